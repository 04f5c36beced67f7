"""The hash cache kept on disk, so that a restarted node, or one that has just taken over, does
not read every file again to learn what it already knew.

Without it the first scan of a process reads every byte of every folder: after a takeover the
new primary rehashes its whole copy before it can serve a snapshot, and the old primary, back
as secondary, rehashes its own before it can compare. With 100,000 small files that is seconds
of CPU; with a terabyte it is hours of disk.

One file per folder, ``state_dir/hashes/<folder>.jsonl``: a header line
``{"v": 2, "root": ..., "dev": ...}``, then one line per file, ``CRC [path, size, mtime_ns,
mode, hash, ino, ctime_ns]``: the CRC-32 of the JSON array in hex, so that a line damaged on
disk (one digit of a hash changed) is skipped, not trusted: a wrong hash whose stat still
matched was served in every manifest, and that file never reached the secondary.
It is only a hint: an entry is used when the file's size, mtime, inode
and ctime are all still the ones it was hashed at (HashCache.lookup), and the kernel sets the
ctime on every change of content or metadata, so a file changed while the node was down (even
one whose size and mtime were put back) is read again. Entries are stored only once their ctime
is older than index.RACY_NS (a change within the same timestamp tick cannot be seen). A file for
another root or filesystem is not used; a line that does not parse or does not fit is skipped
and counted; an unreadable file is logged and the node hashes as it would without it.

Saved by the thread that owns the caches (the scanner, or the syncer), when ``changed`` is large
(a first scan, a snapshot applied: within seconds) or at least every SAVE_EVERY seconds when
anything changed, and once more when the node stops cleanly. A crash loses at most what
changed since the last save: those files are read again.

The syncer hashes what it writes as it receives it, but the ctime of a file it has just renamed
into place is not safe to key on: a change in the same timestamp tick (a kernel tick on kernels
before 6.13) would leave it as it is. So each file it puts in place is noted (``wrote``) and,
at least RACY_NS later, read and hashed once more through the cache by the scanner's own rule
(``settle``, FolderWriter.local_entry): what is cached is what is on disk then, never what was
meant to be written. This costs the secondary one read of each file it wrote, from the page
cache and off the critical path, instead of the new primary reading all of them at takeover.
"""
from __future__ import annotations

import logging
import os
import re
import threading
import time
import zlib
from collections.abc import Callable
from pathlib import Path

import orjson

from . import names
from .entries import MODES, FileEntry
from .index import RACY_NS, HashCache

log = logging.getLogger("sbs.hashstore")

FORMAT = 2
SAVE_EVERY = 300.0  # seconds: a trickle of changes costs one rewrite per this
BIG = 64  # changed entries (and a tenth of the cache) that make a save due at once
_LINES = 2000  # lines per write: the file is never built whole in memory
# A load gives up the GIL every this many lines (~0.5 ms of work): a node restarted next to a
# primary loads its cache while it hears that primary, and a loop that had to win the GIL back
# from the load after each of its system calls took up to 250 ms to follow (by hand, 100,000
# lines), 4-31 ms with this
YIELD_LINES = 200
WROTE_SPAN = 10_000_000  # ns: files the syncer wrote within this share one time
SETTLE_SLICE = 256  # files settled between two looks at the owner's work (~5 ms)
_HASH = re.compile(r"[0-9a-f]{32}")
_I63 = 1 << 63


def cache_path(state_dir: Path, folder: str) -> Path:
    return Path(state_dir) / "hashes" / f"{folder}.jsonl"


def vanished(state_dir: Path, folder: str, root: str) -> str:
    """Why ``root`` looks like a disk not mounted, by the hash cache this node saved for it
    when it held files there, or "": missing, or empty on another device than then. Nothing
    is written there then (the copy would fill the filesystem under the mount point) until it
    is back, or the operator removes the cache file to replicate into it anew."""
    path, root = cache_path(state_dir, folder), os.path.abspath(root)
    try:
        with open(path, "rb") as fh:
            head, held = orjson.loads(fh.readline()), bool(fh.readline().strip())
    except (OSError, ValueError):  # none, or not one (load() says so when it is read)
        return ""
    if not (isinstance(head, dict) and head.get("root") == root and held):
        return ""
    undo = f"mount it, or remove {path} to replicate into it anew"
    try:
        st = os.stat(root)
    except FileNotFoundError:
        return (f"it is missing, though this node held files in it (a disk not mounted?); "
                f"not made again: {undo}")
    except OSError:
        return ""  # what opening it says is the better reason
    if st.st_dev != head.get("dev") and _is_empty(root):
        return (f"it is empty and on another device than when this node held files in it (a "
                f"disk not mounted?): {undo}")
    return ""


