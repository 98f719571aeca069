"""Config parsing and validation: every bad config fails at construction naming the key."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import SEED_CONFIG, TAG_FEED

from distill_reader import ConfigError, DistillReader
from distill_reader.config import load_config, strip_inline_comment

pytestmark = pytest.mark.timeout(30)

GOOD = SEED_CONFIG.format(servers=["127.0.0.1:9292", "localhost:9393"], extra="")


def test_seed_config_parses(tmp_path):
    path = tmp_path / "ok.conf"
    path.write_text(GOOD)
    config = load_config(path)
    assert config.mode == "fixed"
    assert config.servers == ("127.0.0.1:9292", "localhost:9393")
    assert config.model_name == "teacher"
    assert [(s.name, s.dtype, s.shape) for s in config.feeds] == [
        ("img", np.dtype("float32"), (1, 4, 4)),
        ("label", np.dtype("int64"), (1,)),
    ]
    assert [s.name for s in config.predict_feeds] == ["img"]
    assert [(s.name, s.shape) for s in config.fetches] == [("prediction", (10,))]


def test_bare_words_and_new_keys(tmp_path):
    path = tmp_path / "ok.conf"
    path.write_text(
        GOOD.replace("[conf]\n", "[conf]\nmodel_name = resnet50\n").replace("mode = fixed", "mode = 'fixed'")
    )
    config = load_config(path)
    assert config.model_name == "resnet50" and config.mode == "fixed"


@pytest.mark.parametrize(
    ("old", "new", "message"),
    [
        ("[fetch]", "[fetchx]", "[fetchx]: unknown section; did you mean [fetch]? known sections are [conf], "),
        ("\n[fetch]\n", "\n", "[feed] fetch_vars: unknown key; it belongs in [fetch]"),
        ("mode = fixed\n", "", "[conf] mode: missing key"),
        ("mode = fixed", "mode = balanced", "[conf] mode: unknown mode 'balanced'"),
        ("servers = ['127.0.0.1:9292', 'localhost:9393']", "servers = []", "[conf] servers: the list is empty"),
        ("servers = ['127.0.0.1:9292', 'localhost:9393']", "servers = ['127.0.0.1']", "[conf] servers: '127.0.0.1'"),
        ("servers = ['127.0.0.1:9292', 'localhost:9393']", "servers = ['a:1',", "[conf] servers: cannot parse"),
        ("feed_types = ['float32', 'int64']", "feed_types = ['float32']", "feed_vars, feed_types and feed_shapes"),
        ("fetch_types = ['float32']", "fetch_types = ['float128']", "[fetch] fetch_types: unknown dtype 'float128'"),
        ("feed_shapes = [(1, 4, 4), (1,)]", "feed_shapes = [(1, 4, 4), (0,)]", "[feed] feed_shapes[1]"),
        ("feed_shapes = [(1, 4, 4), (1,)]", "feed_shapes = [(1, -1, 4), (1,)]", "[conf] max_length: missing key"),
        ("feed_shapes = [(1, 4, 4), (1,)]", "feed_shapes = [(1, -2, 4), (1,)]", "or -1 for a variable length"),
        ("predict_feed_ids = [0]", "predict_feed_ids = [2]", "[feed] predict_feed_ids: 2 is out of range"),
        ("predict_feed_ids = [0]", "predict_feed_ids = []", "[feed] predict_feed_ids"),
        ("fetch_vars = ['prediction']", "fetch_vars = 'prediction'", "[fetch] fetch_vars: expected a list"),
    ],
)
def test_bad_config_names_the_key(tmp_path, old, new, message):
    assert old in GOOD
    path = tmp_path / "bad.conf"
    path.write_text(GOOD.replace(old, new))
    with pytest.raises(ConfigError) as info:
        DistillReader(path, 32, 4, 4, 2)
    assert message in str(info.value)


@pytest.mark.parametrize(
    ("added", "message"),
    [
        ("[conf]\nreqire_num = 2\n", "[conf] reqire_num: unknown key; did you mean require_num?"),
        ("[conf]\nmodelname = x\n", "[conf] modelname: unknown key; did you mean model_name?"),
        ("[conf]\ntls_crt = a.pem\n", "[conf] tls_crt: unknown key; did you mean tls_cert?"),
        ("[conf]\nfeed_vars = ['img']\n", "[conf] feed_vars: unknown key; it belongs in [feed]"),
        ("[conf]\nbatch_size = 32\n", "[conf] batch_size: unknown key; known keys of [conf] are mode, servers,"),
        ("[feed]\nfeed_shape = [(1,)]\n", "[feed] feed_shape: unknown key; did you mean feed_shapes?"),
        (
            "[stor]\nx = 1\n",
            "[stor]: unknown section; did you mean [store]? known sections are [conf], [feed], [fetch], [store]",
        ),
        ("[Feed]\nx = 1\n", "[Feed]: unknown section; did you mean [feed]? known sections are [conf], [feed], [fetch]"),
        ("[DEFAULT]\nmode = fixed\n", "[DEFAULT]: unknown section; known sections are [conf], [feed], [fetch]"),
    ],
)
def test_unknown_keys_and_sections_are_refused(tmp_path, added, message):
    """A typo must not be ignored: it names the key and the nearest known one."""
    section = added.split("\n", 1)[0]
    text = GOOD.replace(section + "\n", added) if section in GOOD else GOOD + "\n" + added
    path = tmp_path / "typo.conf"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert message in str(info.value)


def test_every_documented_key_is_accepted(tmp_path):
    """All keys at once (discover and fixed mode keys, security, serving_conf_file) load."""
    from security_support import make_pki

    pki = make_pki(tmp_path / "pki")
    (tmp_path / "token").write_text("s3cret\n")
    (tmp_path / "client.prototxt").write_text(
        'feed_var { name: "image" alias_name: "img" shape: 1 shape: 4 shape: 4 }\n'
        'fetch_var { name: "probs" alias_name: "prediction" shape: 10 }\n'
    )
    keys = (
        "mode = discover\nservers = ['127.0.0.1:9292']\nhost = 127.0.0.1\nport = 7400\nservice_name = mnist\n"
        "require_num = 2\nmodel_name = mnist_teacher\nserving_conf_file = client.prototxt\ntoken_file = token\n"
        f"tls_ca = {pki.ca}\ntls_cert = {pki.client_cert}\ntls_key = {pki.client_key}\n"
    )
    path = tmp_path / "all.conf"
    path.write_text(GOOD.replace("mode = fixed\nservers = ['127.0.0.1:9292', 'localhost:9393']\n", keys))
    config = load_config(path)
    assert (config.mode, config.discovery, config.service_name, config.require_num) == (
        "discover",
        ("127.0.0.1:7400",),
        "mnist",
        2,
    )
    assert config.model_name == "mnist_teacher"
    assert config.served_name("img") == "image" and config.served_name("prediction") == "probs"
    assert config.token is not None and config.token.reveal() == "s3cret"
    assert config.tls is not None and config.tls.ca == pki.ca.read_bytes()
    assert config.tls.cert == pki.client_cert.read_bytes() and config.tls.key == pki.client_key.read_bytes()


def test_discover_mode_keys(tmp_path):
    text = GOOD.replace(
        "mode = fixed\nservers = ['127.0.0.1:9292', 'localhost:9393']",
        "mode = discover\nhost = 10.0.0.1:7000, 10.0.0.2\nport = 7001\nservice_name = resnet\nrequire_num = 2",
    )
    path = tmp_path / "d.conf"
    path.write_text(text)
    config = load_config(path)
    assert config.discovery == ("10.0.0.1:7000", "10.0.0.2:7001")
    assert (config.service_name, config.require_num) == ("resnet", 2)
    path.write_text(text.replace("require_num = 2", "require_num = 0"))
    with pytest.raises(ConfigError, match=r"\[conf\] require_num: must be >= 1"):
        load_config(path)


def test_missing_file_and_serving_conf(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(tmp_path / "nope.conf")
    path = tmp_path / "s.conf"
    path.write_text(GOOD.replace("[conf]\n", "[conf]\nserving_conf_file = missing.prototxt\n"))
    with pytest.raises(ConfigError, match=r"\[conf\] serving_conf_file: cannot read"):
        load_config(path)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((0, 4, 4, 2), "batch_size: must be >= 1"),
        ((32, 0, 4, 2), "d_batch_size: must be >= 1"),
        ((32, 4, 2, 2), "capacity (2) must be greater than occupied_capacity (2)"),
        ((32, 4, 4, -1), "occupied_capacity: must be >= 0"),
        ((32.5, 4, 4, 2), "batch_size: expected an integer"),
    ],
)
def test_bad_sizes(tmp_path, args, message):
    path = tmp_path / "ok.conf"
    path.write_text(GOOD)
    with pytest.raises(ConfigError) as info:
        DistillReader(path, *args)
    assert message in str(info.value)


def test_reader_must_be_set(tmp_path):
    path = tmp_path / "ok.conf"
    path.write_text(GOOD)
    with pytest.raises(Exception, match="no reader set"):
        DistillReader(path, 8, 4, 2, 0).distill_reader()


def test_comments_after_values_are_not_part_of_them(tmp_path):
    """``#`` and ``;`` after whitespace start a comment, after a value too (issue 17): the README's
    own snippets are written that way. Inside a quoted string they are the value's."""
    text = GOOD.replace(
        "mode = fixed\nservers = ['127.0.0.1:9292', 'localhost:9393']\n",
        "mode = fixed          # or: discover\n"
        "servers = ['127.0.0.1:9292',   # the first teacher\n"
        "           'localhost:9393']   ; two teachers\n"
        "model_name = 'tag #1'  # a quoted '#' is the name's\n",
    ).replace("predict_feed_ids = [0]", "predict_feed_ids = [0]  ; the teacher takes the image")
    text += (
        "\n[store]\n"
        "path = teacher-outputs   # a directory: Arrow IPC files and a manifest of the config\n"
        "policy = cache           # write: ask and record; read: never ask a teacher\n"
    )
    path = tmp_path / "commented.conf"
    path.write_text(text)
    config = load_config(path)
    assert config.mode == "fixed"
    assert config.servers == ("127.0.0.1:9292", "localhost:9393")
    assert config.model_name == "tag #1"
    assert config.predict_feed_ids == (0,)
    assert config.store is not None
    assert config.store.path == tmp_path / "teacher-outputs"  # no comment in the directory's name
    assert config.store.policy == "cache"


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("cache   # write: ask and record", "cache"),
        ("cache ; a comment", "cache"),
        ("a#b", "a#b"),  # not after whitespace: part of the value (the usual INI rule)
        ("x;y", "x;y"),
        ("run #3", "run"),  # unquoted: a comment; quote such a value
        ("'run #3'  # quoted", "'run #3'"),
        ('"a ; b" ; c', '"a ; b"'),
        ("['h:1', 'h:2']  # two teachers", "['h:1', 'h:2']"),
        ("[1,   # a\n 2]  ; b", "[1,\n 2]"),
        ("bob's teacher  # an apostrophe opens no string", "bob's teacher"),
        (r"'a\' #b'  # an escaped quote", r"'a\' #b'"),
        ("# only a comment", ""),
    ],
)
def test_strip_inline_comment(value, expected):
    assert strip_inline_comment(value) == expected


