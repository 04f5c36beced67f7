"""The secondary's replication worker: a thread that applies snapshots and manifests.

Jobs arrive from the node loop on a queue (snapshot, manifest, confirm, stop), in order. For
each, the worker compares what the primary has with what is on disk, fetches only what
differs (node/blobs.Fetcher, many small files per request, several requests in flight),
writes each file to a temp file, verifies its hash, fsyncs and renames it into place
(node/fsops). Before it overwrites or deletes a local object that differs from what the pair
last agreed on (node/journal), it keeps a copy under state_dir/conflicts/<UTC time>/.

What could not be applied (the file changed again while in flight, the disk is full, the
primary vanished) stays pending and is retried; `applied` only moves past a manifest once
nothing before it is pending, so the primary's final sync never trusts a half-applied copy.

To the loop, over an inproc PAIR:
    [b"applied", json {applied, snapshot, pending_files, pending_bytes, error, through, stuck,
                       gen}]
    [b"event",   json {event, ...}]   (transfers, progress, conflicts, guard, disk full)
"""
from __future__ import annotations

import collections
import concurrent.futures
import errno
import itertools
import logging
import os
import queue
import threading
import time
from collections.abc import Iterator
from typing import Any

import orjson
import zmq

from .blobs import Fetcher, FetchError
from .config import Config, FolderConfig
from .conflicts import own_extras
from .fsops import FolderWriter, HashMismatch, PathError, check_relpath, purge_trash, utc_stamp
from .journal import Agreed
from .protocol import entry_check
from .scan import Filter, FolderMissing, HashCache, scan_folder
from .security import Keys

log = logging.getLogger("sbs.syncer")

SMALL = 256 << 10  # files up to this size travel many to a request
BATCH_BYTES = 1 << 20
BATCH_ITEMS = 256
CHUNK = 1 << 20
LANES = 2  # threads writing small files, each with its own temp directory
GUARD_MIN_FILES = 20
PER_FILE_EVENTS = 100  # above this many files in one job, the bus gets progress instead


