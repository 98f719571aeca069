"""The reader's INI config (the seed's format) parsed into a typed, validated :class:`ReaderConfig`.

Values are Python literals (``['img', 'label']``, ``[(1, 28, 28), (1,)]``); plain words are accepted
for string keys (``mode = fixed``). ``#`` or ``;`` after whitespace starts a comment, after a value
too (``policy = cache   # ask only for what is missing``), except inside a quoted string
(``path = 'run #3'``). Every error is a :class:`~distill_reader.errors.ConfigError`
whose message names the section and key.

Internal: not public API (the public surface is what ``distill_reader`` exports; docs/architecture.md).
The file format is the contract (README's config reference), not this module's names.
"""

from __future__ import annotations

import ast
import configparser
import dataclasses
import difflib
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from distill_reader.errors import ConfigError
from distill_reader.oip import SUPPORTED_DTYPES, TensorSpec
from distill_reader.rpc import split_hostport
from distill_reader.security import Secret, TlsFiles, load_tls, read_token_file

MODES = ("fixed", "discover")
#: ``[store] policy``: see docs/store.md
STORE_POLICIES = ("write", "read", "cache")
#: ``[store] precision``: top-k knowledge kept as the teacher sent it, or compact (docs/store.md)
STORE_PRECISIONS = ("exact", "compact")
SHARED_MEMORY_MODES = ("auto", "on", "off")
#: ``[conf] protocol``: how the reader talks to teachers (``openai``: docs/llm.md)
PROTOCOLS = ("oip", "openai")
DEFAULT_MODEL_NAME = "teacher"
#: Every section and key :func:`load_config` reads. Anything else is refused, so that a typo
#: (``reqire_num``, ``[stor]``) fails loudly instead of being ignored.
KNOWN_KEYS: dict[str, tuple[str, ...]] = {
    "conf": (
        "mode",
        "servers",
        "host",
        "port",
        "service_name",
        "require_num",
        "model_name",
        "max_length",
        "serving_conf_file",
        "token_file",
        "tls_ca",
        "tls_cert",
        "tls_key",
        "shared_memory",
        "report_to",
        "protocol",
    ),
    "feed": ("feed_vars", "feed_types", "feed_shapes", "predict_feed_ids"),
    "fetch": ("fetch_vars", "fetch_types", "fetch_shapes"),
    "store": ("path", "policy", "key_var", "precision", "groups"),
    #: ``[teacher NAME]``: a teacher group (docs/groups.md); every section named ``teacher <name>``
    "teacher": (
        "servers",
        "host",
        "port",
        "service_name",
        "require_num",
        "model_name",
        "protocol",
        "predict_feed_ids",
    ),
}
#: ``[teacher NAME]``: a group's name: its fetch vars are ``NAME.OUTPUT``, so no dot
GROUP_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_-]*")
#: ``[conf]`` keys that name one teacher set: with teacher groups, each group names its own
_GROUP_ONLY_KEYS = ("servers", "service_name", "require_num")


@dataclass(frozen=True)
class TeacherGroup:
    """``[teacher NAME]``: one teacher model every sample also goes to (docs/groups.md)."""

    name: str
    #: fixed mode: the group's teachers' ``host:port`` addresses
    servers: tuple[str, ...]
    #: discover mode: the discovery servers (the group's ``host``, else ``[conf] host``)
    discovery: tuple[str, ...]
    service_name: str | None
    require_num: int
    model_name: str
    protocol: str
    #: indices into ``[feed] feed_vars`` of the inputs this group's model takes
    predict_feed_ids: tuple[int, ...]
    #: indices into the config's fetch vars of the group's outputs (those named ``NAME.OUTPUT``)
    fetch_ids: tuple[int, ...]


@dataclass(frozen=True)
class StoreConfig:
    """``[store]``: the knowledge store of teacher outputs (docs/store.md)."""

    #: the store's directory (relative paths are relative to the config file's folder)
    path: Path
    #: ``write`` (ask the teachers, record every row), ``read`` (never ask a teacher) or ``cache``
    policy: str
    #: the feed var whose value identifies a sample; None: its position in the epoch
    key_var: str | None = None
    #: ``exact`` (the teacher's outputs as they are) or ``compact`` (top-k pairs quantized, docs/store.md)
    precision: str = "exact"
    #: the teacher groups whose outputs the store keeps (None: all); the others are always asked live
    groups: tuple[str, ...] | None = None