def test_a_key_with_only_a_comment_is_missing(tmp_path):
    path = tmp_path / "c.conf"
    path.write_text(GOOD.replace("mode = fixed", "mode =    # fixed or discover"))
    with pytest.raises(ConfigError, match=r"\[conf\] mode: missing key"):
        load_config(path)


# -- teacher groups ([teacher NAME], docs/groups.md) ----------------------------------------------

GROUPS = """\
[conf]
mode = fixed
model_name = shared

[teacher a]
servers = ['127.0.0.1:9292', 'localhost:9393']
model_name = resnet

[teacher b]
servers = ['127.0.0.1:9494']
protocol = oip
predict_feed_ids = [1]

"""
GROUPS += TAG_FEED
GROUPS += """
[fetch]
fetch_vars = ['a.prediction', 'b.prediction', 'a.features']
fetch_types = ['float32', 'float32', 'float16']
fetch_shapes = [(10,), (3,), (5,)]
"""

DISCOVER_GROUPS = """\
[conf]
mode = discover
host = 127.0.0.1:8500

[teacher a]
service_name = resnet-teachers
require_num = 2

[teacher b]
service_name = vit-teachers
require_num = 1
host = 10.0.0.1:8600, 10.0.0.2:8600

[feed]
feed_vars = ['img']
feed_types = ['float32']
feed_shapes = [(1, 4, 4)]
predict_feed_ids = [0]

[fetch]
fetch_vars = ['a.prediction', 'b.prediction']
fetch_types = ['float32', 'float32']
fetch_shapes = [(10,), (10,)]
"""