class Syncer:
    def __init__(self, ctx: zmq.Context, endpoint: str, cfg: Config, keys: Keys | None,
                 agreed: Agreed):
        self.ctx, self.endpoint, self.cfg, self.agreed = ctx, endpoint, cfg, agreed
        self.fetcher = Fetcher(ctx, f"tcp://{cfg.peer}:{cfg.blob_port}", keys)
        self.jobs: queue.Queue[tuple] = queue.Queue()
        self.cache = HashCache()
        self.writers: dict[str, FolderWriter] = {}
        self.filters: dict[str, Filter] = {}
        self.known: dict[str, dict[str, dict]] = {}  # the primary's index as last applied
        self.pending: dict[tuple[str, str], dict] = {}  # (folder, path) -> entry still to apply
        self.pending_since_seq: int | None = None
        # The ACK of a snapshot makes the primary record its whole index as agreed, so it is
        # sent only once nothing of the snapshot is pending (until then we report applied 0)
        self.snapshot_ack_due = False
        self.applied = 0
        self.error = ""
        self.confirmed: set[str] = set()
        # strict deletions the guard refused, per folder: applied once an operator confirms,
        # dropped when the primary shows the path again (a disk that was only unmounted)
        self.held: dict[str, dict[str, dict]] = {}
        self.guard_errors: dict[str, str] = {}
        self.snapshots = 0  # snapshot jobs begun: the node ignores reports from before its latest
        self.disk_full: set[str] = set()  # folders whose full disk was already logged
        # pending files whose last try found no room for them: waiting does not bring them
        self.no_room: set[tuple[str, str]] = set()
        self.kept: set[tuple[str, str, str | None]] = set()  # conflict copies already made
        # set by the node when it was primary before: the first snapshot also sets aside the
        # files the new primary lacks that were made here and never agreed on (conflicts.py)
        self.own_term = False
        self._lanes: concurrent.futures.ThreadPoolExecutor | None = None  # small-file writers
        self._lane_id = threading.local()
        self.thread = threading.Thread(target=self._run, name="sbs-syncer", daemon=True)

    # --- called from the node loop ---------------------------------------------------
    def start(self) -> None:
        self.thread.start()

    def submit_snapshot(self, seq: int, folders: dict[str, FolderConfig],
                        index: dict[str, list]) -> None:
        self.jobs.put(("snapshot", seq, folders, index))

    def submit_manifest(self, seq: int, entries: dict[str, list]) -> None:
        self.jobs.put(("manifest", seq, entries))

    def confirm_deletions(self, folder: str | None) -> None:
        self.jobs.put(("confirm", folder))

    def stop(self) -> None:
        self.fetcher.cancelled.set()  # a fetch from a dead primary ends now, not after retries
        self.jobs.put(("stop",))
        self.thread.join(60)

    # --- the worker ------------------------------------------------------------------
    def _run(self) -> None:
        self.pipe = self.ctx.socket(zmq.PAIR)
        self.pipe.connect(self.endpoint)
        # strict mode's trash is kept trash_days: purged at setup and then every
        # trash_days / 24 (at most hourly, at least every second), for a secondary that
        # follows for months without a new snapshot
        purge_every = min(3600.0, max(1.0, self.cfg.trash_days * 86400 / 24))
        next_purge = time.monotonic() + purge_every
        try:
            while True:
                now = time.monotonic()
                if now >= next_purge:
                    next_purge = now + purge_every
                    self._purge_trash()
                retry_in = (2.0 if self.error else 0.3) if self.pending else None
                try:
                    job = self.jobs.get(timeout=min(retry_in or purge_every,
                                                    next_purge - now))
                except queue.Empty:
                    if self.pending:
                        self._retry_pending()
                    continue
                if job[0] == "stop" or self.fetcher.cancelled.is_set():
                    return
                try:
                    if job[0] == "snapshot":
                        self._snapshot(*job[1:])
                    elif job[0] == "manifest":
                        self._manifest(*job[1:])
                    elif job[0] == "confirm":
                        self._confirm(job[1])
                except Exception as exc:  # keep following; report what went wrong
                    log.exception("sync job %s failed", job[0])
                    self.error = f"{job[0]} failed: {exc}"
                    self._report(snapshot=False)
        finally:
            if self._lanes is not None:
                self._lanes.shutdown(wait=True)
            self.fetcher.close()
            self.pipe.close()

    def _emit(self, event: str, **fields: Any) -> None:
        self.pipe.send_multipart([b"event", orjson.dumps({"event": event, **fields})])

    def _report(self, *, snapshot: bool) -> None:
        self.snapshot_ack_due = self.snapshot_ack_due or snapshot
        snapshot = self.snapshot_ack_due and not self.pending
        if snapshot:
            self.snapshot_ack_due = False
        if not self.error.startswith("disk full"):
            if self.disk_full:
                log.info("space is back in %s", sorted(self.disk_full))
            self.disk_full.clear()
        self.pipe.send_multipart([b"applied", orjson.dumps({
            "applied": self.applied if not self.pending else (self.pending_since_seq or 0),
            "snapshot": snapshot,
            "pending_files": len(self.pending),
            "pending_bytes": sum(e.get("size", 0) for e in self.pending.values()),
            "error": self.error or "; ".join(self.guard_errors.values()),
            "through": self.applied,
            "stuck": self._stuck(),
            "gen": self.snapshots,
        })])

    def _stuck(self) -> str:
        """Why nothing pending can be applied by waiting, or "": every pending file found no
        room on its last try and is still bigger than the space free now (a deletion since may
        have made room: the next retry tells). A primary's final sync stops waiting for them."""
        if not self.pending or (self.error and not self.error.startswith("disk full")):
            return ""
        free: dict[str, int | None] = {}
        for key, e in self.pending.items():
            name = key[0]
            if key not in self.no_room or name not in self.writers:
                return ""
            if name not in free:
                free[name] = _free_bytes(self.writers[name].root)
            room = free[name]
            if room is None or int(e.get("size", 0)) <= room:
                return ""
        return (f"{len(self.pending)} file(s) do not fit: disk full in "
                + ", ".join(f"{n} ({self.writers[n].root})" for n in sorted(free)))[:1000]

    def _confirm(self, folder: str | None) -> None:
        """The operator allows the deletions the guard refused: apply the held ones now, or
        (when none is held) let the next strict cycle of the folder(s) delete."""
        names = set(self.writers) if folder is None else {folder}
        log.warning("operator confirmed the strict deletions in %s", sorted(names))
        held = {n: self.held.pop(n) for n in names if n in self.held}
        self.confirmed |= names - set(held)
        for name in held:
            self.guard_errors.pop(name, None)
        stamp = utc_stamp()
        for name, doomed in held.items():
            if name not in self.writers:
                continue
            known = self.known.get(name, {})
            deletions = [e for p, e in doomed.items() if p not in known]
            local = self._local(name, [e["path"] for e in deletions])
            self.confirmed.add(name)
            done = self._delete(name, deletions, local, stamp)
            if done:
                self.agreed.update(done)
        self._report(snapshot=False)

    def _setup(self, folders: dict[str, FolderConfig]) -> None:
        sd = self.cfg.state_dir
        for name, f in folders.items():
            w = self.writers.get(name)
            if w is None or str(w.root) != str(f.path):
                # trash and conflict copies go under <stamp>/<folder>/: two folders may both
                # hold a config.ini, and the operator must see which one a copy came from
                try:
                    w = FolderWriter(f.path, sd / "tmp" / name, sd / "trash", sd / "conflicts",
                                     name=name)
                    removed = w.cleanup_temps()
                except (OSError, ValueError) as exc:  # that folder is refused, not all of them
                    log.error("folder %s (%s) cannot be replicated here: %s", name,
                              str(f.path)[:200], exc)
                    self.writers.pop(name, None)
                    continue
                if removed:
                    log.info("removed %d temp file(s) left by an interrupted sync in %s",
                             removed, name)
                self.writers[name] = w
            self.filters[name] = Filter(f.filters)
        for name in list(self.writers):
            if name not in folders:
                del self.writers[name]
        self._purge_trash()

    def _purge_trash(self) -> None:
        try:
            purge_trash(self.cfg.state_dir / "trash", self.cfg.trash_days,
                        stop=self.fetcher.cancelled.is_set)
        except OSError as exc:  # a trash folder we cannot remove must not stop the sync
            log.warning("cannot purge %s: %s", self.cfg.state_dir / "trash", exc)

    def _valid(self, folder: str, entries: list) -> Iterator[dict]:
        for e in entries:
            why = entry_check(e)
            if why is None:
                try:
                    check_relpath(e["path"])
                except PathError as exc:
                    why = str(exc)
            if why is not None:
                log.warning("refused an entry in %s: %s (%r)", folder, why,
                            str(e.get("path") if isinstance(e, dict) else e)[:200])
                self._emit("refused", folder=folder, reason=why)
                continue
            if e["kind"] == "file" and not e.get("hash") and not e.get("deleted"):
                log.warning("refused an entry in %s without hash: %r", folder, e["path"][:200])
                continue
            yield e

    def _snapshot(self, seq: int, folders: dict[str, FolderConfig], index: dict) -> None:
        self.snapshots += 1
        self._setup(folders)
        self.pending.clear()
        self.no_room.clear()
        self.pending_since_seq = None
        self.error = ""
        self.held.clear()  # what to delete is worked out afresh from the full index
        self.guard_errors.clear()
        stamp = utc_stamp()
        plans = []
        for name, entries in index.items():
            if name not in self.writers:
                continue
            writer, filt = self.writers[name], self.filters[name]
            try:
                local = scan_folder(str(writer.root), filt, self.cache)
            except FolderMissing:
                local = {}
            remote = {e["path"]: e for e in self._valid(name, entries)}
            self.known[name] = remote
            deletions = [local[p] for p in local if p not in remote] if self.cfg.strict else []
            extras = (own_extras(local, remote, self.agreed, name)
                      if self.own_term and not self.cfg.strict else [])
            plans.append((name, list(remote.values()), deletions, local, extras))
        total_files = sum(1 for _, r, _, loc, _ in plans for e in r
                          if e["kind"] == "file" and _differs(loc.get(e["path"]), e))
        log.info("snapshot %d: %d file(s) to fetch", seq, total_files)
        self._progress = {"files": 0, "bytes": 0, "total": total_files, "at": 0.0}
        for name, remote, deletions, local, extras in plans:
            files_here = sum(1 for e in local.values() if e["kind"] != "dir")
            self._apply(name, remote, deletions, local, stamp, seq, files_here=files_here)
            self._set_aside(name, extras, stamp)
        self.own_term = False
        self.applied = seq
        if self.pending:
            self.pending_since_seq = 0  # nothing is confirmed before the snapshot is complete
        self._report(snapshot=True)

    def _manifest(self, seq: int, entries: dict[str, list]) -> None:
        stamp = utc_stamp()
        self._progress = {"files": 0, "bytes": 0, "total": 0, "at": 0.0}
        for name, items in entries.items():
            if name not in self.writers:
                log.warning("manifest %d names unknown folder %r: ignored", seq, name[:64])
                continue
            valid = list(self._valid(name, items))
            known = self.known.setdefault(name, {})
            changes, deletions = [], []
            held = self.held.get(name, {})
            for e in valid:
                self.pending.pop((name, e["path"]), None)
                self.no_room.discard((name, e["path"]))
                if not e.get("deleted") and held.pop(e["path"], None) is not None and not held:
                    del self.held[name]  # the primary has them all again: nothing to confirm
                    self.guard_errors.pop(name, None)
                if e.get("deleted"):
                    known.pop(e["path"], None)
                    if self.cfg.strict:
                        deletions.append(e)
                else:
                    known[e["path"]] = e
                    changes.append(e)
            local = self._local(name, [e["path"] for e in valid])
            self._apply(name, changes, deletions, local, stamp, seq)
        self.applied = seq
        if not self.pending:
            self.pending_since_seq = None
        elif self.pending_since_seq is None:
            self.pending_since_seq = seq - 1
        self._report(snapshot=False)

    def _retry_pending(self) -> None:
        by_folder: dict[str, list[dict]] = {}
        for (name, _), e in self.pending.items():
            by_folder.setdefault(name, []).append(e)
        self.pending.clear()
        self.no_room.clear()
        self.error = ""
        stamp = utc_stamp()
        self._progress = {"files": 0, "bytes": 0, "total": 0, "at": 0.0}
        for name, entries in by_folder.items():
            if name in self.writers:
                local = self._local(name, [e["path"] for e in entries])
                self._apply(name, entries, [], local, stamp, self.applied)
        if not self.pending:
            self.pending_since_seq = None
            log.info("pending files applied; in sync at manifest %d", self.applied)
        self._report(snapshot=False)

    def _local(self, name: str, paths: list[str]) -> dict[str, dict]:
        writer, filt = self.writers[name], self.filters[name]
        out = {}
        for p in paths:
            try:
                e = writer.local_entry(p, filt, self.cache)
            except (PathError, OSError):
                e = None
            if e is not None:
                out[p] = e
        return out

    # --- applying --------------------------------------------------------------------
    def _keep_if_conflict(self, name: str, path: str, local: dict | None, incoming: str | None,
                          stamp: str) -> None:
        """Keep a copy of a local object that is about to be replaced or deleted when it is
        not what the pair last agreed on: a change made here that never reached the peer."""
        if local is None or local["kind"] == "dir":
            return
        mine = Agreed.token(local)
        if mine == incoming or mine == self.agreed.get(name, path):
            return
        if (name, path, mine) in self.kept:
            return  # a retry of a fetch that failed: this very content is already kept
        kept = self.writers[name].preserve(path, stamp)
        self.kept.add((name, path, mine))
        if kept:
            log.warning("conflict: %s/%s differs from what the pair agreed on; kept at %s",
                        name, path, kept)
            self._emit("conflict", folder=name, path=path, kept=str(kept))

    def _set_aside(self, name: str, extras: list[dict], stamp: str) -> None:
        """Move this node's own unagreed files that the primary lacks to conflicts/ (a copy
        there, the original to the trash), so the live folder matches the primary's."""
        writer = self.writers[name]
        for e in extras:  # deepest first: a folder's files go before it
            try:
                if e["kind"] == "dir":
                    if not os.listdir(os.path.join(writer.root, e["path"])):
                        writer.remove(e["path"], trash=True, stamp=stamp)
                    continue
                kept = writer.preserve(e["path"], stamp)
                writer.remove(e["path"], trash=True, stamp=stamp)
            except (PathError, OSError) as exc:
                log.warning("could not set aside %s/%s: %s", name, e["path"], exc)
                continue
            log.warning("conflict: %s/%s was made here while primary and %s lacks it; kept"
                        " at %s", name, e["path"], self.cfg.peer, kept)
            self._emit("conflict", folder=name, path=e["path"], kept=str(kept),
                       why="only on this node")

    def _apply(self, name: str, changes: list[dict], deletions: list[dict],
               local: dict[str, dict], stamp: str, seq: int,
               files_here: int | None = None) -> None:
        writer = self.writers[name]
        agreed: list[tuple[str, str, str | None]] = []
        fetch: list[dict] = []
        for e in sorted(changes, key=lambda x: (x["kind"] != "dir", x["path"])):
            have = local.get(e["path"])
            token = Agreed.token(e)
            try:
                if have is not None and not _differs(have, e):
                    if have["mode"] != e["mode"] or (
                        e["kind"] != "dir" and have["mtime_ns"] != e["mtime_ns"]
                    ):
                        writer.set_meta(e)
                    agreed.append((name, e["path"], token))
                    continue
                self._keep_if_conflict(name, e["path"], have, token, stamp)
                if have is not None and have["kind"] != e["kind"]:
                    writer.remove(e["path"], trash=True, stamp=stamp)
                if e["kind"] == "dir":
                    writer.make_dir(e)
                    agreed.append((name, e["path"], token))
                elif e["kind"] == "link":
                    writer.make_link(e)
                    agreed.append((name, e["path"], token))
                else:
                    fetch.append(e)
            except (PathError, OSError) as exc:
                self._failed(name, e, exc)
        if fetch:
            agreed.extend(self._fetch(name, fetch))
        if deletions:
            agreed.extend(self._delete(name, deletions, local, stamp, files_here))
        if agreed:
            self.agreed.update(agreed)

    def _pend(self, name: str, e: dict, *, no_room: bool = False) -> None:
        """Keep e to apply later, remembering whether it failed for lack of room (_stuck)."""
        key = (name, e["path"])
        self.pending[key] = e
        if no_room:
            self.no_room.add(key)
        else:
            self.no_room.discard(key)

    def _failed(self, name: str, e: dict, exc: BaseException) -> None:
        self._pend(name, e, no_room=_enospc(exc))
        if _enospc(exc):
            if name not in self.disk_full:
                self.disk_full.add(name)
                log.error("disk full in folder %s writing %s: keeping the old copy; will retry",
                          name, e["path"])
            self.error = f"disk full in folder {name} ({self.writers[name].root})"
            self._emit("disk_full", folder=name, path=e["path"], error=self.error)
        elif isinstance(exc, PathError):
            self.pending.pop((name, e["path"]), None)  # hostile or impossible: never retry
            log.warning("refused %s/%s: %s", name, e["path"][:200], exc)
            self._emit("refused", folder=name, path=e["path"][:200], reason=str(exc))
        elif not isinstance(exc, HashMismatch):
            log.warning("could not apply %s/%s: %s", name, e["path"], exc)
            self.error = self.error or f"{name}/{e['path']}: {exc}"

    def _delete(self, name: str, deletions: list[dict], local: dict[str, dict],
                stamp: str, files_here: int | None = None) -> list[tuple[str, str, None]]:
        """Strict deletions, into the trash. `files_here`: the folder's files before this
        cycle (a snapshot counts its scan); by default what the primary had before it."""
        doomed = sum(1 for e in deletions if e["kind"] != "dir")
        if files_here is None:
            # `local` only holds the paths of this manifest: it says nothing of the folder
            files_here = doomed + sum(1 for e in self.known.get(name, {}).values()
                                      if e["kind"] != "dir")
        if files_here >= GUARD_MIN_FILES and doomed * 2 > files_here and (
            name not in self.confirmed
        ):
            msg = (f"strict guard: refusing to delete {doomed} of {files_here} files in folder "
                   f"{name} (an unmounted disk on the primary looks like this); run "
                   f"'sbs-tools confirm-deletions {name}' on this node to allow it")
            log.error(msg)
            self.held.setdefault(name, {}).update((e["path"], e) for e in deletions)
            self.guard_errors[name] = msg
            self._emit("strict_guard", folder=name, deletions=doomed, files=files_here,
                       error=msg)
            return []
        self.confirmed.discard(name)
        done = []
        # children before parents, so a deleted folder is empty when its turn comes; a folder
        # inside a folder deleted too goes to the trash with it, in one rename (a tree 2,000
        # levels deep is not walked down from the root once per level)
        doomed_dirs = {e["path"] for e in deletions if e["kind"] == "dir"}
        for e in sorted(deletions, key=lambda x: x["path"], reverse=True):
            if e["kind"] == "dir" and e["path"].rpartition("/")[0] in doomed_dirs:
                done.append((name, e["path"], None))
                continue
            have = local.get(e["path"])
            if have is None and e["path"] not in local:
                have = self._local(name, [e["path"]]).get(e["path"])
            if have is None:
                done.append((name, e["path"], None))
                continue
            self._keep_if_conflict(name, e["path"], have, None, stamp)
            try:
                self.writers[name].remove(e["path"], trash=True, stamp=stamp)
                done.append((name, e["path"], None))
                self._event_file("deleted", name, e)
            except (PathError, OSError) as exc:
                log.warning("could not delete %s/%s: %s", name, e["path"], exc)
        return done

    def _event_file(self, action: str, name: str, e: dict) -> None:
        p = self._progress
        if action == "fetched":
            p["files"] += 1
            p["bytes"] += e.get("size", 0)
        if p["total"] <= PER_FILE_EVENTS:
            self._emit("transfer", action=action, folder=name, path=e["path"],
                       size=e.get("size", 0))
        elif time.monotonic() - p["at"] > 0.5 or p["files"] == p["total"]:
            p["at"] = time.monotonic()
            self._emit("progress", files=p["files"], total=p["total"], bytes=p["bytes"])

    def _fetch(self, name: str, files: list[dict]) -> list[tuple[str, str, str]]:
        """Fetch, verify and commit files; return what got applied (for the journal)."""
        writer = self.writers[name]
        done: list[tuple[str, str, str]] = []
        by_path = {e["path"]: e for e in files if e["size"] > 0}
        open_big: dict[str, Any] = {}
        lanes: collections.deque[concurrent.futures.Future] = collections.deque()
        # Files that failed on our side (a full disk, a bad path): their remaining chunks are
        # not asked for. Other files go on: a file too big for the space left must not keep
        # the small ones behind it from arriving.
        skip: set[str] = set()
        chunks: _ChunkWriter | None = None  # big files' writer thread, started when needed
        free = _free_bytes(writer.root)
        for e in by_path.values():
            if free is not None and e["size"] > free:
                # the temp file sits next to the old copy until the rename: it cannot fit, so
                # do not transfer it (a hostile or corrupt size of 2**62 ends here too)
                skip.add(e["path"])
                self._failed(name, e, OSError(errno.ENOSPC, f"{e['size']} bytes needed, "
                                              f"{free} free"))
        try:
            for e in files:
                if e["size"] == 0:
                    try:
                        tmp = writer.new_temp(e["path"])
                    except (PathError, OSError) as exc:
                        self._failed(name, e, exc)
                        continue
                    self._commit(name, [(tmp, e)], done)
            for items, metas, blobs in self.fetcher.fetch(self._batches(name, by_path, skip)):
                small: list[tuple[Any, dict]] = []
                for item, meta, blob in zip(items, metas, blobs, strict=True):
                    e = by_path[item["p"]]
                    if e["path"] in skip:
                        continue
                    if meta["size"] != e["size"] or "err" in meta:
                        # changed or gone since the manifest: the next one will say more
                        if (tmp := open_big.pop(e["path"], None)) is not None:
                            if chunks is not None:
                                chunks.drain()
                                chunks.error(tmp)
                            tmp.abort()
                        if e["path"] not in {x[1] for x in done}:
                            self._pend(name, e)
                        continue
                    if e["size"] <= SMALL:
                        small.append((e, blob))
                        continue
                    try:
                        tmp = open_big.get(e["path"])
                        if tmp is None:
                            if item["o"] != 0:
                                continue  # an earlier chunk failed; this file is pending
                            tmp = open_big[e["path"]] = writer.new_temp(e["path"])
                        if chunks is None:
                            chunks = _ChunkWriter()
                        if (exc := chunks.error(tmp)) is not None:
                            raise exc  # an earlier chunk's write failed (a full disk)
                        chunks.write(tmp, blob)
                        if item["o"] + len(blob) >= e["size"]:
                            chunks.drain()  # the whole file is written before it is sealed
                            if (exc := chunks.error(tmp)) is not None:
                                raise exc
                    except (PathError, OSError) as exc:
                        if (tmp := open_big.pop(e["path"], None)) is not None:
                            if chunks is not None:
                                chunks.drain()
                                chunks.error(tmp)
                            tmp.abort()
                        skip.add(e["path"])
                        self._failed(name, e, exc)
                        continue
                    if item["o"] + len(blob) >= e["size"]:
                        del open_big[e["path"]]
                        self._commit(name, [(tmp, e)], done)
                if small:
                    # written and committed on a lane thread while the next replies arrive
                    lanes.append(self._lane_pool().submit(self._write_small, writer, small))
                    while len(lanes) > 2 * LANES:
                        self._settle(name, lanes.popleft(), done)
        except FetchError as exc:
            log.error("fetching from the primary failed: %s", exc)
            self.error = str(exc)
            self.fetcher.close()
            while lanes:
                self._settle(name, lanes.popleft(), done)
            got = {x[1] for x in done}
            for e in by_path.values():
                if e["path"] not in got:
                    self._pend(name, e)
        except BaseException:
            # an unexpected error: no lane may still be writing into the folder when it leaves
            concurrent.futures.wait(lanes)
            lanes.clear()
            raise
        finally:
            if chunks is not None:
                chunks.close()  # after the chunks queued before it: no write is left running
            for tmp in open_big.values():
                tmp.abort()
        # every batch handed to a lane is finished and accounted for before we return
        while lanes:
            self._settle(name, lanes.popleft(), done)
        return done

    # --- small files on lane threads -------------------------------------------------
    def _lane_pool(self) -> concurrent.futures.ThreadPoolExecutor:
        if self._lanes is None:
            ids = itertools.count(1)

            def name_lane() -> None:
                self._lane_id.lane = next(ids)

            self._lanes = concurrent.futures.ThreadPoolExecutor(
                LANES, thread_name_prefix="sbs-syncer-lane", initializer=name_lane)
        return self._lanes

    def _write_small(self, writer: FolderWriter, pairs: list[tuple[dict, Any]]
                     ) -> tuple[list[tuple[dict, BaseException]], list, list]:
        """On a lane thread: write a batch of small files to temp files in the lane's own temp
        directory and commit them (one syncfs). Only disk work happens here; what it means
        for pending, events and the journal is settled on the syncer thread."""
        lane = self._lane_id.lane
        failed: list[tuple[dict, BaseException]] = []
        items: list[tuple[Any, dict]] = []
        for e, blob in pairs:
            try:
                tmp = writer.new_temp(e["path"], lane)
                tmp.write(blob)  # on error the temp file removes itself
            except (PathError, OSError) as exc:
                failed.append((e, exc))
                continue
            items.append((tmp, e))
        return failed, items, self._commit_files(writer, items)

    def _settle(self, name: str, fut: concurrent.futures.Future, done: list) -> None:
        failed, items, results = fut.result()
        for e, exc in failed:
            self._failed(name, e, exc)
        self._book(name, items, results, done)

    def _batches(self, name: str, by_path: dict[str, dict],
                 skip: set[str]) -> Iterator[list[dict]]:
        batch: list[dict] = []
        size = 0
        for e in by_path.values():
            if e["path"] in skip:
                continue
            if e["size"] > SMALL:
                if batch:
                    yield batch
                    batch, size = [], 0
                for off in range(0, e["size"], CHUNK):
                    if e["path"] in skip:
                        break
                    yield [{"f": name, "p": e["path"], "o": off,
                            "n": min(CHUNK, e["size"] - off)}]
                continue
            batch.append({"f": name, "p": e["path"], "o": 0, "n": e["size"]})
            size += e["size"]
            if size >= BATCH_BYTES or len(batch) >= BATCH_ITEMS:
                yield batch
                batch, size = [], 0
        if batch:
            yield batch

    def _commit(self, name: str, items: list, done: list) -> None:
        self._book(name, items, self._commit_files(self.writers[name], items), done)

    @staticmethod
    def _commit_files(writer: FolderWriter, items: list) -> list[BaseException | None]:
        if not items:
            return []
        if len(items) == 1:
            tmp, e = items[0]
            try:
                writer.commit(tmp, e)
                return [None]
            except (HashMismatch, PathError, OSError) as exc:
                return [exc]
        return writer.commit_many(items)

    def _book(self, name: str, items: list, results: list, done: list) -> None:
        for (tmp, e), res in zip(items, results, strict=True):
            if res is None:
                done.append((name, e["path"], Agreed.token(e)))
                self._event_file("fetched", name, e)
            else:
                tmp.abort()
                self._failed(name, e, res)


