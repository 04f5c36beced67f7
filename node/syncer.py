"""The secondary's replication worker: a thread that applies snapshots and manifests.

Jobs arrive from the node loop on a queue (snapshot, manifest, confirm, stop), in order. For
each, the worker compares what the primary has with what is on disk, fetches only what
differs (node/transfer.py over node/content.Fetcher: many small files per request, several
requests in flight), writes each file to a temp file, verifies its hash, fsyncs and renames it
into place (node/writer). Before it overwrites or deletes a local object that differs from
what the pair last agreed on (node/journal), it keeps a copy under state_dir/conflicts/<UTC
time>/.

What could not be applied (the file changed again while in flight, the disk is full, the
primary vanished) stays pending and is retried; `applied` only moves past a manifest once
nothing before it is pending, so the primary's final sync never trusts a half-applied copy.

To the loop, over an inproc PAIR:
    [b"applied", json {applied, snapshot, pending_files, pending_bytes, error, through, stuck,
                       gen}]
    [b"event",   json {event, ...}]   (transfers, progress, conflicts, guard, disk full)

The Syncer runs the jobs; its helpers each have one job: node/pending.py keeps what could
not be applied yet and why, node/transfer.py fetches and commits files, node/deletions.py
applies strict deletions behind the guard, conflicts.ConflictKeeper keeps conflict copies,
node/fileevents.py tells the bus how a job goes.
"""
from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import zmq

from . import names
from .config import Config, FolderConfig
from .conflicts import ConflictKeeper, own_extras
from .content import Fetcher
from .deletions import GUARD_MIN_FILES, StrictDeletions  # noqa: F401  (re-exported)
from .drift import LOOK_EVERY
from .entries import KEPT, FileEntry, same_entry, shared_values
from .fileevents import FileEvents
from .filters import Filter
from .hashstore import CacheKeeper, vanished
from .index import FolderMissing, HashCache, keep_unreadable, scan_folder
from .journal import Agreed
from .mending import Mending
from .pending import RETRY_ERROR, Pending
from .protocol import entry_check
from .security import Keys
from .transfer import Transfer
from .writer import FolderWriter, PathError, check_relpath, purge_trash, utc_stamp

if TYPE_CHECKING:
    from .scanner import Scanner

# files fetched (and journalled) per Transfer.fetch call: a 100,000-file snapshot in 20 slices
FETCH_SLICE = 5_000
# how long the first snapshot waits for the scanner handed over to end (Scanner.loaded_cache);
# past it (a dropped scan hashing a file of many GB) the caches are read from disk again
HANDED_WAIT = 5.0
# at least this often, retries come between jobs too (a busy primary never leaves the queue
# empty long enough for the quiet ones)
BUSY_RETRY = 10.0

log = logging.getLogger("sbs.syncer")


