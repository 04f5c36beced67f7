"""The SBS wire protocol: every message on every socket, encoded and validated here.

Frames of one message::

    [b"SBS1", COMMAND, BODY, *BLOBS]

- ``SBS1``: version tag. Anything else is refused, so a future SBS2 can coexist.
- ``COMMAND``: ASCII upper-case name, one of ``SCHEMAS``.
- ``BODY``: one orjson object whose fields are checked against the command's schema.
- ``BLOBS``: raw file bytes (only ``DATA`` carries them), never inside JSON.

On the bus (PUB/SUB) a topic frame (the command in lower case) comes first so that a
subscriber can filter. A ROUTER prepends the sender identity, a REQ/REP pair its empty
delimiter; the sockets strip those before ``decode`` sees the frames.

``decode`` never raises on wire input: it returns ``Bad(reason)``, which the node logs
and drops (the peer may be hostile, buggy or simply a newer version).
See docs/PROTOCOL.md for every message in words.
"""
from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import orjson

from . import names

VERSION = b"SBS1"

# MAXMSGSIZE per socket role: small for what strangers can reach, large where a snapshot or
# file chunks are expected from the authenticated peer.
MAX_CONTROL_IN = 1 << 20  # ROUTER: pings, acks and tool commands are small
MAX_REPLY_IN = 256 << 20  # DEALER to the peer/tool: a snapshot part, a tool's large reply
MAX_BUS_IN = 64 << 20  # SUB: manifests are split into parts of at most MANIFEST_PART entries
MAX_BLOB_REQUEST_IN = 1 << 20  # REP: fetch requests are small
MAX_BLOB_REPLY_IN = 64 << 20  # fetch client: DATA with chunks
# bytes one GET may ask for in all (the sum of its items' n): the server builds a reply in
# memory, so this bounds what one request costs it; an honest batch asks for at most 1.25 MiB
# (small files up to 1 MiB plus one of 256 KiB, or one 1 MiB chunk of a large file)
MAX_GET_BYTES = 2 << 20
MAX_CHUNK = MAX_GET_BYTES  # largest chunk one item may ask for
FETCH_WINDOW = 8  # GETs in flight per fetch client
MANIFEST_PART = 5000  # entries per bus manifest message
SNAPSHOT_PART = 5000  # entries per SNAPSHOT_REP message (a snapshot comes in parts)
# paths a snapshot names as there but unreadable, per folder (a secondary deletes none of them)
UNREADABLE_MAX = 10_000
SNAPSHOT_PARTS_MAX = 500  # more entries than 500 parts hold: bigger parts, not more of them

STATES = ("starting", "primary", "secondary", "stopping", "stopped")
ROLES = ("main", "backup")
KINDS = ("file", "dir", "link")


@dataclass(frozen=True)
class Message:
    command: str
    body: dict[str, Any]
    blobs: list[bytes] = field(default_factory=list)


@dataclass(frozen=True)
class Bad:
    reason: str

    def __bool__(self) -> bool:  # so `if not msg:` reads naturally at call sites
        return False


# --- field validators: return None when valid, else a short reason -------------------------

Check = Callable[[Any], "str | None"]


def s(max_len: int = 256, *, path: bool = False) -> Check:
    """A string of at most max_len characters. Only a path (``path``) may hold a byte that is
    not UTF-8 (node/names.py): anywhere else such a string would reach code that takes text
    (a filter, a sentinel's command, a log file's name) and is refused here."""
    def check(v: Any) -> str | None:
        if not isinstance(v, str):
            return "not a string"
        if len(v) > max_len:
            return "too long"
        if not path and not v.isascii() and names.has_byte(v):
            return "holds a byte that is not UTF-8 (only a path may)"
        return None

    return check


def path_s(max_len: int = 4096) -> Check:
    return s(max_len, path=True)


