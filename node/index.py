"""A folder's index and how it is kept: content hashes, the hash cache, full and incremental
scans (node/watcher.py says what to scan again). An index is ``dict[path -> Entry]`` for one
folder; what an Entry is and how a node keeps it is node/entries.py."""

from __future__ import annotations

import errno
import logging
import os
import stat
import threading
import time
from collections.abc import Callable, Iterable

import xxhash

from .entries import (
    Entry,
    FileEntry,
    deleted_entry,
    dir_entry,
    file_entry,
    link_entry,
    same_entry,
)
from .filters import Filter
from .tree import TEMP_PREFIX, PathError, check_relpath, walk
from .unreplicable import Unreplicable, special

log = logging.getLogger(__name__)

CHUNK = 1 << 20
STABLE_TRIES = 3
# A write that lands in the same timestamp tick as our hash leaves size, mtime and ctime
# unchanged (the "racy git" problem), so a file changed this recently is hashed but not cached.
RACY_NS = 50_000_000
# on a filesystem whose times are whole seconds (ext4 with small inodes, FAT: two seconds)
COARSE_RACY_NS = 2_100_000_000
_OPEN_FILE = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


class FolderMissing(OSError):
    """The folder root is not there: never read this as "everything was deleted"."""

    def __init__(self, root: str):
        super().__init__(errno.ENOENT, "replicated folder is missing", root)


# ---------------------------------------------------------------------------------------------
# hashing

_local = threading.local()


def _buffer() -> memoryview:
    # One reusable 1 MiB buffer per thread: os.read(fd, 1 MiB) would allocate (and mmap) a fresh
    # megabyte for every small file.
    buf = getattr(_local, "buf", None)
    if buf is None:
        buf = _local.buf = memoryview(bytearray(CHUNK))
    return buf


def new_hasher() -> xxhash.xxh3_128:
    return xxhash.xxh3_128()


def hash_bytes(b: bytes | bytearray | memoryview) -> str:
    return xxhash.xxh3_128_hexdigest(b)


def hash_fd(fd: int) -> str:
    """Hash from the current offset of an open file to its end."""
    hasher = xxhash.xxh3_128()
    buf = _buffer()
    while n := os.readv(fd, [buf]):
        hasher.update(buf[:n])
    return hasher.hexdigest()


# ---------------------------------------------------------------------------------------------
# hash cache


def _stat_key(st: os.stat_result) -> tuple[int, int, int, int]:
    return (st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns)


def cache_key_of(st: os.stat_result) -> int:
    """A file's inode and ctime as one int, unique for each pair (ctime_ns is below 2**63)."""
    return (st.st_ino << 64) | (st.st_ctime_ns & 0xFFFF_FFFF_FFFF_FFFF)


