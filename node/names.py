"""Names that are not UTF-8, in JSON.

A Linux file name is bytes; Python's os functions give a name that does not decode as UTF-8
(b"caf\\xe9.txt", written by a Latin-1 program) as a str holding each undecodable byte as a lone
surrogate U+DC80..U+DCFF (PEP 383, "surrogateescape"), and take that str back to the same bytes.
The node keeps such names as they come, in every Entry, index, queue and cache; only JSON cannot
hold a lone surrogate (orjson refuses it). So everything the node writes as JSON (the wire's
bodies and manifests, the journal, the hash caches, the syncer's reports, the state documents)
goes through ``dumps``/``loads`` here, which write such a byte as NUL and two hex digits
("\\u0000e9" in the JSON text) and read it back. A name on Linux never holds NUL, so this form
cannot be mistaken for a real name; a NUL that is not followed by two hex digits from 80 to ff
is left as it is, and the one path rule (node/tree.py) refuses it.

Only a message that holds such a name pays: ``dumps`` tries orjson first, ``loads`` looks for
the escape in the raw bytes before it walks anything.

``shown`` is the form for people (logs, status, sbs-tools): each undecodable byte as \\xNN.
"""
from __future__ import annotations

import re
from dataclasses import fields, is_dataclass
from typing import Any

import orjson

ESC = "\x00"
RAW_ESC = b"\\u0000"  # how orjson writes ESC inside a JSON string
_LOW, _HIGH = 0xDC80, 0xDCFF  # the surrogates os.fsdecode makes of bytes 0x80..0xff
_SURROGATE = re.compile("[\udc80-\udcff]")
_ESCAPED = re.compile("\x00([89a-f][0-9a-f])")


def _esc(m: re.Match[str]) -> str:
    return f"{ESC}{ord(m.group()) - 0xDC00:02x}"


def _unesc(m: re.Match[str]) -> str:
    return chr(0xDC00 + int(m.group(1), 16))


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


def _has_surrogate(s: str) -> bool:
    return not s.isascii() and _SURROGATE.search(s) is not None


def escape(obj: Any) -> Any:
    """obj with every undecodable byte of its strings (keys too) as NUL and two hex digits."""
    return _walk(obj, lambda s: _SURROGATE.sub(_esc, s), _has_surrogate)


def unescape(obj: Any) -> Any:
    """What ``escape`` made, back: NUL and two hex digits 80..ff as the byte's surrogate."""
    return _walk(obj, lambda s: _ESCAPED.sub(_unesc, s), lambda s: ESC in s)


def dumps(obj: Any, option: int | None = None) -> bytes:
    """orjson.dumps, and a string holding an undecodable byte written escaped."""
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


def shown(text: str) -> str:
    """A name fit to print: each undecodable byte as \\xNN."""
    if text.isascii():
        return text
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def for_people(obj: Any) -> Any:
    """obj with every string fit to print (``shown``): what sbs-tools prints."""
    return _walk(obj, shown, _has_surrogate)
