"""The primary's change detection: a thread that turns watcher batches and periodic rescans
into deltas for the node loop, which numbers and publishes them as manifests.

The watcher starts before the first scan, so nothing written during that scan is missed: it
shows up in a batch right after. The periodic full rescan is the safety net behind the watcher
(inotify drops events when its queue overflows; the watcher then asks for a rescan). Only
files whose size, mtime, inode or ctime changed are read again (index.HashCache).

To the loop, over an inproc PAIR:
    [b"delta", scanner id, b"full"|b"part"]   (b"full" after a full scan); the delta itself,
                                              {folder: [Entry]}, waits in Scanner.deltas
                                              (the Entry objects are shared, not copied:
                                              100,000 of them are ~70 MB, and neither side
                                              changes an Entry in place)
    [b"flushed", token]                                    (every change so far is sent)
    [b"error", text]
"""
from __future__ import annotations

import collections
import logging
import os
import queue
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import zmq

from .config import FolderConfig
from .fdio import identity
from .filters import Filter
from .hashstore import CacheKeeper
from .index import (
    FolderMissing,
    HashCache,
    diff,
    keep_unreadable,
    scan_folder,
    scan_paths,
)
from .journal import Agreed
from .names import readable
from .protocol import UNREADABLE_MAX
from .rolling import Rotation, rescan_dir
from .unreplicable import summary

log = logging.getLogger("sbs.scanner")


class _Stopped(Exception):
    """Scanner.stop() came during a full scan: the walk ends between two directories."""