def test_teacher_groups_parse(tmp_path):
    path = tmp_path / "groups.conf"
    path.write_text(GROUPS)
    config = load_config(path)
    assert [g.name for g in config.groups] == ["a", "b"]
    a, b = config.groups
    assert a.servers == ("127.0.0.1:9292", "localhost:9393") and b.servers == ("127.0.0.1:9494",)
    assert (a.model_name, b.model_name) == ("resnet", "shared")  # [conf] model_name: the default
    assert (a.predict_feed_ids, b.predict_feed_ids) == ((0,), (1,))  # [feed]'s, or the group's own
    assert (a.fetch_ids, b.fetch_ids) == ((0, 2), (1,))
    assert config.predict_feed_ids == (0, 1)  # every var some teacher takes
    views = {name: (view, ids) for name, view, ids in config.group_views()}
    view, ids = views["a"]
    assert ids == (0, 2) and [s.name for s in view.fetches] == ["a.prediction", "a.features"]
    # Asked for by the model's own output names; given the group's inputs only.
    assert [view.served_name(s.name) for s in view.fetches] == ["prediction", "features"]
    assert view.servers == a.servers and view.model_name == "resnet" and view.predict_feed_ids == (0,)
    assert views["b"][0].predict_feeds[0].name == "label"


def test_discover_groups_parse(tmp_path):
    path = tmp_path / "groups.conf"
    path.write_text(DISCOVER_GROUPS)
    a, b = load_config(path).groups
    assert (a.service_name, a.require_num, a.discovery) == ("resnet-teachers", 2, ("127.0.0.1:8500",))
    assert (b.service_name, b.require_num, b.discovery) == ("vit-teachers", 1, ("10.0.0.1:8600", "10.0.0.2:8600"))


