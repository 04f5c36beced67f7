"""The primary's side of replication, on the loop thread.

It owns the scanner's inproc pipe: the Scanner thread reports deltas, which are numbered and
published on the bus as MANIFESTs (the loop's PUB), and kept in a mirror of the index so a
secondary can ask for a snapshot (SNAPSHOT on the ROUTER, answered with SNAPSHOT_REP). The
secondary's ACKs say how far it applied: that much becomes agreed in the journal, written by a
thread of its own (after a snapshot it walks the whole index). A hand-over or a stop first runs
the final sync: flush the watcher, then wait (bounded) until the peer has applied it all.

A node that does not yet know its role starts the scanner at once (prescan: the scan only
reads): a node alone waits dead_after before it may take the primary role, and its first scan
(seconds at 100,000 files) runs in that wait instead of after it. What the scanner reports is
held, not published, until start() adopts it with the same folders; following a primary, a
different folder list or too much held stops it.
"""
from __future__ import annotations

import collections
import itertools
import logging
import queue
import secrets
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import zmq

from . import protocol
from .config import FolderConfig
from .fsm import PRIMARY_LIKE, E
from .journal import Agreed
from .scanner import Scanner

if TYPE_CHECKING:
    from .node import Node

log = logging.getLogger("sbs.node")

# manifests kept for the journal until the secondary acknowledges them: at most this many,
# holding at most this many entries together (a primary alone under heavy churn kept every
# entry of 10,000 manifests of up to MANIFEST_PART each: ~1 GB after a few million changes).
# Letting the oldest go loses no file: what they held is recorded as agreed when the secondary
# next acknowledges a snapshot (which a secondary that was away takes anyway); until then a
# path they changed counts as not agreed, so a rejoin keeps it as a conflict copy, never
# deletes it.
KEEP_UNACKED = 10_000
KEEP_UNACKED_ENTRIES = 100_000
# a prescan's reports held while the role is not known: past this many (a watcher busy for a
# long undecided start) the prescan is dropped and the primary, if it comes to that, scans anew
PRESCAN_HELD_MAX = 1_000


@dataclass
class FinalSync:
    """The last sync of a hand-over or a stop: everything closed before it began must reach
    the peer, or `deadline` passes."""
    deadline: float
    token: str  # the scanner's flush answers with it
    why: str
    target: int | None = None  # the manifest holding everything, once the flush is done


