"""What the primary's scans skip because it is neither a regular file, a folder nor a symbolic
link: a FIFO, a socket, a device node. It is not replicated, so the operator is told: the
primary's status counts these and names a few, and its PINGs carry the same to the secondary,
whose status says them too (README, interface notes). (A name that is not UTF-8 is no reason:
it travels escaped, node/names.py.)

Each folder's HashCache holds an Unreplicable (the scans that skip an object record it there);
the scanner forgets what a full scan no longer finds, and prunes what is gone every period.
"""
from __future__ import annotations

import heapq
import os
import stat
from collections.abc import Iterable
from typing import Any

from .names import shown

# what is neither a regular file, a folder nor a link: never opened, never sent
SPECIAL = "only regular files, folders and links replicate"
_SPECIAL_KINDS = ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"),
                  (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"))
MAX_KEPT = 10_000  # per folder: past it the count says "at least"
SHOWN = 5  # names in status


class Unreplicable:
    """One folder's skipped objects: relpath -> why (special()'s)."""

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
        """Forget what is no longer there, or is something that replicates now."""
        for rel in list(self.paths):
            try:
                keep = special(os.lstat(os.path.join(root, rel)).st_mode) is not None
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