def i(lo: int = 0, hi: int = 2**63 - 1) -> Check:
    def check(v: Any) -> str | None:
        if not isinstance(v, int) or isinstance(v, bool):
            return "not an integer"
        return None if lo <= v <= hi else f"out of range {lo}..{hi}"

    return check


def num(lo: float = 0.0, hi: float = 1e12) -> Check:
    def check(v: Any) -> str | None:
        if not isinstance(v, int | float) or isinstance(v, bool):
            return "not a number"
        return None if lo <= v <= hi else "out of range"

    return check


def b(v: Any) -> str | None:
    return None if isinstance(v, bool) else "not a boolean"


def one_of(*values: str) -> Check:
    def check(v: Any) -> str | None:
        return None if v in values else f"not one of {values}"

    return check


def list_of(item: Check, max_len: int) -> Check:
    def check(v: Any) -> str | None:
        if not isinstance(v, list):
            return "not a list"
        if len(v) > max_len:
            return "too many items"
        for n, x in enumerate(v):
            if (why := item(x)) is not None:
                return f"item {n}: {why}"
        return None

    return check


def dict_of(value: Check, max_len: int, key: Check | None = None) -> Check:
    key = key or s(255)

    def check(v: Any) -> str | None:
        if not isinstance(v, dict):
            return "not an object"
        if len(v) > max_len:
            return "too many keys"
        for k, x in v.items():
            if (why := key(k)) is not None:
                return f"key {str(k)[:40]!r}: {why}"
            if (why := value(x)) is not None:
                return f"{str(k)[:40]!r}: {why}"
        return None

    return check


def obj(schema: dict[str, Check], optional: tuple[str, ...] = ()) -> Check:
    def check(v: Any) -> str | None:
        if not isinstance(v, dict):
            return "not an object"
        return validate(schema, v, optional)

    return check


def validate(schema: dict[str, Check], body: dict, optional: tuple[str, ...] = ()) -> str | None:
    for name, check in schema.items():
        if name not in body:
            if name in optional:
                continue
            return f"missing field {name!r}"
        if (why := check(body[name])) is not None:
            return f"field {name!r}: {why}"
    return None


# --- schemas -----------------------------------------------------------------------------

NAME = s(64)
EPOCH = i(0, 2**53)
SEQ = i(0, 2**63 - 1)


# Folder and sentinel names arrive from the peer as keys and become names on disk (a folder's
# temp, trash and conflict directories under state_dir; a sentinel's log file), so they are held
# to the rules sbs.ini's are (node/config.py): a pushed "../.." must never reach a path.
# (at most 251 characters: the log file <name>.log must fit in a 255-byte file name)
SENTINEL_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,250}")


def folder_name_problem(name: str) -> str | None:
    """Why `name` cannot be a folder name (letters, digits, '-', '_'; 1-64), or None."""
    if not 0 < len(name) <= 64 or not name.replace("-", "").replace("_", "").isalnum():
        return "a folder name uses 1-64 letters, digits, '-' or '_'"
    return None


def _folder_name(v: Any) -> str | None:
    return "not a string" if not isinstance(v, str) else folder_name_problem(v)


def _sentinel_name(v: Any) -> str | None:
    if not isinstance(v, str):
        return "not a string"
    return None if SENTINEL_NAME_RE.fullmatch(v) else "not a sentinel name"


# An Entry: one object of a replicated folder (see node/index.py). Paths are checked again,
# component by component, where they touch the disk (node/writer.py).
ENTRY: dict[str, Check] = {
    "path": path_s(),
    "kind": one_of(*KINDS),
    "size": i(0, 2**62),
    "mtime_ns": i(-(2**62), 2**62),
    "mode": i(0, 0o7777),
    "hash": s(64),
    "target": path_s(),
    "deleted": b,
}
ENTRY_OPTIONAL = ("target", "deleted", "hash")
entry_check = obj(ENTRY, ENTRY_OPTIONAL)


def _is_list(v: Any) -> str | None:
    return None if isinstance(v, list) else "not a list"


