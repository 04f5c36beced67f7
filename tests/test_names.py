"""node.names: a name that is not UTF-8 through JSON and back, byte for byte; what is not its
escape is left alone for the path rule to judge; only a path may hold such a byte on the wire;
and the forms people see."""
from __future__ import annotations

import os

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st
from sbs.node import names, protocol
from sbs.node.entries import file_entry
from sbs.node.tree import PathError, check_relpath

# a component of a Linux name: any bytes but NUL and "/", not "." or ".."
component = st.binary(min_size=1, max_size=40).map(
    lambda b: b.replace(b"\x00", b"x").replace(b"/", b"y")).filter(lambda b: b not in (b".", b".."))


@given(st.lists(component, min_size=1, max_size=5))
def test_any_name_travels_a_manifest_and_comes_back_as_the_same_bytes(parts):
    raw = b"/".join(parts)
    path = os.fsdecode(raw)
    body = {"name": "alpha", "entries": {"docs": [{"path": path, "target": path}]},
            "unreadable": {"docs": {path: "why " + path}}}
    back = names.loads(names.dumps(body))
    assert back == body
    got = back["entries"]["docs"][0]["path"]
    assert os.fsencode(got) == raw
    if not any(p.startswith(b".sbs-tmp-") for p in parts):  # reserved for temp files
        assert check_relpath(got) == tuple(os.fsdecode(p) for p in parts)


def test_a_plain_document_is_written_as_orjson_writes_it():
    doc = {"path": "café/naïve ✓.txt", "n": 1, "x": [None, True, 1.5]}
    assert names.dumps(doc) == orjson.dumps(doc)
    assert names.dumps(doc, option=orjson.OPT_INDENT_2) == orjson.dumps(
        doc, option=orjson.OPT_INDENT_2)
    assert names.loads(orjson.dumps(doc)) == doc


def test_an_entry_dataclass_is_escaped_with_the_keys_orjson_gives_it(tmp_path):
    p = tmp_path / os.fsdecode(b"caf\xe9")
    p.write_bytes(b"x")
    entry = file_entry(os.fsdecode(b"caf\xe9"), os.lstat(p), "0" * 32)
    plain = file_entry("cafe", os.lstat(p), "0" * 32)
    got = orjson.loads(names.dumps(entry))
    assert list(got) == list(orjson.loads(orjson.dumps(plain)))
    assert got["path"] == "\x00Y2Fm6Q=="  # NUL and the base64 of b"caf\xe9"
    assert names.loads(names.dumps(entry))["path"] == os.fsdecode(b"caf\xe9")


@pytest.mark.parametrize("sent, why", [
    ('"docs/\\u0000Y2Fm6Q=="', "NUL byte"),  # NUL not at the start: not an escape
    ('"\\u0000not base64!"', "NUL byte"),
    ('"\\u0000"', "NUL byte"),
])
def test_what_is_not_an_escape_stays_nul_and_the_path_rule_refuses_it(sent, why):
    got = names.loads(sent.encode())
    assert got.count("\x00") == 1
    with pytest.raises(PathError, match=why):
        check_relpath(got)


def test_a_hostile_escape_is_only_bytes_of_a_name_and_still_held_to_the_path_rule():
    import base64

    def sent(raw: bytes) -> bytes:
        return orjson.dumps("\x00" + base64.b64encode(raw).decode())

    got = names.loads(sent(b"\xe9/../x"))
    assert got == os.fsdecode(b"\xe9/../x")
    with pytest.raises(PathError, match="'..' component"):
        check_relpath(got)
    with pytest.raises(PathError, match="NUL byte"):
        check_relpath(names.loads(sent(b"a\x00b")))
    assert names.loads(sent("café".encode())) == "café"  # escaped for nothing: still the name


def test_only_a_path_may_hold_a_byte_that_is_not_utf8_on_the_wire():
    """A filter, a sentinel's command, a node's name holding one would reach code that takes
    text (it did: a filter so escaped stopped a snapshot's lists with a traceback)."""
    latin1 = os.fsdecode(b"x\xe9*")
    frames = protocol.encode("SNAPSHOT", {"name": latin1})
    assert "only a path may" in protocol.decode(frames).reason
    entry = {"path": latin1, "kind": "file", "size": 1, "mtime_ns": 0, "mode": 0o644,
             "hash": "0" * 32}
    assert protocol.entry_check(names.loads(names.dumps(entry))) is None
    assert "only a path may" in protocol.entry_check(dict(entry, hash=latin1))


def test_a_surrogate_no_name_can_hold_is_refused_by_the_path_rule():
    with pytest.raises(PathError, match="not a byte of a name"):
        check_relpath("docs/\ud800x")


def test_a_message_with_such_a_name_passes_the_protocol_both_ways():
    path = os.fsdecode(b"d\xe8r/caf\xe9.txt")
    frames = protocol.encode("GET", {"id": 1, "items": [{"f": "docs", "p": path, "o": 0,
                                                          "n": 10}]})
    assert b"\\u0000" in frames[2]
    msg = protocol.decode(frames)
    assert msg, msg
    assert msg.body["items"][0]["p"] == path


def test_people_see_each_undecodable_byte_as_xnn_and_two_names_never_alike():
    assert names.shown(os.fsdecode(b"caf\xe9 ok")) == "caf\\xe9 ok"
    assert names.shown("caf\\xe9") == "caf\\\\xe9"  # a name that is UTF-8, with a backslash
    assert names.shown("café ✓") == "café ✓"
    assert names.readable(os.fsdecode(b"caf\xe9 \\")) == "caf\\xe9 \\"  # a log line
    assert names.for_people({"files": [os.fsdecode(b"\xff")], "n": 2, "cmd": "a\\nb"}) == {
        "files": ["\\xff"], "n": 2, "cmd": "a\\nb"}
