"""The secondary's own look at its copy: what was changed or deleted here by hand is found and
fetched again, in a rolling check.

The secondary's folders are the primary's copy; nothing but the node should write them. Yet a
file edited or deleted there by hand stayed so while the pair ran (only a snapshot looked at the
secondary's own tree), its status said synced, and after a failover the new primary published
the edit over the primary's content. So the syncer looks, every LOOK_EVERY seconds when it has
nothing else to do, at up to SLICE objects the pair agreed on (the journal has the token of
the primary's entry: it was applied here), round the folders: an object whose kind, size or
mtime is not the entry's, or that is gone, is applied again like a change from the primary
(its content is kept under conflicts first when it differs from what was agreed, as any change
of this node's). 100,000 files are looked at in under four minutes, an lstat each.

What the check cannot see, as rsync's quick check cannot: a change that keeps a file's size and
mtime (within MTIME_SLACK_NS). A folder away (node/pending.py) or refused is not looked at.
"""
from __future__ import annotations

import logging
import os
import stat
from collections.abc import Callable, Container, Mapping
from typing import Any

log = logging.getLogger("sbs.syncer")

LOOK_EVERY = 2.0
# a folder on a filesystem that keeps coarser times than the primary's (whole seconds, FAT's
# two) holds every file's mtime a little off the entry's: not a change by hand (one made by
# hand is seconds to years off, and mostly changes the size too)
MTIME_SLACK_NS = 2_000_000_000
SLICE = 1000  # ~9 us each measured on a busy 2-core VM: ~0.5 % of a core


def drifted(root: str, e: Mapping[str, Any]) -> bool:
    """Is the object at e's path here not what the entry says (kind, size, mtime, a link's
    target), or gone? False when it cannot be looked at (not this check's to judge)."""
    path = os.path.join(root, e["path"])
    try:
        st = os.lstat(path)
    except (FileNotFoundError, NotADirectoryError):
        return True
    except OSError:
        return False
    kind, mode = e["kind"], st.st_mode
    if kind == "dir":
        return not stat.S_ISDIR(mode)
    if kind == "link":
        if not stat.S_ISLNK(mode):
            return True
        try:
            return os.readlink(path) != e.get("target")
        except OSError:
            return False
    return (not stat.S_ISREG(mode) or st.st_size != e["size"]
            or abs(st.st_mtime_ns - e["mtime_ns"]) >= MTIME_SLACK_NS)


class DriftCheck:
    """Where the rolling check is: per folder, the paths of the round and how far it got."""

    def __init__(self) -> None:
        self.order: dict[str, list[str]] = {}
        self.at: dict[str, int] = {}

    def look(self, known: Mapping[str, Mapping[str, Mapping[str, Any]]],
             roots: Mapping[str, str], agreed: Callable[[str, str], str | None],
             token: Callable[[Mapping[str, Any]], str | None],
             budget: int = SLICE, pending: Container[tuple[str, str]] = ()
             ) -> dict[str, list[Mapping[str, Any]]]:
        """The next slice of every folder in `roots` (name -> root): {folder: entries whose
        objects drifted}. Only what the pair agreed on (agreed(name, path) is token(entry))
        is judged: a file in flight or refused is someone else's, and so is one `pending`
        ((folder, path): its retry has it; found again at every look, it was fetched and
        logged every 2 s while its folder could not be written)."""
        found: dict[str, list[Mapping[str, Any]]] = {}
        for name in sorted(roots):
            index = known.get(name)
            if not index:
                continue
            share = max(1, budget // len(roots))
            order = self.order.get(name)
            at = self.at.get(name, 0)
            if order is None or at >= len(order):
                order, at = list(index), 0  # a new round: what the index holds now
                self.order[name] = order
            root = roots[name]
            for path in order[at:at + share]:
                e = index.get(path)
                if e is None or agreed(name, path) != token(e) or (name, path) in pending:
                    continue
                if drifted(root, e):
                    found.setdefault(name, []).append(e)
            self.at[name] = at + share
        for name in list(self.order):
            if name not in roots:
                del self.order[name], self.at[name]
        return found