@dataclass(frozen=True)
class ReaderConfig:
    """Everything the reader needs from the config file, validated."""

    mode: str
    #: fixed mode: the teachers' ``host:port`` addresses.
    servers: tuple[str, ...]
    #: discover mode: the discovery servers' ``host:port`` addresses.
    discovery: tuple[str, ...]
    service_name: str | None
    require_num: int
    #: the model's name on the teacher servers.
    model_name: str
    #: every field of a training sample, in the order the user's reader yields them.
    feeds: tuple[TensorSpec, ...]
    #: indices into ``feeds`` of the fields the teacher takes as inputs.
    predict_feed_ids: tuple[int, ...]
    #: the teacher outputs wanted.
    fetches: tuple[TensorSpec, ...]
    #: config var name -> tensor name on the teacher (from ``serving_conf_file``; identity otherwise).
    served_names: dict[str, str] = field(default_factory=dict)
    #: ``[conf] token_file``'s token, sent to discovery and to teachers (its repr never shows it).
    token: Secret | None = field(default=None, repr=False)
    #: ``[conf] tls_ca``/``tls_cert``/``tls_key``: TLS for teacher and discovery connections.
    tls: TlsFiles | None = field(default=None, repr=False)
    #: ``[conf] max_length``: the bound of every variable (``-1``) dimension; None without any.
    max_length: int | None = None
    #: ``[store]``: teacher outputs recorded or reused (None: every row goes to a teacher)
    store: StoreConfig | None = None
    #: ``[conf] shared_memory``: ``auto`` (a teacher on this host that announces the OIP system
    #: shared-memory extension maps the pool), ``on`` (a teacher must), ``off`` (tensors over gRPC).
    shared_memory: str = "auto"
    #: ``[conf] report_to``: fixed mode, the discovery servers to report this reader's figures to
    #: (discover mode reports to its own discovery servers).
    report_to: tuple[str, ...] = ()
    #: the student's id with discovery and in its reports; set by DistillReader, not from the file
    student_id: str | None = None
    #: ``[conf] protocol``: ``oip`` (Open Inference Protocol over gRPC) or ``openai`` (an OpenAI-compatible
    #: server's completions API with prompt log-probs, e.g. vLLM); in discover mode, for teachers whose
    #: registration names none
    protocol: str = "oip"
    #: ``[teacher NAME]`` sections: several teachers per sample; empty: one teacher set, from ``[conf]``
    groups: tuple[TeacherGroup, ...] = ()

    def group_views(self) -> tuple[tuple[str | None, ReaderConfig, tuple[int, ...]], ...]:
        """Per teacher group: its name, the config its teachers are asked with (its servers or
        service, model, protocol, inputs, and its fetch vars only, asked for by their ``OUTPUT``
        names) and the indices of its fetch vars in :attr:`fetches`. Without groups: one, this
        config itself, unnamed."""
        if not self.groups:
            return ((None, self, tuple(range(len(self.fetches)))),)
        return tuple((group.name, self._group_view(group), group.fetch_ids) for group in self.groups)

    def _group_view(self, group: TeacherGroup) -> ReaderConfig:
        fetches = tuple(self.fetches[j] for j in group.fetch_ids)
        served = dict(self.served_names)
        for spec in fetches:
            output = spec.name[len(group.name) + 1 :]
            served.setdefault(spec.name, self.served_names.get(output, output))
        return dataclasses.replace(
            self,
            servers=group.servers,
            discovery=group.discovery,
            service_name=group.service_name,
            require_num=group.require_num,
            model_name=group.model_name,
            protocol=group.protocol,
            predict_feed_ids=group.predict_feed_ids,
            fetches=fetches,
            served_names=served,
            store=None,
            groups=(),
        )

    def stored_view(self) -> tuple[ReaderConfig, tuple[int, ...]]:
        """The config the knowledge store is kept with (``[store] groups``: only those groups'
        outputs and inputs) and the indices into :attr:`fetches` of the fetch vars it keeps."""
        if self.store is None or self.store.groups is None:
            return self, tuple(range(len(self.fetches)))
        kept = [g for g in self.groups if g.name in self.store.groups]
        fetch_ids = tuple(j for g in kept for j in g.fetch_ids)
        renumber = {j: k for k, j in enumerate(fetch_ids)}
        view = dataclasses.replace(
            self,
            fetches=tuple(self.fetches[j] for j in fetch_ids),
            predict_feed_ids=tuple(dict.fromkeys(i for g in kept for i in g.predict_feed_ids)),
            groups=tuple(dataclasses.replace(g, fetch_ids=tuple(renumber[j] for j in g.fetch_ids)) for g in kept),
        )
        return view, fetch_ids

    def fetch_length_source(self, fetch: int) -> int | None:
        """The feed var whose row lengths fetch var ``fetch``'s variable dimensions take: the
        first variable var its teacher (its group's, with groups) is given."""
        group = next((g for g in self.groups if fetch in g.fetch_ids), None)
        ids = group.predict_feed_ids if group is not None else self.predict_feed_ids
        return next((i for i in ids if self.feeds[i].variable), None)

    @property
    def predict_feeds(self) -> tuple[TensorSpec, ...]:
        return tuple(self.feeds[i] for i in self.predict_feed_ids)

    def served_name(self, var_name: str) -> str:
        return self.served_names.get(var_name, var_name)

    @property
    def variable_feeds(self) -> tuple[int, ...]:
        """Indices into ``feeds`` of the vars with a variable dimension (each has a length per row)."""
        return tuple(i for i, spec in enumerate(self.feeds) if spec.variable)

    @property
    def length_specs(self) -> tuple[TensorSpec, ...]:
        """The ``<var>_length`` arrays that end a batch: one int64 per row per variable feed var."""
        return tuple(TensorSpec(f"{self.feeds[i].name}_length", np.dtype(np.int64), ()) for i in self.variable_feeds)

    @property
    def length_source(self) -> int | None:
        """The feed var whose row lengths the fetch vars' variable dimensions take (the first variable
        var the teacher is given), or None when no var is variable."""
        return next((i for i in self.predict_feed_ids if self.feeds[i].variable), None)

    @property
    def pool_specs(self) -> tuple[TensorSpec, ...]:
        """What a batch slot holds, in batch order: feeds, fetches (variable dimensions at
        ``max_length``), then the length arrays."""
        vars_ = (*self.feeds, *self.fetches)
        if self.max_length is not None:
            vars_ = tuple(spec.with_length(self.max_length) for spec in vars_)
        return (*vars_, *self.length_specs)


