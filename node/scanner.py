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
from typing import Any

import zmq

from .config import FolderConfig
from .index import Filter, FolderMissing, HashCache, Watcher, diff, scan_folder, scan_paths
from .journal import Agreed

log = logging.getLogger("sbs.scanner")


class Scanner:
    def __init__(self, ctx: zmq.Context, endpoint: str, folders: dict[str, FolderConfig], *,
                 period: float):
        self.ctx, self.endpoint, self.period = ctx, endpoint, period
        self.folders = {n: (str(f.path), Filter(f.filters)) for n, f in folders.items()}
        self.jobs: queue.Queue[tuple[str, Any]] = queue.Queue()
        self.cache = HashCache()
        self.index: dict[str, dict[str, dict]] = {n: {} for n in folders}
        self.ident = os.urandom(8)  # a later scanner's messages are not taken for this one's
        self.deltas: collections.deque[dict[str, list[dict]]] = collections.deque()
        self.thread = threading.Thread(target=self._run, name="sbs-scanner", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def take_delta(self) -> dict[str, list[dict]]:
        """The delta a [b"delta", ...] message announced (called by the loop, once each)."""
        return self.deltas.popleft()

    def _send_delta(self, pipe: zmq.Socket, delta: dict[str, list[dict]], kind: bytes) -> None:
        self.deltas.append(delta)  # before the message: the loop pops it when it reads that
        pipe.send_multipart([b"delta", self.ident, kind])

    def flush(self, token: str) -> None:
        self.jobs.put(("flush", token))

    def stop(self) -> None:
        self.jobs.put(("stop", None))
        self.thread.join(30)

    def _run(self) -> None:
        pipe = self.ctx.socket(zmq.PAIR)
        pipe.connect(self.endpoint)
        watcher = None
        try:
            watcher = Watcher({n: root for n, (root, _) in self.folders.items()},
                              lambda batch: self.jobs.put(("batch", batch)))
            try:
                watcher.start()
            except OSError as exc:  # e.g. a folder that does not exist yet, inotify limits
                log.error("watcher not started (%s); relying on the %.1fs rescan", exc,
                          self.period)
                watcher = None
            self._full_scan(pipe)
            next_scan = time.monotonic() + self.period
            while True:
                try:
                    kind, arg = self.jobs.get(timeout=max(0.0, next_scan - time.monotonic()))
                except queue.Empty:
                    self._full_scan(pipe)
                    next_scan = time.monotonic() + self.period
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
        except Exception as exc:  # the scanner must report, not vanish silently
            log.exception("scanner failed")
            pipe.send_multipart([b"error", f"scanner failed: {exc}".encode()])
        finally:
            if watcher is not None:
                watcher.stop()
            pipe.close()

    def _partial_scan(self, pipe: zmq.Socket, batches: list[dict[str, set[str]]],
                      touched: dict[str, set[str]] | None = None) -> None:
        delta: dict[str, list[dict]] = {}
        for name, (root, filt) in self.folders.items():
            paths = set().union(*(b.get(name, ()) for b in batches))
            if not paths:
                continue
            if touched is not None:
                touched.setdefault(name, set()).update(paths)
            try:
                changes = scan_paths(root, filt, self.cache, self.index[name], paths)
            except FolderMissing:
                changes = []
            if changes:
                delta[name] = changes
        if delta:
            self._send_delta(pipe, delta, b"part")

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

        def between() -> None:
            if batches := self._waiting_batches():
                self._partial_scan(pipe, batches, touched)

        for name, (root, filt) in self.folders.items():
            skipped: list[str] = []
            try:
                fresh = scan_folder(root, filt, self.cache, skipped=skipped, between=between)
            except FolderMissing:
                # an unmounted or vanished folder is not "everything was deleted"
                log.error("folder %s (%s) is missing: not replicating it", name, root)
                pipe.send_multipart([b"error", f"folder {name} ({root}) is missing".encode()])
                continue
            for rel_dir in skipped:
                # unreadable now (permissions, I/O error) is not deleted: keep what we had
                prefix = rel_dir + "/"
                for path, entry in self.index[name].items():
                    if path == rel_dir or path.startswith(prefix):
                        fresh.setdefault(path, entry)
            if paths := touched.get(name):
                _keep_touched(fresh, self.index[name], paths)
            changes = diff(self.index[name], fresh)
            self.index[name] = fresh
            if changes:
                delta[name] = changes
        self._send_delta(pipe, delta, b"full")


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
