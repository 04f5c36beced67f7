"""What the primary's scans skip because it cannot travel: a file, link or folder whose name,
or a link whose target, is not UTF-8 (the manifests are JSON), and what is none of those three
(a FIFO, a socket, a device node). It is not replicated, so the operator is told: the primary's
status counts these and names a few, and its PINGs carry the same to the secondary, whose status
says them too (README, interface notes).

Each folder's HashCache holds an Unreplicable (the scans that skip a name record it there); the
scanner forgets what a full scan no longer finds, and prunes what is gone every period.
"""
from __future__ import annotations

import heapq
import os
import stat
from collections.abc import Iterable
from typing import Any

NAME = "the name is not UTF-8"
TARGET = "link target is not UTF-8"
# what is neither a regular file, a folder nor a link: never opened, never sent
SPECIAL = "only regular files, folders and links replicate"
_SPECIAL_KINDS = ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"),
                  (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"))
MAX_KEPT = 10_000  # per folder: past it the count says "at least"
SHOWN = 5  # names in status


class Unreplicable:
    """One folder's skipped objects: relpath (as os.fsdecode gives it, with surrogates) ->
    why (NAME, TARGET or special()'s). A folder that is not UTF-8 is one object (nothing in
    it travels)."""

    def __init__(self) -> None:
        self.paths: dict[str, str] = {}

    def add(self, relpath: str, why: str) -> None:
        if relpath in self.paths or len(self.paths) < MAX_KEPT:
            self.paths[relpath] = why

    def discard(self, relpath: str) -> None:
        if self.paths:
            self.paths.pop(relpath, None)

    def clear(self) -> None:
        self.paths.clear()

    def prune(self, root: str) -> None:
        """Forget what is no longer there, or no longer unreplicable (a link retargeted)."""
        for rel, why in list(self.paths.items()):
            path = os.path.join(root, rel)
            try:
                if why == TARGET:
                    keep = not utf8_ok(os.readlink(path))
                elif why == NAME:
                    keep = bool(os.lstat(path))
                else:  # SPECIAL: until it is something that replicates
                    keep = special(os.lstat(path).st_mode) is not None
            except OSError:
                keep = False
            if not keep:
                del self.paths[rel]


def special(mode: int) -> str | None:
    """Why an object of this st_mode does not replicate ("a FIFO: ..."), or None when it does."""
    for test, kind in _SPECIAL_KINDS:
        if test(mode):
            return f"{kind}: {SPECIAL}"
    return None


def utf8_ok(name: str) -> bool:
    # os.scandir turns undecodable bytes into surrogates, which orjson cannot serialise.
    if name.isascii():
        return True
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def first_bad(relpath: str) -> str | None:
    """The part of relpath up to its first component that is not UTF-8, or None."""
    parts = relpath.split("/")
    for n, part in enumerate(parts):
        if not utf8_ok(part):
            return "/".join(parts[:n + 1])
    return None


def shown(relpath: str) -> str:
    """A name fit to print and to send: its undecodable bytes as \\xNN escapes."""
    return relpath.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def summary(folders: Iterable[tuple[str, Unreplicable]]) -> dict[str, Any] | None:
    """{count, names: a few "folder/path" escaped, capped: a folder hit MAX_KEPT}, or None."""
    folders = list(folders)
    count = sum(len(u.paths) for _, u in folders)
    if not count:
        return None
    names = heapq.nsmallest(SHOWN, (f"{n}/{shown(rel)}"[:300] for n, u in folders
                                    for rel in u.paths))
    return {"count": count, "names": names,
            "capped": any(len(u.paths) >= MAX_KEPT for _, u in folders)}


def skip_entry(cache: Any, filt: Any, path: str, de: os.DirEntry, abspath: str) -> None:
    """A name not UTF-8 met by a listing (the rolling rescan): recorded in the HashCache
    `cache` unless the Filter `filt` leaves it out (folders are never filtered)."""
    try:
        is_dir = de.is_dir(follow_symlinks=False)
    except OSError:
        return
    if is_dir or filt.match(path):
        cache.skip(path, abspath, NAME)


def watched_bad(root: str, filt: Any, cache: Any, relpath: str) -> bool:
    """A watched path that is not UTF-8 (scan_paths skips it): recorded in the HashCache
    `cache` while it is there, forgotten once gone. Always False (nothing to scan)."""
    if (bad := first_bad(relpath)) is not None:
        abspath = os.path.join(root, bad)
        try:
            is_dir = stat.S_ISDIR(os.lstat(abspath).st_mode)
        except OSError:
            cache.unreplicable.discard(bad)  # gone
            return False
        if bad != relpath or is_dir or filt.match(bad):
            cache.skip(bad, abspath, NAME)
    return False
