"""The wire protocol: round trips, and hostile frames that must come back as Bad, not raise."""
from __future__ import annotations

import copy

from hypothesis import given, settings
from hypothesis import strategies as st
from sbs.node import protocol
from sbs.node.protocol import Bad, Message, decode, decode_bus, encode, encode_bus

PING = {"name": "alpha", "run": "abc", "n": 1, "state": "primary", "epoch": 3, "role": "main",
        "restricted": False, "since": 1.5, "seq": 7, "applied": 0, "synced": True,
        "pending_files": 0, "pending_bytes": 0, "error": ""}


def test_round_trip():
    msg = decode(encode("PING", PING))
    assert isinstance(msg, Message) and msg.command == "PING" and msg.body == PING
    data = decode(encode("DATA", {"id": 1, "items": [{"size": 3}, {"size": -1, "err": "x"}]},
                         b"abc", b""))
    assert data and data.blobs == [b"abc", b""]
    bus = decode_bus(encode_bus("HB", {"name": "a", "run": "r", "epoch": 1, "state": "primary",
                                       "seq": 2, "sv": 0}))
    assert bus and bus.command == "HB"


def bad(frames) -> str:
    msg = decode(frames)
    assert isinstance(msg, Bad), msg
    return msg.reason


def test_hostile_frames_are_refused_with_a_reason():
    assert "frames" in bad([b"SBS1", b"PING"])
    assert "version" in bad([b"SBS9", b"PING", b"{}"])
    assert "unknown command" in bad([b"SBS1", b"REBOOT", b"{}"])
    assert "ASCII" in bad([b"SBS1", b"\xff\xfe", b"{}"])
    assert "not JSON" in bad([b"SBS1", b"PING", b"{nope"])
    assert "not an object" in bad([b"SBS1", b"PING", b"[1,2]"])
    assert "missing field" in bad(encode("PING", {k: v for k, v in PING.items() if k != "epoch"}))
    assert "'epoch'" in bad(encode("PING", {**PING, "epoch": "3"}))
    assert "'epoch'" in bad(encode("PING", {**PING, "epoch": -1}))
    assert "'state'" in bad(encode("PING", {**PING, "state": "king"}))
    assert "'name'" in bad(encode("PING", {**PING, "name": "x" * 1000}))
    assert "'restricted'" in bad(encode("PING", {**PING, "restricted": 1}))
    # through/stuck are optional (a peer of the previous version sends neither), typed if sent
    assert decode(encode("PING", {**PING, "through": 4, "stuck": "disk full"})).body["through"] == 4
    assert "'through'" in bad(encode("PING", {**PING, "through": -4}))
    assert "'stuck'" in bad(encode("PING", {**PING, "stuck": "x" * 1001}))
    assert "raw frames" in bad([*encode("PING", PING), b"extra"])
    assert "blobs" in bad(encode("DATA", {"id": 1, "items": [{"size": 1}]}))
    assert "'n'" in bad(encode("GET", {"id": 1, "items": [
        {"f": "d", "p": "x", "o": 0, "n": protocol.MAX_CHUNK + 1}]}))
    assert "unexpected command" in decode(encode("PING", PING), expect=("PONG",)).reason



def test_a_packed_data_reply_is_one_frame_with_each_items_length():
    items = [{"size": 3, "n": 3}, {"size": -1, "err": "gone", "n": 0}, {"size": 2, "n": 2}]
    msg = decode(encode("DATA", {"id": 1, "items": items, "packed": True}, b"abcde"))
    assert msg and msg.blobs == [b"abcde"]
    assert "packed in 2 frames" in bad(encode("DATA", {"id": 1, "items": items, "packed": True},
                                              b"abc", b"de"))
    assert "without n" in bad(encode("DATA", {"id": 1, "items": [{"size": 3}], "packed": True},
                                     b"abc"))
    assert "'items'" in bad(encode("DATA", {"id": 1, "items": [{"size": 3, "n": -1}],
                                            "packed": True}, b"abc"))
    assert "'packed'" in bad(encode("DATA", {"id": 1, "items": items, "packed": "yes"},
                                    b"abcde"))
    # a GET asking for it stays a valid GET (an older server ignores the field)
    assert decode(encode("GET", {"id": 1, "items": [{"f": "d", "p": "x", "o": 0, "n": 1}],
                                 "pack": True}))

SNAPSHOT = {"name": "alpha", "run": "r", "epoch": 1, "seq": 3, "folders": {"docs": ["*"]},
            "paths": {"docs": "/srv/docs"}, "sentinels": {"web": "httpd"}, "active": ["web"],
            "sv": 1, "index": {"docs": []}}


