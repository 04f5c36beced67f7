"""The secondary's side of replication, on the loop thread (zguide's clone client).

While following it owns a SUB to the primary's bus and a Syncer thread (reached over an inproc
PAIR that lives as long as the node). It asks for a snapshot (SNAPSHOT over the peer link),
buffers the manifests that arrive meanwhile, then takes numbered manifests in order: a gap, a
heartbeat ahead of what we have, a new run of the primary or a new sentinel list version means
"ask for a new snapshot". The Syncer applies the jobs and reports progress, which goes back to
the primary as ACKs and rides on our pings.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import zmq

from . import names, protocol
from .fsm import S
from .liveness import Watch
from .protocol import Bad, Message
from .security import client
from .syncer import GUARD_MIN_FILES, Syncer, keep_entries

if TYPE_CHECKING:
    from .node import Node

log = logging.getLogger("sbs.node")

SNAPSHOT_RETRY = 10.0  # an unanswered snapshot request is sent again after this long
SNAPSHOT_SOON = 0.2  # ... or this soon when it could not be sent or the primary was not ready


@dataclass
class Follow:
    """Which primary run we follow and how far we took its manifests."""
    run: str | None = None  # the primary's run of the snapshot we took; None: none yet
    seen: int | None = None  # the last manifest taken (handed to the Syncer)
    snapshot_deadline: float | None = None  # set while a snapshot is asked for: ask again then
    snapshot_sent: bool = False  # out and unanswered: reaching the deadline is a timeout
    # manifests meanwhile: (run, seq, the MANIFEST's body as it came, validated) -- kept
    # encoded, as a primary's first scan publishes its whole index just before the snapshot
    # (decoded, each entry cost ~4 times its ~140 bytes on the wire)
    buffer: list[tuple[str, int, bytes]] = field(default_factory=list)
    # a snapshot arriving in parts: the first part's body, the index growing with each part
    parts: dict[str, Any] | None = None
    next_part: int = 0
    oldest_unapplied: float | None = None  # monotonic time since when we lag


@dataclass
class Progress:
    """What the Syncer last reported of applying the snapshot and its manifests."""
    applied: int = 0
    synced: bool = False
    pending_files: int = 0
    pending_bytes: int = 0
    through: int = 0  # manifests worked through, applied or not (see Syncer)
    stuck: str = ""
    # what is pending waits on this node's own disk (full, read-only, failing), not the link
    local: bool = False


class Secondary:
    def __init__(self, node: Node):
        self.node = node
        self.sub: zmq.Socket | None = None
        self.syncer: Syncer | None = None
        self.follow = Follow()
        self.progress = Progress()
        self.error = ""  # the Syncer's last error, kept until it reports again
        self.last_sync_wall: float | None = None
        self.snapshots_submitted = 0  # to the current Syncer
        self.syncer_events = 0  # the Syncer's events: progress for the link watch
        # is what the primary publishes reaching us?
        self.watch = Watch(node.cfg.dead_after, grace=node.cfg.heartbeat)
        self.kept_new: list[dict[str, Any]] = []  # conflict copies made, not yet announced
        self.endpoint = f"inproc://syncer-{node.run_id}"
        self.pipe = node.ctx.socket(zmq.PAIR)
        self.pipe.bind(self.endpoint)

    # ------------------------------------------------------------------ start, stop
    def start(self, *, own_term: bool = False) -> None:
        """Follow the primary. `own_term`: this node was primary before, and may hold changes
        of its own term the peer lacks (the first snapshot sets them aside, conflicts.py)."""
        node = self.node
        self._open_sub()
        self.watch.reset(time.monotonic())
        self.watch.stalled = ""
        self.syncer = Syncer(node.ctx, self.endpoint, node.cfg, node.keys, node.agreed)
        self.syncer.own_term = own_term
        self.syncer.handed = node.primary.take_stopped()  # its hash caches, loaded already
        self.syncer.start()
        self.kept_new = []
        self.syncer_events = 0
        self.snapshots_submitted = 0
        self.follow = Follow()
        self.request_snapshot()

    def _open_sub(self) -> None:
        node = self.node
        self._close_sub()
        self.sub = node.socket(zmq.SUB, maxmsg=protocol.MAX_BUS_IN)
        self.sub.rcvhwm = 100_000
        client(self.sub, node.keys)
        self.sub.setsockopt(zmq.SUBSCRIBE, b"")
        self.sub.connect(f"tcp://{node.cfg.peer}:{node.cfg.bus_port}")
        node.poller.register(self.sub, zmq.POLLIN)

    def _close_sub(self) -> None:
        if self.sub is not None:
            self.node.poller.unregister(self.sub)
            self.sub.close()
            self.sub = None

    def stop(self, final: bool = False) -> None:
        """``final``: the node is stopping; the syncer saves its hash caches on the way out."""
        if self.syncer is not None:
            self.syncer.stop(save=final)
            self.syncer = None
        self._close_sub()
        self.follow = Follow()
        self.progress = Progress()

    @property
    def following(self) -> str:
        """The primary run our progress counts in ("" when none)."""
        return self.follow.run or ""

    # ------------------------------------------------------------------ snapshot
    def request_snapshot(self) -> None:
        if self.syncer is None:
            return
        f = self.follow
        f.snapshot_deadline = time.monotonic() + SNAPSHOT_RETRY
        f.buffer, f.seen, f.run, f.parts = [], None, None, None
        # until the snapshot is applied we have nothing of it (maybe a new run of the primary)
        self.progress = Progress()
        # not connected yet (a primary that just restarted): try again in 0.2 s, not in 10
        f.snapshot_sent = self.node.link.send("SNAPSHOT", {"name": self.node.cfg.name})
        if not f.snapshot_sent:
            f.snapshot_deadline = time.monotonic() + SNAPSHOT_SOON

    def retry_snapshot_soon(self) -> None:
        """Ask for the snapshot again soon, not in 10 s: the primary was not ready for one, or
        its reply came from a run we have not heard a heartbeat of yet."""
        if self.follow.snapshot_deadline:
            self.follow.snapshot_deadline = time.monotonic() + SNAPSHOT_SOON
            # it was answered: the next request is the retry asked for, not a timeout's
            self.follow.snapshot_sent = False

    def on_snapshot(self, msg: Message) -> None:
        f = self.follow
        if self.syncer is None or not f.snapshot_deadline:
            return
        node, body = self.node, msg.body
        if node.primacy.stale("SNAPSHOT_REP", body):
            self.retry_snapshot_soon()  # the new term's, soon
            return
        if (body := self._whole(body)) is None:
            return  # more parts to come
        f.snapshot_deadline, f.seen, f.run = None, body["seq"], body["run"]
        if node.ops.listsync.snapshot_lists(body):
            node.folders = folders = node.lists.take_snapshot(body)
        else:  # ours are newer and on their way to the primary: follow what it has meanwhile
            node.folders = folders = node.lists.pushed_folders(body)
        node.blobs.set_folders(folders)
        f.oldest_unapplied = f.oldest_unapplied or time.monotonic()
        # reports of jobs queued before this snapshot are about the previous one (perhaps a
        # previous run of the primary, numbered from 0 again): on_syncer ignores them
        self.snapshots_submitted += 1
        count = sum(len(v) for v in body["index"].values())
        # the syncer lets go of the entries as it takes them: nothing here reads them after
        self.syncer.submit_snapshot(body["seq"], folders, body["index"],
                                    body.get("unreadable", {}))
        log.info("snapshot from %s at manifest %d: %d folders, %d entries in %d part(s)",
                 body["name"], body["seq"], len(body["folders"]), count, body.get("parts", 1))
        buffered, f.buffer = f.buffer, []
        for run, seq, raw in buffered:
            if run == body["run"] and seq > body["seq"]:  # not a previous run's, numbered alike
                self.accept_manifest(seq, names.loads(raw)["entries"])

    def _whole(self, body: dict[str, Any]) -> dict[str, Any] | None:
        """A snapshot in parts: the first part's body with every part's index once the last
        part is here, else None. Parts must come in order, of one reply (its run, epoch, seq,
        sid and number of parts); a part of another reply is ignored, a gap in the parts of
        this one drops them all and asks again soon. (Each part is held to the schema and
        to the peer's run and epoch like a whole SNAPSHOT_REP, before it gets here.)"""
        f = self.follow
        part, parts = body.get("part", 0), body.get("parts", 1)
        keep_entries(body["index"])
        first = body
        if part == 0:
            f.parts, f.next_part = (body, 1) if parts > 1 else (None, 0)
            # what the snapshot holds already is let go before its parts are decoded
            f.buffer = [m for m in f.buffer if m[0] == body["run"] and m[1] > body["seq"]]
        else:
            first = f.parts
            which = ("run", "epoch", "seq", "sid", "parts")
            if first is None or any(first.get(k) != body.get(k) for k in which):
                log.warning("ignored SNAPSHOT_REP part %d/%d of a reply not being received "
                            "(sid %s)", part + 1, parts, str(body.get("sid"))[:32])
                return None
            if part != f.next_part:
                log.warning("ignored SNAPSHOT_REP part %d/%d: part %d was due; asking again",
                            part + 1, parts, f.next_part + 1)
                f.parts = None
                self.retry_snapshot_soon()
                return None
            index = first["index"]
            for name, entries in body["index"].items():
                index.setdefault(name, []).extend(entries)
            f.next_part += 1
        if part + 1 < parts:
            f.snapshot_deadline = time.monotonic() + SNAPSHOT_RETRY  # parts keep coming
            return None
        f.parts = None
        return first

    # ------------------------------------------------------------------ the primary's bus
    def on_bus(self, frames: list[bytes]) -> None:
        msg = protocol.decode_bus(frames)
        if isinstance(msg, Bad):
            log.warning("dropped a bad bus message: %s", msg.reason)
            return
        body = msg.body
        if self.syncer is None:
            return
        if (msg.command in ("MANIFEST", "HB", "SENTINELS")
                and self.node.primacy.stale(msg.command, body)):
            return
        f = self.follow
        waiting = bool(f.snapshot_deadline)
        if msg.command == "MANIFEST":
            if waiting:
                f.buffer.append((body["run"], body["seq"], bytes(frames[3])))
            elif body["run"] != f.run:
                self.request_snapshot()
            else:
                self.accept_manifest(body["seq"], body["entries"])
        elif msg.command == "HB":
            if body["state"] in ("primary", "stopping"):
                self.watch.heard_bus(time.monotonic())
            # "stopping" is a primary in its final sync: exactly when we must keep up with it
            if waiting or body["state"] not in ("primary", "stopping"):
                return
            if body["run"] != f.run:
                log.info("primary run changed: new snapshot")
                self.request_snapshot()
            elif body["seq"] > (f.seen or 0):
                log.warning("missed manifests %d..%d: new snapshot", (f.seen or 0) + 1,
                            body["seq"])
                self.request_snapshot()
            elif body["sv"] != self.node.lists.sv:
                self.request_snapshot()
        elif msg.command == "SENTINELS":
            if self.node.ops.listsync.lists_newer_than_peer():  # ours are on their way to it
                body = {**body, "sentinels": self.node.lists.pair.get("sentinels") or {}}
            self.node.lists.take_sentinels(body)
            log.info("sentinel list from primary: active %s", body["active"])

    def accept_manifest(self, seq: int, entries: dict[str, list[dict]]) -> None:
        f = self.follow
        seen = f.seen or 0
        if seq <= seen:
            return
        if seq != seen + 1:
            log.warning("manifest gap: expected %d, got %d: new snapshot", seen + 1, seq)
            self.request_snapshot()
            return
        f.seen = seq
        f.oldest_unapplied = f.oldest_unapplied or time.monotonic()
        self.syncer.submit_manifest(seq, entries)

    # ------------------------------------------------------------------ the Syncer's reports
    def on_syncer(self, frames: list[bytes]) -> None:
        if self.syncer is None:
            return  # a report the stopped syncer left in the pipe
        node = self.node
        kind, body = frames[0], names.loads(frames[1])
        if kind == b"applied":
            if body["gen"] != self.snapshots_submitted or not self.follow.run:
                # about a snapshot before the latest one (or one we asked for and have not
                # got yet): its numbers mean nothing to the primary we follow now
                return
            p = self.progress = Progress(
                applied=body["applied"], pending_files=body["pending_files"],
                pending_bytes=body["pending_bytes"], through=body["through"],
                stuck=body["stuck"], local=body.get("local", False))
            self.error = body.get("error", "")
            caught_up = p.applied >= (self.follow.seen or 0) and not p.pending_files
            # in sync only with everything the primary says it has published
            p.synced = (caught_up and not self.error and not self.watch.stalled
                        and p.applied >= self._primary_seq())
            if caught_up:
                self.follow.oldest_unapplied = None
                self.last_sync_wall = time.time()
            node.link.send("ACK", {"name": node.cfg.name, "run": node.run_id,
                                   "applied": p.applied, "snapshot": body["snapshot"],
                                   "following": self.follow.run})
            node.link.send_ping()
            if self.error:
                node.publish_event("error", where="sync", error=self.error)
            if self.kept_new:
                self._announce_conflicts()
        elif kind == b"event":
            if body.get("event") == "folder_ready":  # a folder refused until now: take it on
                self.request_snapshot()
            node.ops.on_sync_event(body)
            self.syncer_events += 1  # a file moved: progress for the link watch
            if body.get("event") == "conflict":
                self.kept_new.append(body)
            node.publish_event(body.pop("event"), **body)

    def confirm_deletions(self, folder: str | None) -> str | None:
        """An operator confirms the strict deletions the guard holds (in `folder`, or in
        every folder): None when they go ahead, else why not."""
        if self.syncer is None:
            return "only a secondary deletes in strict mode"
        if folder is not None and folder not in {f.name for f in self.node.cfg.folders}:
            return f"no folder named {folder!r} here"
        held = set(self.syncer.deletions.held)  # the syncer's; a copy made in one step
        if not (held if folder is None else held & {folder}):
            return (f"the strict guard holds no deletions in {folder or 'any folder'}: "
                    f"nothing to confirm (it holds them when a strict sync would delete more "
                    f"than half of a folder of {GUARD_MIN_FILES} files or more)")
        self.syncer.confirm_deletions(folder)
        return None

    # ------------------------------------------------------------------ deadlines, status
    def next_deadline(self) -> float | None:
        return self.follow.snapshot_deadline or None

    def tick(self, now: float) -> None:
        if self.node.state == S.SECONDARY and self.syncer is not None:
            self._watch_link(now)
        deadline = self.follow.snapshot_deadline
        if deadline and now >= deadline:
            if self.follow.snapshot_sent:
                log.info("snapshot not answered yet; asking again")
            self.request_snapshot()

    def status(self, now: float) -> dict[str, Any]:
        p, oldest = self.progress, self.follow.oldest_unapplied
        return {
            "direction": "incoming", "applied": p.applied, "primary_seq": self.node.peer.seq,
            "synced": p.synced,
            "lag_seconds": round(now - oldest, 3) if oldest else 0.0,
            "pending_files": p.pending_files, "pending_bytes": p.pending_bytes,
            "last_sync": self.last_sync_wall, "error": self.error, "stuck": p.stuck,
            "stalled": self.watch.stalled,
            "stalled_for": round(now - self.watch.stalled_at, 3) if self.watch.stalled else 0.0,
            # on the primary, not replicated (FIFOs, sockets, devices): "synced" leaves these out
            "unreplicable": self.node.ops.peer_unreplicable,
        }

    # ------------------------------------------------------------------ the link watch
    def _primary_seq(self) -> int:
        """The seq the primary we follow says it has published (0: not known yet)."""
        peer, run = self.node.peer, self.follow.run
        alive = peer.alive and peer.state in ("primary", "stopping")
        return peer.seq if alive and run and peer.run == run else 0

    def _watch_link(self, now: float) -> None:
        """Is what the primary publishes reaching us? See liveness.py."""
        node, peer, p, w = self.node, self.node.peer, self.progress, self.watch
        cfg = node.cfg
        primary = peer.alive and peer.state in ("primary", "stopping")
        # waiting for a snapshot counts as having nothing of what the primary has
        seq = self._primary_seq() or (peer.seq if primary else 0)
        kind, why = w.check(
            now, pings_arrive=primary, pinged_at=peer.heard_at, primary_seq=seq,
            # what waits on this node's own disk has arrived: that is no stall of the link
            # (the status's error says what it is; the primary's lag alert tells the operator)
            applied=p.through if p.local else p.applied,
            progress=(p.applied, p.through, self.snapshots_submitted,
                      self.syncer_events, self.syncer.fetcher.answers),
            # a snapshot begins with a scan of the local folders, which reports nothing
            # while it hashes: a large one is given longer before it counts as a stall
            apply_window=None if p.applied else max(30.0, 10 * cfg.dead_after))
        if why:
            p.synced = False
            if not w.stalled:
                w.stalled, w.stalled_at = why, now
                log.error("replication stalled: %s", why)
                node.publish_event("stall", reason=why, applied=p.applied, primary_seq=seq)
                node.ops.alerts.raise_(
                    "stall", "stall", f"replication stalled on {cfg.name}",
                    f"Secondary {cfg.name} is not receiving what primary "
                    f"{peer.name or cfg.peer} publishes: {why}.\n"
                    f"Its pings arrive, so there is no takeover; were the primary to fail now, "
                    f"changes after manifest {p.applied} would be missing here.\n")
            if now - w.remedied_at >= max(5.0, 3 * cfg.dead_after):
                w.remedied_at = now
                node.link.reconnect()
                if kind == "bus":  # manifests went missing with it
                    log.warning("reconnecting to %s (control and bus), asking for a new "
                                "snapshot", cfg.peer)
                    self._open_sub()
                    w.heard_bus(now)
                    self.request_snapshot()
                else:  # the bus works: a new one would lose manifests in flight
                    log.warning("reconnecting to %s (control)", cfg.peer)
        elif w.stalled and p.applied >= seq and self.follow.run:
            log.warning("replication flows again (stalled for %.1fs: %s)", now - w.stalled_at,
                        w.stalled)
            node.publish_event("stall_over", reason=w.stalled,
                               seconds=round(now - w.stalled_at, 3))
            node.ops.alerts.resolve("stall")
            w.stalled = ""
            p.synced = (not p.pending_files and not self.error
                        and p.applied >= (self.follow.seen or 0))

    def _announce_conflicts(self) -> None:
        """One log line, bus event and email for the copies kept since the last one."""
        node = self.node
        kept, self.kept_new = self.kept_new, []
        paths = [f"{k.get('folder')}/{k.get('path')}" for k in kept]
        said = [names.shown(p) for p in paths]  # for people: a byte not UTF-8 as \xNN
        where = f"{node.state_dir}/conflicts/"
        peer = node.peer.name or node.cfg.peer
        log.warning("kept %d file(s) of this node under %s before following %s: %s",
                    len(kept), where, peer, ", ".join(said[:20]))
        node.publish_event("conflicts", count=len(kept), files=paths[:100], where=where)
        node.ops.alerts.notice(
            "conflicts", f"SBS conflicts: {node.cfg.name} kept {len(kept)} file(s) of its own",
            f"Node {node.cfg.name} is secondary of {peer} now. These "
            f"files differed from what the pair had agreed on (changed or made here, never "
            f"replicated) and were kept under {where} before they were replaced or removed:\n"
            + "".join(f"  {said[n]} -> {names.shown(str(k.get('kept')))}\n"
                      for n, k in enumerate(kept[:200]))
            + ("  ...\n" if len(kept) > 200 else "")
            + "See 'sbs-tools conflicts'.\n")