# folder -> [Entry]. Only the shape is checked on receipt; each entry is checked on its own by
# the applier (entry_check, then the path on disk), so one bad entry does not hide the others
# and a 100k-entry snapshot is not walked twice in the node loop.
ENTRIES = dict_of(_is_list, 1000, _folder_name)

# Sent in both directions every heartbeat (PING) and as the answer to one (PONG): the sender's
# view of itself, so each side knows the other's state, epoch and replication progress.
PEER_STATE: dict[str, Check] = {
    "name": NAME,
    "run": s(32),  # random per process: a new value means the peer restarted
    "n": SEQ,  # per-run message counter: older or repeated values are stale
    "state": one_of(*STATES),
    "epoch": EPOCH,
    "role": one_of(*ROLES),
    "restricted": b,
    "since": num(0, 1e9),  # seconds the sender has been in its state
    "seq": SEQ,  # primary: last manifest published
    "applied": SEQ,  # secondary: last manifest applied (0 until the first snapshot is done)
    "synced": b,  # secondary: nothing pending, copy matches `applied`
    "pending_files": i(0),
    "pending_bytes": i(0),
    "error": s(1000, path=True),  # may name a file: only shown (node/names.py)
    "through": SEQ,  # secondary: last manifest it has worked through (applied or not)
    # secondary: why what is pending cannot be applied by waiting ("" if it can); may name a file
    "stuck": s(1000, path=True),
    "following": s(32),  # secondary: the primary's run its numbers (applied, through) refer to
    # a split-brain loser: it yielded to that run of the peer, from its term of `loser_epoch`
    # (the winner learns of the split brain from this when it did not see two primaries)
    "yielded": obj({"run": s(32), "epoch": EPOCH, "loser_epoch": EPOCH}),
    # pair-wide settings (node/maintenance.py, node/listedits.py): the sender's copy; the
    # newer one wins
    "maint": obj({"on": b, "at": num(0, 1e11), "by": NAME}),
    "lists": obj({"gen": i(0, 2**53), "at": num(0, 1e11), "by": NAME}),
    "sick": list_of(s(255), 100),  # sentinels that crash-looped here lately (node/health.py)
    # primary: what its scans skip (FIFOs, sockets, devices: node/unreplicable.py)
    "unrepl": obj({"count": i(1), "names": list_of(s(300), 5), "capped": b}),
}
PEER_STATE_OPTIONAL = ("through", "stuck", "following", "yielded", "maint", "lists", "sick",
                       "unrepl")

FOLDERS = dict_of(list_of(s(1024), 64), 1000, _folder_name)  # name -> [filters]
SENTINEL_DEFS = dict_of(s(4096), 1000, _sentinel_name)
ACTIVE = list_of(_sentinel_name, 1000)