def test_a_snapshot_part_is_one_of_its_parts():
    """A snapshot comes in parts (part, parts, sid; without them it is whole): a part number
    outside the count is refused with the message."""
    assert decode(encode("SNAPSHOT_REP", {**SNAPSHOT, "part": 2, "parts": 3, "sid": "s"}))
    for part, parts in ((3, 3), (1, 1), (0, 0), (-1, 2)):
        assert isinstance(decode(encode("SNAPSHOT_REP", {**SNAPSHOT, "part": part,
                                                         "parts": parts, "sid": "s"})), Bad)
    assert isinstance(decode(encode("SNAPSHOT_REP", {**SNAPSHOT, "part": 1})), Bad)


def test_a_snapshot_may_name_what_the_primary_could_not_read():
    """`unreadable` (folder -> paths, "" the folder itself) is optional and held to its shape:
    a malformed one refuses the message, as any field does."""
    ok = decode(encode("SNAPSHOT_REP", {**SNAPSHOT, "unreadable": {"docs": ["a/b", ""]}}))
    assert ok and ok.body["unreadable"] == {"docs": ["a/b", ""]}
    for value in ({"docs": "a/b"}, {"docs": [1]}, {"../x": ["a"]}, ["a"],
                  {"docs": ["a"] * 10_001}):
        assert "'unreadable'" in bad(encode("SNAPSHOT_REP", {**SNAPSHOT, "unreadable": value}))


def test_pushed_folder_and_sentinel_names_are_held_to_the_config_rules():
    """Folder names become directories under state_dir (temp, trash, conflicts), sentinel names
    log files: a peer's "../.." must be refused with its message, never reach a path."""
    assert decode(encode("SNAPSHOT_REP", SNAPSHOT))
    for field, value in [("folders", {"../../..": ["*"]}), ("folders", {"": ["*"]}),
                         ("folders", {"a/b": ["*"]}), ("folders", {"x" * 65: ["*"]}),
                         ("paths", {"..": "/srv"}), ("index", {"../tmp": []}),
                         ("sentinels", {"a b": "x"}), ("sentinels", {"../log": "x"}),
                         ("sentinels", {".hidden": "x"}), ("active", ["../../x"])]:
        assert f"'{field}'" in bad(encode("SNAPSHOT_REP", {**SNAPSHOT, field: value})), value
    assert decode(encode("SNAPSHOT_REP", {**SNAPSHOT, "folders": {"web-data_2": ["*"]}}))
    manifest = {"name": "alpha", "run": "r", "epoch": 1, "seq": 4, "part": 0, "parts": 1}
    assert decode_bus(encode_bus("MANIFEST", {**manifest, "entries": {"docs": []}}))
    assert isinstance(decode_bus(encode_bus("MANIFEST", {**manifest, "entries": {"..": []}})),
                      Bad)
    sentinels = {"name": "alpha", "epoch": 1, "sv": 2, "sentinels": {"web": "httpd"},
                 "active": ["web"]}
    assert decode_bus(encode_bus("SENTINELS", sentinels))
    assert isinstance(decode_bus(encode_bus("SENTINELS", {**sentinels, "active": ["a b"]})), Bad)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(max_size=64), max_size=6))
def test_random_frames_never_raise(frames):
    assert isinstance(decode(frames), Bad | Message)
    assert isinstance(decode_bus(frames), Bad | Message)


JSONISH = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1)
    | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                max_size=4),
    max_leaves=20,
)


def test_an_honest_fetch_batch_fits_the_bound_on_one_request():
    from sbs.node import transfer

    assert transfer.BATCH_BYTES + transfer.SMALL <= protocol.MAX_GET_BYTES
    assert transfer.CHUNK <= protocol.MAX_GET_BYTES


ENTRY = {"path": "a/b.txt", "kind": "file", "size": 3, "mtime_ns": 1, "mode": 0o644,
         "hash": "ab" * 8}
_PAIRWIDE = {"maint": {"on": True, "at": 1.5, "by": "alpha"},
             "lists": {"gen": 2, "at": 1.5, "by": "beta"}, "sick": ["web"]}