def _is_empty(root: str) -> bool:
    try:
        with os.scandir(root) as it:
            return next(it, None) is None
    except OSError:
        return True  # nothing listed


def _root_dev(root: str) -> int | None:
    try:
        return os.stat(root).st_dev
    except OSError:
        return None


def load(path: Path, root: str, stopping: Callable[[], bool] = lambda: False) -> HashCache:
    """The cache saved for ``root`` at ``path``; an empty one when there is none or it does not
    belong to this root (logged, never raised), or when ``stopping()`` turned true on the way
    (a scan begun at start-up and dropped: 100,000 lines are ~0.3 s of CPU the node needs for
    what it does instead)."""
    cache = HashCache()
    root = os.path.abspath(root)
    for old in path.parent.glob(f".{path.name}.*.tmp") if path.parent.is_dir() else ():
        if old.name.split(".")[-3] != str(os.getpid()):  # a killed process's half-written save
            try:
                old.unlink()
            except OSError:
                pass
    try:
        fh = open(path, "rb")
    except FileNotFoundError:
        return cache
    except OSError as exc:
        log.warning("hash cache %s not read: %s (files are hashed again)", path, exc)
        return cache
    bad = 0
    with fh:
        try:
            head = orjson.loads(fh.readline())
        except orjson.JSONDecodeError:
            head = None
        if not isinstance(head, dict) or head.get("v") != FORMAT:
            log.warning("hash cache %s not used: not a version %d cache file", path, FORMAT)
            return cache
        dev = _root_dev(root)
        if head.get("root") != root or head.get("dev") != dev:
            log.info("hash cache %s not used: it was made for %r on device %s, the folder is "
                     "%r on device %s", path, str(head.get("root"))[:200], head.get("dev"), root,
                     dev)
            return cache
        store = cache._map
        loads, escaped = orjson.loads, names.RAW_ESC
        try:
            for n, line in enumerate(fh):
                if n % _LINES == 0 and n and stopping():
                    return HashCache()
                if n % YIELD_LINES == 0:
                    time.sleep(0)  # let the node loop have the GIL (YIELD_LINES)
                try:
                    crc, _, body = line.partition(b" ")
                    if int(crc, 16) != zlib.crc32(body.rstrip(b"\n")):
                        raise ValueError
                    p, size, mtime, mode, h, ino, ctime = loads(body)
                    if escaped in body:  # a name that is not UTF-8 (node/names.py)
                        p = names.unescape(p)
                    if not (type(p) is str and p and type(h) is str and _HASH.fullmatch(h)
                            and type(size) is int and type(mtime) is int and type(ino) is int
                            and type(ctime) is int and type(mode) is int
                            and 0 <= size < _I63 and 0 <= ino < 1 << 64 and 0 <= ctime < _I63
                            and -_I63 <= mtime < _I63 and 0 <= mode <= 0o777):
                        raise ValueError
                except (ValueError, TypeError):  # orjson's error is a ValueError
                    bad += 1
                    continue
                entry = FileEntry(p, "file", size, mtime, MODES[mode], h)
                entry.cache_key = (ino << 64) | ctime
                store[p] = entry
        except OSError as exc:
            log.warning("hash cache %s read in part: %s", path, exc)
    if bad:
        log.warning("hash cache %s: %d line(s) skipped (not a cache entry, or damaged)", path,
                    bad)
    return cache


def cache_line(body: bytes) -> bytes:
    """One entry's line (without its newline): the CRC-32 of its JSON array, then the array."""
    return b"%08x %s" % (zlib.crc32(body), body)