SCHEMAS: dict[str, tuple[dict[str, Check], tuple[str, ...]]] = {
    # control: peer <-> peer over DEALER -> ROUTER
    "PING": (PEER_STATE, PEER_STATE_OPTIONAL),
    "PONG": (PEER_STATE, PEER_STATE_OPTIONAL),
    # why: "stop", "promote", "restricted", "health" (a planned hand-over, told apart from a
    # failover in the new primary's mail)
    "HANDOVER": ({"name": NAME, "run": s(32), "epoch": EPOCH, "seq": SEQ, "why": s(300)},
                 ("why",)),
    # the pair's lists, sent to a peer whose PING shows an older stamp (node/listedits.py)
    "LISTS": ({"name": NAME, "run": s(32), "epoch": EPOCH, "gen": i(0, 2**53),
               "at": num(0, 1e11), "by": NAME,
               "folders": FOLDERS, "paths": dict_of(s(4096), 1000, _folder_name),
               "sentinels": SENTINEL_DEFS}, ()),
    "ASK_HANDOVER": ({"name": NAME, "run": s(32), "epoch": EPOCH}, ()),
    "SNAPSHOT": ({"name": NAME}, ()),
    "SNAPSHOT_REP": (
        {
            "name": NAME, "run": s(32), "epoch": EPOCH, "seq": SEQ,
            "folders": FOLDERS, "paths": dict_of(s(4096), 1000, _folder_name),
            "sentinels": SENTINEL_DEFS, "active": ACTIVE, "sv": SEQ,
            "index": ENTRIES,
            "lists": obj({"gen": i(0, 2**53), "at": num(0, 1e11), "by": NAME}),
            # one reply in `parts` messages of at most SNAPSHOT_PART entries, sent in order
            # with the same `sid`; the header fields are the same in each (absent: one part)
            "part": i(0), "parts": i(1), "sid": s(32),
            # folder -> paths there on the primary that it could not read at its last full
            # scan (no entry in the index; "" the folder's root): not deleted by a secondary
            "unreadable": dict_of(list_of(path_s(), UNREADABLE_MAX), 1000, _folder_name),
        },
        ("lists", "part", "parts", "sid", "unreadable"),
    ),
    "ACK": ({"name": NAME, "run": s(32), "applied": SEQ, "snapshot": b, "following": s(32)},
            ("following",)),
    # control: operator tool -> node, answered by REPLY
    "STATUS": ({}, ()),
    "PROMOTE": ({"force": b}, ()),
    "SENTINEL": ({"action": one_of("list", "start", "stop"), "name": s(255)}, ("name",)),
    "VERIFY": ({"peer": b}, ("peer",)),  # peer: the peer's tokens, asked for by this node
    "TOKENS": ({"name": NAME}, ()),  # node -> peer: what VERIFY answers, for the peer's VERIFY
    "CONFIRM": ({"folder": s(255)}, ("folder",)),
    "RELOAD": ({}, ()),
    "MAINTENANCE": ({"on": b}, ("on",)),  # without "on": only ask
    "REPLY": ({"status": one_of("ok", "error"), "reason": s(4000)}, ("reason",)),
    # bus: PUB -> SUB
    "HB": ({"name": NAME, "run": s(32), "epoch": EPOCH, "state": one_of(*STATES),
            "seq": SEQ, "sv": SEQ, "maintenance": b}, ("maintenance",)),
    "MANIFEST": ({"name": NAME, "run": s(32), "epoch": EPOCH, "seq": SEQ, "part": i(0),
                  "parts": i(1), "entries": ENTRIES}, ()),
    # epoch: the sender's term, refused when stale like MANIFEST's and HB's (node/lease.py)
    "SENTINELS": ({"name": NAME, "epoch": EPOCH, "sv": SEQ, "sentinels": SENTINEL_DEFS,
                   "active": ACTIVE}, ()),
    "EVENT": ({"name": NAME, "event": s(64)}, ()),
    # blobs: fetch client (DEALER) -> REP
    "GET": ({"id": SEQ, "items": list_of(obj({"f": s(255), "p": path_s(), "o": i(0),
                                               "n": i(1, MAX_CHUNK)}), 4096)}, ()),
    # packed (asked for with "pack" in the GET): one raw frame holds every item's bytes one
    # after the other, each item saying how many are its own ("n"); else a frame per item
    "DATA": ({"id": SEQ, "items": list_of(obj({"size": i(-1), "err": s(1000, path=True),
                                               "n": i(0, MAX_CHUNK)}, ("err", "n")), 4096),
              "packed": b}, ("packed",)),
}

# Commands whose body may carry fields beyond the schema (REPLY bodies differ per command,
# EVENT bodies per event). Other bodies are checked for known fields only, extra ones ignored.


def encode(command: str, body: dict[str, Any] | None = None, *blobs: bytes) -> list[bytes]:
    return [VERSION, command.encode(), names.dumps(body or {}), *blobs]


def encode_bus(command: str, body: dict[str, Any]) -> list[bytes]:
    return [command.lower().encode(), *encode(command, body)]


