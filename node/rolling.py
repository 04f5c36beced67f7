"""The primary's rolling rescan: a slice of the folders' directories every `period`, least
recently looked at first, so that a change the watcher missed is found within `rescan_cycle`
(Rotation, which the Scanner in node/scanner.py drives), and the listing and lstat of one
directory against the index (rescan_dir).
"""
from __future__ import annotations

import collections
import errno
import math
import os
import stat
import time
from collections.abc import Callable, Iterator

from .entries import dir_entry, same_entry
from .filters import Filter
from .index import RACY_NS, FolderMissing, HashCache, _entry_from_stat, cache_key_of, scan_paths
from .tree import DIR_FLAGS, TEMP_PREFIX

# The smallest slice, in index entries: a tree this size is rescanned whole every period (a few
# milliseconds), and a bigger one in slices of at least this many.
MIN_SLICE = 2000
# the paths of one directory's direct entries (Rotation.kids)
Kids = tuple[str, ...] | set[str]


class Rotation:
    """Which directories the rolling rescan looks at next: least recently looked at first.

    Every `period` a slice of ``max(MIN_SLICE, entries * period / cycle)`` entries is taken,
    plus every directory that would otherwise go unseen for longer than `cycle`: so each
    directory is listed, and each entry in it lstat'ed, at least once every ``max(period,
    cycle)`` seconds. A full scan resets the order; new directories (from a watch batch or
    found by a slice) join at the end, deleted ones leave.
    """

    def __init__(self, period: float, cycle: float, min_slice: int = MIN_SLICE):
        self.period, self.cycle, self.min_slice = period, max(period, cycle), min_slice
        # (folder, reldir) -> (last looked at, its (mtime, ctime, ino) when its names matched
        # the index, or None: not known, compare names next time)
        self.dirs: collections.OrderedDict[tuple[str, str], tuple[float, tuple | None]] = (
            collections.OrderedDict())
        # folder -> {reldir: paths of its direct entries}: built from the index once after a
        # full scan, when a slice first needs it, then kept by note(). A tuple until note()
        # changes that directory, then a set: tuples cost a tenth of a set's hash table
        # (~6 MB less at 100,000 files) and most directories never change.
        self.kids: dict[str, dict[str, Kids]] = {}

    def children(self, name: str, index: dict[str, dict]) -> dict[str, Kids]:
        got = self.kids.get(name)
        if got is None:
            got = self.kids[name] = children(index)
        return got

    def reset(self, indexes: dict[str, dict[str, dict]], now: float) -> None:
        self.dirs.clear()
        self.kids.clear()
        for name, index in indexes.items():
            self.dirs[(name, "")] = (now, None)
            for path, e in index.items():
                if e["kind"] == "dir":
                    self.dirs[(name, path)] = (now, None)

    def note(self, name: str, changes: list[dict], now: float | None = None) -> None:
        """Take in the directories a delta created or deleted."""
        now = time.monotonic() if now is None else now
        kids = self.kids.get(name)
        for e in changes:
            key = (name, e["path"])
            if kids is not None:
                parent = e["path"].rpartition("/")[0]
                got = kids.get(parent)
                if not isinstance(got, set):
                    got = kids[parent] = set(got or ())
                if e.get("deleted"):
                    got.discard(e["path"])
                    kids.pop(e["path"], None)
                else:
                    got.add(e["path"])
            if e.get("deleted") or e["kind"] != "dir":
                self.dirs.pop(key, None)
            elif key not in self.dirs:
                self.dirs[key] = (now, None)  # just walked by the scan that found it

    def forget(self, name: str, rel: str) -> None:
        self.dirs.pop((name, rel), None)

    def dir_key(self, name: str, rel: str) -> tuple | None:
        got = self.dirs.get((name, rel))
        return None if got is None else got[1]

    def visited(self, name: str, rel: str, now: float, entries: int, dkey: tuple | None
                ) -> None:
        self.dirs[(name, rel)] = (now, dkey)
        self.dirs.move_to_end((name, rel))
        self._work += entries

    def take(self, now: float, total: int) -> Iterator[tuple[str, str]]:
        """The next slice, one directory at a time; the caller calls visited() or forget()
        for each before taking the next (that is what moves the rotation on)."""
        share = total if self.cycle <= self.period else max(
            self.min_slice, math.ceil(total * self.period / self.cycle))
        overdue = now + self.period - self.cycle  # seen before this: due now, share or not
        self._work = 0
        for _ in range(len(self.dirs)):
            if not self.dirs:
                return
            key, (seen, _) = next(iter(self.dirs.items()))
            if seen >= now or (self._work >= share and seen > overdue):
                return
            yield key
            if key in self.dirs and next(iter(self.dirs)) == key:
                self.dirs.move_to_end(key)  # not reported back: never stall on it