class HashCache:
    """relpath -> FileEntry, for ONE folder: an unchanged file is never re-read, and its Entry
    is the very object built when it was hashed, so a rescan of an unchanged tree allocates
    nothing per file (entries are never changed in place: a change replaces them). The inode
    and ctime the hash was taken at ride on the Entry itself, as one int (``cache_key``, see
    cache_key_of: a slot that never goes on the wire; two ints cost ~24 bytes a file more), its
    size and mtime are the Entry's own: a tuple beside it cost ~80 bytes a file. The key is
    the Entry's own path string.

    Used by one thread. ``hashed`` counts the files whose content was actually read,
    ``changed`` the entries stored or dropped since it was last saved (node/hashstore.py).
    """

    def __init__(self, racy_ns: int = RACY_NS):
        self._map: dict[str, FileEntry] = {}
        self.racy_ns = racy_ns
        self.hashed = 0
        self.changed = 0
        self._warned: set[str] = set()
        self.unreplicable = Unreplicable()  # the FIFOs, sockets and devices skipped
        # files whose last read failed (permissions, an I/O error): there, so not deleted
        self.unreadable: set[str] = set()

    def __len__(self) -> int:
        return len(self._map)

    def lookup(self, relpath: str, st: os.stat_result) -> Entry | None:
        """The file's Entry as last hashed, if its size, mtime, inode and ctime are unchanged
        (a chmod changes the ctime)."""
        hit = self._map.get(relpath)
        if (hit is None or hit.cache_key != cache_key_of(st)
                or hit.size != st.st_size or hit.mtime_ns != st.st_mtime_ns):
            return None
        return hit

    def store(self, st: os.stat_result, entry: FileEntry) -> None:
        """Keep entry for its path; its size and mtime_ns must be st's (file_entry's)."""
        self.changed += 1
        racy = self.racy_ns
        if not st.st_ctime_ns % 1_000_000_000:  # whole seconds: a filesystem with coarse times
            racy = max(racy, COARSE_RACY_NS)
        if time.time_ns() - max(st.st_ctime_ns, st.st_mtime_ns) < racy:
            self._map.pop(entry.path, None)
            return
        entry.cache_key = cache_key_of(st)
        self._map[entry.path] = entry

    def swap(self, held: FileEntry, same: FileEntry) -> bool:
        """Hold ``same`` (an Entry of the same path and content kept elsewhere: one object,
        not two) where the cache holds ``held`` now, under held's key. False when it holds
        something else for that path."""
        if self._map.get(held.path) is not held:
            return False
        same.cache_key = held.cache_key
        self._map[held.path] = same
        return True

    def warn_once(self, key: str, msg: str, *args: object) -> None:
        # An unreadable file would otherwise log again on every periodic rescan.
        if key not in self._warned:
            self._warned.add(key)
            log.warning(msg, *args)

    def skip(self, relpath: str, abspath: str, why: str) -> None:
        """An object that cannot be replicated (unreplicable.py): kept for status, logged once."""
        self.unreplicable.add(relpath, why)
        self.warn_once(abspath, "skipping %r: %s", abspath, why)


def hashed_file_entry(relpath: str, abspath: str, st: os.stat_result, cache: HashCache,
                      opener: Callable[[], int]) -> Entry | None:
    """The Entry of a regular file, its hash from the cache or read through ``opener()``.

    The stat is taken on the open fd before and after hashing; when they differ the file changed
    under us and is read again, so a manifest never pairs a hash with the wrong size or mtime.
    None when the file vanished, became something else, or cannot be read (then its relpath
    is in ``cache.unreadable`` until a read succeeds: the scans keep what they had for it).
    """
    hit = cache.lookup(relpath, st)
    if hit is not None:
        return hit
    cache.unreadable.discard(relpath)
    for _ in range(STABLE_TRIES):
        try:
            fd = opener()
        except (FileNotFoundError, NotADirectoryError):
            return None
        except OSError as e:
            if e.errno != errno.ELOOP:  # ELOOP: it just became a symlink; its event follows
                cache.warn_once(abspath, "cannot read %s: %s", abspath, e)
                cache.unreadable.add(relpath)
            return None
        try:
            before = os.fstat(fd)
            if not stat.S_ISREG(before.st_mode):
                return None
            h = hash_fd(fd)
            after = os.fstat(fd)
        except OSError as e:
            cache.warn_once(abspath, "cannot read %s: %s", abspath, e)
            cache.unreadable.add(relpath)
            return None
        finally:
            os.close(fd)
        cache.hashed += 1
        if _stat_key(before) == _stat_key(after):
            entry = file_entry(relpath, after, h)
            cache.store(after, entry)
            return entry
    # Still being written: report what we have without caching it; the writer's next event (or
    # the periodic rescan) hashes it again, and the secondary verifies the content anyway.
    log.debug("%s kept changing while it was hashed", abspath)
    return file_entry(relpath, after, h)


