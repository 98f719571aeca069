"""Every INI config snippet of the README and the docs parses, as pasted, with the real config loader.

A snippet is a fenced ```` ```ini ```` block, or any other fenced block with a ``[conf]``, ``[feed]``,
``[fetch]`` or ``[store]`` line (which must then be an ``ini`` block, or a heredoc in a shell block,
as in ``cat >> store.conf <<'EOF'``). A full config is loaded as it is; a fragment (only
``[store]``, only a discover-mode ``[conf]``) is loaded as the user would use it: pasted into a
config, here the README's usage example's config (:data:`BASES` names another where a fragment needs
it), whose sections the fragment lacks are appended after the pasted text. Then every value the
snippet sets is checked against what was loaded: a comment after a value must not become part of it
(issue 17: ``policy = cache   # write: ...`` was an unknown policy, ``path = x   # ...`` a folder name).
"""

from __future__ import annotations

import ast
import re
import textwrap
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from distill_reader.config import ReaderConfig, load_config

pytestmark = pytest.mark.timeout(60)

ROOT = Path(__file__).resolve().parent.parent
DOCUMENTS = sorted(
    [ROOT / "README.md", *(ROOT / "docs").glob("*.md"), *(ROOT / "examples").rglob("*.md")],
)
BASE = "examples/mnist_distill_reader.conf"
#: A fragment's base config where the usage example's does not fit it: docs/store.md's ``[store]``
#: names ``key_var = id``, a feed var of docs/sequences.md's config (the example has img and label);
#: docs/groups.md's ``[store] groups`` names its own config's teacher groups.
BASES = {"docs/store.md": "docs/sequences.md", "docs/groups.md": "docs/groups.md"}
SECTIONS = ("conf", "feed", "fetch", "store")
#: a section header: ``[conf]``, or a teacher group's ``[teacher NAME]``
SECTION_LINE = re.compile(r"^\[(\w+(?: [\w-]+)?)\]\s*$", re.M)
FENCE = re.compile(r"^(?P<indent>[ \t]*)```(?P<lang>[\w+-]*)[ \t]*$")
HEREDOC = re.compile(r"<<-?[ \t]*(['\"]?)(?P<tag>\w+)\1[^\n]*\n(?P<body>.*?)^(?P=tag)[ \t]*$", re.M | re.S)


@dataclass(frozen=True)
class Snippet:
    document: str  # relative to the repository root
    line: int  # of the opening fence
    text: str

    def __str__(self) -> str:
        return f"{self.document}:{self.line}"


def fenced_blocks(path: Path) -> list[tuple[int, str, str]]:
    """``(line, language, dedented text)`` of every fenced block of a Markdown file."""
    blocks = []
    lines = path.read_text(encoding="utf-8").splitlines()
    i = 0
    while i < len(lines):
        match = FENCE.match(lines[i])
        if not match:
            i += 1
            continue
        start, body = i, []
        i += 1
        while i < len(lines) and lines[i].strip() != "```":
            body.append(lines[i])
            i += 1
        blocks.append((start + 1, match["lang"], textwrap.dedent("\n".join(body) + "\n")))
        i += 1
    return blocks


def is_config(text: str) -> bool:
    return any(name in SECTIONS for name in SECTION_LINE.findall(text))


EXAMPLE_SCRIPTS = {path.read_text(encoding="utf-8").strip() for path in (ROOT / "examples").rglob("*.py")}


def snippets() -> list[Snippet]:
    found = []
    for path in DOCUMENTS:
        document = path.relative_to(ROOT).as_posix()
        for line, lang, text in fenced_blocks(path):
            if lang == "ini":
                found.append(Snippet(document, line, text))
            elif is_config(text) and lang == "python" and text.strip() in EXAMPLE_SCRIPTS:
                # A page showing a whole example script, whose config is a template the script fills
                # in: the test that runs that example (test_hf_trainer) loads it for real.
                continue
            elif is_config(text):
                bodies = [m["body"] for m in HEREDOC.finditer(text) if is_config(m["body"])]
                assert lang in ("bash", "sh", "shell") and bodies, (
                    f"{document}:{line}: an INI config in a ```{lang} block; mark it ```ini"
                )
                found.extend(Snippet(document, line, body) for body in bodies)
    return found


SNIPPETS = snippets()


def test_the_snippets_are_found() -> None:
    # The README's example config, its discover-mode [conf] and its [store] (twice: the section and the
    # commands' heredoc), and the docs' configs.
    assert len(SNIPPETS) >= 10, [str(s) for s in SNIPPETS]
    assert sum(s.document == "README.md" for s in SNIPPETS) >= 4
    assert any("[store]" in s.text for s in SNIPPETS if s.document == "docs/store.md")


def sections_of(text: str) -> dict[str, str]:
    """The text of each section of a config (from its header to the next one)."""
    parts = re.split(r"^(?=\[\w+(?: [\w-]+)?\]\s*$)", text, flags=re.M)
    return {SECTION_LINE.match(part)[1]: part for part in parts if SECTION_LINE.match(part)}


def base_text(document: str) -> str:
    source = BASES.get(document)
    if source is None:
        return (ROOT / BASE).read_text(encoding="utf-8")
    full = [
        s.text for s in SNIPPETS if s.document == source and {"conf", "feed", "fetch"} <= sections_of(s.text).keys()
    ]
    assert full, f"no full config in {source}"
    return full[0]