def test_a_config_without_groups_is_one_unnamed_group(tmp_path):
    path = tmp_path / "ok.conf"
    path.write_text(GOOD)
    config = load_config(path)
    assert config.groups == ()
    assert config.group_views() == ((None, config, (0,)),)


@pytest.mark.parametrize(
    ("text", "old", "new", "message"),
    [
        (GROUPS, "fetch_vars = ['a.prediction',", "fetch_vars = ['prediction',", "[fetch] fetch_vars: 'prediction'"),
        (GROUPS, "fetch_vars = ['a.prediction',", "fetch_vars = ['c.prediction',", "names no teacher group"),
        (GROUPS, "fetch_vars = ['a.prediction',", "fetch_vars = ['a.',", "[fetch] fetch_vars: 'a.' names no teacher"),
        (GROUPS, "'b.prediction', 'a.features'", "'a.other', 'a.features'", "[teacher b]: no fetch var"),
        (GROUPS, "[conf]\n", "[conf]\nservers = ['h:1']\n", "[conf] servers: this config has teacher groups"),
        (GROUPS, "[teacher b]", "[teacher b.c]", "[teacher b.c]: a teacher group's name"),
        (GROUPS, "[teacher b]", "[teacher]", "[teacher]: a teacher group needs a name"),
        (GROUPS, "[teacher b]", "[teacher  a]", "[teacher  a]: the teacher group 'a' is also [teacher a]"),
        (GROUPS, "predict_feed_ids = [1]", "predict_feed_ids = [2]", "[teacher b] predict_feed_ids: 2 is out"),
        (GROUPS, "predict_feed_ids = [0]\n", "", "[teacher a] predict_feed_ids: missing key"),
        (GROUPS, "servers = ['127.0.0.1:9494']", "servers = []", "[teacher b] servers: the list is empty"),
        (GROUPS, "servers = ['127.0.0.1:9494']", "servers = ['x']", "[teacher b] servers: 'x' is not"),
        (GROUPS, "servers = ['127.0.0.1:9494']", "service_name = x", "[teacher b] service_name: for mode = discover"),
        (GROUPS, "protocol = oip", "protocol = grpc", "[teacher b] protocol: 'grpc' is not one of"),
        (GROUPS, "protocol = oip", "batch = 4", "[teacher b] batch: unknown key"),
        (GROUPS, "protocol = oip", "feed_vars = []", "[teacher b] feed_vars: unknown key; it belongs in [feed]"),
        (DISCOVER_GROUPS, "require_num = 1\n", "", "[teacher b] require_num: missing key"),
        (DISCOVER_GROUPS, "require_num = 1\n", "require_num = 0\n", "[teacher b] require_num: must be >= 1"),
        (DISCOVER_GROUPS, "require_num = 1\n", "require_num = 1\nservers = ['h:1']\n", "[teacher b] servers: for"),
        (DISCOVER_GROUPS, "host = 127.0.0.1:8500\n", "", "[conf] host: missing key"),
    ],
)
def test_bad_group_config_names_the_key(tmp_path, text, old, new, message):
    assert old in text
    path = tmp_path / "bad.conf"
    path.write_text(text.replace(old, new, 1))
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert message in str(info.value)