class Syncer:
    def __init__(self, ctx: zmq.Context, endpoint: str, cfg: Config, keys: Keys | None,
                 agreed: Agreed):
        self.ctx, self.endpoint, self.cfg, self.agreed = ctx, endpoint, cfg, agreed
        self.fetcher = Fetcher(ctx, f"tcp://{cfg.peer}:{cfg.blob_port}", keys)
        self.jobs: queue.Queue[tuple] = queue.Queue()
        self.caches: dict[str, HashCache] = {}  # per folder (keyed by relpath), as writers
        self.keeper = CacheKeeper(cfg.state_dir, "syncer",  # the caches on disk
                                  stopping=self.fetcher.cancelled.is_set,
                                  busy=lambda: not self.jobs.empty())
        self.writers: dict[str, FolderWriter] = {}
        self.filters: dict[str, Filter] = {}
        self.known: dict[str, dict[str, dict]] = {}  # the primary's index as last applied
        # the scanner this node stopped when it began to follow: its hash caches, loaded
        # already, are taken on at the first snapshot (_setup) instead of read again
        self.handed: Scanner | None = None
        self.pending = Pending(self.emit)  # what could not be applied yet, and why
        # The ACK of a snapshot makes the primary record its whole index as agreed, so it is
        # sent only once nothing of the snapshot is pending (until then we report applied 0)
        self.snapshot_ack_due = False
        self.applied = 0
        self.snapshots = 0  # snapshot jobs begun: the node ignores reports from before its latest
        # folders of the last snapshot that cannot be replicated here, and why: in the error
        # at every report, so this node never says it is in sync without them
        self.refused: dict[str, str] = {}
        # ... and their paths, tried again every RETRY_ERROR until they open (then a snapshot
        # is asked for, which replicates them); gone from here once asked
        self.reopen: dict[str, Path] = {}
        # set by the node when it was primary before: the first snapshot also sets aside the
        # files the new primary lacks that were made here and never agreed on (conflicts.py)
        self.own_term = False
        self.transfer = Transfer(self)
        self.mending = Mending(self)
        self.deletions = StrictDeletions(self)
        self.conflicts = ConflictKeeper(self)
        self.progress = FileEvents(self.emit)
        self.thread = threading.Thread(target=self._run, name="sbs-syncer", daemon=True)

    # --- called from the node loop ---------------------------------------------------
    def start(self) -> None:
        self.thread.start()

    def submit_snapshot(self, seq: int, folders: dict[str, FolderConfig],
                        index: dict[str, list], unreadable: dict[str, list[str]] | None = None
                        ) -> None:
        """``unreadable``: per folder, what the primary has but could not read (its snapshot
        says so): none of it is deleted or set aside here."""
        self.jobs.put(("snapshot", seq, folders, index, unreadable or {}))

    def submit_manifest(self, seq: int, entries: dict[str, list]) -> None:
        self.jobs.put(("manifest", seq, entries))

    def confirm_deletions(self, folder: str | None) -> None:
        self.jobs.put(("confirm", folder))

    def stop(self, save: bool = False) -> None:
        """``save``: the hash caches are written on the way out (the node is stopping)."""
        self.keeper.at_exit = save
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
        next_look = time.monotonic() + LOOK_EVERY  # the rolling check of the copy (drift.py)
        # retries come once no job has come for retry_in seconds (a job puts them off), and
        # at least every BUSY_RETRY seconds while jobs keep coming (a primary writing a log
        # every second put them off for good: a folder mended, a trash writable again, and
        # nothing applied until the primary fell quiet)
        quiet_from = last_retry = time.monotonic()
        try:
            while True:
                now = time.monotonic()
                if now >= next_purge:
                    next_purge = now + purge_every
                    self._purge_trash()
                if self.keeper.due(self.caches, now):
                    self._save_caches()
                retry_in = self.pending.retry_in()
                if self.reopen or self.deletions.failed:
                    retry_in = min(retry_in or RETRY_ERROR, RETRY_ERROR)
                if retry_in is None:
                    last_retry = now  # nothing waits: the busy bound counts from here
                elif now - last_retry >= max(retry_in, BUSY_RETRY):
                    quiet_from = last_retry = now
                    self.mending.retries()
                    continue
                save_in = self.keeper.next_save() - now
                retry_at = None if retry_in is None else quiet_from + retry_in
                wait = max(0.0, min(purge_every if retry_at is None else retry_at - now,
                                    next_purge - now, save_in, next_look - now))
                try:
                    job = self.jobs.get(timeout=wait)
                except queue.Empty:
                    # not on every pass of a settle that gave way to a job (save_in 0): once
                    # the retry's time has come
                    if retry_at is not None and time.monotonic() >= retry_at:
                        quiet_from = last_retry = time.monotonic()
                        self.mending.retries()
                    if time.monotonic() >= next_look:
                        next_look = time.monotonic() + LOOK_EVERY
                        self.mending.look_at_copy()
                    continue
                quiet_from = time.monotonic()
                if job[0] == "stop" or self.fetcher.cancelled.is_set():
                    return
                try:
                    if job[0] == "snapshot":
                        self._snapshot(*job[1:])
                    elif job[0] == "manifest":
                        self._manifest(*job[1:])
                    elif job[0] == "confirm":
                        self._confirm(job[1])
                except _Stopped:
                    return
                except Exception as exc:  # keep following; report what went wrong
                    log.exception("sync job %s failed", job[0])
                    self.pending.error = f"{job[0]} failed: {exc}"
                    self.pending.local = False
                    self.pending.error_of = None  # about no one file
                    self.report(snapshot=False)
        finally:
            self.transfer.close()
            self.fetcher.close()
            self.pipe.close()
            if self.keeper.at_exit:
                self._save_caches()
            for w in self.writers.values():
                w.close()

    def _save_caches(self) -> None:
        self.keeper.save({n: (str(w.root), self.caches[n]) for n, w in self.writers.items()},
                         self._keep, self._look)

    def _look(self, name: str) -> Callable[[str], object]:
        """How a written file is looked at again to be cached (hashstore: settle)."""
        writer, filt, cache = self.writers[name], self.filters[name], self.caches[name]
        known = self.known.get(name, {})

        def look(path: str) -> None:
            got = writer.local_entry(path, filt, cache)
            want = known.get(path)
            if got is not None and isinstance(want, FileEntry) and same_entry(got, want):
                # the same content as the primary's entry: keep that one object, not a copy
                # (~180 bytes a file with its hash string)
                cache.swap(got, want)

        return look

    def _keep(self, name: str) -> Callable[[Any], bool] | None:
        """What the primary has (as last applied); all while nothing is known yet."""
        known = self.known.get(name)
        if not known:
            return None
        return lambda e: e.path in known

    def emit(self, event: str, **fields: Any) -> None:
        self.pipe.send_multipart([b"event", names.dumps({"event": event, **fields})])

    def report(self, *, snapshot: bool) -> None:
        self.snapshot_ack_due = self.snapshot_ack_due or snapshot
        snapshot = self.snapshot_ack_due and not self.pending
        if snapshot:
            self.snapshot_ack_due = False
        pending = self.pending
        pending.settle()
        self.pipe.send_multipart([b"applied", names.dumps({
            "applied": self.applied if not pending else (pending.since_seq or 0),
            "snapshot": snapshot,
            "pending_files": len(pending),
            "pending_bytes": pending.bytes(),
            "error": (pending.error or self.deletions.error()
                      or "; ".join(self.refused.values())[:1000]),
            "through": self.applied,
            "stuck": pending.stuck({n: w.root for n, w in self.writers.items()}),
            "local": bool(pending) and pending.local,
            "gen": self.snapshots,
        })])

    def _confirm(self, folder: str | None) -> None:
        self.deletions.confirm(folder)
        self.report(snapshot=False)

    def _setup(self, folders: dict[str, FolderConfig]) -> None:
        sd = self.cfg.state_dir
        handed_until = time.monotonic() + HANDED_WAIT
        self.refused, self.reopen = {}, {}
        for name, f in folders.items():
            w = self.writers.get(name)
            if w is None or str(w.root) != str(f.path):
                if w is not None:
                    self.writers.pop(name).close()  # the path changed: its fds go with it
                try:
                    w, removed = open_writer(name, f.path, sd)
                except (OSError, ValueError) as exc:  # that folder is refused, not all of them
                    log.error("folder %s (%s) cannot be replicated here: %s", name,
                              str(f.path)[:200], exc)
                    self.refused[name] = (f"folder {name} ({str(f.path)[:200]}) cannot be "
                                          f"replicated here: {exc}")
                    self.reopen[name] = f.path
                    continue
                if removed:
                    log.info("removed %d temp file(s) left by an interrupted sync in %s",
                             removed, name)
                self.writers[name] = w
                cache = None if self.handed is None else self.handed.loaded_cache(
                    name, str(w.root), handed_until, self._stop_check)
                # else this root's from disk, if kept
                self.caches[name] = cache if cache is not None else self.keeper.load(
                    name, str(w.root))
                self.keeper.forget(name)
            self.filters[name] = Filter(f.filters)
        self.handed = None  # what was not taken on is let go
        for name in list(self.writers):
            if name not in folders:
                self.writers.pop(name).close()
                self.caches.pop(name, None)
                self.keeper.forget(name)
        self._purge_trash()

    def _stop_check(self) -> None:
        """Raises _Stopped once the syncer is told to stop (the loop may be waiting)."""
        if self.fetcher.cancelled.is_set():
            raise _Stopped

    def _purge_trash(self) -> None:
        try:
            purge_trash(self.cfg.state_dir / "trash", self.cfg.trash_days,
                        stop=self.fetcher.cancelled.is_set)
        except OSError as exc:  # a trash folder we cannot remove must not stop the sync
            log.warning("cannot purge %s: %s", self.cfg.state_dir / "trash", exc)

    def _snapshot(self, seq: int, folders: dict[str, FolderConfig], index: dict,
                  unreadable: dict[str, list[str]]) -> None:
        self.snapshots += 1
        self._setup(folders)
        self.pending.reset()
        self.deletions.reset()  # what to delete is worked out afresh from the full index
        stamp = utc_stamp()
        plans = []
        read = files_local = 0
        for name, entries in index.items():
            if name not in self.writers:
                continue
            writer, filt = self.writers[name], self.filters[name]
            read0 = self.caches[name].hashed
            try:
                local = scan_folder(str(writer.root), filt, self.caches[name],
                                    between=self._stop_check)
            except FolderMissing:
                local = {}
            read += self.caches[name].hashed - read0
            files_local += sum(1 for e in local.values() if e["kind"] == "file")
            remote = {e["path"]: e for e in valid_entries(name, entries, self.emit,
                                                          consume=True)}
            self.known[name] = remote
            if held := set(unreadable.get(name, ())):
                # there on the primary, only not readable now: what we have of it is left alone
                log.warning("snapshot %d: %s: the primary cannot read %d path(s) it has (%s); "
                            "this node keeps its copies of them", seq, name, len(held),
                            ", ".join(sorted(p or "(the folder)" for p in held)[:5])[:500])
                remote_or_held = dict(remote)
                keep_unreadable(remote_or_held, local, held)
            else:
                remote_or_held = remote
            deletions = ([local[p] for p in local if p not in remote_or_held]
                         if self.cfg.strict else [])
            extras = (own_extras(local, remote_or_held, self.agreed, name)
                      if self.own_term and not self.cfg.strict else [])
            plans.append((name, list(remote.values()), deletions, local, extras))
        total_files = sum(1 for _, r, _, loc, _ in plans for e in r
                          if e["kind"] == "file" and _differs(loc.get(e["path"]), e))
        log.info("snapshot %d: %d file(s) to fetch; %d of the %d file(s) here read and hashed, "
                 "the others known from the hash cache", seq, total_files, read, files_local)
        self.progress.begin(total_files)
        for name, remote, deletions, local, extras in plans:
            files_here = sum(1 for e in local.values() if e["kind"] != "dir")
            self.apply(name, remote, deletions, local, stamp, seq, files_here=files_here)
            self.conflicts.set_aside(name, extras, stamp)
        self.own_term = False
        self.applied = seq
        if self.pending:
            self.pending.since_seq = 0  # nothing is confirmed before the snapshot is complete
        self.report(snapshot=True)

    def _manifest(self, seq: int, entries: dict[str, list]) -> None:
        stamp = utc_stamp()
        self.progress.begin(0)
        for name, items in entries.items():
            if name not in self.writers:
                log.warning("manifest %d names unknown folder %r: ignored", seq, name[:64])
                continue
            valid = list(valid_entries(name, items, self.emit))
            known = self.known.setdefault(name, {})
            changes, deletions = [], []
            for e in valid:
                self.pending.superseded(name, e["path"])
                if not e.get("deleted"):
                    self.deletions.seen(name, e["path"])
                if e.get("deleted"):
                    known.pop(e["path"], None)
                    if self.cfg.strict:
                        deletions.append(e)
                else:
                    known[e["path"]] = e
                    changes.append(e)
            local = self.local(name, [e["path"] for e in valid])
            self.apply(name, changes, deletions, local, stamp, seq)
        self.applied = seq
        if not self.pending:
            self.pending.since_seq = None
        elif self.pending.since_seq is None:
            self.pending.since_seq = seq - 1
        self.report(snapshot=False)

    def local(self, name: str, paths: list[str]) -> dict[str, dict]:
        writer, filt = self.writers[name], self.filters[name]
        out = {}
        for p in paths:
            try:
                e = writer.local_entry(p, filt, self.caches[name])
            except (PathError, OSError):
                e = None
            if e is not None:
                out[p] = e
        return out

    # --- applying --------------------------------------------------------------------
    def apply(self, name: str, changes: list[dict], deletions: list[dict],
               local: dict[str, dict], stamp: str, seq: int,
               files_here: int | None = None) -> None:
        writer = self.writers[name]
        if writer.replaced():
            self.pending.replaced(name, writer.root, changes, len(deletions))
            return
        agreed: list[tuple[str, str, str | None]] = []
        fetch: list[dict] = []
        # folders first, each group in path order; keyed by the path strings themselves (a
        # (kind, path) tuple per entry cost ~6 MB at 100,000 files, all alive while sorting)
        dirs = sorted((e for e in changes if e["kind"] == "dir"), key=_path)
        others = sorted((e for e in changes if e["kind"] != "dir"), key=_path)
        for e in itertools.chain(dirs, others):
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
                self.conflicts.keep_if_conflict(name, e["path"], have, token, stamp)
                if have is not None and have["kind"] != e["kind"]:
                    if have["kind"] == "dir":
                        self.conflicts.keep_tree_if_conflict(name, e["path"], stamp)
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
                self.failed(name, e, exc)
        # a big snapshot's files in slices, each journalled as it is done: what one fetch
        # keeps per file (its index by path, what it applied) stays bounded
        for i in range(0, len(fetch), FETCH_SLICE):
            agreed.extend(self.transfer.fetch(name, fetch[i:i + FETCH_SLICE]))
            self.agreed.update(agreed)
            agreed.clear()
        if deletions:
            agreed.extend(self.deletions.delete(name, deletions, local, stamp, files_here))
        if agreed:
            self.agreed.update(agreed)

    def failed(self, name: str, e: dict, exc: BaseException) -> None:
        self.pending.failed(name, e, exc, self.writers[name].root)