# One valid body per command that has fields; the fuzz below mutates them one spot at a time, so
# decoding gets past the tag, the command and the JSON into the field checks.
VALID: dict[str, tuple[dict, tuple[bytes, ...]]] = {
    "PING": ({**PING, "through": 7, "stuck": "", "following": "xyz", **_PAIRWIDE}, ()),
    "PONG": ({**PING, "through": 7, "stuck": "", "following": "xyz", **_PAIRWIDE}, ()),
    "HANDOVER": ({"name": "alpha", "run": "r", "epoch": 2, "seq": 9, "why": "promote"}, ()),
    "LISTS": ({"name": "beta", "run": "r", "epoch": 2, "gen": 3, "at": 1.5, "by": "beta",
               "folders": {"docs": ["*"]}, "paths": {"docs": "/srv/docs"},
               "sentinels": {"web": "httpd"}}, ()),
    "MAINTENANCE": ({"on": True}, ()),
    "ASK_HANDOVER": ({"name": "beta", "run": "r", "epoch": 1}, ()),
    "TOKENS": ({"name": "beta"}, ()),
    "VERIFY": ({"peer": True}, ()),
    "SNAPSHOT": ({"name": "beta"}, ()),
    "SNAPSHOT_REP": ({**SNAPSHOT, "index": {"docs": [ENTRY]}, "lists": _PAIRWIDE["lists"],
                      "part": 1, "parts": 3, "sid": "s1"}, ()),
    "ACK": ({"name": "beta", "run": "r", "applied": 3, "snapshot": False, "following": "r"}, ()),
    "PROMOTE": ({"force": False}, ()),
    "SENTINEL": ({"action": "start", "name": "web"}, ()),
    "CONFIRM": ({"folder": "docs"}, ()),
    "REPLY": ({"status": "error", "reason": "no"}, ()),
    "HB": ({"name": "alpha", "run": "r", "epoch": 1, "state": "primary", "seq": 2, "sv": 0,
            "maintenance": False}, ()),
    "MANIFEST": ({"name": "alpha", "run": "r", "epoch": 1, "seq": 4, "part": 0, "parts": 1,
                  "entries": {"docs": [ENTRY, {**ENTRY, "path": "gone", "deleted": True}]}}, ()),
    "SENTINELS": ({"name": "alpha", "epoch": 1, "sv": 2, "sentinels": {"web": "httpd"},
                   "active": ["web"]}, ()),
    "EVENT": ({"name": "alpha", "event": "role"}, ()),
    "GET": ({"id": 1, "items": [{"f": "docs", "p": "a", "o": 0, "n": 10}]}, ()),
    "DATA": ({"id": 1, "items": [{"size": 3}, {"size": -1, "err": "gone"}]}, (b"abc", b"")),
}
NESTED_OPTIONAL = {("DATA", "err")}  # optional fields below the top level


def test_every_command_with_fields_has_a_valid_example():
    assert {c for c, (schema, _) in protocol.SCHEMAS.items() if schema} == set(VALID)
    for command, (body, blobs) in VALID.items():
        assert decode(encode(command, body, *blobs)), command


def spots(value, path=()):
    """Every place in a JSON value, as a path of keys and indexes."""
    yield path
    if isinstance(value, dict):
        for k, v in value.items():
            yield from spots(v, (*path, k))
    elif isinstance(value, list):
        for n, v in enumerate(value):
            yield from spots(v, (*path, n))


def kind(v) -> str:
    if isinstance(v, bool) or v is None:
        return type(v).__name__
    return "number" if isinstance(v, int | float) else type(v).__name__


def put(body, path, value, delete=False):
    body = copy.deepcopy(body)
    *parents, last = path
    target = body
    for k in parents:
        target = target[k]
    if delete:
        del target[last]
    else:
        target[last] = value
    return body


@settings(max_examples=1000, deadline=None)
@given(st.data())
def test_mutated_valid_bodies_are_judged_by_the_field_checks(data):
    """A valid message with one spot changed or removed: the catch-all never fires; a value of
    another JSON type, or a missing required field, is refused naming the top-level field;
    entries (checked one by one by the applier, not on receipt) fail entry_check instead."""
    command = data.draw(st.sampled_from(sorted(VALID)))
    body, blobs = VALID[command]
    path = data.draw(st.sampled_from([p for p in spots(body) if p]))
    old = body
    for k in path:
        old = old[k]
    delete = isinstance(path[-1], str) and data.draw(st.booleans())
    new = None if delete else data.draw(JSONISH)
    mutated = put(body, path, new, delete)
    msg = decode(encode(command, mutated, *blobs))
    reason = msg.reason if isinstance(msg, Bad) else ""
    assert not reason.startswith("undecodable"), reason
    schema, optional = protocol.SCHEMAS[command]
    top = path[0]
    in_entry = top in ("index", "entries") and len(path) >= 3
    if in_entry:  # shape only on receipt: the entry itself is the applier's to refuse
        entry = mutated[top][path[1]][path[2]]
        if delete and path[-1] not in protocol.ENTRY_OPTIONAL or not delete and (
                kind(new) != kind(old)):
            assert protocol.entry_check(entry) is not None, (entry, path)
        return
    if delete:
        if len(path) == 1 and top not in optional or len(path) > 1 and (
                (command, path[-1]) not in NESTED_OPTIONAL and top not in ("folders", "paths",
                                                                          "sentinels", "index",
                                                                          "entries")):
            assert isinstance(msg, Bad) and f"{top!r}" in reason, (path, msg)
        return
    if kind(new) != kind(old) and not (command == "EVENT" and len(path) > 1):
        assert isinstance(msg, Bad), (path, new, msg)
        assert f"{top!r}" in reason, (path, reason)