def _entry_from_stat(relpath: str, abspath: str, st: os.stat_result, filt: Filter,
                     cache: HashCache, at: tuple[int, str] | None = None) -> Entry | None:
    """`at`: (directory fd, name) to open and read the object by, instead of `abspath` (which
    then only names it in messages and the cache): the walk's way, for any depth."""
    mode = st.st_mode
    if stat.S_ISDIR(mode):
        return dir_entry(relpath, st)
    if stat.S_ISREG(mode):
        if not filt.match(relpath):
            return None
        if at is not None:
            dir_fd, name = at
            return hashed_file_entry(relpath, abspath, st, cache,
                                     lambda: os.open(name, _OPEN_FILE, dir_fd=dir_fd))
        return hashed_file_entry(relpath, abspath, st, cache,
                                 lambda: os.open(abspath, _OPEN_FILE))
    if stat.S_ISLNK(mode):
        if not filt.match(relpath):
            return None
        try:
            target = os.readlink(at[1], dir_fd=at[0]) if at is not None else os.readlink(abspath)
        except OSError:
            return None
        return link_entry(relpath, st, target)
    if filt.match(relpath) and (why := special(mode)) is not None:
        cache.skip(relpath, abspath, why)  # never opened: a FIFO's open could block
    return None


def _relpath_ok(relpath: str) -> bool:
    try:
        check_relpath(relpath)  # the one rule for relative paths (node/tree.py)
    except PathError:
        return False
    return True


# ---------------------------------------------------------------------------------------------
# scans


def _check_root(root: str) -> None:
    try:
        st = os.stat(root)  # the configured root itself may be a symlink: the operator chose it
    except (FileNotFoundError, NotADirectoryError):
        raise FolderMissing(root) from None
    if not stat.S_ISDIR(st.st_mode):
        raise FolderMissing(root)


def _walk(rel_dir: str, abs_dir: str, filt: Filter, cache: HashCache, out: dict[str, Entry],
          skipped: list[str] | None, between: Callable[[], None] | None = None) -> None:
    """Add everything under abs_dir (relpath rel_dir) to ``out``, parents before their children
    (a delta creates folders first), on node.tree's walk: no recursion, no link followed."""
    flags = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
    try:  # the root itself may be a symlink (the operator chose it); a subfolder may not
        top = os.open(abs_dir, flags | (os.O_NOFOLLOW if rel_dir else 0))
    except (FileNotFoundError, NotADirectoryError):
        if not rel_dir:
            raise FolderMissing(abs_dir) from None
        return  # vanished while we walked; its own event reports it
    except OSError as e:
        if not rel_dir:
            raise
        if e.errno != errno.ELOOP:  # ELOOP: it just became a symlink; its event follows
            _unreadable(rel_dir, abs_dir, e, skipped)
        return

    def onerror(rel: str, exc: OSError) -> None:
        if not rel and not rel_dir:
            raise exc  # the folder root itself cannot be read
        _unreadable(_join(rel_dir, rel), os.path.join(abs_dir, rel), exc, skipped)

    try:
        for rel, fd, dirs, others in walk(top, onerror=onerror):
            here = _join(rel_dir, rel)
            prefix = here + "/" if here else ""
            abs_here = os.path.join(abs_dir, rel) if rel else abs_dir
            for name in list(dirs):
                st = _child(name, fd, abs_here, cache, None, prefix)
                if st is None or not stat.S_ISDIR(st.st_mode):
                    dirs.remove(name)  # a temp name, or gone/replaced meanwhile
                    continue
                # one string for the key and the entry's path (a second copy: ~65 bytes a file)
                path = prefix + name
                out[path] = dir_entry(path, st)
            for name in others:
                st = _child(name, fd, abs_here, cache, filt, prefix)
                if st is None or stat.S_ISDIR(st.st_mode):
                    continue  # a folder that appeared meanwhile: its own event reports it
                path = prefix + name
                entry = _entry_from_stat(path, os.path.join(abs_here, name), st, filt,
                                         cache, (fd, name))
                if entry is not None:
                    out[entry["path"]] = entry  # a cached entry's path is the same string
                elif (skipped is not None and stat.S_ISREG(st.st_mode)
                      and path in cache.unreadable):
                    skipped.append(path)  # there, only not readable now: not deleted
            if between is not None:
                between()
    finally:
        os.close(top)


def _join(rel_dir: str, rel: str) -> str:
    return f"{rel_dir}/{rel}" if rel_dir and rel else rel_dir or rel