def test_a_group_variable_output_needs_a_variable_input_of_its_own(tmp_path):
    text = GROUPS.replace("feed_shapes = [(1, 4, 4), (1,)]", "feed_shapes = [(1, 4, 4), (-1,)]")
    text = text.replace("fetch_shapes = [(10,), (3,), (5,)]", "fetch_shapes = [(10,), (-1,), (-1,)]")
    text = text.replace("[conf]\n", "[conf]\nmax_length = 8\n")
    path = tmp_path / "groups.conf"
    path.write_text(text)
    with pytest.raises(ConfigError, match=r"\[fetch\] var 'a.features' .* no var in \[teacher a\] predict_feed_ids"):
        load_config(path)
    path.write_text(text.replace("fetch_shapes = [(10,), (-1,), (-1,)]", "fetch_shapes = [(10,), (-1,), (5,)]"))
    config = load_config(path)
    assert config.fetch_length_source(1) == 1 and config.fetch_length_source(0) is None


@pytest.mark.parametrize(
    ("text", "store", "message"),
    [
        (GOOD, "groups = ['a']", "[store] groups: this config has no teacher groups"),
        (GROUPS, "groups = []", "[store] groups: the list is empty; name some of the groups a, b"),
        (GROUPS, "groups = ['c']", "[store] groups: 'c' is not a teacher group; the groups are a, b"),
        (GROUPS, "groups = 'a'", "[store] groups: expected a list"),
    ],
)
def test_bad_store_groups_names_the_key(tmp_path, text, store, message):
    path = tmp_path / "bad.conf"
    path.write_text(f"{text}\n[store]\npath = s\npolicy = write\n{store}\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert message in str(info.value)


def test_store_groups_view(tmp_path):
    path = tmp_path / "groups.conf"
    path.write_text(f"{GROUPS}\n[store]\npath = s\npolicy = write\ngroups = ['b']\n")
    config = load_config(path)
    view, kept = config.stored_view()
    assert config.store.groups == ("b",) and kept == (1,)
    assert [s.name for s in view.fetches] == ["b.prediction"] and view.predict_feed_ids == (1,)
    assert [(g.name, g.fetch_ids) for g in view.groups] == [("b", (0,))]
    # Stored groups whose variable outputs take their lengths from different vars: refused.
    text = GROUPS.replace("feed_shapes = [(1, 4, 4), (1,)]", "feed_shapes = [(-1,), (-1,)]")
    text = text.replace("fetch_shapes = [(10,), (3,), (5,)]", "fetch_shapes = [(-1,), (-1,), (5,)]")
    text = text.replace("feed_types = ['float32', 'int64']", "feed_types = ['int64', 'int64']")
    text = text.replace("[conf]\n", "[conf]\nmax_length = 8\n", 1) + "\n[store]\npath = s\npolicy = write\n"
    path.write_text(text)
    with pytest.raises(ConfigError, match=r"\[store\]: the stored groups' teachers take their first variable"):
        load_config(path)
    path.write_text(text + "groups = ['b']\n")
    assert load_config(path).stored_view()[0].fetch_length_source(0) == 1