def parse_endpoint(text: str, what: str) -> str:
    """Validate a ``host:port`` string; ``what`` names it in the error."""
    text = str(text).strip()
    if split_hostport(text) is None:
        raise ConfigError(f"{what}: {text!r} is not a 'host:port' address")
    return text


class _Section:
    """Reads typed values of one INI section; errors name ``[section] key``."""

    def __init__(self, parser: configparser.ConfigParser, name: str, path: str) -> None:
        if not parser.has_section(name):
            raise ConfigError(f"{path}: missing section [{name}]")
        self.name = name
        #: the KNOWN_KEYS entry: ``teacher`` for every ``[teacher NAME]``
        self.kind = "teacher" if name.startswith("teacher ") else name
        self.items = parser[name]

    def where(self, key: str) -> str:
        return f"[{self.name}] {key}"

    def has(self, key: str) -> bool:
        # A key read here but missing from KNOWN_KEYS would be refused in every user's config.
        assert key in KNOWN_KEYS[self.kind], f"[{self.name}] {key} is read but not listed in KNOWN_KEYS"
        return key in self.items and self.items[key].strip() != ""

    def raw(self, key: str) -> str:
        if not self.has(key):
            raise ConfigError(f"{self.where(key)}: missing key")
        return self.items[key].strip()

    def literal(self, key: str) -> Any:
        text = self.raw(key)
        try:
            return ast.literal_eval(text)
        except (ValueError, SyntaxError) as exc:
            raise ConfigError(f"{self.where(key)}: cannot parse {text!r} as a Python literal ({exc})") from None

    def string(self, key: str) -> str:
        text = self.raw(key)
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            return text  # a bare word such as `fixed`
        if not isinstance(value, str):
            raise ConfigError(f"{self.where(key)}: expected a string, got {text!r}")
        return value

    def integer(self, key: str) -> int:
        value = self.literal(key)
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{self.where(key)}: expected an integer, got {self.raw(key)!r}")
        return value

    def str_list(self, key: str) -> list[str]:
        value = self.literal(key)
        if isinstance(value, str) or not isinstance(value, (list, tuple)):
            raise ConfigError(f"{self.where(key)}: expected a list, got {self.raw(key)!r}")
        for item in value:
            if not isinstance(item, str) or not item:
                raise ConfigError(f"{self.where(key)}: every entry must be a non-empty string, got {item!r}")
        return list(value)

    def shape_list(self, key: str) -> list[tuple[int, ...]]:
        value = self.literal(key)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{self.where(key)}: expected a list of shapes, got {self.raw(key)!r}")
        return [self._shape(key, i, shape) for i, shape in enumerate(value)]

    def _shape(self, key: str, index: int, shape: Any) -> tuple[int, ...]:
        if isinstance(shape, int) and not isinstance(shape, bool):
            shape = (shape,)  # `10` instead of `(10,)`: the seed's guide warns about this typo
        if not isinstance(shape, (list, tuple)):
            raise ConfigError(f"{self.where(key)}[{index}]: expected a shape such as (1, 28, 28), got {shape!r}")
        for dim in shape:
            if isinstance(dim, bool) or not isinstance(dim, int):
                raise ConfigError(f"{self.where(key)}[{index}]: dimension {dim!r} is not an integer")
            if dim < 1 and dim != -1:
                raise ConfigError(
                    f"{self.where(key)}[{index}]: dimension {dim} must be >= 1, or -1 for a variable length"
                )
        return tuple(shape)