def _unreadable(rel: str, path: str, exc: OSError, skipped: list[str] | None) -> None:
    log.warning("skipping unreadable folder %s: %s", path, exc)
    if skipped is not None:
        skipped.append(rel)


def _child(name: str, dir_fd: int, abs_dir: str, cache: HashCache, filt: Filter | None,
           prefix: str = "") -> os.stat_result | None:
    """The lstat of one name in a walked folder, or None when it is not ours to look at: a temp
    name, one the filter leaves out (checked before paying for the lstat), or one gone
    meanwhile."""
    if name.startswith(TEMP_PREFIX):
        return None
    if filt is not None and not filt.match(prefix + name):
        return None
    try:
        return os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except OSError:
        return None


def scan_folder(root: str, filt: Filter, cache: HashCache, *,
                skipped: list[str] | None = None,
                between: Callable[[], None] | None = None) -> dict[str, Entry]:
    """Full recursive walk of a folder. Raises FolderMissing when the root is not there.

    An unreadable subfolder or file is logged and skipped; its relpath is appended to
    ``skipped`` when given, so a caller can keep it out of deletions (keep_unreadable).
    ``between`` is called after each directory (the scanner handles watch events there instead
    of after the whole walk).
    """
    root = os.fspath(root)
    _check_root(root)
    index: dict[str, Entry] = {}
    _walk("", root, filt, cache, index, skipped, between)
    return index


def keep_unreadable(fresh: dict[str, Entry], index: dict[str, Entry],
                    skipped: Iterable[str]) -> None:
    """What could not be read now (permissions, an I/O error) is not deleted: put back into
    ``fresh`` what ``index`` had at and under each skipped relpath ("" is the whole folder;
    scan_folder's ``skipped``, or a snapshot's ``unreadable`` on the secondary). One pass over
    the index, whatever the number of skipped paths."""
    held = set(skipped)
    if not held:
        return
    whole = "" in held
    for path, entry in index.items():
        if whole or path in held or _under_any(path, held):
            fresh.setdefault(path, entry)


def _deleted_in_order(entries: Iterable[Entry]) -> list[Entry]:
    # Deepest first: a folder's content goes before the folder.
    return sorted((deleted_entry(e) for e in entries),
                  key=lambda e: e["path"].count("/"), reverse=True)


def diff(old: dict[str, Entry], new: dict[str, Entry]) -> list[Entry]:
    """Delta from one index to another: changed or new entries, then deletions."""
    # the usual case, an unchanged entry, is settled at once: the same object (HashCache hands
    # back the Entry it built) or an equal dict (compared in C)
    changed = [e for p, e in new.items()
               if (o := old.get(p)) is None or (o is not e and o != e and not same_entry(o, e))]
    return changed + _deleted_in_order(e for p, e in old.items() if p not in new)


def _parent(relpath: str) -> str:
    return relpath.rpartition("/")[0]


def _is_real_dir(root: str, rel_dir: str, real: dict[str, os.stat_result | None],
                 not_real: set[str]) -> bool:
    """Is root/rel_dir a directory reached through directories only (no symlink on the way)?"""
    # from the nearest ancestor already known down to rel_dir, without recursion (deep trees)
    chain = []
    d = rel_dir
    while d not in real and d not in not_real:
        chain.append(d)
        d = _parent(d)
    ok = d in real
    for d in reversed(chain):
        if ok:
            try:
                st = os.lstat(os.path.join(root, d))
            except (FileNotFoundError, NotADirectoryError):  # other errors: the caller's
                ok = False
            else:
                ok = stat.S_ISDIR(st.st_mode)
        if ok:
            real[d] = st
        else:
            not_real.add(d)
    return ok


def _under_any(relpath: str, subtrees: set[str]) -> bool:
    i = relpath.find("/")
    while i != -1:
        if relpath[:i] in subtrees:
            return True
        i = relpath.find("/", i + 1)
    return False