def children(index: dict[str, dict]) -> dict[str, Kids]:
    """{reldir: (paths of its direct entries)} of an index."""
    out: dict[str, list[str]] = {}
    for path in index:
        out.setdefault(path.rpartition("/")[0], []).append(path)
    return {rel: tuple(paths) for rel, paths in out.items()}


def _open_dir(root: str, rel: str) -> int:
    """The directory root/rel, opened one component at a time without following a link."""
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    for part in rel.split("/") if rel else ():
        try:
            sub = os.open(part, DIR_FLAGS, dir_fd=fd)
        finally:
            os.close(fd)
        fd = sub
    return fd


def rescan_dir(root: str, filt: Filter, cache: HashCache, index: dict[str, dict], rel: str,
               old_key: tuple | None, kids: Callable[[], dict[str, Kids]]
               ) -> tuple[list[dict], int, tuple | None]:
    """Compare one directory's entries (not deeper) with the index, updating the index in
    place: (the delta, how many names it holds, its stat key for next time).

    An unchanged file costs one lstat and a HashCache look-up: no Entry is built. Anything
    else (a new name, a new folder, a kind that changed, a name gone) goes through scan_paths,
    the watcher's own path. Names that vanished are looked for only when the directory's
    mtime, ctime or inode moved since its names last matched the index (a create, a delete or
    a rename always moves them), so an idle directory never needs the index's list of names.
    """
    prefix = rel + "/" if rel else ""
    base = os.path.join(root, rel) if rel else root
    try:
        fd = _open_dir(root, rel)
    except OSError as exc:
        if not rel and exc.errno in (errno.ENOENT, errno.ENOTDIR):
            raise FolderMissing(root) from None
        if exc.errno in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP):
            return scan_paths(root, filt, cache, index, {rel}), 1, None
        cache.warn_once(base, "skipping unreadable folder %s: %s", base, exc)
        return [], 1, old_key  # unreadable is not deleted: keep what we had
    delta: list[dict] = []
    redo: set[str] = set()
    names: set[str] = set()
    base_slash = base + "/"
    # HashCache.lookup inlined (relpath -> FileEntry): this loop is the
    # whole cost of an idle node, a few microseconds per file
    cached = cache._map.get
    lstat = os.stat
    every = filt._all  # no filter: no match per name
    try:
        dst = os.fstat(fd)  # before the listing: a change after it moves the key
        dkey = (dst.st_mtime_ns, dst.st_ctime_ns, dst.st_ino)
        with os.scandir(fd) as it:
            for de in it:
                name = de.name
                if name.startswith(TEMP_PREFIX):
                    continue
                path = prefix + name
                names.add(path)
                old = index.get(path)
                try:
                    if old is not None and old["kind"] == "file":
                        st = lstat(name, dir_fd=fd, follow_symlinks=False)
                        hit = cached(path)
                        if (hit is old and hit.cache_key == cache_key_of(st)
                                and hit.size == st.st_size and hit.mtime_ns == st.st_mtime_ns):
                            continue  # the usual case: nothing changed
                    else:
                        is_dir = de.is_dir(follow_symlinks=False)
                        if not is_dir and not every and not filt.match(path):
                            continue
                        st = lstat(name, dir_fd=fd, follow_symlinks=False)
                except OSError:
                    if old is not None:
                        redo.add(path)
                    continue
                if stat.S_ISDIR(st.st_mode):
                    if old is None or old["kind"] != "dir":
                        redo.add(path)  # a new folder: scan_paths walks it
                    elif old["mode"] != st.st_mode & 0o777:
                        index[path] = entry = dir_entry(path, st)
                        delta.append(entry)
                    continue
                if old is not None and old["kind"] == "dir":
                    redo.add(path)
                    continue
                abspath = base_slash + name
                entry = _entry_from_stat(path, abspath, st, filt, cache, (fd, name))
                if entry is None:
                    if old is not None:
                        redo.add(path)
                elif old is None or not same_entry(old, entry):
                    index[path] = entry
                    delta.append(entry)
    except OSError as exc:
        cache.warn_once(base, "skipping unreadable folder %s: %s", base, exc)
        return delta, max(1, len(names)), None
    finally:
        os.close(fd)
    if dkey != old_key:
        redo.update(p for p in kids().get(rel, ()) if p not in names)
    if redo:
        delta += scan_paths(root, filt, cache, index, redo)
    # a change in the same timestamp tick as the listing would not move the key: not kept
    fresh = time.time_ns() - max(dkey[0], dkey[1]) < RACY_NS
    return delta, max(1, len(names)), None if fresh or redo else dkey