def _specs(section: _Section, prefix: str) -> tuple[TensorSpec, ...]:
    names = section.str_list(f"{prefix}_vars")
    types = section.str_list(f"{prefix}_types")
    shapes = section.shape_list(f"{prefix}_shapes")
    if not names:
        raise ConfigError(f"{section.where(prefix + '_vars')}: the list is empty")
    if not len(names) == len(types) == len(shapes):
        raise ConfigError(
            f"[{section.name}]: {prefix}_vars, {prefix}_types and {prefix}_shapes have different lengths "
            f"({len(names)}, {len(types)}, {len(shapes)})"
        )
    if len(set(names)) != len(names):
        raise ConfigError(f"{section.where(prefix + '_vars')}: duplicate names in {names}")
    specs = []
    for name, dtype, shape in zip(names, types, shapes):
        if dtype not in SUPPORTED_DTYPES:
            raise ConfigError(
                f"{section.where(prefix + '_types')}: unknown dtype {dtype!r} for {name!r}; "
                f"supported: {', '.join(SUPPORTED_DTYPES)}"
            )
        specs.append(TensorSpec(name, np.dtype(dtype), shape))
    return tuple(specs)


def load_config(conf_file: str | os.PathLike[str]) -> ReaderConfig:
    """Parse and validate the reader's config file."""
    path = Path(conf_file)
    # No DEFAULT section: its keys would silently appear in every section. `[DEFAULT]` is then an
    # ordinary (unknown) section.
    parser = configparser.ConfigParser(interpolation=None, default_section="\0no default section")
    try:
        with path.open(encoding="utf-8") as fh:
            parser.read_file(fh)
    except OSError as exc:
        raise ConfigError(f"cannot read config file {str(path)!r}: {exc.strerror or exc}") from None
    except configparser.Error as exc:
        raise ConfigError(f"{path}: not a valid INI file: {exc}") from None
    _strip_inline_comments(parser)
    _refuse_unknown(parser)

    conf = _Section(parser, "conf", str(path))
    feed = _Section(parser, "feed", str(path))
    fetch = _Section(parser, "fetch", str(path))

    mode = conf.string("mode")
    if mode not in MODES:
        raise ConfigError(f"[conf] mode: unknown mode {mode!r}; expected one of {', '.join(MODES)}")
    group_sections = [_Section(parser, name, str(path)) for name in parser.sections() if name.startswith("teacher ")]
    servers: tuple[str, ...] = ()
    discovery: tuple[str, ...] = ()
    service_name = None
    require_num = 0
    if not group_sections:
        servers, discovery, service_name, require_num = _teacher_set(conf, conf, mode)
    else:
        for key in _GROUP_ONLY_KEYS:
            if conf.has(key):
                raise ConfigError(
                    f"[conf] {key}: this config has teacher groups ([{group_sections[0].name}]); "
                    f"each [teacher NAME] section names its own {key}"
                )
        if mode == "discover":
            discovery = _discovery_endpoints(conf) if conf.has("host") else ()

    model_name = conf.string("model_name") if conf.has("model_name") else DEFAULT_MODEL_NAME
    feeds = _specs(feed, "feed")
    fetches = _specs(fetch, "fetch")
    ids: tuple[int, ...] = ()
    if not group_sections or feed.has("predict_feed_ids"):
        ids = _predict_ids(feed, feeds)
    shared_memory = conf.string("shared_memory") if conf.has("shared_memory") else "auto"
    if shared_memory not in SHARED_MEMORY_MODES:
        raise ConfigError(f"[conf] shared_memory: {shared_memory!r} is not one of {', '.join(SHARED_MEMORY_MODES)}")
    protocol = _protocol(conf, shared_memory, "oip")
    groups = _groups(group_sections, conf, mode, feeds, fetches, ids, model_name, protocol, shared_memory)
    if groups:  # the vars any group's teacher is given, in the order first named
        ids = tuple(dict.fromkeys(i for group in groups for i in group.predict_feed_ids))

    max_length = _max_length(conf, feeds, fetches, ids, groups)

    served_names: dict[str, str] = {}
    if conf.has("serving_conf_file"):
        serving_path = Path(conf.string("serving_conf_file"))
        if not serving_path.is_absolute():
            serving_path = path.parent / serving_path
        from distill_reader.teacher.paddle_serving import load_alias_map

        served_names = load_alias_map(serving_path)
    token = (
        read_token_file(_conf_path(conf, "token_file", path), "[conf] token_file") if conf.has("token_file") else None
    )
    tls = load_tls(
        *(_conf_path(conf, key, path) if conf.has(key) else None for key in ("tls_ca", "tls_cert", "tls_key")),
        names=("[conf] tls_ca", "[conf] tls_cert", "[conf] tls_key"),
    )
    report_to: tuple[str, ...] = ()
    if conf.has("report_to"):
        if mode != "fixed":
            raise ConfigError("[conf] report_to: fixed mode only (discover mode reports to its discovery servers)")
        report_to = tuple(parse_endpoint(h, "[conf] report_to") for h in conf.string("report_to").split(",") if h)
    config = ReaderConfig(
        mode=mode,
        servers=servers,
        discovery=discovery,
        service_name=service_name,
        require_num=require_num,
        model_name=model_name,
        feeds=feeds,
        predict_feed_ids=tuple(ids),
        fetches=fetches,
        served_names=served_names,
        token=token,
        tls=tls,
        max_length=max_length,
        store=_store(parser, path, feeds, groups),
        shared_memory=shared_memory,
        report_to=report_to,
        protocol=protocol,
        groups=groups,
    )
    for name, view, _ in config.group_views():
        if view.protocol == "openai":
            from distill_reader.teacher.openai import openai_layout

            try:
                openai_layout(view)
            except ValueError as exc:
                where = "[conf]" if name is None else f"[teacher {name}]"
                raise ConfigError(f"{where} protocol = openai: {exc}") from None
    return config