def open_writer(name: str, path: Path, state_dir: Path) -> tuple[FolderWriter, int]:
    """The writer of a folder, and how many temp files an interrupted sync left (removed).
    ValueError when the folder looks like a disk not mounted (hashstore.vanished)."""
    if why := vanished(state_dir, name, str(path)):
        raise ValueError(why)
    # trash and conflict copies go under <stamp>/<folder>/: two folders may both hold a
    # config.ini, and the operator must see which one a copy came from
    w = FolderWriter(path, state_dir / "tmp" / name, state_dir / "trash",
                     state_dir / "conflicts", name=name)
    try:
        return w, w.cleanup_temps()
    except BaseException:
        w.close()
        raise


def valid_entries(folder: str, entries: list, emit: Callable[..., None], *,
                  consume: bool = False) -> Iterator[dict]:
    """The entries fit to apply, as the node keeps them (shared_values); the others are logged
    (and announced) and dropped. ``consume``: each item of ``entries`` is let go (set to None)
    as it is read, so a snapshot's 100,000 dicts from the wire are freed one by one while their
    compact copies are made, instead of all living beside them until the list goes."""
    for i, e in enumerate(entries):
        if consume:
            entries[i] = None
        # a kept entry was held to the schema when its snapshot part arrived (keep_entries)
        why = None if isinstance(e, KEPT) else entry_check(e)
        if why is None:
            try:
                check_relpath(e["path"])
            except PathError as exc:
                why = str(exc)
        if why is not None:
            log.warning("refused an entry in %s: %s (%r)", folder, why,
                        str(e.get("path") if isinstance(e, dict) else e)[:200])
            emit("refused", folder=folder, reason=why)
            continue
        if e["kind"] == "file" and not e.get("hash") and not e.get("deleted"):
            log.warning("refused an entry in %s without hash: %r", folder, e["path"][:200])
            continue
        yield shared_values(e)


def keep_entries(index: dict[str, list]) -> None:
    """A snapshot part's entries as the node keeps them, the moment the part is here: each one
    the schema accepts is made compact in place (shared_values), so a 100,000-entry snapshot
    never holds all its dicts from the wire at once (~50 MB of them). What the schema refuses
    stays as it came, for valid_entries to log and drop; paths are checked there."""
    for entries in index.values():
        for i, e in enumerate(entries):
            if entry_check(e) is None:
                entries[i] = shared_values(e)


class _Stopped(Exception):
    """The syncer was told to stop while it scanned or waited (Syncer.stop)."""


def _path(e: dict) -> str:
    return e["path"]


def _differs(have: dict | None, want: dict) -> bool:
    """Does the local object need rewriting (content or kind), not just its metadata?"""
    if have is None or have["kind"] != want["kind"]:
        return True
    if want["kind"] == "file":
        return have["hash"] != want.get("hash") or have["size"] != want["size"]
    if want["kind"] == "link":
        return have.get("target") != want.get("target")
    return False