def _drop_subtrees(index: dict[str, Entry], subtrees: set[str],
                   keep: dict[str, Entry]) -> list[Entry]:
    """Remove from index every entry strictly below one of ``subtrees`` that is not in keep."""
    if len(subtrees) <= 32:
        # str.startswith with a tuple runs in C: one pass over a 100,000-entry index is cheap.
        prefixes = tuple(s + "/" for s in subtrees)
        doomed = [p for p in index if p.startswith(prefixes) and p not in keep]
    else:
        doomed = [p for p in index if p not in keep and _under_any(p, subtrees)]
    return [index.pop(p) for p in doomed]


def scan_paths(root: str, filt: Filter, cache: HashCache, index: dict[str, Entry],
               relpaths: Iterable[str]) -> list[Entry]:
    """Incremental rescan of the paths a watcher batch touched; updates ``index`` in place.

    A relpath that is a directory is walked; one that vanished takes its whole subtree out of the
    index. Returns the delta: entries that really changed, then deletions (deepest first).
    Raises FolderMissing when the root is gone (never "everything was deleted").
    """
    root = os.fspath(root)
    _check_root(root)
    todo = {p for p in relpaths if p == "" or _relpath_ok(p)}
    skipped: list[str] = []  # there but unreadable now: what the index has stays
    if "" in todo:
        fresh_index = scan_folder(root, filt, cache, skipped=skipped)
        keep_unreadable(fresh_index, index, skipped)
        delta = diff(index, fresh_index)
        index.clear()
        index.update(fresh_index)
        return delta

    real: dict[str, os.stat_result | None] = {"": None}
    not_real: set[str] = set()
    fresh: dict[str, Entry] = {}  # what is on disk now, for everything looked at
    looked: set[str] = set()  # relpaths looked at: absent from fresh means gone
    subtrees: set[str] = set()  # relpaths whose old subtree must be reconciled with fresh

    # Shallow first, so a path inside a folder that is itself in the batch is covered by it.
    for rel in sorted(todo, key=lambda p: p.count("/")):
        if _under_any(rel, subtrees):
            continue
        looked.add(rel)
        cache.unreplicable.discard(rel)  # a FIFO gone or replaced; recorded again if still one
        old = index.get(rel)
        if old is not None and old["kind"] == "dir":
            subtrees.add(rel)
        parent = _parent(rel)
        abspath = os.path.join(root, rel)
        try:
            if not _is_real_dir(root, parent, real, not_real):
                subtrees.add(rel)
                continue
            st = os.lstat(abspath)
        except (FileNotFoundError, NotADirectoryError):
            subtrees.add(rel)
            continue
        except OSError:  # there, but it cannot be looked at now (permissions, an I/O error)
            skipped.append(rel)
            continue
        _add_missing_parents(parent, index, fresh, real)
        if stat.S_ISDIR(st.st_mode):
            fresh[rel] = dir_entry(rel, st)
            subtrees.add(rel)
            _walk(rel, abspath, filt, cache, fresh, skipped)
        elif (entry := _entry_from_stat(rel, abspath, st, filt, cache)) is not None:
            fresh[rel] = entry
        elif stat.S_ISREG(st.st_mode) and rel in cache.unreadable:
            skipped.append(rel)
    keep_unreadable(fresh, index, skipped)

    delta = []
    for rel, entry in fresh.items():
        old = index.get(rel)
        if old is None or not same_entry(old, entry):
            index[rel] = entry
            delta.append(entry)
    gone = [index.pop(rel) for rel in looked if rel not in fresh and rel in index]
    if subtrees:
        gone += _drop_subtrees(index, subtrees, fresh)
    return delta + _deleted_in_order(gone)


def _add_missing_parents(rel_dir: str, index: dict[str, Entry], fresh: dict[str, Entry],
                         real: dict[str, os.stat_result | None]) -> None:
    """Make sure every folder above a changed path is in the index (outermost first)."""
    missing = []
    while rel_dir and rel_dir not in index and rel_dir not in fresh:
        missing.append(rel_dir)
        rel_dir = _parent(rel_dir)
    for d in reversed(missing):
        st = real.get(d)  # recorded by _is_real_dir for every folder it checked
        if st is not None:
            fresh[d] = dir_entry(d, st)