def save(path: Path, root: str, cache: HashCache,
         keep: Callable[[FileEntry], bool] | None = None,
         stopping: Callable[[], bool] = lambda: False) -> int:
    """Write the cache (its entries that ``keep``, all without one) for ``root`` atomically.
    Entries left out are dropped from the cache too (files gone from the folder). Returns how
    many were written; 0 when ``stopping()`` turned true on the way (nothing is replaced).
    OSError when it cannot be written (the caller logs it)."""
    root = os.path.abspath(root)
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    # a name of its own: a stopping scanner and the next role's syncer may save at once
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    items = cache._map
    if keep is not None:
        for p in [p for p, e in items.items() if not keep(e)]:
            del items[p]
    dumps = names.dumps
    complete = False
    try:
        with open(tmp, "wb") as fh:
            fh.write(dumps({"v": FORMAT, "root": root, "dev": _root_dev(root)}) + b"\n")
            lines: list[bytes] = []
            for e in items.values():
                key = e.cache_key
                lines.append(cache_line(dumps([e.path, e.size, e.mtime_ns, e.mode, e.hash,
                                               key >> 64, key & 0xFFFF_FFFF_FFFF_FFFF])))
                if len(lines) >= _LINES:
                    fh.write(b"\n".join(lines) + b"\n")
                    lines.clear()
                    if stopping():
                        break
            else:  # not told to stop on the way
                fh.write(b"".join(line + b"\n" for line in lines))
                complete = True
        if not complete:  # nothing is replaced
            os.unlink(tmp)
            return 0
        os.replace(tmp, path)  # not fsynced: a torn file after a crash only costs hashing
    except OSError:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    cache.changed = 0
    return len(items)