class Primary:
    def __init__(self, node: Node):
        self.node = node
        self.seq = 0  # last manifest seq published
        self.index: dict[str, dict[str, dict]] = {}  # mirror of the scanner's index
        self.index_ready = False
        # the latest snapshot request that came before the first scan was done (the peer's
        # ROUTER identity): answered the moment the scan ends, not when the peer asks again
        self.held_snapshot: bytes | None = None
        self.unacked: collections.deque[tuple[int, dict]] = collections.deque()
        self.unacked_entries = 0  # the entries in self.unacked, together
        self.unacked_dropped = 0  # manifests let go since the secondary's last acknowledgement
        self.dropped_seq = 0  # the newest manifest ever let go unacknowledged
        self.scanner: Scanner | None = None
        # the scanner stopped last, while its caches may serve the syncer if the node follows
        # (take_stopped); None once taken or once another scanner starts
        self.stopped_scanner: Scanner | None = None
        # while prescanning (the role not known yet): the folders it scans and the scanner's
        # reports, held in order for start() to replay; None otherwise
        self.prescan_folders: dict[str, FolderConfig] | None = None
        self.held: list[list[bytes]] = []
        self.final_sync: FinalSync | None = None
        self.peer_last_sync: float | None = None  # wall time the secondary was in sync
        self.pipes = 0  # scanner pipes used so far (each scanner gets a fresh one)
        self.endpoint = f"inproc://scanner-{node.run_id}"
        self.pipe = node.ctx.socket(zmq.PAIR)
        self.pipe.bind(self.endpoint)
        self.journal_jobs: queue.Queue = queue.Queue()
        self.journal = threading.Thread(target=self._journal_worker, name="sbs-journal",
                                        daemon=True)
        self.journal.start()

    # ------------------------------------------------------------------ scanner
    def prescan(self, folders: dict[str, FolderConfig]) -> None:
        """Begin the first scan before the role is known; start() adopts it (module doc)."""
        if self.scanner is not None or not folders:
            return
        self._new_scanner(folders)
        self.prescan_folders, self.held = folders, []
        log.info("scanning %s while the role is not known yet", ", ".join(folders))

    def start(self, folders: dict[str, FolderConfig]) -> None:
        node = self.node
        early, held = self.prescan_folders, self.held
        self.prescan_folders, self.held = None, []
        if early != folders:  # only this start's own prescan is taken on; any other scanner goes
            if early is not None:
                log.info("the folder list changed since the scan begun at start-up; scanning anew")
            self.stop()
        node.blobs.set_folders(folders)
        self.index = {n: {} for n in folders}
        self.index_ready = False
        self.held_snapshot = None
        node.lists.record_primary(folders)
        if self.scanner is None:
            self._new_scanner(folders)
            return
        done = any(f[0] == b"delta" and f[2] == b"full" for f in held)
        log.info("taking on the scan begun at start-up (%s, %d report(s) held)",
                 "done" if done else "still running", len(held))
        for frames in held:
            self.on_scanner(frames)

    def _new_scanner(self, folders: dict[str, FolderConfig]) -> None:
        node = self.node
        self.stopped_scanner = None
        if self.pipes:
            self._new_pipe()
        self.pipes += 1
        self.scanner = Scanner(node.ctx, self.endpoint, folders, period=node.cfg.period,
                               rescan_cycle=node.cfg.rescan_cycle, state_dir=node.cfg.state_dir)
        self.scanner.start()

    def stop(self, final: bool = False) -> None:
        """``final``: the node is stopping; the scanner saves its hash caches on the way out."""
        early = self.prescan_folders is not None
        if self.scanner is not None:
            # a dropped prescan may be deep in its first walk: the loop does not wait for it
            # (its pings would stop meanwhile and the peer would take this node for dead); a
            # cache it is loading is loaded whole, for the syncer if this node follows
            self.scanner.stop(wait=not early, save=final, finish_loading=early and not final)
            self.stopped_scanner = None if final else self.scanner
            self.scanner = None
        if early:
            log.info("the scan begun at start-up is dropped: this node is not primary")
        self.prescan_folders, self.held = None, []
        self.index_ready = False
        self.held_snapshot = None

    def take_stopped(self) -> Scanner | None:
        """The scanner stopped last (see stop), for a syncer to take its hash caches on."""
        scanner, self.stopped_scanner = self.stopped_scanner, None
        return scanner

    def restart(self, folders: dict[str, FolderConfig]) -> None:
        """A new folder list while primary: a new scanner."""
        self.stop()
        self.start(folders)

    def _new_pipe(self) -> None:
        """A fresh pipe for the next scanner: an inproc PAIR takes one peer, and the last
        scanner's goodbye may not be processed yet (a quick restart, or a primary term that
        follows another within a second), when the new one's connection would be refused
        and its first send would block."""
        node = self.node
        node.poller.unregister(self.pipe)
        self.pipe.close()
        self.endpoint = f"inproc://scanner-{node.run_id}-{self.pipes}"
        self.pipe = node.ctx.socket(zmq.PAIR)
        self.pipe.bind(self.endpoint)
        node.poller.register(self.pipe, zmq.POLLIN)

    def on_scanner(self, frames: list[bytes]) -> None:
        kind = frames[0]
        if self.prescan_folders is not None and kind != b"error":
            # not primary (yet): nothing is published; start() replays these in order
            self.held.append(frames)
            if len(self.held) > PRESCAN_HELD_MAX:
                log.warning("the scan begun at start-up is dropped: %d reports held while the "
                            "role is still not known", len(self.held))
                self.stop()
            return
        if kind == b"delta":
            if self.scanner is None or frames[1] != self.scanner.ident:
                return  # left in the pipe by a scanner that has stopped
            delta = self.scanner.take_delta()
            full = frames[2] == b"full"
            self.publish_delta(delta)
            if full and not self.index_ready:
                self.index_ready = True
                log.info("first scan done: %s", {n: len(ix) for n, ix in self.index.items()})
                if (ident := self.held_snapshot) is not None:
                    self.held_snapshot = None
                    self.on_snapshot_request(ident, {})
        elif kind == b"flushed":
            fs = self.final_sync
            if fs is not None and fs.token == frames[1].decode():
                fs.target = self.seq
                log.info("final sync: everything is in manifest %d", self.seq)
        elif kind == b"error":
            log.error("scanner: %s", frames[1].decode(errors="replace"))
            self.node.publish_event("error", where="scanner",
                                    error=frames[1].decode(errors="replace"))

    def publish_delta(self, delta: dict[str, list[dict]]) -> None:
        node = self.node
        # taken a part at a time: a first scan's delta is the whole index, and a (folder, entry)
        # tuple for each of 100,000 entries at once cost the primary ~7 MB of its peak
        items = ((f, e) for f, entries in delta.items() for e in entries)
        while True:
            part: dict[str, list[dict]] = {}
            for folder, entry in itertools.islice(items, protocol.MANIFEST_PART):
                part.setdefault(folder, []).append(entry)
                index = self.index.setdefault(folder, {})
                if entry.get("deleted"):
                    index.pop(entry["path"], None)
                else:
                    index[entry["path"]] = entry
            if not part:
                return
            self.seq += 1
            count = _entries_in(part)
            self._keep_unacked(part, count)
            node.pub.send_multipart(protocol.encode_bus("MANIFEST", {
                "name": node.cfg.name, "run": node.run_id, "epoch": node.epoch, "seq": self.seq,
                "part": 0, "parts": 1, "entries": part,
            }))
            log.debug("manifest %d: %d entries", self.seq, count)
            node.beat()  # a first scan's delta is the whole index: 21 parts at 100,000 files

    def _keep_unacked(self, part: dict[str, list[dict]], count: int) -> None:
        self.unacked.append((self.seq, part))
        self.unacked_entries += count
        while len(self.unacked) > 1 and (len(self.unacked) > KEEP_UNACKED
                                         or self.unacked_entries > KEEP_UNACKED_ENTRIES):
            seq, part = self.unacked.popleft()
            self.unacked_entries -= _entries_in(part)
            self.dropped_seq = seq  # the oldest go first: each one let go is the newest yet
            if not self.unacked_dropped:
                log.info("the secondary has not acknowledged manifests up to %d (%d entries "
                         "waiting): the oldest are let go, and are recorded as agreed when it "
                         "next acknowledges a snapshot", self.seq, self.unacked_entries)
            self.unacked_dropped += 1

    # ------------------------------------------------------------------ the secondary's requests
    def on_snapshot_request(self, ident: bytes, body: dict[str, Any]) -> None:
        node = self.node
        if node.state in PRIMARY_LIKE and not self.index_ready:
            # an initial sync starts as soon as the index exists; the peer asks again only if
            # no answer comes in SNAPSHOT_RETRY (a newer request replaces this one)
            self.held_snapshot = ident
            return
        if node.state not in PRIMARY_LIKE:
            node.reply(ident, protocol.reply_error("not primary"))
            return
        head = {
            "name": node.cfg.name, "run": node.run_id, "epoch": node.epoch, "seq": self.seq,
            **node.lists.folder_fields(node.folders), **node.lists.sentinel_fields(),
            "lists": node.ops.listsync.stamp.wire(), "sid": secrets.token_hex(8),
        }
        # In parts of SNAPSHOT_PART entries, each encoded and handed to the socket before
        # the next is built: one message of a 100k-entry index was ~14 MB, held encoded here
        # (and again inside libzmq) and decoded whole by the secondary.
        # The parts wait in the ROUTER's queue (1,000 messages): past SNAPSHOT_PARTS_MAX
        # parts (a tree of millions) they grow instead, so none is dropped at the queue's mark.
        total = sum(len(ix) for ix in self.index.values())
        size = max(protocol.SNAPSHOT_PART, -(-total // protocol.SNAPSHOT_PARTS_MAX))
        parts = max(1, -(-total // size))
        items = ((f, e) for f, ix in self.index.items() for e in ix.values())
        # there but unreadable at the last full scan: the secondary deletes none of it
        unreadable = ({f: paths for f, paths in self.scanner.unreadable.items() if f in self.index}
                      if self.scanner is not None else {})
        for part in range(parts):
            piece: dict[str, list[dict]] = {f: [] for f in self.index} if part == 0 else {}
            for f, e in itertools.islice(items, size):
                piece.setdefault(f, []).append(e)
            extra = {"unreadable": unreadable} if part == 0 and unreadable else {}
            if not node.reply(ident, protocol.encode("SNAPSHOT_REP", {
                    **head, "part": part, "parts": parts, "index": piece, **extra})):
                log.warning("snapshot part %d of %d could not be queued for the peer; the rest "
                            "is not sent (it will ask again)", part + 1, parts)
                return
            node.beat()
        log.info("sent snapshot at manifest %d (%d entries in %d part(s))", self.seq, total,
                 parts)

    def on_ack(self, ident: bytes, body: dict[str, Any]) -> None:
        """The secondary applied everything up to `applied`: that much is now agreed. The
        journal work runs on the journal thread: after a snapshot it walks the whole index
        (100k entries take seconds), which would silence our heartbeats past dead_after."""
        if body.get("following", self.node.run_id) != self.node.run_id:
            # counted in a previous run of ours (we restarted; the peer has not noticed yet):
            # those numbers are not our manifests, and the journal must not say otherwise
            log.debug("ignored an ACK for run %s", body["following"])
            return
        applied = body["applied"]
        acked = []
        while self.unacked and self.unacked[0][0] <= applied:
            acked.append(self.unacked.popleft()[1])
            self.unacked_entries -= _entries_in(acked[-1])
        self.unacked_dropped = 0
        # a snapshot older than a manifest let go: which paths changed after it is not known,
        # so the index is not recorded as agreed now (a later snapshot's acknowledgement
        # records it; until then a rejoin keeps copies, never deletes)
        whole_agreed = body["snapshot"] and self.dropped_seq <= applied
        if body["snapshot"] and not whole_agreed:
            log.info("the snapshot acknowledged at %d is older than manifest %d, let go "
                     "unacknowledged: the index is recorded as agreed at a later snapshot",
                     applied, self.dropped_seq)
        if whole_agreed:
            later = {(f, e["path"]) for s, part in self.unacked if s > applied
                     for f, es in part.items() for e in es}
            # entries are never mutated in place (a change replaces them): a shallow copy of
            # each folder's entry list is a consistent view for the thread
            whole = [(f, list(ix.values())) for f, ix in self.index.items()]
            self.journal_jobs.put((whole, later, acked))
        elif acked:
            self.journal_jobs.put(([], set(), acked))
        peer = self.node.peer
        peer.applied = max(peer.applied, applied)

    def _journal_worker(self) -> None:
        agreed = self.node.agreed
        while (job := self.journal_jobs.get()) is not None:
            # a write failed (full state disk): the journal in memory is whole; it is written
            # out again here, off the loop (a large one takes a while)
            agreed.rewrite()
            whole, later, acked = job
            del job  # nothing of it is kept while the worker waits for the next one
            # recorded a part at a time: the updates of a 100k-entry snapshot (or of the
            # manifests that carried a first scan) in one list cost the primary ~7-25 MB more
            updates: list[tuple[str, str, str | None]] = []
            for folder, entries in whole:
                for entry in entries:
                    path = entry["path"]
                    if (folder, path) not in later:
                        token = Agreed.token(entry)
                        if agreed.get(folder, path) != token:
                            updates.append((folder, path, token))
                            if len(updates) >= protocol.MANIFEST_PART:
                                agreed.update(updates)
                                updates = []
            for part in acked:
                for folder, entries in part.items():
                    for e in entries:
                        updates.append((folder, e["path"], Agreed.token(e)))
                        if len(updates) >= protocol.MANIFEST_PART:
                            agreed.update(updates)
                            updates = []
            agreed.update(updates)  # a failed write is kept in memory and retried
            del whole, later, acked, updates

    def rewrite_journal(self) -> None:
        """The journal's last write failed: the journal thread writes it out again."""
        self.journal_jobs.put(([], set(), []))  # nothing new: the worker rewrites it

    def peer_heard(self) -> None:
        """A PING/PONG of the peer came in: note when the secondary had everything."""
        peer = self.node.peer
        if (self.node.state in PRIMARY_LIKE and peer.state == "secondary" and peer.synced
                and peer.follows(self.node.run_id) and peer.applied >= self.seq):
            self.peer_last_sync = time.time()  # the secondary had everything we had published

    # ------------------------------------------------------------------ final sync
    def begin_final_sync(self, why: str) -> None:
        node = self.node
        self.final_sync = FinalSync(deadline=time.monotonic() + node.cfg.handover_timeout,
                                    token=secrets.token_hex(4), why=why)
        if self.scanner is not None:
            # everything closed before now must be in a manifest: flush the watcher + rescan
            self.scanner.flush(self.final_sync.token)
        else:
            self.final_sync.target = self.seq
        log.info("final sync: flushing changes, then waiting (<= %.0fs) for %s to apply them",
                 node.cfg.handover_timeout, node.peer.name or node.cfg.peer)

    def abort_final_sync(self) -> None:
        self.final_sync = None

    def next_deadline(self) -> float | None:
        return self.final_sync.deadline if self.final_sync is not None else None

    def tick(self, now: float) -> E | None:
        """SYNC_DONE once the final sync is done (or can get no further)."""
        fs = self.final_sync
        if fs is None:
            return None
        peer, run_id = self.node.peer, self.node.run_id
        if not peer.alive or peer.state != "secondary":
            done = fs.target is not None or now >= fs.deadline
            why = "no secondary to wait for"
        elif fs.target is None:
            done, why = now >= fs.deadline, "flush timed out"
        else:
            # the peer's numbers count in our manifests only once it follows this run of ours
            # (a restarted primary numbers from 0 again; the peer may not have noticed yet)
            ours = peer.follows(run_id)
            done = ours and peer.applied >= fs.target and peer.synced
            why = f"peer applied manifest {peer.applied}"
            if not done and ours and peer.stuck and peer.through >= fs.target:
                # the peer worked through everything and what is left waits for disk space:
                # waiting out handover_timeout would not bring it
                done = True
                why = (f"{peer.name} has manifest {fs.target} but cannot apply "
                       f"everything: {peer.stuck}")
                log.error("final sync incomplete: %s", why)
            elif not done and now >= fs.deadline:
                done, why = True, f"timed out at {peer.applied}/{fs.target}"
                log.error("final sync incomplete: %s", why)
        if not done:
            return None
        log.info("final sync done: %s", why)
        self.node.ops.handover_why = fs.why  # the HANDOVER says why (planned, not a failover)
        self.final_sync = None
        return E.SYNC_DONE

    # ------------------------------------------------------------------ status, shutdown
    def status(self) -> dict[str, Any]:
        peer = self.node.peer
        peer_ok = peer.alive and peer.state == "secondary"
        # its numbers count in our manifests only once it follows this run of ours
        ours = peer_ok and peer.follows(self.node.run_id)
        return {
            "direction": "outgoing", "seq": self.seq, "ready": self.index_ready,
            "folders": {n: len(ix) for n, ix in self.index.items()},
            "peer_following": ours,
            "peer_applied": peer.applied if ours else None,
            "lag_manifests": (self.seq - peer.applied) if ours else None,
            "pending_files": peer.pending_files if peer_ok else None,
            "pending_bytes": peer.pending_bytes if peer_ok else None,
            "peer_error": peer.error if peer_ok else "",
            "peer_stuck": peer.stuck if ours else "",
            "peer_last_sync": self.peer_last_sync,
            "unreplicable": self.unreplicable(),
        }

    def unreplicable(self) -> dict[str, Any] | None:
        """What the scans skip: a FIFO, socket or device (node/unreplicable.py);
        None when nothing is."""
        return self.scanner.unreplicable if self.scanner is not None else None

    def close(self) -> None:
        self.stop()
        self.journal_jobs.put(None)
        self.journal.join(30)


def _entries_in(part: dict[str, list[dict]]) -> int:
    return sum(len(entries) for entries in part.values())