def _teacher_set(
    section: _Section, conf: _Section, mode: str
) -> tuple[tuple[str, ...], tuple[str, ...], str | None, int]:
    """The teachers ``section`` (``[conf]`` or a ``[teacher NAME]``) names: fixed mode, its
    ``servers``; discover mode, the discovery servers (its ``host``, else ``[conf] host``), its
    ``service_name`` and ``require_num``."""
    if mode == "fixed":
        if section is not conf:
            _refuse_keys(section, ("service_name", "require_num", "host", "port"), "discover")
        entries = section.str_list("servers")
        if not entries:
            raise ConfigError(
                f"{section.where('servers')}: the list is empty; fixed mode needs at least one 'host:port'"
            )
        return tuple(parse_endpoint(s, section.where("servers")) for s in entries), (), None, 0
    if section is not conf:
        _refuse_keys(section, ("servers",), "fixed")
    discovery = _discovery_endpoints(section if section.has("host") else conf)
    service_name = section.string("service_name")
    require_num = section.integer("require_num")
    if require_num < 1:
        raise ConfigError(f"{section.where('require_num')}: must be >= 1, got {require_num}")
    return (), discovery, service_name, require_num


def _refuse_keys(section: _Section, keys: Sequence[str], mode: str) -> None:
    for key in keys:
        if section.has(key):
            raise ConfigError(f"{section.where(key)}: for mode = {mode}; this config's [conf] mode is not {mode}")


def _predict_ids(section: _Section, feeds: Sequence[TensorSpec]) -> tuple[int, ...]:
    """``predict_feed_ids`` of ``section``: indices into ``[feed] feed_vars``."""
    where = section.where("predict_feed_ids")
    ids = section.literal("predict_feed_ids")
    if not isinstance(ids, (list, tuple)) or not ids:
        raise ConfigError(f"{where}: expected a non-empty list of indices, got {ids!r}")
    for i in ids:
        if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < len(feeds):
            raise ConfigError(
                f"{where}: {i!r} is out of range; feed_vars has {len(feeds)} entries (valid ids 0..{len(feeds) - 1})"
            )
    if len(set(ids)) != len(ids):
        raise ConfigError(f"{where}: duplicate ids in {list(ids)}")
    return tuple(ids)