class _ChunkWriter:
    """Writes the chunks of big files in a thread of its own, so receiving the next chunks
    (which keeps the fetch window full) overlaps with writing and hashing this one.

    Bounded (QUEUE chunks, 1 MiB each), so memory stays flat. A failed write aborts its temp
    file (TempFile.write does) and is kept in `errors` for the syncer to pick up; the syncer
    touches a temp file handed to this thread again only after drain().
    """

    QUEUE = 16

    def __init__(self) -> None:
        self.q: queue.Queue[tuple[Any, Any] | None] = queue.Queue(self.QUEUE)
        self.errors: dict[int, BaseException] = {}  # id(temp file) -> what its write raised
        self.thread = threading.Thread(target=self._run, name="sbs-syncer-writer", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while True:
            job = self.q.get()
            try:
                if job is None:
                    return
                tmp, blob = job
                if id(tmp) not in self.errors:
                    try:
                        tmp.write(blob)
                    except BaseException as exc:  # noqa: BLE001 -- handed to the syncer
                        self.errors[id(tmp)] = exc
            finally:
                self.q.task_done()

    def write(self, tmp: Any, blob: Any) -> None:
        self.q.put((tmp, blob))

    def drain(self) -> None:
        self.q.join()

    def error(self, tmp: Any) -> BaseException | None:
        return self.errors.pop(id(tmp), None)

    def close(self) -> None:
        self.q.put(None)
        self.thread.join()


def _free_bytes(path: str) -> int | None:
    try:
        st = os.statvfs(path)
    except OSError:
        return None
    return (st.f_bfree if os.geteuid() == 0 else st.f_bavail) * st.f_frsize


def _enospc(exc: BaseException) -> bool:
    return isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)


def _differs(have: dict | None, want: dict) -> bool:
    """Does the local object need rewriting (content or kind), not just its metadata?"""
    if have is None or have["kind"] != want["kind"]:
        return True
    if want["kind"] == "file":
        return have["hash"] != want.get("hash") or have["size"] != want["size"]
    if want["kind"] == "link":
        return have.get("target") != want.get("target")
    return False
