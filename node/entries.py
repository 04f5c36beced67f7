"""What a node knows of one object in a replicated folder: an Entry, and how it is kept.

An Entry describes one object inside a replicated folder: ``path`` (relative POSIX), ``kind``
(file|dir|link), ``size``, ``mtime_ns``, ``mode`` (st_mode & 0o777), ``hash`` (xxh3_128 hex of a
file's content, "" otherwise), ``target`` (links only) and, in deltas only, ``deleted: True``.
It is read like a dict (``e["size"]``, ``e.get("target")``, ``dict(e)``) and goes on the wire as
a JSON object. What a node keeps is compact: a FileEntry (files and dirs) or a LinkEntry, slotted
dataclasses that orjson writes as exactly those keys, ~96 bytes a file against ~290 for a dict;
a deletion, and anything from the wire of another shape, stays a plain dict. An index is
``dict[path -> Entry]`` for one folder (node/index.py builds and keeps it).

Directory mtimes are not replicated (writing a file into a directory changes it), so a dir's
``mtime_ns`` is always 0. Symbolic links are described, never followed.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

_COMPARED = ("kind", "size", "mtime_ns", "mode", "hash", "target")

# One int object per mode, shared by every Entry: ints above 256 are not shared by Python, and
# a mode of its own cost 28 bytes a file. Indexed by any mode the protocol allows (0..0o7777).
MODES = tuple(range(0o10000))
_KINDS = {k: k for k in ("file", "dir", "link")}


class _Compact:
    """The dict face of a compact Entry: ``e[key]``, ``get``, ``in``, ``keys``/``items``,
    ``dict(e)``, ``{**e}`` and ``==`` (with a dict of the same keys and values too) behave as
    they did when entries were dicts. Read-only: an Entry is replaced, never changed. The slot
    here is the HashCache's and is not a field: orjson never sends it."""

    __slots__ = ("cache_key",)
    _keys: ClassVar[tuple[str, ...]]
    _key_set: ClassVar[frozenset[str]]

    def __getitem__(self, key: str) -> Any:
        if key in self._key_set:
            return getattr(self, key)
        raise KeyError(key)

    def get(self, key: str, default: Any = None) -> Any:
        return getattr(self, key) if key in self._key_set else default

    def __contains__(self, key: object) -> bool:
        return key in self._key_set

    def keys(self) -> tuple[str, ...]:
        return self._keys

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    def values(self) -> list[Any]:
        return [getattr(self, k) for k in self._keys]

    def items(self) -> list[tuple[str, Any]]:
        return [(k, getattr(self, k)) for k in self._keys]

    def __eq__(self, other: object) -> bool:
        if isinstance(other, _Compact | dict):
            return (len(other) == len(self._keys)
                    and all(k in other and other[k] == getattr(self, k) for k in self._keys))
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]  (a dict was not hashable either)

    def __repr__(self) -> str:
        return repr(dict(self.items()))


_FILE_KEYS = ("path", "kind", "size", "mtime_ns", "mode", "hash")


@dataclass(slots=True, eq=False, repr=False)
class FileEntry(_Compact):
    """A file or a directory (``kind``), as the index keeps it."""

    path: str
    kind: str
    size: int
    mtime_ns: int
    mode: int
    hash: str
    _keys: ClassVar[tuple[str, ...]] = _FILE_KEYS
    _key_set: ClassVar[frozenset[str]] = frozenset(_FILE_KEYS)


@dataclass(slots=True, eq=False, repr=False)
class LinkEntry(FileEntry):
    """A symbolic link, as the index keeps it: the fields of any entry and its target."""

    target: str
    _keys: ClassVar[tuple[str, ...]] = (*_FILE_KEYS, "target")
    _key_set: ClassVar[frozenset[str]] = frozenset((*_FILE_KEYS, "target"))


Mapping.register(_Compact)
Entry = dict[str, Any] | FileEntry | LinkEntry
KEPT = (FileEntry, LinkEntry)  # isinstance(e, KEPT): checked and converted already


def shared_values(entry: Entry) -> Entry:
    """An Entry from the wire (checked: protocol.entry_check) as the node keeps it: compact
    when it has the usual keys (a dict from orjson costs ~190 bytes more a file), its kind and
    mode the shared objects (orjson makes a new string and int for each). A deletion, or an
    entry of another shape, stays the dict it came as. A kept entry is returned as it is."""
    if isinstance(entry, KEPT):
        return entry
    kind = _KINDS.get(entry["kind"], entry["kind"])
    mode = MODES[entry["mode"]]
    n = len(entry)
    if n == 6 and kind != "link" and "hash" in entry:
        return FileEntry(entry["path"], kind, entry["size"], entry["mtime_ns"], mode,
                         entry["hash"])
    if n == 7 and kind == "link" and "hash" in entry and "target" in entry:
        return LinkEntry(entry["path"], kind, entry["size"], entry["mtime_ns"], mode,
                         entry["hash"], entry["target"])
    entry["kind"] = kind
    entry["mode"] = mode
    return entry


def dir_entry(relpath: str, st: os.stat_result) -> FileEntry:
    return FileEntry(relpath, "dir", 0, 0, MODES[st.st_mode & 0o777], "")


def link_entry(relpath: str, st: os.stat_result, target: str) -> LinkEntry:
    return LinkEntry(relpath, "link", len(os.fsencode(target)), st.st_mtime_ns, 0, "", target)


def file_entry(relpath: str, st: os.stat_result, h: str) -> FileEntry:
    return FileEntry(relpath, "file", st.st_size, st.st_mtime_ns, MODES[st.st_mode & 0o777], h)


def same_entry(a: Entry, b: Entry) -> bool:
    return all(a.get(k) == b.get(k) for k in _COMPARED)


def deleted_entry(old: Entry) -> Entry:
    gone = dict(old)
    gone["deleted"] = True
    return gone