def _groups(
    sections: Sequence[_Section],
    conf: _Section,
    mode: str,
    feeds: Sequence[TensorSpec],
    fetches: Sequence[TensorSpec],
    default_ids: tuple[int, ...],
    default_model: str,
    default_protocol: str,
    shared_memory: str,
) -> tuple[TeacherGroup, ...]:
    """The ``[teacher NAME]`` sections; every fetch var is then ``NAME.OUTPUT`` of one of them."""
    if not sections:
        return ()
    names = []
    for section in sections:
        name = section.name[len("teacher ") :].strip()
        if not GROUP_NAME.fullmatch(name):
            raise ConfigError(
                f"[{section.name}]: a teacher group's name is a letter or '_' then letters, digits, '_' or '-' "
                f"(no '.': its fetch vars are named NAME.OUTPUT), got {name!r}"
            )
        if name in names:  # ``[teacher a]`` and ``[teacher  a]``: two groups writing one group's fetch vars
            first = sections[names.index(name)].name
            raise ConfigError(f"[{section.name}]: the teacher group {name!r} is also [{first}]; name each group once")
        names.append(name)
    fetch_ids: dict[str, list[int]] = {name: [] for name in names}
    for j, spec in enumerate(fetches):
        group, dot, output = spec.name.partition(".")
        if not dot or group not in fetch_ids or not output:
            raise ConfigError(
                f"[fetch] fetch_vars: {spec.name!r} names no teacher group; with [teacher NAME] sections every "
                f"fetch var is NAME.OUTPUT (its group, then its model's output), groups: {', '.join(names)}"
            )
        fetch_ids[group].append(j)
    groups = []
    for name, section in zip(names, sections):
        if not fetch_ids[name]:
            raise ConfigError(
                f"[{section.name}]: no fetch var is this group's; name its outputs in [fetch] fetch_vars as "
                f"'{name}.OUTPUT'"
            )
        servers, discovery, service_name, require_num = _teacher_set(section, conf, mode)
        if section.has("predict_feed_ids"):
            ids = _predict_ids(section, feeds)
        elif default_ids:
            ids = default_ids
        else:
            raise ConfigError(
                f"{section.where('predict_feed_ids')}: missing key (and [feed] has no predict_feed_ids for "
                "the groups without their own)"
            )
        groups.append(
            TeacherGroup(
                name=name,
                servers=servers,
                discovery=discovery,
                service_name=service_name,
                require_num=require_num,
                model_name=section.string("model_name") if section.has("model_name") else default_model,
                protocol=_protocol(section, shared_memory, default_protocol),
                predict_feed_ids=ids,
                fetch_ids=tuple(fetch_ids[name]),
            )
        )
    return tuple(groups)


def _protocol(section: _Section, shared_memory: str, default: str) -> str:
    """``protocol`` of ``[conf]`` or a group (``default`` when it has none); ``openai`` has no
    shared memory to turn on."""
    protocol = section.string("protocol") if section.has("protocol") else default
    if protocol not in PROTOCOLS:
        raise ConfigError(f"{section.where('protocol')}: {protocol!r} is not one of {', '.join(PROTOCOLS)}")
    if protocol == "openai" and shared_memory == "on":
        where = "" if section.name == "conf" else f" ([{section.name}])"
        raise ConfigError(
            f"[conf] shared_memory = on: an OpenAI-compatible teacher (protocol = openai{where}) has none"
        )
    return protocol


def _store(
    parser: configparser.ConfigParser,
    config_path: Path,
    feeds: Sequence[TensorSpec],
    teacher_groups: Sequence[TeacherGroup] = (),
) -> StoreConfig | None:
    """The optional ``[store]`` section."""
    if not parser.has_section("store"):
        return None
    section = _Section(parser, "store", str(config_path))
    text = section.string("path")
    if "://" in text:
        raise ConfigError(
            f"[store] path: {text!r} is a URL; the knowledge store is a directory, local or on a shared file system"
        )
    folder = Path(text).expanduser()
    policy = section.string("policy")
    if policy not in STORE_POLICIES:
        raise ConfigError(f"[store] policy: unknown policy {policy!r}; expected one of {', '.join(STORE_POLICIES)}")
    key_var = None
    if section.has("key_var"):
        key_var = section.string("key_var")
        spec = next((s for s in feeds if s.name == key_var), None)
        if spec is None:
            names = ", ".join(s.name for s in feeds)
            raise ConfigError(f"[store] key_var: {key_var!r} is not a feed var; [feed] feed_vars are {names}")
        if spec.variable or spec.dtype.kind not in "iu" or spec.sample_nbytes != spec.dtype.itemsize:
            raise ConfigError(
                f"[store] key_var: {key_var!r} must hold one integer per sample (an integer feed var of shape () or "
                f"(1,)); it is {spec.dtype.name} of shape {spec.shape}"
            )
    precision = section.string("precision") if section.has("precision") else "exact"
    if precision not in STORE_PRECISIONS:
        raise ConfigError(
            f"[store] precision: unknown precision {precision!r}; expected one of {', '.join(STORE_PRECISIONS)}"
        )
    groups = _stored_groups(section, feeds, teacher_groups)
    return StoreConfig(
        folder if folder.is_absolute() else config_path.parent / folder, policy, key_var, precision, groups
    )