def pasted(snippet: Snippet) -> str:
    """The config a user gets by pasting the snippet: a fragment completed with its base's other sections."""
    have = sections_of(snippet.text)
    if {"conf", "feed", "fetch"} <= have.keys():
        return snippet.text
    rest = [text for name, text in sections_of(base_text(snippet.document)).items() if name not in have]
    return snippet.text.rstrip("\n") + "\n\n" + "\n".join(rest)


def files_named(config_text: str, folder: Path) -> None:
    """Create the token and TLS files a snippet names (relative to the config's folder)."""
    from security_support import make_pki

    wanted = dict(re.findall(r"^(token_file|tls_ca|tls_cert|tls_key)\s*=\s*(\S+)", config_text, flags=re.M))
    if not wanted:
        return
    pki = make_pki(folder / "pki")
    sources = {"tls_ca": pki.ca, "tls_cert": pki.client_cert, "tls_key": pki.client_key}
    for key, name in wanted.items():
        target = folder / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if key == "token_file":
            target.write_text("a-token-of-the-snippet\n")
        else:
            target.write_bytes(sources[key].read_bytes())


def written_values(text: str) -> dict[tuple[str, str], str]:
    """``(section, key) -> value`` as the snippet writes it, up to its comment. Independent of the
    loader on purpose: a value here ends at whitespace followed by ``#`` or ``;`` (the docs quote
    no value holding one)."""
    values: dict[tuple[str, str], str] = {}
    section = ""
    for line in text.splitlines():
        header = SECTION_LINE.match(line)
        if header:
            section = header[1]
            continue
        match = re.match(r"^(\w+)\s*=(.*)$", line)
        if match:
            values[(section, match[1])] = re.split(r"\s[#;]", " " + match[2], maxsplit=1)[0].strip()
    return values


def word(text: str) -> object:
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def shapes(text: str) -> list[tuple[int, ...]]:
    return [(s,) if isinstance(s, int) else tuple(s) for s in ast.literal_eval(text)]


def loaded_value(config: ReaderConfig, section: str, key: str, values: dict) -> tuple[object, object]:
    """``(what the loader made of the key, what the snippet's text says it is)``."""
    raw = values[(section, key)]
    if section.startswith("teacher "):
        group = next(g for g in config.groups if g.name == section.split()[1])
        if key in ("servers", "predict_feed_ids"):
            return getattr(group, key), tuple(ast.literal_eval(raw))
        if key == "require_num":
            return group.require_num, int(raw)
        if key == "host":
            return group.discovery, tuple(h.strip() for h in str(word(raw)).split(","))
        return getattr(group, key), word(raw)
    feeds = {"feed": config.feeds, "fetch": config.fetches}.get(section, ())
    if key in ("mode", "service_name", "model_name", "shared_memory", "protocol"):
        return getattr(config, key), word(raw)
    if key in ("require_num", "max_length"):
        return getattr(config, key), int(raw)
    if key == "servers":
        return config.servers, tuple(ast.literal_eval(raw))
    if key == "host":
        port = values.get(("conf", "port"))
        hosts = [h.strip() for h in str(word(raw)).split(",")]
        return config.discovery, tuple(h if ":" in h else f"{h}:{port}" for h in hosts)
    if key == "port":
        return {e.rsplit(":", 1)[1] for e in config.discovery} >= {raw}, True
    if key.endswith("_vars"):
        return [s.name for s in feeds], ast.literal_eval(raw)
    if key.endswith("_types"):
        return [s.dtype for s in feeds], [np.dtype(t) for t in ast.literal_eval(raw)]
    if key.endswith("_shapes"):
        return [s.shape for s in feeds], shapes(raw)
    if key == "predict_feed_ids":
        return config.predict_feed_ids, tuple(ast.literal_eval(raw))
    if key == "report_to":
        return config.report_to, tuple(h.strip() for h in str(word(raw)).split(","))
    if key == "token_file":
        return config.token is not None and config.token.reveal(), "a-token-of-the-snippet"
    if key in ("tls_ca", "tls_cert", "tls_key"):
        return config.tls is not None, True
    assert config.store is not None
    if key == "path":
        return config.store.path.name, Path(str(word(raw))).name
    if key == "policy":
        return config.store.policy, word(raw)
    if key == "precision":
        return config.store.precision, word(raw)
    if key == "key_var":
        return config.store.key_var, word(raw)
    if key == "groups":
        return config.store.groups, tuple(ast.literal_eval(raw))
    raise AssertionError(f"[{section}] {key}: not checked by this test; add it to loaded_value")


@pytest.mark.parametrize("snippet", SNIPPETS, ids=str)
def test_snippet_parses_as_pasted(snippet: Snippet, tmp_path: Path) -> None:
    text = pasted(snippet)
    files_named(text, tmp_path)
    path = tmp_path / "pasted.conf"
    path.write_text(text, encoding="utf-8")
    config = load_config(path)
    values = written_values(snippet.text)
    assert values, f"{snippet}: no key = value line"
    for section, key in values:
        got, expected = loaded_value(config, section, key, values)
        assert got == expected, f"{snippet}: [{section}] {key}: loaded {got!r}, the snippet says {expected!r}"
    if config.store is not None:
        assert config.store.path.parent == tmp_path, f"{snippet}: [store] path {config.store.path}"
        assert not re.search(r"[#;\s]", config.store.path.name), f"{snippet}: [store] path {config.store.path}"