class CacheKeeper:
    """One thread's caches on disk: which are there, what is unsettled, when to save.

    ``folders``: folder name -> (root, HashCache); ``keep(name)`` gives the filter of entries
    still wanted (None: all). ``stop_flag()`` true: the owner's thread is told to stop, and a
    save or settle under way gives up (the node loop may be waiting for it) unless ``at_exit``
    (the node is stopping: the owner saves once more on its way out). ``busy()`` true: work
    waits for the owner's thread (the syncer's next manifest); a settle gives way to it every
    SETTLE_SLICE files, the save is made due again at once and the file is written when the
    settle is done. Used by the one thread that owns the caches.
    """

    def __init__(self, state_dir: Path, who: str, save_every: float = SAVE_EVERY,
                 stopping: Callable[[], bool] = lambda: False,
                 busy: Callable[[], bool] = lambda: False):
        self.state_dir = Path(state_dir)
        self.who = who  # "scanner" or "syncer", for the log
        self.save_every = save_every
        self.stop_flag = stopping
        self.busy = busy
        self.at_exit = False
        self.racy_ns = RACY_NS
        self.last_save = time.monotonic()
        # folder -> [(time.monotonic_ns() when the syncer began putting them in place,
        # [paths])]: one time per WROTE_SPAN, not per file (a dict and an int a file cost ~10 MB
        # at 100,000 files). Monotonic: a wall clock set back an hour held every file written
        # since (behind the spans before the step) unsettled, so uncached, for that hour
        # (FolderWriter.local_entry's own racy rule still looks at the file's times)
        self.unsettled: dict[str, list[tuple[int, list[str]]]] = {}
        # after a big save, the files written too recently to settle get one more save soon
        self.again_at: float | None = None
        self.failed_at: float | None = None  # the last save that could not be written
        self.gave_way = self.big = False  # a save that gave way, and whether it was a big one

    def stopping(self) -> bool:
        return self.stop_flag() and not self.at_exit

    def load(self, name: str, root: str, *, give_up: bool = False) -> HashCache:
        """``give_up``: an empty cache as soon as the owner is told to stop (the scanner's
        prescan, dropped when the node turns out not to be primary). The syncer goes on to
        scan with what it loads, so it never gives up: it would hash every file instead."""
        path = cache_path(self.state_dir, name)
        t0 = time.monotonic()
        cache = load(path, root, self.stopping if give_up else (lambda: False))
        if give_up and self.stopping():
            log.debug("%s: loading the hash cache of %s given up (stopping)", self.who, name)
        elif len(cache):
            log.info("%s: %d file hashes of folder %s from %s (%.2f s)", self.who, len(cache),
                     name, path, time.monotonic() - t0)
        return cache

    def wrote(self, name: str, path: str) -> None:
        """A file the syncer has just put in place (module doc)."""
        now = time.monotonic_ns()
        spans = self.unsettled.setdefault(name, [])
        if spans and now - spans[-1][0] < WROTE_SPAN:
            spans[-1][1].append(path)
        else:
            spans.append((now, [path]))

    def forget(self, name: str) -> None:
        self.unsettled.pop(name, None)

    def settle(self, name: str, look: Callable[[str], object]) -> bool:
        """``look(path)`` each written file at least racy_ns after it was put in place:
        it is read and hashed then, through the cache (FolderWriter.local_entry), and cached
        by the scanner's own rule. Newer ones wait for the next save. False when it gave way
        to the owner's work (``busy``) or to a stop before all ripe ones were looked at: the
        rest wait, in order, for the next pass."""
        spans = self.unsettled.get(name)
        ripe = time.monotonic_ns() - self.racy_ns - WROTE_SPAN
        done = True
        while spans and spans[0][0] <= ripe:
            at, paths = spans[0]
            for i, path in enumerate(paths):
                if i % SETTLE_SLICE == 0 and i and self._give_way():
                    spans[0] = (at, paths[i:])
                    return False
                try:
                    look(path)
                except (OSError, ValueError):  # gone, unreadable, not a file: not cached
                    pass
            spans.pop(0)
            if spans and spans[0][0] <= ripe and self._give_way():
                done = False
                break
        if spans is not None and not spans:
            del self.unsettled[name]
        return done

    def _give_way(self) -> bool:
        """Stop settling for now: the thread is told to stop, or work waits for it (a change
        that arrived right after a 100,000-file snapshot waited 1.9 s for the settle)."""
        return self.stopping() or (self.busy() and not self.at_exit)

    def _unsettled(self) -> int:
        return sum(len(paths) for spans in self.unsettled.values() for _, paths in spans)

    def next_save(self) -> float:
        """The monotonic time by which the owner's loop should call due() again."""
        at = self.last_save + self.save_every
        return at if self.again_at is None else min(at, self.again_at)

    def due(self, caches: dict[str, HashCache], now: float) -> bool:
        if self.stopping():
            return False
        changed = sum(c.changed for c in caches.values())
        fresh = self._unsettled()
        if not changed and not fresh:
            return False
        if now >= self.next_save():
            return True
        if self.failed_at is not None and now - self.failed_at < self.save_every:
            return False  # a full or read-only state disk is not rewritten on every pass
        size = sum(len(c) for c in caches.values())
        return changed + fresh >= max(BIG, size // 10)

    def save(self, folders: dict[str, tuple[str, HashCache]],
             keep: Callable[[str], Callable[[FileEntry], bool] | None] = lambda name: None,
             look: Callable[[str], Callable[[str], object]] | None = None) -> None:
        """Settle what can be (``look(name)``: the folder's look, see settle), then write
        every cache that changed. Never raises: a cache that cannot be saved costs hashing
        later, nothing else."""
        try:
            self._save(folders, keep, look)
        except Exception:
            log.exception("%s: saving the hash caches failed", self.who)

    def _save(self, folders: dict[str, tuple[str, HashCache]],
              keep: Callable[[str], Callable[[FileEntry], bool] | None],
              look: Callable[[str], Callable[[str], object]] | None) -> None:
        t0 = self.last_save = time.monotonic()
        # a pass that goes on after giving way is still the save it began as
        big = self.big if self.gave_way else (self.again_at is None
                                              and self._unsettled() >= BIG)
        self.again_at, self.gave_way = None, False
        written = changed = 0
        for name, (root, cache) in folders.items():
            if look is not None and not self.settle(name, look(name)):
                # gave way: the owner's work first, then this save again at once
                self.again_at, self.gave_way, self.big = time.monotonic(), True, big
                return
            if not cache.changed or self.stopping():
                continue
            changed += cache.changed
            try:
                written += save(cache_path(self.state_dir, name), root, cache, keep(name),
                                self.stopping)
            except OSError as exc:
                if self.failed_at is None:
                    log.warning("%s: hash cache of %s not saved: %s (tried again in %.0f s; "
                                "a restart meanwhile hashes its files again)", self.who, name,
                                exc, self.save_every)
                self.failed_at = time.monotonic()
                continue
            self.failed_at = None
        if big and self.unsettled:
            self.again_at = time.monotonic() + 2 * (self.racy_ns + WROTE_SPAN) / 1e9
        if written:  # a periodic save of a few changes is not news
            log.log(logging.INFO if changed >= BIG else logging.DEBUG,
                    "%s: %d file hashes saved (%.2f s)", self.who, written, time.monotonic() - t0)