def _stored_groups(
    section: _Section, feeds: Sequence[TensorSpec], teacher_groups: Sequence[TeacherGroup]
) -> tuple[str, ...] | None:
    """``[store] groups``: the teacher groups whose outputs the store keeps (None: every one)."""
    names = [g.name for g in teacher_groups]
    if section.has("groups"):
        if not teacher_groups:
            raise ConfigError("[store] groups: this config has no teacher groups ([teacher NAME] sections)")
        wanted = section.str_list("groups")
        if not wanted:
            raise ConfigError(f"[store] groups: the list is empty; name some of the groups {', '.join(names)}")
        for name in wanted:
            if name not in names:
                raise ConfigError(f"[store] groups: {name!r} is not a teacher group; the groups are {', '.join(names)}")
        kept = [g for g in teacher_groups if g.name in wanted]
    else:
        kept = list(teacher_groups)
    # The store keeps one length per row for its variable outputs: they must all take it from one var.
    sources = {next((i for i in g.predict_feed_ids if feeds[i].variable), None) for g in kept}
    if len(sources - {None}) > 1:
        raise ConfigError(
            "[store]: the stored groups' teachers take their first variable-length input from different feed "
            f"vars ({', '.join(sorted(feeds[i].name for i in sources - {None}))}); keep them in separate stores "
            "([store] groups) or give them the same first variable input"
        )
    return tuple(wanted) if section.has("groups") else None


def _max_length(
    conf: _Section,
    feeds: tuple[TensorSpec, ...],
    fetches: tuple[TensorSpec, ...],
    ids: Sequence[int],
    groups: Sequence[TeacherGroup] = (),
) -> int | None:
    """``[conf] max_length``, required when a var has a variable dimension; checks how such vars fit."""
    variable = [spec for spec in (*feeds, *fetches) if spec.variable]
    if not conf.has("max_length"):
        if variable:
            section = "feed" if variable[0] in feeds else "fetch"
            raise ConfigError(
                f"[conf] max_length: missing key; [{section}] var {variable[0].name!r} has a variable dimension "
                f"(-1), and max_length bounds it (it sizes the pool)"
            )
        return None
    max_length = conf.integer("max_length")
    if max_length < 1:
        raise ConfigError(f"[conf] max_length: must be >= 1, got {max_length}")
    for where, group_fetches, group_ids in [
        (f"[teacher {g.name}]", [fetches[j] for j in g.fetch_ids], g.predict_feed_ids) for g in groups
    ] or [("[feed]", list(fetches), ids)]:
        if any(spec.variable for spec in group_fetches) and not any(feeds[i].variable for i in group_ids):
            name = next(spec.name for spec in group_fetches if spec.variable)
            raise ConfigError(
                f"[fetch] var {name!r} has a variable dimension, but no var in {where} predict_feed_ids has one: "
                "a fetch var's variable dimension takes the length of the first variable feed var the teacher gets"
            )
    names = {spec.name for spec in feeds}
    for spec in feeds:
        if spec.variable and f"{spec.name}_length" in names:
            raise ConfigError(
                f"[feed] feed_vars: {spec.name + '_length'!r} is the name of {spec.name!r}'s length array; "
                "rename one of them"
            )
    return max_length


#: What starts a comment after a value (after whitespace, outside a quoted string); also a whole
#: line (configparser's default ``comment_prefixes``).
INLINE_COMMENT_PREFIXES = ("#", ";")
_STRING_PREFIXES = frozenset({"", "r", "u", "b", "br", "rb", "f", "fr", "rf"})