class Scanner:
    def __init__(self, ctx: zmq.Context, endpoint: str, folders: dict[str, FolderConfig], *,
                 period: float, rescan_cycle: float = 300.0, state_dir: Path | None = None):
        self.ctx, self.endpoint, self.period = ctx, endpoint, period
        self.rotation = Rotation(period, rescan_cycle)
        self.watching = False  # without a watcher every period is a full rescan, as it was
        self.folders = {n: (str(f.path), Filter(f.filters)) for n, f in folders.items()}
        self.jobs: queue.Queue[tuple[str, Any]] = queue.Queue()
        self.caches = {n: HashCache() for n in folders}  # one per folder: keyed by relpath
        # each folder's (device, inode) while its index holds entries, and the folders found
        # to be another since (replaced: a disk unmounted under the node)
        self.root_ids: dict[str, tuple[int, int]] = {}
        self.replaced: set[str] = set()
        self._stopping = threading.Event()
        # stop(finish_loading=True): the caches being loaded are loaded whole before the thread
        # ends, for the syncer to take on (loaded_cache) instead of reading them again
        self._finish_loading = False
        self.loaded: set[str] = set()  # folders whose cache was loaded whole, not given up
        # the caches on disk (node/hashstore.py): loaded by the thread before its first scan
        self.keeper = (CacheKeeper(state_dir, "scanner", stopping=self._give_up)
                       if state_dir is not None else None)
        self.scanned = False  # a full scan has completed: the index says which files exist
        self.index: dict[str, dict[str, dict]] = {n: {} for n in folders}
        self.ident = os.urandom(8)  # a later scanner's messages are not taken for this one's
        self.deltas: collections.deque[dict[str, list[dict]]] = collections.deque()
        # the FIFOs, sockets, devices the scans skipped (unreplicable.summary), for status
        self.unreplicable: dict[str, Any] | None = None
        # folder -> what the last full scan found there but could not read (permissions, I/O
        # errors) and has no entry for ("": the folder's root), for the loop's snapshots: a
        # secondary deletes none of it. Replaced whole after each full scan (read by the loop).
        self.unreadable: dict[str, list[str]] = {}
        self._walking = False  # a full scan under way: its folders' records are being redone
        self.thread = threading.Thread(target=self._run, name="sbs-scanner", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def take_delta(self) -> dict[str, list[dict]]:
        """The delta a [b"delta", ...] message announced (called by the loop, once each)."""
        return self.deltas.popleft()

    def _send_delta(self, pipe: zmq.Socket, delta: dict[str, list[dict]], kind: bytes) -> None:
        self._count_unreplicable()
        self.deltas.append(delta)  # before the message: the loop pops it when it reads that
        pipe.send_multipart([b"delta", self.ident, kind])

    def _count_unreplicable(self) -> None:
        if not self._walking:
            self.unreplicable = summary((n, self.caches[n].unreplicable) for n in self.folders)

    def flush(self, token: str) -> None:
        self.jobs.put(("flush", token))

    def stop(self, wait: bool = True, save: bool = False, finish_loading: bool = False) -> None:
        """Stop the thread; a full scan under way ends at its next directory. ``wait=False``
        returns at once (the node loop must not wait out a scan: its pings would stop).
        ``save``: the hash caches are written on the way out (the node is stopping).
        ``finish_loading``: a cache load under way is finished, not given up (the node follows
        a primary, and its syncer takes the caches on: loaded_cache)."""
        if self.keeper is not None:
            self.keeper.at_exit = save
        self._finish_loading = finish_loading
        self._stopping.set()
        self.jobs.put(("stop", None))
        if wait:
            self.thread.join(30)

    def _run(self) -> None:
        pipe = self.ctx.socket(zmq.PAIR)
        pipe.connect(self.endpoint)
        watcher = None
        try:
            if self.keeper is not None:
                for name, (root, _) in self.folders.items():
                    self.caches[name] = self.keeper.load(name, root, give_up=True)
                    if not self.keeper.stopping():
                        self.loaded.add(name)
                if self._stopping.is_set():
                    raise _Stopped  # dropped while loading: no watcher, no scan
            from .watcher import Watcher  # here, not at the node's start (node/watcher.py)

            watcher = Watcher({n: root for n, (root, _) in self.folders.items()},
                              lambda batch: self.jobs.put(("batch", batch)))
            try:
                watcher.start()
            except OSError as exc:  # e.g. a folder that does not exist yet, inotify limits
                log.error("watcher not started (%s); relying on the %.1fs rescan", exc,
                          self.period)
                watcher = None
            self.watching = watcher is not None
            self._full_scan(pipe)
            self._save_if_due()
            next_scan = time.monotonic() + self.period
            while True:
                try:
                    kind, arg = self.jobs.get(timeout=max(0.0, next_scan - time.monotonic()))
                except queue.Empty:
                    kind, arg = "tick", None
                if kind == "tick" or time.monotonic() >= next_scan:
                    # also between batches: a busy watcher must not hold the rescan off
                    if self.watching:
                        self._rolling_scan(pipe)
                    else:
                        self._full_scan(pipe)
                    next_scan = time.monotonic() + self.period
                    self._save_if_due()
                    if kind == "tick":
                        continue
                if kind == "stop":
                    return
                if kind == "flush":
                    self._full_scan(pipe)
                    pipe.send_multipart([b"flushed", arg.encode()])
                    continue
                batches = [arg]  # drain what queued up meanwhile into one delta
                while True:
                    try:
                        k2, a2 = self.jobs.get_nowait()
                    except queue.Empty:
                        break
                    if k2 == "batch":
                        batches.append(a2)
                    else:
                        self.jobs.put((k2, a2))
                        break
                if any(b is None for b in batches):
                    log.warning("watcher lost events; full rescan")
                    self._full_scan(pipe)
                    next_scan = time.monotonic() + self.period
                else:
                    self._partial_scan(pipe, batches)
        except _Stopped:
            return  # told to stop in the middle of a full scan: nothing more is sent
        except Exception as exc:  # the scanner must report, not vanish silently
            log.exception("scanner failed")
            pipe.send_multipart([b"error", _text(f"scanner failed: {exc}")])
        finally:
            if watcher is not None:
                watcher.stop()
            pipe.close()
            if self.keeper is not None and self.keeper.at_exit:
                self._save_caches()

    def _give_up(self) -> bool:
        return self._stopping.is_set() and not self._finish_loading

    def loaded_cache(self, name: str, root: str, until: float = 0.0,
                     check: Callable[[], None] = lambda: None) -> HashCache | None:
        """For the syncer of a node that stopped this scanner: the cache of this folder, loaded
        whole and kept up to date by the scans it made, when it was made for this root, once
        the thread has ended (waited for until the monotonic time ``until``, calling ``check``
        between looks: it raises to give up); None otherwise."""
        while self.thread.is_alive() and time.monotonic() < until:
            check()
            self.thread.join(0.05)
        if self.thread.is_alive():
            log.info("the stopped scanner is still busy: the hash cache of %s is read again",
                     name)
            return None
        if name not in self.loaded or name not in self.folders:
            return None
        if os.path.abspath(self.folders[name][0]) != os.path.abspath(root):
            return None
        log.info("%d file hashes of folder %s taken on from the stopped scanner",
                 len(self.caches[name]), name)
        return self.caches[name]

    def _save_if_due(self) -> None:
        if self.keeper is not None and self.keeper.due(self.caches, time.monotonic()):
            self._save_caches()

    def _save_caches(self) -> None:
        assert self.keeper is not None
        self.keeper.save({n: (root, self.caches[n]) for n, (root, _) in self.folders.items()},
                         self._keep)

    def _keep(self, name: str) -> Callable[[Any], bool] | None:
        """Once a full scan has completed, the cache keeps only what the index has."""
        index = self.index.get(name)
        if not self.scanned or not index:  # a missing folder keeps its cache for its return
            return None
        return lambda e: index.get(e.path) is e

    def _partial_scan(self, pipe: zmq.Socket, batches: list[dict[str, set[str]]],
                      touched: dict[str, set[str]] | None = None) -> None:
        delta: dict[str, list[dict]] = {}
        for name, (root, filt) in self.folders.items():
            paths = set().union(*(b.get(name, ()) for b in batches))
            if not paths:
                continue
            if touched is not None:
                touched.setdefault(name, set()).update(paths)
            if self._root_replaced(pipe, name, root):
                continue
            try:
                changes = scan_paths(root, filt, self.caches[name], self.index[name], paths)
            except FolderMissing:
                changes = []
            except OSError as exc:  # the folder itself cannot be read: this one, not all
                self.caches[name].warn_once(root, "folder %s (%s) cannot be read: %s; keeping "
                                            "what it had", name, root, exc)
                changes = []
            if changes:
                delta[name] = changes
                self.rotation.note(name, changes)
        if delta:
            self._send_delta(pipe, delta, b"part")
        else:
            self._count_unreplicable()

    def _waiting_batches(self) -> list[dict[str, set[str]]]:
        """Watch batches at the head of the job queue, taken off it; not past a flush, a stop
        or an overflow marker (those keep their place and their order)."""
        out = []
        while True:
            with self.jobs.mutex:  # only this thread takes jobs off: the head stays put
                head = self.jobs.queue[0] if self.jobs.queue else None
            if head is None or head[0] != "batch" or head[1] is None:
                return out
            out.append(self.jobs.get_nowait()[1])

    def _full_scan(self, pipe: zmq.Socket) -> None:
        """Walk every folder and publish what differs from the index. Watch batches that arrive
        meanwhile are published between two directories, not after the walk (a 100,000-file
        walk takes most of a second); the paths they touched then keep the state those batches
        saw, since the walk may have passed them before they changed."""
        delta: dict[str, list[dict]] = {}
        touched: dict[str, set[str]] = {}
        t0, read0 = time.monotonic(), sum(c.hashed for c in self.caches.values())

        def between() -> None:
            if self._stopping.is_set():
                raise _Stopped
            if batches := self._waiting_batches():
                self._partial_scan(pipe, batches, touched)

        unreadable: dict[str, list[str]] = {}
        for name, (root, filt) in self.folders.items():
            skipped: list[str] = []
            if self._root_replaced(pipe, name, root):
                continue
            self._walking = True
            self.caches[name].unreplicable.clear()  # what the walk finds again is kept
            try:
                fresh = scan_folder(root, filt, self.caches[name], skipped=skipped,
                                    between=between)
            except FolderMissing:
                # an unmounted or vanished folder is not "everything was deleted"
                log.error("folder %s (%s) is missing: not replicating it", name, root)
                pipe.send_multipart([b"error", _text(f"folder {name} ({root}) is missing")])
                continue
            except OSError as exc:
                # nor is one that cannot be read (permissions, a failing disk); and the other
                # folders go on: this used to end the scanner, and with it all replication
                log.error("folder %s (%s) cannot be read: %s; keeping what it had", name,
                          root, exc)
                pipe.send_multipart([b"error", _text(f"folder {name} ({root}) cannot be read: "
                                                     f"{exc}")])
                if not self.index[name]:
                    unreadable[name] = [""]
                continue
            # unreadable now (permissions, I/O error) is not deleted: keep what we had
            keep_unreadable(fresh, self.index[name], skipped)
            # a file with no entry, or a folder that could not be listed (its entry says
            # nothing of what is in it)
            if missing := [p for p in skipped if p not in fresh or fresh[p]["kind"] == "dir"]:
                if len(missing) > UNREADABLE_MAX:
                    log.warning("folder %s: %d paths cannot be read; a snapshot names the first "
                                "%d (a strict secondary may delete its copies of the others)",
                                name, len(missing), UNREADABLE_MAX)
                unreadable[name] = missing[:UNREADABLE_MAX]
            if paths := touched.get(name):
                _keep_touched(fresh, self.index[name], paths)
            changes = diff(self.index[name], fresh)
            self.index[name] = fresh
            if changes:
                delta[name] = changes
        self.rotation.reset(self.index, time.monotonic())
        self._walking = False
        self.unreadable = unreadable
        self._send_delta(pipe, delta, b"full")
        if not self.scanned:
            self.scanned = True
            files = sum(1 for ix in self.index.values() for e in ix.values()
                        if e["kind"] == "file")
            read = sum(c.hashed for c in self.caches.values()) - read0
            log.info("first scan: %d file(s), %d read and hashed, %d known from the hash "
                     "cache (%.2f s)", files, read, max(0, files - read), time.monotonic() - t0)

    def _root_replaced(self, pipe: zmq.Socket, name: str, root: str) -> bool:
        """Is the folder at root another than the one its index was made from (a disk
        unmounted under the node, its mount point left, empty)? It is not scanned then: an
        empty mount point is not "everything was deleted", as a missing folder is not. Said
        once, and again when it is back. A folder that holds nothing yet is taken as it is."""
        try:
            now = identity(root)
        except OSError:
            return False  # missing or unreadable: the scan says so
        if not self.index.get(name) or self.root_ids.setdefault(name, now) == now:
            self.root_ids[name] = now
            if name in self.replaced:
                self.replaced.discard(name)
                log.warning("folder %s (%s) is the folder it was again: replicating it", name,
                            root)
            return False
        if name not in self.replaced:
            self.replaced.add(name)
            why = (f"folder {name} ({root}) is no longer the folder this node scanned (a disk "
                   f"unmounted under it?): not replicating it, nor its files as deleted, until "
                   f"it is back; restart the node to take a new folder there on")
            log.error("%s", why)
            pipe.send_multipart([b"error", _text(why)])
        return True

    def _rolling_scan(self, pipe: zmq.Socket) -> None:
        """One slice of the rolling rescan (Rotation): the directories least recently looked
        at, each listed and its entries lstat'ed against the index, nothing deeper."""
        now = time.monotonic()
        total = sum(len(ix) for ix in self.index.values())
        delta: dict[str, list[dict]] = {}
        slice_ = self.rotation.take(now, total)
        replaced = {n for n, (root, _) in self.folders.items()
                    if self._root_replaced(pipe, n, root)}
        for name, rel in slice_:
            if name not in self.folders:
                self.rotation.forget(name, rel)
                continue
            if name in replaced:
                continue
            root, filt = self.folders[name]
            index = self.index[name]
            if rel and (index.get(rel) or {}).get("kind") != "dir":
                self.rotation.forget(name, rel)  # gone from the index: its parent tells
                continue
            try:
                changes, seen, dkey = rescan_dir(
                    root, filt, self.caches[name], index, rel,
                    self.rotation.dir_key(name, rel),
                    lambda name=name: self.rotation.children(name, self.index[name]))
            except FolderMissing:
                changes, seen, dkey = [], 1, None
            self.rotation.visited(name, rel, now, seen, dkey)
            if changes:
                delta.setdefault(name, []).extend(changes)
                self.rotation.note(name, changes, now)
        for name, (root, _) in self.folders.items():
            self.caches[name].unreplicable.prune(root)  # gone (or retargeted) meanwhile
        if delta:
            log.info("rolling rescan found what the watcher missed: %s",
                     {n: len(c) for n, c in delta.items()})
            self._send_delta(pipe, delta, b"part")
        else:
            self._count_unreplicable()


def _keep_touched(fresh: dict[str, dict], index: dict[str, dict], paths: set[str]) -> None:
    """In `fresh`, replace what is at or under `paths` by what `index` has there."""
    if "" in paths:  # the root itself: the partial scan covered everything
        fresh.clear()
        fresh.update(index)
        return
    prefixes = tuple(p + "/" for p in paths)

    def under(p: str) -> bool:
        return p in paths or p.startswith(prefixes)

    for p in [p for p in fresh if under(p)]:
        del fresh[p]
    fresh.update((p, e) for p, e in index.items() if under(p))


def verify_tokens(folders: dict[str, FolderConfig]) -> dict[str, dict[str, str]]:
    """{folder: {path: agreed token}} of what is on disk now, hashing everything afresh."""
    out = {}
    for name, f in folders.items():
        try:
            index = scan_folder(str(f.path), Filter(f.filters), HashCache())
        except FolderMissing:
            out[name] = {}
            continue
        out[name] = {p: Agreed.token(e) for p, e in index.items()}
    return out


def _text(message: str) -> bytes:
    """An error for the node's pipe: a name that is not UTF-8 in it as \\xNN, never a second
    error while reporting the first."""
    return readable(message).encode("utf-8", "backslashreplace")
