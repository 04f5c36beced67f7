"""Names that are not UTF-8, in JSON.

A Linux file name is bytes; Python's os functions give a name that does not decode as UTF-8
(b"caf\\xe9.txt", written by a Latin-1 program) as a str holding each undecodable byte as a lone
surrogate U+DC80..U+DCFF (PEP 383, "surrogateescape"), and take that str back to the same bytes.
The node keeps such names as they come, in every Entry, index, queue and cache; only JSON cannot
hold a lone surrogate (orjson refuses it). So everything the node writes as JSON (the wire's
bodies and manifests, the journal, the hash caches, the syncer's reports, the state documents)
goes through ``dumps``/``loads`` here: a string holding such a byte is written as NUL and the
base64 of its bytes (b"caf\\xe9.txt" is "\\u0000Y2Fm6S50eHQ="), at most 4/3 of its length in
bytes, as the UTF-8 of a name may be; ``loads`` reads it back. No Linux name holds NUL, so this
form cannot be mistaken for a name; a NUL that does not begin such a form is left as it is, and
the one path rule (node/tree.py) refuses it. What comes from the peer is held to its schema
after that (node/protocol.py): only a path may hold such a byte.

Only a message that holds such a name pays: ``dumps`` tries orjson first, ``loads`` looks for
the escape in the raw bytes before it walks anything.

For people: ``shown`` writes such a byte as \\xNN and a backslash as \\\\ (as `ls -b` does, so
two names never look alike): what sbs-tools prints. ``readable`` only writes the bytes as
\\xNN: the node's log lines.
"""
from __future__ import annotations

import base64
import binascii
import re
from dataclasses import fields, is_dataclass
from typing import Any

import orjson

ESC = "\x00"
RAW_ESC = b"\\u0000"  # how orjson writes ESC inside a JSON string
_SURROGATE = re.compile("[\udc80-\udcff]")


def _walk(obj: Any, fix: Any, needs: Any) -> Any:
    if type(obj) is str:
        return fix(obj) if needs(obj) else obj
    if type(obj) is dict:
        return {_walk(k, fix, needs): _walk(v, fix, needs) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_walk(x, fix, needs) for x in obj]
    if is_dataclass(obj) and not isinstance(obj, type):  # an Entry (node/entries.py)
        return {f.name: _walk(getattr(obj, f.name), fix, needs) for f in fields(obj)}
    return obj


def has_byte(s: str) -> bool:
    """Does s hold a byte that is not UTF-8 (as its surrogate)?"""
    return not s.isascii() and _SURROGATE.search(s) is not None


def _esc(s: str) -> str:
    return ESC + base64.b64encode(s.encode("utf-8", "surrogateescape")).decode("ascii")


def _unesc(s: str) -> str:
    if len(s) < 2 or s[0] != ESC:
        return s  # a NUL elsewhere, or alone: not ours, left for the path rule to refuse
    try:
        raw = base64.b64decode(s[1:], validate=True)
    except (binascii.Error, ValueError):
        return s
    return raw.decode("utf-8", "surrogateescape")


def escape(obj: Any) -> Any:
    """obj with every string (keys too) that holds a byte that is not UTF-8 in the escaped form."""
    return _walk(obj, _esc, has_byte)


def unescape(obj: Any) -> Any:
    """What ``escape`` made, back: each escaped string as its name's own bytes."""
    return _walk(obj, _unesc, lambda s: ESC in s)


def dumps(obj: Any, option: int | None = None) -> bytes:
    """orjson.dumps, and a string holding a byte that is not UTF-8 written escaped."""
    try:
        return orjson.dumps(obj, option=option)
    except TypeError as exc:  # orjson.JSONEncodeError is a TypeError
        if "surrogates" not in str(exc):
            raise
        return orjson.dumps(escape(obj), option=option)


def loads(raw: bytes | bytearray | memoryview | str) -> Any:
    """orjson.loads, and what ``dumps`` escaped read back as the name's own bytes."""
    if type(raw) is bytes:
        found = RAW_ESC in raw
    elif isinstance(raw, str):
        found = "\\u0000" in raw
    else:
        found = RAW_ESC in bytes(raw)
    obj = orjson.loads(raw)
    return unescape(obj) if found else obj


def readable(text: str) -> str:
    """text with each byte that is not UTF-8 as \\xNN (a log line)."""
    if not has_byte(text):
        return text
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def shown(text: str) -> str:
    """A name fit to print and tell apart: each byte that is not UTF-8 as \\xNN, a backslash
    as \\\\ (`ls -b`)."""
    if "\\" in text:
        text = text.replace("\\", "\\\\")
    return readable(text)


def for_people(obj: Any) -> Any:
    """obj with every string that holds a byte that is not UTF-8 as ``shown`` writes it: what
    sbs-tools prints (where it lists names, it shows each one: a backslash of a name that is
    UTF-8 is doubled too)."""
    return _walk(obj, shown, has_byte)