def strip_inline_comment(value: str) -> str:
    """``value`` without its comments: from a ``#`` or ``;`` that follows whitespace (or starts a
    line) to the end of its line, unless it is inside a quoted Python string, so that
    ``['h:1', 'h:2']  # two teachers`` and ``'run #3'  ; a path`` keep their values. A quote
    opens a string only where a Python string can start (not the apostrophe of ``bob's``)."""
    lines = []
    quote = ""  # the open string's quote (one character or three), carried over continuation lines
    for line in value.split("\n"):
        end = len(line)
        i = 0
        while i < len(line):
            char = line[i]
            if quote:
                if char == "\\":
                    i += 2
                    continue
                if line.startswith(quote, i):
                    i += len(quote)
                    quote = ""
                    continue
            elif char in "'\"":
                start = i
                while start > 0 and (line[start - 1].isalnum() or line[start - 1] == "_"):
                    start -= 1
                if line[start:i].lower() in _STRING_PREFIXES:
                    quote = char * 3 if line.startswith(char * 3, i) else char
                    i += len(quote)
                    continue
            elif char in INLINE_COMMENT_PREFIXES and (i == 0 or line[i - 1].isspace()):
                end = i
                break
            i += 1
        if len(quote) == 1:
            quote = ""  # a one-quote string ends with its line (an unterminated literal fails later)
        lines.append(line[:end].rstrip())
    return "\n".join(lines).strip()


def _strip_inline_comments(parser: configparser.ConfigParser) -> None:
    """Remove every value's comments (:func:`strip_inline_comment`), in place."""
    for section in parser.sections():
        for key, value in parser.items(section, raw=True):
            parser.set(section, key, strip_inline_comment(value))


def _nearest(word: str, choices: Iterable[str]) -> str | None:
    """The known name closest to a misspelt ``word``, if any is close."""
    close = difflib.get_close_matches(word, list(choices), n=1)
    return close[0] if close else None


def _refuse_unknown(parser: configparser.ConfigParser) -> None:
    """ConfigError for a section or key that :data:`KNOWN_KEYS` does not list, naming the nearest known one."""
    for section in parser.sections():
        kind = "teacher" if section.startswith("teacher ") else section
        if section == "teacher":
            raise ConfigError("[teacher]: a teacher group needs a name, [teacher NAME] (docs/groups.md)")
        if kind not in KNOWN_KEYS:
            nearest = _nearest(section, KNOWN_KEYS)
            hint = f"did you mean [{nearest}]? " if nearest else ""
            known = ", ".join("[teacher NAME]" if s == "teacher" else f"[{s}]" for s in KNOWN_KEYS)
            raise ConfigError(f"[{section}]: unknown section; {hint}known sections are {known}")
        for key in parser[section]:
            if key in KNOWN_KEYS[kind]:
                continue
            home = next((s for s, keys in KNOWN_KEYS.items() if key in keys), None)
            nearest = _nearest(key, KNOWN_KEYS[kind])
            if home:
                hint = f"it belongs in [{'teacher NAME' if home == 'teacher' else home}]"
            elif nearest:
                hint = f"did you mean {nearest}?"
            else:
                hint = f"known keys of [{section}] are {', '.join(KNOWN_KEYS[kind])}"
            raise ConfigError(f"[{section}] {key}: unknown key; {hint}")


def _conf_path(conf: _Section, key: str, config_path: Path) -> Path:
    """A file named by ``[conf] key``; relative paths are relative to the config file's folder."""
    value = Path(conf.string(key))
    return value if value.is_absolute() else config_path.parent / value


def _discovery_endpoints(section: _Section) -> tuple[str, ...]:
    """`host` may be one host (with `port`) or a comma-separated list of `host:port`."""
    hosts = [h.strip() for h in section.string("host").split(",") if h.strip()]
    if not hosts:
        raise ConfigError(f"{section.where('host')}: empty")
    port = section.integer("port") if section.has("port") else None
    endpoints = []
    for host in hosts:
        if ":" not in host or host.endswith("]"):
            if port is None:
                raise ConfigError(f"{section.where('port')}: missing key (needed for host {host!r} without a port)")
            host = f"{host}:{port}"
        endpoints.append(parse_endpoint(host, section.where("host")))
    return tuple(endpoints)


def validate_reader_args(batch_size: Any, d_batch_size: Any, capacity: Any, occupied_capacity: Any) -> None:
    """Check the constructor's sizes; messages name the argument."""
    for name, value, minimum in (
        ("batch_size", batch_size, 1),
        ("d_batch_size", d_batch_size, 1),
        ("capacity", capacity, 1),
        ("occupied_capacity", occupied_capacity, 0),
    ):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise ConfigError(f"{name}: expected an integer, got {value!r}")
        if value < minimum:
            raise ConfigError(f"{name}: must be >= {minimum}, got {value}")
    if capacity <= occupied_capacity:
        raise ConfigError(
            f"capacity ({capacity}) must be greater than occupied_capacity ({occupied_capacity}): the pool "
            "needs at least one batch slot beyond those the consumer may still hold"
        )