def reply_ok(**fields: Any) -> list[bytes]:
    return encode("REPLY", {"status": "ok", **fields})


def reply_error(reason: str, **fields: Any) -> list[bytes]:
    return encode("REPLY", {"status": "error", "reason": reason, **fields})


def decode(frames: list[bytes], expect: tuple[str, ...] | None = None) -> Message | Bad:
    """Validate frames in order: count, version, command, body, blob count. Never raises."""
    try:
        if len(frames) < 3:
            return Bad(f"{len(frames)} frames, need at least 3")
        version, command_raw, body_raw, *blobs = frames
        if bytes(version) != VERSION:
            return Bad(f"unknown version tag {bytes(version)[:16]!r}")
        try:
            command = bytes(command_raw).decode("ascii")
        except UnicodeDecodeError:
            return Bad("command is not ASCII")
        if command not in SCHEMAS:
            return Bad(f"unknown command {command[:32]!r}")
        if expect is not None and command not in expect:
            return Bad(f"unexpected command {command} here")
        try:
            body = names.loads(body_raw)
        except orjson.JSONDecodeError as exc:
            return Bad(f"{command}: body is not JSON ({exc})")
        if not isinstance(body, dict):
            return Bad(f"{command}: body is not an object")
        schema, optional = SCHEMAS[command]
        if (why := validate(schema, body, optional)) is not None:
            return Bad(f"{command}: {why}")
        if command == "GET":
            asked = sum(item["n"] for item in body["items"])
            if asked > MAX_GET_BYTES:
                return Bad(f"GET: {asked} bytes asked, at most {MAX_GET_BYTES} per request")
        if command == "SNAPSHOT_REP" and body.get("part", 0) >= body.get("parts", 1):
            return Bad(f"SNAPSHOT_REP: part {body.get('part')} of {body.get('parts', 1)}")
        if command == "DATA":
            if body.get("packed"):
                # the lengths are checked against the frame where it is cut (content.py)
                if len(blobs) != 1 or any("n" not in item for item in body["items"]):
                    return Bad(f"DATA: packed in {len(blobs)} frames, or an item without n")
            elif len(blobs) != len(body["items"]):
                return Bad(f"DATA: {len(blobs)} blobs for {len(body['items'])} items")
        elif blobs:
            return Bad(f"{command}: unexpected {len(blobs)} raw frames")
        return Message(command, body, [bytes(x) for x in blobs])
    except Exception as exc:  # the last line of defence: wire input must not crash the node
        return Bad(f"undecodable message: {type(exc).__name__}: {exc}")


def decode_bus(frames: list[bytes]) -> Message | Bad:
    if len(frames) < 4:
        return Bad(f"bus message with {len(frames)} frames, need 4")
    msg = decode(frames[1:])
    if msg and bytes(frames[0]) != msg.command.lower().encode():
        return Bad("bus topic does not match the command")
    return msg


def stale(body: dict[str, Any], run: str, epoch: int) -> str | None:
    """Why a peer command (HANDOVER, ASK_HANDOVER, SNAPSHOT_REP) is not from the peer as we
    know it now, or None: it must carry the run of the peer's latest heartbeat and an epoch no
    lower than the one that heartbeat said (an older message, replayed or late, is dropped)."""
    if body["run"] != run:
        return f"from run {body['run'][:32]}: the peer is run {run or 'unknown'}"
    if body["epoch"] < epoch:
        return f"stale epoch {body['epoch']}: the peer is at epoch {epoch}"
    return None


def wins(a: dict[str, Any], b_: dict[str, Any]) -> bool:
    """The rule: does node `a` win over node `b_`? Higher epoch (primary most recently), then
    role main over backup, then the smaller name. Total and antisymmetric for two names."""
    key_a = (a["epoch"], a["role"] == "main")
    key_b = (b_["epoch"], b_["role"] == "main")
    if key_a != key_b:
        return key_a > key_b
    return a["name"] < b_["name"]
