"""The node loop: one poller owns every ZeroMQ socket of the node.

Sockets (all CURVE servers/clients when curve = true)
    router  ROUTER bound on local:port        pings from the peer, snapshot/ack, tool commands
    dealer  DEALER to peer:port               our pings, snapshot requests, acks, hand-over
    pub     PUB bound on local:port+1         heartbeats, manifests, sentinel list, events
    sub     SUB to peer:port+1                only while secondary: the primary's bus
    port+2  REP, owned by the BlobServer thread (file content, pure disk reads)
    inproc  PAIR pipes to the Scanner (primary) and Syncer (secondary) threads, a PULL for
            replies computed by short-lived worker threads (verify), and the signal wake-up fd

The loop turns what it sees into fsm events and performs the actions the table returns; the
poll timeout is the nearest deadline (heartbeat, silence, probe, hand-over, sentinel restart).
Disk work (scanning, hashing, writing) never runs here, so a slow disk cannot delay a heartbeat.
"""
from __future__ import annotations

import collections
import logging
import os
import queue
import secrets
import signal
import socket
import threading
import time
from pathlib import Path
from typing import Any

import orjson
import zmq

from . import conflicts, persist, protocol
from .blobs import BlobServer
from .config import Config, FolderConfig
from .fsm import PRIMARY_LIKE, PUBLIC, A, E, S, step
from .journal import Agreed
from .liveness import Watch, set_heartbeats
from .notify import Notifier
from .peer import Peer
from .primacy import Primacy, guard_kill_after
from .protocol import Bad, Message
from .scanner import Scanner, verify_tokens
from .security import (
    PEER_COMMANDS,
    client,
    load_keys,
    pinned_sentinels,
    refusal,
    sender_key,
    serve,
    start_authenticator,
)
from .sentinels import Sentinels
from .syncer import Syncer
from .tree import PathError, check_abspath

log = logging.getLogger("sbs.node")

# a ping that found no connection to the peer is tried again this soon (seconds), so a peer
# that has just come up hears from us within milliseconds rather than at the next heartbeat;
# the wait doubles while the peer stays unreachable, up to the heartbeat itself
PING_RETRY = 0.025


class NodeError(RuntimeError):
    """A runtime failure that ends the node with exit 1 (e.g. the port is taken)."""


class Node:
    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.state_dir = cfg.state_dir
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.run_id = secrets.token_hex(8)
        self.n = 0
        self.next_ping = self.ping_retry_at = 0.0
        self.ping_retry_in = PING_RETRY
        saved = persist.load(self.state_dir / "node.json", {})
        # every state_dir write goes through this: a full state disk is logged, shown in
        # status and retried, never the end of the node
        self.writes = persist.Guarded()
        self.epoch = int(saved.get("epoch", 0))
        # kept on disk: a node restarted alone must still number its next term above every
        # primary it has seen, or an old primary coming back would win the split-brain rule
        self.max_seen_epoch = max(self.epoch, int(saved.get("max_seen_epoch", 0)))
        self.last_role = saved.get("last_role", "")
        self.stopping_sentinels = False
        # while sentinels stop: the actions still to do after them, and the events that
        # arrived meanwhile (fed once the stop is done)
        self.sentinel_stop: dict[str, Any] | None = None
        self.peer_last_sync: float | None = None  # primary: wall time the secondary was in sync
        self.state = S.STARTING
        self.state_at = time.monotonic()
        self.started_at = self.state_at
        self.restricted = False
        self.peer = Peer(dead_after=cfg.dead_after)
        self.peer_ident: bytes | None = None  # ROUTER identity of the peer's DEALER
        self.split_reported: str | None = None
        self.kept_new: list[dict[str, Any]] = []  # conflict copies made, not yet announced
        self.syncer_events = 0  # events from the current Syncer (transfers, progress, ...)
        # after yielding in a split brain: told in every ping, so the winner learns of it
        self.yielded: dict[str, Any] | None = None
        self.keys = load_keys(cfg)

        # replication state
        self.pair = persist.load(self.state_dir / "pair.json", {})  # last pushed folders/sentinels
        self.folders: dict[str, FolderConfig] = self._pushed_folders()
        self.seq = 0  # primary: last manifest seq published
        self.index: dict[str, dict[str, dict]] = {}  # primary: mirror of the scanner's index
        self.index_ready = False
        self.unacked: collections.deque[tuple[int, dict]] = collections.deque()
        self.sv = int(self.pair.get("sv", 0))  # sentinel list version
        self.scanner: Scanner | None = None
        self.syncer: Syncer | None = None
        self.sub: zmq.Socket | None = None
        self.follow: dict[str, Any] = {}  # secondary: snapshot/manifest tracking
        self.applied = 0
        self.synced = False
        self.pending = (0, 0)
        self.repl_error = ""
        self.through, self.stuck = 0, ""  # secondary: manifests worked through; see Syncer
        self.snapshots_submitted = 0  # secondary: to the current Syncer
        self.last_sync_wall: float | None = None
        self.final_sync: dict[str, Any] | None = None
        self.waiting_tools: list[tuple[bytes, str]] = []  # (identity, command) to answer later
        self.agreed = Agreed(self.state_dir / "agreed.jsonl")
        self.journal_jobs: queue.Queue = queue.Queue()
        self.journal = threading.Thread(target=self._journal_worker, name="sbs-journal",
                                        daemon=True)
        self.journal.start()

        self.notifier = Notifier(cfg.email)
        self.sentinels = Sentinels(self.state_dir, on_event=self._sentinel_event,
                                   guard_kill_after=guard_kill_after(cfg))
        self.writes.extra["sentinels.pids.json"] = lambda: self.sentinels.pids_error
        self.writes.extra["agreed.jsonl"] = lambda: self.agreed.write_error
        self._load_sentinels_for(own=True)
        killed = self.sentinels.cleanup_leftovers()
        if killed:
            log.warning("killed %d leftover sentinel process(es) of a previous run: %s",
                        len(killed), killed)

        self.ctx = zmq.Context()
        set_heartbeats(self.ctx, cfg.heartbeat, cfg.dead_after)  # a dead link is dropped, remade
        self.watch = Watch(cfg.dead_after)
        self.auth = start_authenticator(self.ctx, self.keys)
        self.probed = False  # the first probe window is over
        self._open_sockets()
        self.primacy = Primacy(self)
        if self.primacy.pipe is not None:
            self.poller.register(self.primacy.pipe, zmq.POLLIN)

    # ------------------------------------------------------------------ sockets
    def _socket(self, kind: int, *, maxmsg: int) -> zmq.Socket:
        sock = self.ctx.socket(kind)
        sock.linger = 0
        sock.setsockopt(zmq.MAXMSGSIZE, maxmsg)
        return sock

    def _open_sockets(self) -> None:
        cfg = self.cfg
        self.router = self._socket(zmq.ROUTER, maxmsg=protocol.MAX_CONTROL_IN)
        # no TTL in its heartbeats: a TTL would make the peer's DEALER drop its connection
        # when our answers stop arriving, and so stop its pings (see _open_dealer)
        self.router.setsockopt(zmq.HEARTBEAT_TTL, 0)
        serve(self.router, self.keys)
        self.pub = self._socket(zmq.PUB, maxmsg=protocol.MAX_CONTROL_IN)
        self.pub.sndhwm = 100_000
        serve(self.pub, self.keys)
        try:  # the ROUTER first: a probing peer must find us before we probe it
            self.router.bind(f"tcp://{cfg.local}:{cfg.control_port}")
            self.pub.bind(f"tcp://{cfg.local}:{cfg.bus_port}")
        except zmq.ZMQError as exc:
            self.close()
            raise NodeError(
                f"cannot bind {cfg.local}:{cfg.control_port}..{cfg.bus_port}: {exc}"
            ) from None
        self.blobs = BlobServer(self.ctx, f"tcp://{cfg.local}:{cfg.blob_port}", self.keys)
        try:
            self.blobs.start_and_wait()
        except zmq.ZMQError as exc:
            self.close()
            raise NodeError(f"cannot bind {cfg.local}:{cfg.blob_port}: {exc}") from None
        self.dealer = None
        self._open_dealer()

        self.results = self.ctx.socket(zmq.PULL)
        self.results_addr = f"inproc://results-{self.run_id}"
        self.results.bind(self.results_addr)
        self.scanner_pipe = self.ctx.socket(zmq.PAIR)
        self.scanner_pipe.bind(f"inproc://scanner-{self.run_id}")
        self.syncer_pipe = self.ctx.socket(zmq.PAIR)
        self.syncer_pipe.bind(f"inproc://syncer-{self.run_id}")

        self.wake_r, self.wake_w = socket.socketpair()
        self.wake_r.setblocking(False)
        self.wake_w.setblocking(False)
        self.poller = zmq.Poller()
        for sock in (self.router, self.results, self.scanner_pipe, self.syncer_pipe):
            self.poller.register(sock, zmq.POLLIN)
        self.poller.register(self.dealer, zmq.POLLIN)
        self.poller.register(self.wake_r.fileno(), zmq.POLLIN)

    def _open_dealer(self) -> None:
        """The connection our pings and requests take to the peer (made again by the
        secondary's link watch when what it sends does not get through)."""
        if self.dealer is not None:
            self.poller.unregister(self.dealer)
            self.dealer.close()
        self.dealer = self._socket(zmq.DEALER, maxmsg=protocol.MAX_REPLY_IN)
        # IMMEDIATE: a ping to a peer that is not connected is dropped, not queued; a queued
        # ping delivered seconds later would describe a state long gone.
        self.dealer.setsockopt(zmq.IMMEDIATE, 1)
        # No ZeroMQ heartbeat timeout here: with only the way back cut, our pings still reach
        # the peer, and dropping this connection for want of answers would stop them and make
        # a secondary take over while this primary runs (two primaries). Silence is the pings'
        # business; the secondary remakes its own connection when its link stalls.
        self.dealer.setsockopt(zmq.HEARTBEAT_IVL, 0)
        self.dealer.sndhwm = 1000
        self.dealer.reconnect_ivl = 100
        self.dealer.reconnect_ivl_max = 500
        client(self.dealer, self.keys)
        self.dealer.connect(f"tcp://{self.cfg.peer}:{self.cfg.control_port}")
        if hasattr(self, "poller"):
            self.poller.register(self.dealer, zmq.POLLIN)

    # ------------------------------------------------------------------ main loop
    def run(self) -> int:
        self.stop_requested = 0
        old = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
        old_fd = signal.set_wakeup_fd(self.wake_w.fileno(), warn_on_full_buffer=False)
        log.info("node %s starting: epoch %d, role %s, probing %s:%d", self.cfg.name,
                 self.epoch, self.cfg.role, self.cfg.peer, self.cfg.control_port)
        self.next_ping = self.ping_retry_at = 0.0
        self.ping_retry_in = PING_RETRY
        self.probe_deadline = time.monotonic() + self.cfg.dead_after
        self.probed = False
        try:
            while self.state != S.STOPPED or self.sentinel_stop is not None:
                self._loop_once()
        finally:
            signal.set_wakeup_fd(old_fd)
            for sig, handler in old.items():
                signal.signal(sig, handler)
            self.close()
        return 0

    def _on_signal(self, signum: int, frame: Any) -> None:
        self.stop_requested += 1

    def _loop_once(self) -> None:
        now = time.monotonic()
        timeout = max(0.0, self._next_deadline(now) - now)
        ready = dict(self.poller.poll(timeout * 1000))
        if self.wake_r.fileno() in ready:
            try:
                while self.wake_r.recv(512):
                    pass
            except BlockingIOError:
                pass
        if self.stop_requested:
            self.stop_requested -= 1
            log.info("stop requested (signal) in state %s", self.state)
            self.feed(E.STOP)
        for name, handler in (
            ("router", self._on_router),
            ("dealer", self._on_dealer),
            ("sub", self._on_bus),
            ("results", self._on_result),
            ("scanner_pipe", self._on_scanner),
            ("syncer_pipe", self._on_syncer),
            ("primacy_pipe", self.primacy.on_report),
        ):
            # drain what is there now, bounded so one busy socket cannot starve the others;
            # looked up each time, since a handler may close a socket (sub on takeover)
            for _ in range(1000):
                sock = self.primacy.pipe if name == "primacy_pipe" else getattr(self, name)
                if sock is None or sock.closed or sock not in ready:
                    break
                try:  # the ROUTER's frames carry the sender's key (ZAP User-Id)
                    frames = sock.recv_multipart(zmq.NOBLOCK, copy=name != "router")
                except zmq.Again:
                    break
                handler(frames)
                if self.state == S.STOPPED and self.sentinel_stop is None:
                    return
        self._tick(time.monotonic())

    def _next_deadline(self, now: float) -> float:
        deadlines = [self.next_ping, now + 0.5]
        if self.ping_retry_at:
            deadlines.append(self.ping_retry_at)
        if self.state == S.STARTING:
            deadlines.append(self.probe_deadline)
        if self.peer.alive:
            deadlines.append(self.peer.heard_at + self.cfg.dead_after + 0.001)
        if self.writes.failing:
            deadlines.append(self.writes.next_retry)
        if (w := self.sentinels.next_wakeup()) is not None:
            deadlines.append(w)
        if self.final_sync is not None:
            deadlines.append(self.final_sync["deadline"])
        if (hold := self.primacy.next_deadline()) is not None:
            deadlines.append(hold)
        if self.follow.get("snapshot_deadline"):
            deadlines.append(self.follow["snapshot_deadline"])
        return min(deadlines)

    def _tick(self, now: float) -> None:
        if self.sentinel_stop is not None:
            self._check_sentinel_stop(now)
        if self.writes.failing or self.agreed.write_error:
            self._retry_writes(now)
        if self.state == S.STARTING and now >= self.probe_deadline:
            if not self.probed:
                log.info("no answer from peer %s within %.1fs", self.cfg.peer,
                         self.cfg.dead_after)
            self.probed = True
            self.feed(E.PROBE_TIMEOUT)
            if self.state == S.STARTING:  # dcs: still waiting for the key; ask again later
                self.probe_deadline = now + self.cfg.dead_after
        if self.peer.silent(now):
            self.peer.alive = False
            log.warning("peer %s silent for %.2fs (last state %s)", self.peer.name or self.cfg.peer,
                        now - self.peer.heard_at, self.peer.state)
            self.feed(E.PEER_SILENT)
        if now >= self.next_ping:
            self._send_ping()
            self.next_ping = now + self.cfg.heartbeat
        elif self.ping_retry_at and now >= self.ping_retry_at:
            # the last ping found no connection (the peer is starting, or down): try again
            # soon, so a peer that just came up hears from us in milliseconds, not a heartbeat
            self._ping_peer(now)
        if self.state in PRIMARY_LIKE and not self.restricted:
            self.sentinels.poll()
        self.primacy.tick(now)
        self._check_final_sync(now)
        if self.state == S.SECONDARY and self.syncer is not None:
            self._watch_link(now)
        if self.follow.get("snapshot_deadline") and now >= self.follow["snapshot_deadline"]:
            if self.follow.get("snapshot_sent"):
                log.info("snapshot not answered yet; asking again")
            self._request_snapshot()

    # ------------------------------------------------------------------ fsm glue
    def feed(self, event: E, *, context: tuple[bytes, str] | None = None) -> tuple[A, ...]:
        if self.sentinel_stop is not None:
            # the actions of the last transition are not done yet: this event is for the
            # state they leave us in. What the peer's state says is said again by its next
            # ping (and would be stale by then); silence, a hand-over and a stop are not.
            if event in (E.STOP, E.PEER_SILENT, E.PEER_HANDOVER):
                queued = self.sentinel_stop["queued"]
                if (event, context) not in queued:
                    queued.append((event, context))
            return ()
        nxt, actions = step(self.state, event, dcs=self.primacy.dcs)
        if nxt != self.state or actions:
            log.info("%s + %s -> %s %s", self.state, event, nxt, [a.value for a in actions])
        prev = self.state
        if nxt != self.state:
            self.state = nxt
            self.state_at = time.monotonic()
        for i, action in enumerate(actions):
            if action == A.STOP_SENTINELS and self._begin_sentinel_stop(
                    actions[i + 1:], prev=prev, event=event, context=context):
                break  # the rest runs once they have stopped: _check_sentinel_stop
            getattr(self, f"_do_{action.value}")(prev=prev, event=event, context=context)
        if nxt != prev:
            # the state counts from when its actions are done: stopping a slow sentinel before
            # a hand-over must not make a fresh secondary look like one of long standing (two
            # secondaries "for dead_after" would take over again at once)
            self.state_at = time.monotonic()
            self.publish_event("role", state=PUBLIC[nxt], internal=nxt.value, was=prev.value,
                               why=event.value, epoch=self.epoch)
            self._send_ping()  # tell the peer at once, not at the next heartbeat
        return actions

    def me(self) -> dict[str, Any]:
        return {"name": self.cfg.name, "epoch": self.epoch, "role": self.cfg.role,
                "restricted": self.restricted, "run": self.run_id}

    def _become_primary(self, *, restricted: bool, why: str) -> None:
        self.yielded = None
        self.epoch = max(self.epoch, self.max_seen_epoch) + 1
        if term := self.primacy.term():
            self.epoch = term  # the term is etcd's: the key's create revision
        self.max_seen_epoch = max(self.max_seen_epoch, self.epoch)
        self._save_node("primary")
        self.restricted = restricted
        self._stop_following()
        self._start_scanner()
        if restricted:
            log.warning("role = backup and started without a peer: restricted, no sentinels")
        else:
            self.primacy.run_sentinels()
        log.info("PRIMARY now (epoch %d, %s)%s", self.epoch, why,
                 " [restricted]" if restricted else "")

    def _save_node(self, last_role: str | None = None) -> None:
        self.last_role = last_role or self.last_role
        # a full state disk: kept in memory and written again by the loop (self.writes)
        self.writes.save(self.state_dir / "node.json", {"epoch": self.epoch,
                                                        "max_seen_epoch": self.max_seen_epoch,
                                                        "last_role": self.last_role})

    def _do_start_primary(self, **_: Any) -> None:
        # a node that was following a primary when it stopped runs the lists that primary
        # pushed last (state_dir/pair.json): they are the pair's, not its own sbs.ini's
        pushed = self.last_role == "secondary" and self.pair.get("folders") is not None
        if pushed:
            log.info("was secondary when it stopped: running the folder and sentinel lists "
                     "its primary pushed last (%s)", self.state_dir / "pair.json")
        self._load_sentinels_for(own=not pushed)
        own = {f.name: f for f in self.cfg.folders}
        self.folders = ((self._pushed_folders() or own) if pushed
                        else (own or self._pushed_folders()))
        self._become_primary(restricted=self.cfg.role == "backup", why="started without a peer")

    def _do_take_over(self, prev: S, event: E, **_: Any) -> None:
        old = self.peer.name or self.cfg.peer
        self._load_sentinels_for(own=False)
        self.folders = self._pushed_folders() or {f.name: f for f in self.cfg.folders}
        why = {
            E.PEER_SILENT: f"no heartbeat from {old} for {self.cfg.dead_after}s",
            E.PEER_HANDOVER: f"{old} handed over",
            E.PROMOTE_FORCE: "operator forced promotion",
            E.DUAL_SECONDARY_WE_WIN: "two secondaries; the rule picked this node",
        }.get(event, event.value)
        self._become_primary(restricted=False, why=why)
        stamp = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
        self.notifier.send(
            f"SBS failover: {self.cfg.name} is now primary",
            f"Node {self.cfg.name} took over from {old} at {stamp}.\n"
            f"Old primary: {old}\nNew primary: {self.cfg.name}\nEpoch: {self.epoch}\n"
            f"Why: {why}\nSentinels started: {', '.join(self.sentinels.active) or 'none'}\n",
        )
        self.publish_event("takeover", old_primary=old, new_primary=self.cfg.name,
                           epoch=self.epoch, why=why)

    def _do_follow(self, **_: Any) -> None:
        self._stop_scanner()
        self.restricted = False
        # a node that was primary (a split-brain loser, a crashed primary back, an old
        # primary after a hand-over) may hold changes of its own term the peer lacks
        own_term = self.last_role == "primary"
        self._save_node("secondary")
        self._start_following()
        if self.syncer is not None:
            self.syncer.own_term = own_term

    def _begin_sentinel_stop(self, rest: tuple[A, ...], **how: Any) -> bool:
        """Stopping sentinels is a state with a deadline, not a wait: SIGTERM now, and the
        actions after it (hand-over, follow, exit) once they are gone. Meanwhile the loop runs:
        STATUS is answered and the peer keeps hearing "stopping" (a peer that is leaving: no
        takeover, a HANDOVER or silence follows), so the service never runs on both nodes.
        False when nothing was running (the rest runs at once)."""
        self.sentinels.begin_stop_all()
        if self.sentinels.stop_done():
            return False
        self.stopping_sentinels = True
        self.sentinel_stop = {"rest": rest, "how": how, "queued": [],
                              "since": time.monotonic()}
        log.info("stopping sentinels; then %s", [a.value for a in rest] or "nothing")
        return True

    def _check_sentinel_stop(self, now: float) -> None:
        stop = self.sentinel_stop
        if stop is None or not self.sentinels.stop_done():
            return
        self.sentinel_stop = None
        self.stopping_sentinels = False
        log.info("sentinels stopped in %.1fs", now - stop["since"])
        for action in stop["rest"]:
            getattr(self, f"_do_{action.value}")(**stop["how"])
        self.state_at = time.monotonic()  # the state counts from when its actions are done
        self._send_ping()
        for event, context in stop["queued"]:
            if self.sentinel_stop is None and self.state != S.STOPPED:
                self.feed(event, context=context)

    def _do_stop_sentinels(self, **_: Any) -> None:
        # A sentinel may take up to the grace time to stop, longer than dead_after: the peer
        # must keep hearing us, as "stopping" (a peer that is leaving: no takeover, a HANDOVER
        # or silence follows), or it takes over on silence while our sentinels still run and
        # the same service runs twice.
        next_ping = 0.0

        def keep_the_peer_waiting() -> None:
            nonlocal next_ping
            if (now := time.monotonic()) >= next_ping:
                next_ping = now + self.cfg.heartbeat
                self._send_ping()

        self.stopping_sentinels = True
        try:
            self.sentinels.stop_all(tick=keep_the_peer_waiting)
        finally:
            self.stopping_sentinels = False

    def _public_state(self) -> str:
        return "stopping" if self.stopping_sentinels else PUBLIC[self.state]

    def _do_split_brain_lost(self, **_: Any) -> None:
        # The loser always knows (it yields); the winner may not have seen two primaries (the
        # loser heard it first). So the loser sends the one email, and tells the winner in its
        # pings, which report it on their side too.
        self.yielded = {"run": self.peer.run, "epoch": self.peer.epoch,
                        "loser_epoch": self.epoch}
        log.error("SPLIT BRAIN: peer %s is primary too and wins by the rule (epoch %d vs %d);"
                  " yielding: files changed here are kept under %s/conflicts/",
                  self.peer.name, self.peer.epoch, self.epoch, self.state_dir)
        self.publish_event("split_brain", winner=self.peer.name, loser=self.cfg.name,
                           winner_epoch=self.peer.epoch, loser_epoch=self.epoch, seen_by="loser")
        self.notifier.send(
            f"SBS split brain resolved: {self.peer.name} stays primary",
            f"Both {self.peer.name} (epoch {self.peer.epoch}) and {self.cfg.name} (epoch "
            f"{self.epoch}) were primary. By the rule {self.peer.name} stays primary; "
            f"{self.cfg.name} (this node) yielded: it stops its sentinels, becomes secondary and "
            f"keeps the files it changed meanwhile under its state_dir/conflicts/ "
            f"({self.state_dir}/conflicts/).\n",
        )

    def _do_split_brain_won(self, **_: Any) -> None:
        self._report_split_won(self.peer.epoch, how="this node wins by the rule")

    def _report_split_won(self, loser_epoch: int, *, how: str) -> None:
        """Log and publish the split brain once per term of the loser (the loser emails)."""
        key = f"{self.peer.run}:{loser_epoch}"
        if self.split_reported == key:
            return
        self.split_reported = key
        log.error("SPLIT BRAIN: peer %s was primary too; %s (epoch %d vs %d); the peer yields",
                  self.peer.name, how, self.epoch, loser_epoch)
        self.publish_event("split_brain", winner=self.cfg.name, loser=self.peer.name,
                           winner_epoch=self.epoch, loser_epoch=loser_epoch, seen_by="winner")

    def _do_final_sync(self, event: E, **_: Any) -> None:
        self.final_sync = {
            "deadline": time.monotonic() + self.cfg.handover_timeout,
            "target": None,
            "token": secrets.token_hex(4),
            "why": event.value,
        }
        if self.scanner is not None:
            # everything closed before now must be in a manifest: flush the watcher + rescan
            self.scanner.flush(self.final_sync["token"])
        else:
            self.final_sync["target"] = self.seq
        log.info("final sync: flushing changes, then waiting (<= %.0fs) for %s to apply them",
                 self.cfg.handover_timeout, self.peer.name or self.cfg.peer)

    def _check_final_sync(self, now: float) -> None:
        fs = self.final_sync
        if fs is None:
            return
        if not self.peer.alive or self.peer.state != "secondary":
            done = fs["target"] is not None or now >= fs["deadline"]
            why = "no secondary to wait for"
        elif fs["target"] is None:
            done, why = now >= fs["deadline"], "flush timed out"
        else:
            # the peer's numbers count in our manifests only once it follows this run of ours
            # (a restarted primary numbers from 0 again; the peer may not have noticed yet)
            ours = self.peer.follows(self.run_id)
            done = ours and self.peer.applied >= fs["target"] and self.peer.synced
            why = f"peer applied manifest {self.peer.applied}"
            if not done and ours and self.peer.stuck and self.peer.through >= fs["target"]:
                # the peer worked through everything and what is left waits for disk space:
                # waiting out handover_timeout would not bring it
                done = True
                why = (f"{self.peer.name} has manifest {fs['target']} but cannot apply "
                       f"everything: {self.peer.stuck}")
                log.error("final sync incomplete: %s", why)
            elif not done and now >= fs["deadline"]:
                done, why = True, f"timed out at {self.peer.applied}/{fs['target']}"
                log.error("final sync incomplete: %s", why)
        if done:
            log.info("final sync done: %s", why)
            self.final_sync = None
            self.feed(E.SYNC_DONE)

    def _do_abort_handover(self, **_: Any) -> None:
        self.final_sync = None
        log.warning("hand-over aborted: the peer went silent; staying primary")

    def _do_send_handover(self, **_: Any) -> None:
        self.primacy.resign()  # dcs: the key goes first, the peer takes it on HANDOVER
        body = {"name": self.cfg.name, "run": self.run_id, "epoch": self.epoch, "seq": self.seq}
        self._send_peer("HANDOVER", body)
        # Also back along the peer's own connection (its pings reach our ROUTER): our DEALER
        # may still be reconnecting to a peer that started a moment ago, and a lost HANDOVER
        # costs the peer dead_after of waiting. A duplicate is ignored by the table.
        if self.peer_ident is not None:
            self._reply(self.peer_ident, protocol.encode("HANDOVER", body))
        log.info("handed over to %s", self.peer.name or self.cfg.peer)

    def _do_ask_handover(self, **_: Any) -> None:
        self._send_peer("ASK_HANDOVER", {"name": self.cfg.name, "run": self.run_id,
                                         "epoch": self.epoch})
        log.info("asked primary %s to hand over", self.peer.name)

    def _do_refuse(self, context: tuple[bytes, str] | None, **_: Any) -> None:
        if context is not None:
            ident, command = context
            self._reply(ident, protocol.reply_error(f"cannot {command} while {self.state.value}"))

    def _do_campaign(self, **_: Any) -> None:
        self.primacy.campaign()

    def _do_peer_lost(self, **_: Any) -> None:
        self.publish_event("peer_lost", peer=self.peer.name)

    def _do_exit(self, **_: Any) -> None:
        log.info("node %s stopped", self.cfg.name)

    # ------------------------------------------------------------------ peer messages
    def _send_ping(self) -> None:
        self.primacy.confirm()
        self._ping_peer(time.monotonic())
        self.pub.send_multipart(protocol.encode_bus("HB", {
            "name": self.cfg.name, "run": self.run_id, "epoch": self.epoch,
            "state": self._public_state(), "seq": self.seq, "sv": self.sv,
            **self.primacy.heartbeat_fields(),
        }))

    def _peer_state(self) -> dict[str, Any]:
        self.n += 1
        return {
            "name": self.cfg.name, "run": self.run_id, "n": self.n,
            "state": self._public_state(),
            "epoch": self.epoch, "role": self.cfg.role, "restricted": self.restricted,
            "since": round(time.monotonic() - self.state_at, 3), "seq": self.seq,
            "applied": self.applied, "synced": self.synced,
            "pending_files": self.pending[0], "pending_bytes": self.pending[1],
            "error": self.repl_error[:1000],
            "through": self.through, "stuck": self.stuck[:1000],
            "following": self.follow.get("run") or "",
            **({"yielded": self.yielded} if self.yielded else {}),
        }

    def _ping_peer(self, now: float) -> None:
        if self._send_peer("PING", self._peer_state()):
            self.ping_retry_at, self.ping_retry_in = 0.0, PING_RETRY
        else:  # a peer that stays down costs no wakeups beyond the heartbeat's
            self.ping_retry_at = now + min(self.cfg.heartbeat, self.ping_retry_in)
            self.ping_retry_in *= 2

    def _send_peer(self, command: str, body: dict[str, Any]) -> bool:
        try:
            self.dealer.send_multipart(protocol.encode(command, body), zmq.NOBLOCK)
            return True
        except zmq.Again:
            return False  # not connected: the peer is down or unreachable; silence speaks

    def _reply(self, ident: bytes, frames: list[bytes]) -> None:
        try:
            self.router.send_multipart([ident, *frames], zmq.NOBLOCK)
        except zmq.ZMQError as exc:
            log.debug("reply dropped: %s", exc)

    def _on_peer_state(self, msg: Message) -> None:
        body = msg.body
        if body["name"] == self.cfg.name and body["run"] != self.run_id:
            log.error("peer calls itself %r like this node: names must differ", body["name"])
            return
        if body["run"] == self.run_id:
            log.error("received our own ping: peer address %s points at this node", self.cfg.peer)
            return
        now = time.monotonic()
        restarted = body["run"] != self.peer.run
        if not self.peer.update(body, now):
            return
        if restarted:
            log.info("peer %s (run %s) is %s, epoch %d", body["name"], body["run"],
                     body["state"], body["epoch"])
            if self.state == S.SECONDARY and body["state"] == "primary":
                self._request_snapshot()
        if body["epoch"] > self.max_seen_epoch:
            self.max_seen_epoch = body["epoch"]
            self._save_node()
        if (self.state in PRIMARY_LIKE and self.peer.state == "secondary" and self.peer.synced
                and self.peer.follows(self.run_id) and self.peer.applied >= self.seq):
            self.peer_last_sync = time.time()  # the secondary had everything we had published
        yielded = body.get("yielded")
        if yielded and yielded["run"] == self.run_id and self.state in PRIMARY_LIKE:
            self._report_split_won(yielded["loser_epoch"], how="it yielded to this node")
        event = self.peer.event(self.me(), self.state, now - self.state_at)
        if event is not None:
            self.feed(event)

    def _on_router(self, raw: list[zmq.Frame]) -> None:
        key = sender_key(raw[-1])
        frames = [f.bytes for f in raw]
        if len(frames) < 2:
            log.warning("dropped a control message without identity")
            return
        ident, rest = frames[0], frames[1:]
        msg = protocol.decode(rest)
        if isinstance(msg, Bad):
            log.warning("dropped a bad control message: %s", msg.reason)
            return
        c = msg.command
        if (why := refusal(c, key, self.keys)) is not None:
            log.warning("refused %s from key %s: %s", c, (key or "?")[:8], why)
            if c not in PEER_COMMANDS:
                self._reply(ident, protocol.reply_error(f"refused: {why}"))
            return
        if c == "PING":
            if msg.body["run"] != self.run_id:
                self.peer_ident = ident
            self._on_peer_state(msg)
            self._reply(ident, protocol.encode("PONG", self._peer_state()))
        elif c == "HANDOVER":
            if self._from_peer(msg):
                self.feed(E.PEER_HANDOVER)
        elif c == "ASK_HANDOVER":
            if self._from_peer(msg):
                self.feed(E.PEER_ASKS_HANDOVER)
        elif c == "SNAPSHOT":
            self._on_snapshot_request(ident)
        elif c == "ACK":
            self._on_ack(msg.body)
        elif c == "STATUS":
            self._reply(ident, protocol.reply_ok(**self.status()))
        elif c == "PROMOTE":
            self._on_promote(ident, msg.body["force"])
        elif c == "SENTINEL":
            self._on_sentinel_command(ident, msg.body)
        elif c == "VERIFY":
            self._on_verify(ident, peer=msg.body.get("peer", False))
        elif c == "TOKENS":
            self._on_verify(ident)
        elif c == "CONFIRM":
            if self.syncer is None:
                self._reply(ident, protocol.reply_error("only a secondary deletes in strict mode"))
            else:
                self.syncer.confirm_deletions(msg.body.get("folder"))
                self._reply(ident, protocol.reply_ok())
        else:
            log.warning("dropped control message %s: not accepted on this port", c)

    def _from_peer(self, msg: Message) -> bool:
        if (why := protocol.stale(msg.body, self.peer.run, self.peer.epoch)) is not None:
            log.warning("ignored %s %s", msg.command, why)
            return False
        return True

    def _on_dealer(self, frames: list[bytes]) -> None:
        msg = protocol.decode(frames, expect=("PONG", "SNAPSHOT_REP", "REPLY", "HANDOVER"))
        if isinstance(msg, Bad):
            log.warning("dropped a bad message from the peer: %s", msg.reason)
            return
        if msg.command == "PONG":
            self._on_peer_state(msg)
        elif msg.command == "SNAPSHOT_REP":
            if self._from_peer(msg):
                self._on_snapshot(msg)
            elif self.follow.get("snapshot_deadline"):
                # perhaps the peer's first heartbeat of a new run has not arrived yet: ask again
                # soon rather than in 10 s
                self.follow["snapshot_deadline"] = time.monotonic() + 0.2
        elif msg.command == "HANDOVER":
            if self._from_peer(msg):
                self.feed(E.PEER_HANDOVER)
        elif msg.command == "REPLY" and msg.body["status"] == "error":
            log.warning("peer answered: %s", msg.body.get("reason"))
            if self.follow.get("snapshot_deadline"):
                self.follow["snapshot_deadline"] = time.monotonic() + 0.2  # not ready: retry

    # ------------------------------------------------------------------ operator commands
    def status(self) -> dict[str, Any]:
        now = time.monotonic()
        peer = self.peer
        return {
            "name": self.cfg.name,
            "state": self._public_state(),
            "internal_state": self.state.value,
            "epoch": self.epoch,
            "role": self.cfg.role,
            "restricted": self.restricted,
            "pid": os.getpid(),
            "uptime": round(now - self.started_at, 3),
            "in_state_for": round(now - self.state_at, 3),
            "peer": {
                "name": peer.name or self.cfg.peer, "address": self.cfg.peer,
                "state": peer.state if peer.alive else "unreachable", "epoch": peer.epoch,
                "last_heard": None if peer.heard_at < 0 else round(now - peer.heard_at, 3),
                "applied": peer.applied, "synced": peer.synced,
            },
            "peer_state": peer.state if peer.alive else "unreachable",
            "replication": self._replication_status(now),
            "sentinels": self.sentinels.status(),
            "active_sentinels": self.sentinels.active,
            "email": self.notifier.status(),
            "lease": self.primacy.status(now),
            # state_dir writes that failed (a full disk) and are being retried: {file: error}
            "state_writes": self.writes.status(),
            "conflicts": self._conflicts_status(),
        }

    def _conflicts_status(self) -> dict[str, Any]:
        # a directory walk, bounded: status stays cheap with a large conflicts/ folder
        kept = conflicts.listing(self.state_dir, limit=1000)
        return {"count": len(kept), "latest": kept[0]["time"] if kept else None,
                "files": kept[:50], "where": str(self.state_dir / "conflicts")}

    def _replication_status(self, now: float) -> dict[str, Any]:
        if self.state in PRIMARY_LIKE:
            peer_ok = self.peer.alive and self.peer.state == "secondary"
            # its numbers count in our manifests only once it follows this run of ours
            ours = peer_ok and self.peer.follows(self.run_id)
            return {
                "direction": "outgoing", "seq": self.seq, "ready": self.index_ready,
                "folders": {n: len(ix) for n, ix in self.index.items()},
                "peer_following": ours,
                "peer_applied": self.peer.applied if ours else None,
                "lag_manifests": (self.seq - self.peer.applied) if ours else None,
                "pending_files": self.peer.pending_files if peer_ok else None,
                "pending_bytes": self.peer.pending_bytes if peer_ok else None,
                "peer_error": self.peer.error if peer_ok else "",
                "peer_stuck": self.peer.stuck if ours else "",
                "peer_last_sync": self.peer_last_sync,
            }
        oldest = self.follow.get("oldest_unapplied")
        return {
            "direction": "incoming", "applied": self.applied, "primary_seq": self.peer.seq,
            "synced": self.synced,
            "lag_seconds": round(now - oldest, 3) if oldest else 0.0,
            "pending_files": self.pending[0], "pending_bytes": self.pending[1],
            "last_sync": self.last_sync_wall, "error": self.repl_error, "stuck": self.stuck,
            "stalled": self.watch.stalled,
            "stalled_for": round(now - self.watch.stalled_at, 3) if self.watch.stalled else 0.0,
        }

    def _on_promote(self, ident: bytes, force: bool) -> None:
        if self.sentinel_stop is not None:
            self._reply(ident, protocol.reply_error("stopping sentinels; try again shortly"))
            return
        # A secondary takes over as soon as the peer is silent for dead_after, so "not alive"
        # alone never holds here: a peer silent for half of it (and two heartbeats) will not
        # answer a hand-over in time, and counts as unreachable for a promote.
        quiet = time.monotonic() - self.peer.heard_at > max(self.cfg.dead_after / 2,
                                                            2 * self.cfg.heartbeat)
        reachable = self.peer.alive and not quiet
        if self.state == S.SECONDARY and not reachable and not force:
            self._reply(ident, protocol.reply_error(
                "peer unreachable: cannot hand over gracefully; use --force"))
            return
        if self.state == S.PRIMARY and not (self.peer.alive and self.peer.state == "secondary"):
            self._reply(ident, protocol.reply_error("no live secondary to hand over to"))
            return
        event = E.PROMOTE_FORCE if self.state == S.SECONDARY and not reachable else E.PROMOTE
        # a refused promote was answered by the REFUSE action: one reply per request
        if A.REFUSE not in self.feed(event, context=(ident, "promote")):
            self._reply(ident, protocol.reply_ok(state=PUBLIC[self.state]))

    def _on_sentinel_command(self, ident: bytes, body: dict[str, Any]) -> None:
        action, name = body["action"], body.get("name", "")
        if action != "list":
            if self.state not in PRIMARY_LIKE:
                self._reply(ident, protocol.reply_error(
                    f"sentinels are managed on the primary ({self.peer.name or self.cfg.peer})"))
                return
            try:  # restricted: start() only activates, since the sentinels are not running
                getattr(self.sentinels, action)(name)
            except (KeyError, ValueError) as exc:
                self._reply(ident, protocol.reply_error(str(exc)))
                return
            self._sentinels_changed()
        self._reply(ident, protocol.reply_ok(sentinels=self.sentinels.status(),
                                             active=self.sentinels.active,
                                             restricted=self.restricted))

    def _on_verify(self, ident: bytes, *, peer: bool = False) -> None:
        """Hash every folder afresh on a worker thread; with `peer`, ask the peer for its own
        tokens (TOKENS, a peer command: the operator's key is not the peer's operator key)."""
        folders = dict(self.folders)

        def work() -> None:
            push = self.ctx.socket(zmq.PUSH)
            push.linger = 1000
            push.connect(self.results_addr)
            try:
                if peer:
                    push.send_multipart([ident, *self._peer_tokens()])
                    return
                tokens = verify_tokens(folders)
                push.send_multipart([ident, *protocol.reply_ok(folders=tokens)])
            except Exception as exc:
                push.send_multipart([ident, *protocol.reply_error(f"verify failed: {exc}")])
            finally:
                push.close()

        threading.Thread(target=work, name="sbs-verify", daemon=True).start()

    def _peer_tokens(self, timeout: float = 600.0) -> list[bytes]:
        """The peer's REPLY to TOKENS, on a socket of the calling (worker) thread."""
        if not self.peer.alive:
            return protocol.reply_error(f"no answer from the peer {self.cfg.peer}")
        sock = self._socket(zmq.DEALER, maxmsg=protocol.MAX_REPLY_IN)
        try:
            client(sock, self.keys)
            sock.connect(f"tcp://{self.cfg.peer}:{self.cfg.control_port}")
            sock.send_multipart(protocol.encode("TOKENS", {"name": self.cfg.name}))
            if not sock.poll(timeout * 1000):
                return protocol.reply_error(f"the peer did not answer within {timeout:.0f}s")
            return sock.recv_multipart()
        finally:
            sock.close()

    def _on_result(self, frames: list[bytes]) -> None:
        self._reply(frames[0], frames[1:])

    # ------------------------------------------------------------------ sentinels
    def _sentinel_event(self, event: dict[str, Any]) -> None:
        # Sentinels reports {"event", "name", ...}: both keys are taken on the bus (the event
        # kind and the node name), so they travel as `action` and `sentinel`.
        if event["event"] == "lapsed":
            self.primacy.on_lapse()
            return
        fields = dict(event)
        self.publish_event("sentinel", action=fields.pop("event"), sentinel=fields.pop("name"),
                           **fields)

    def _load_sentinels_for(self, *, own: bool) -> None:
        """Own config's [sentinels] when starting as primary; the pushed copy on takeover."""
        pushed = self.pair.get("sentinels")
        if pushed is not None and self.cfg.pin_sentinels:
            pushed = pinned_sentinels(pushed, dict(self.cfg.sentinels))
        if own or pushed is None:
            defs = dict(self.cfg.sentinels)
            if not defs and pushed:
                defs = dict(pushed)
        else:
            defs = dict(pushed)
        active = self.pair.get("active")
        self.sentinels.configure(defs)
        self.sentinels.set_active([n for n in active if n in defs] if active is not None
                                  else list(defs))

    def _sentinels_changed(self) -> None:
        self.sv += 1
        self.pair.update(sentinels=self._sentinel_defs(), active=self.sentinels.active, sv=self.sv)
        self.writes.save(self.state_dir / "pair.json", self.pair)
        self.pub.send_multipart(protocol.encode_bus("SENTINELS", {
            "name": self.cfg.name, "sv": self.sv, "sentinels": self._sentinel_defs(),
            "active": self.sentinels.active,
        }))

    def _sentinel_defs(self) -> dict[str, str]:
        return {s["name"]: s["command"] for s in self.sentinels.status()}

    # ------------------------------------------------------------------ replication: primary
    def _pushed_folders(self) -> dict[str, FolderConfig]:
        """The folder list the primary pushed, with this node's own path for a name it knows
        and the primary's path otherwise (the manual's same-paths-on-both-servers case)."""
        own = {f.name: f for f in self.cfg.folders}
        paths = self.pair.get("paths", {})
        table = {}
        for name, filters in self.pair.get("folders", {}).items():
            if (why := protocol.folder_name_problem(name)) is not None:
                log.error("folder %r from the primary: %s: not replicated", name[:64], why)
                continue
            try:  # a pushed path is held to the rules a path from the wire is (node/tree.py)
                path = own[name].path if name in own else Path(check_abspath(paths.get(name)))
            except PathError as exc:
                log.error("folder %r: no path here and no usable path from the primary (%s):"
                          " not replicated", name[:64], exc)
                continue
            table[name] = FolderConfig(name=name, path=path, filters=tuple(filters))
        return table

    def _start_scanner(self) -> None:
        folders = self.folders
        self.blobs.set_folders(folders)
        self.index = {n: {} for n in folders}
        self.index_ready = False
        self.pair.update(folders={n: list(f.filters) for n, f in folders.items()},
                         paths={n: str(f.path) for n, f in folders.items()})
        self.pair.update(sentinels=self._sentinel_defs(), active=self.sentinels.active, sv=self.sv)
        self.writes.save(self.state_dir / "pair.json", self.pair)
        self.scanner = Scanner(self.ctx, f"inproc://scanner-{self.run_id}", folders,
                               period=self.cfg.period)
        self.scanner.start()

    def _stop_scanner(self) -> None:
        if self.scanner is not None:
            self.scanner.stop()
            self.scanner = None
        self.index_ready = False

    def _on_scanner(self, frames: list[bytes]) -> None:
        kind = frames[0]
        if kind == b"delta":
            if self.scanner is None or frames[1] != self.scanner.ident:
                return  # left in the pipe by a scanner that has stopped
            delta = self.scanner.take_delta()
            full = frames[2] == b"full"
            self._publish_delta(delta)
            if full and not self.index_ready:
                self.index_ready = True
                log.info("first scan done: %s", {n: len(ix) for n, ix in self.index.items()})
        elif kind == b"flushed":
            fs = self.final_sync
            if fs is not None and fs["token"] == frames[1].decode():
                fs["target"] = self.seq
                log.info("final sync: everything is in manifest %d", self.seq)
        elif kind == b"error":
            log.error("scanner: %s", frames[1].decode(errors="replace"))
            self.publish_event("error", where="scanner", error=frames[1].decode(errors="replace"))

    def _publish_delta(self, delta: dict[str, list[dict]]) -> None:
        items = [(f, e) for f, entries in delta.items() for e in entries]
        for start in range(0, len(items), protocol.MANIFEST_PART):
            part: dict[str, list[dict]] = {}
            for folder, entry in items[start:start + protocol.MANIFEST_PART]:
                part.setdefault(folder, []).append(entry)
                index = self.index.setdefault(folder, {})
                if entry.get("deleted"):
                    index.pop(entry["path"], None)
                else:
                    index[entry["path"]] = entry
            self.seq += 1
            self.unacked.append((self.seq, part))
            while len(self.unacked) > 10_000:
                self.unacked.popleft()
            self.pub.send_multipart(protocol.encode_bus("MANIFEST", {
                "name": self.cfg.name, "run": self.run_id, "epoch": self.epoch, "seq": self.seq,
                "part": 0, "parts": 1, "entries": part,
            }))
            log.debug("manifest %d: %d entries", self.seq, sum(len(v) for v in part.values()))

    def _on_snapshot_request(self, ident: bytes) -> None:
        if self.state not in PRIMARY_LIKE or not self.index_ready:
            self._reply(ident, protocol.reply_error(
                "not ready for a snapshot" if self.state in PRIMARY_LIKE else "not primary"))
            return
        folders = self.folders
        body = {
            "name": self.cfg.name, "run": self.run_id, "epoch": self.epoch, "seq": self.seq,
            "folders": {n: list(f.filters) for n, f in folders.items()},
            "paths": {n: str(f.path) for n, f in folders.items()},
            "sentinels": self._sentinel_defs(), "active": self.sentinels.active, "sv": self.sv,
            "index": {n: list(ix.values()) for n, ix in self.index.items()},
        }
        self._reply(ident, protocol.encode("SNAPSHOT_REP", body))
        log.info("sent snapshot at manifest %d (%d entries)", self.seq,
                 sum(len(ix) for ix in self.index.values()))

    def _on_ack(self, body: dict[str, Any]) -> None:
        """The secondary applied everything up to `applied`: that much is now agreed. The
        journal work runs on the journal thread: after a snapshot it walks the whole index
        (100k entries take seconds), which would silence our heartbeats past dead_after."""
        if body.get("following", self.run_id) != self.run_id:
            # counted in a previous run of ours (we restarted; the peer has not noticed yet):
            # those numbers are not our manifests, and the journal must not say otherwise
            log.debug("ignored an ACK for run %s", body["following"])
            return
        applied = body["applied"]
        acked = []
        while self.unacked and self.unacked[0][0] <= applied:
            acked.append(self.unacked.popleft()[1])
        if body["snapshot"]:
            later = {(f, e["path"]) for s, part in self.unacked if s > applied
                     for f, es in part.items() for e in es}
            # entries are never mutated in place (a change replaces them): a shallow copy of
            # each folder's entry list is a consistent view for the thread
            whole = [(f, list(ix.values())) for f, ix in self.index.items()]
            self.journal_jobs.put((whole, later, acked))
        elif acked:
            self.journal_jobs.put(([], set(), acked))
        self.peer.applied = max(self.peer.applied, applied)

    def _retry_writes(self, now: float) -> None:
        retry_journal = self.agreed.write_error and now >= self.writes.next_retry
        self.writes.retry(now)
        if retry_journal:
            self.writes.next_retry = now + self.writes.retry_every
            self.journal_jobs.put(([], set(), []))  # nothing new: the worker rewrites it

    def _journal_worker(self) -> None:
        while (job := self.journal_jobs.get()) is not None:
            # a write failed (full state disk): the journal in memory is whole; it is written
            # out again here, off the loop (a large one takes a while)
            self.agreed.rewrite()
            whole, later, acked = job
            updates = []
            for folder, entries in whole:
                for entry in entries:
                    path = entry["path"]
                    if (folder, path) not in later:
                        token = Agreed.token(entry)
                        if self.agreed.get(folder, path) != token:
                            updates.append((folder, path, token))
            for part in acked:
                for folder, entries in part.items():
                    updates.extend((folder, e["path"], Agreed.token(e)) for e in entries)
            self.agreed.update(updates)  # a failed write is kept in memory and retried

    # ------------------------------------------------------------------ replication: secondary
    def _open_sub(self) -> None:
        if self.sub is not None:
            self.poller.unregister(self.sub)
            self.sub.close()
        self.sub = self._socket(zmq.SUB, maxmsg=protocol.MAX_BUS_IN)
        self.sub.rcvhwm = 100_000
        client(self.sub, self.keys)
        self.sub.setsockopt(zmq.SUBSCRIBE, b"")
        self.sub.connect(f"tcp://{self.cfg.peer}:{self.cfg.bus_port}")
        self.poller.register(self.sub, zmq.POLLIN)

    def _start_following(self) -> None:
        self._open_sub()
        self.watch.reset(time.monotonic())
        self.watch.stalled = ""
        self.syncer = Syncer(self.ctx, f"inproc://syncer-{self.run_id}", self.cfg, self.keys,
                             self.agreed)
        self.syncer.start()
        self.kept_new: list[dict[str, Any]] = []  # conflict copies made, not yet announced
        self.syncer_events = 0
        self.snapshots_submitted = 0
        self.follow = {"buffer": [], "seen": None, "run": None}
        self._request_snapshot()

    def _primary_seq(self) -> int:
        """The seq the primary we follow says it has published (0: not known yet)."""
        run = self.follow.get("run")
        alive = self.peer.alive and self.peer.state in ("primary", "stopping")
        return self.peer.seq if alive and run and self.peer.run == run else 0

    def _watch_link(self, now: float) -> None:
        """Secondary: is what the primary publishes reaching us? See liveness.py."""
        primary = self.peer.alive and self.peer.state in ("primary", "stopping")
        # waiting for a snapshot counts as having nothing of what the primary has
        seq = self._primary_seq() or (self.peer.seq if primary else 0)
        kind, why = self.watch.check(
            now, pings_arrive=primary, pinged_at=self.peer.heard_at, primary_seq=seq,
            applied=self.applied,
            progress=(self.applied, self.through, self.snapshots_submitted,
                      self.syncer_events, self.syncer.fetcher.answers),
            # a snapshot begins with a scan of the local folders, which reports nothing
            # while it hashes: a large one is given longer before it counts as a stall
            apply_window=None if self.applied else max(30.0, 10 * self.cfg.dead_after))
        w = self.watch
        if why:
            self.synced = False
            if not w.stalled:
                w.stalled, w.stalled_at = why, now
                log.error("replication stalled: %s", why)
                self.publish_event("stall", reason=why, applied=self.applied, primary_seq=seq)
                self.notifier.send(
                    f"SBS replication stalled on {self.cfg.name}",
                    f"Secondary {self.cfg.name} is not receiving what primary "
                    f"{self.peer.name or self.cfg.peer} publishes: {why}.\n"
                    f"Its pings arrive, so there is no takeover; were the primary to fail now, "
                    f"changes after manifest {self.applied} would be missing here.\n")
            if now - w.remedied_at >= max(5.0, 3 * self.cfg.dead_after):
                w.remedied_at = now
                self._open_dealer()
                if kind == "bus":  # manifests went missing with it
                    log.warning("reconnecting to %s (control and bus), asking for a new "
                                "snapshot", self.cfg.peer)
                    self._open_sub()
                    w.heard_bus(now)
                    self._request_snapshot()
                else:  # the bus works: a new one would lose manifests in flight
                    log.warning("reconnecting to %s (control)", self.cfg.peer)
        elif w.stalled and self.applied >= seq and self.follow.get("run"):
            log.warning("replication flows again (stalled for %.1fs: %s)", now - w.stalled_at,
                        w.stalled)
            self.publish_event("stall_over", reason=w.stalled, seconds=round(now - w.stalled_at, 3))
            w.stalled = ""
            self.synced = (not self.pending[0] and not self.repl_error
                           and self.applied >= (self.follow.get("seen") or 0))

    def _announce_conflicts(self) -> None:
        """One log line, bus event and email for the copies kept since the last one."""
        kept, self.kept_new = self.kept_new, []
        names = [f"{k.get('folder')}/{k.get('path')}" for k in kept]
        where = f"{self.state_dir}/conflicts/"
        log.warning("kept %d file(s) of this node under %s before following %s: %s",
                    len(kept), where, self.peer.name or self.cfg.peer, ", ".join(names[:20]))
        self.publish_event("conflicts", count=len(kept), files=names[:100], where=where)
        self.notifier.send(
            f"SBS conflicts: {self.cfg.name} kept {len(kept)} file(s) of its own",
            f"Node {self.cfg.name} is secondary of {self.peer.name or self.cfg.peer} now. These "
            f"files differed from what the pair had agreed on (changed or made here, never "
            f"replicated) and were kept under {where} before they were replaced or removed:\n"
            + "".join(f"  {k.get('folder')}/{k.get('path')} -> {k.get('kept')}\n"
                      for k in kept[:200])
            + ("  ...\n" if len(kept) > 200 else "")
            + "See 'sbs-tools conflicts'.\n")

    def _stop_following(self) -> None:
        if self.syncer is not None:
            self.syncer.stop()
            self.syncer = None
        if self.sub is not None:
            self.poller.unregister(self.sub)
            self.sub.close()
            self.sub = None
        self.follow = {}
        self._forget_progress()

    def _forget_progress(self) -> None:
        """What we reported of applying a snapshot and its manifests: nothing yet."""
        self.applied, self.synced, self.pending = 0, False, (0, 0)
        self.through, self.stuck = 0, ""

    def _request_snapshot(self) -> None:
        if self.syncer is None:
            return
        self.follow.update(snapshot_deadline=time.monotonic() + 10.0, buffer=[], seen=None,
                           run=None)
        # until the snapshot is applied we have nothing of it (maybe a new run of the primary)
        self._forget_progress()
        # not connected yet (a primary that just restarted): try again in 0.2 s, not in 10
        sent = self.follow["snapshot_sent"] = self._send_peer("SNAPSHOT", {"name": self.cfg.name})
        if not sent:
            self.follow["snapshot_deadline"] = time.monotonic() + 0.2

    def _on_snapshot(self, msg: Message) -> None:
        if self.syncer is None or not self.follow.get("snapshot_deadline"):
            return
        body = msg.body
        if self.primacy.stale("SNAPSHOT_REP", body):
            self.follow["snapshot_deadline"] = time.monotonic() + 0.2  # the new term's, soon
            return
        self.follow.update(snapshot_deadline=None, seen=body["seq"], run=body["run"])
        self.pair.update(folders=body["folders"], paths=body["paths"],
                         sentinels=body["sentinels"], active=body["active"], sv=body["sv"])
        self.sv = body["sv"]
        self.writes.save(self.state_dir / "pair.json", self.pair)
        self._load_sentinels_for(own=False)
        self.folders = folders = self._pushed_folders()
        self.blobs.set_folders(folders)
        self.follow["oldest_unapplied"] = self.follow.get("oldest_unapplied") or time.monotonic()
        # reports of jobs queued before this snapshot are about the previous one (perhaps a
        # previous run of the primary, numbered from 0 again): _on_syncer ignores them
        self.snapshots_submitted += 1
        self.syncer.submit_snapshot(body["seq"], folders, body["index"])
        log.info("snapshot from %s at manifest %d: %d folders, %d entries", body["name"],
                 body["seq"], len(body["folders"]), sum(len(v) for v in body["index"].values()))
        for run, seq, entries in self.follow.pop("buffer", []):
            if run == body["run"] and seq > body["seq"]:  # not a previous run's, numbered alike
                self._accept_manifest(seq, entries)
        self.follow["buffer"] = []

    def _on_bus(self, frames: list[bytes]) -> None:
        msg = protocol.decode_bus(frames)
        if isinstance(msg, Bad):
            log.warning("dropped a bad bus message: %s", msg.reason)
            return
        body = msg.body
        if self.syncer is None:
            return
        if msg.command in ("MANIFEST", "HB") and self.primacy.stale(msg.command, body):
            return
        waiting = bool(self.follow.get("snapshot_deadline"))
        if msg.command == "MANIFEST":
            if waiting:
                self.follow["buffer"].append((body["run"], body["seq"], body["entries"]))
            elif body["run"] != self.follow.get("run"):
                self._request_snapshot()
            else:
                self._accept_manifest(body["seq"], body["entries"])
        elif msg.command == "HB":
            if body["state"] in ("primary", "stopping"):
                self.watch.heard_bus(time.monotonic())
            # "stopping" is a primary in its final sync: exactly when we must keep up with it
            if waiting or body["state"] not in ("primary", "stopping"):
                return
            if body["run"] != self.follow.get("run"):
                log.info("primary run changed: new snapshot")
                self._request_snapshot()
            elif body["seq"] > (self.follow.get("seen") or 0):
                log.warning("missed manifests %d..%d: new snapshot",
                            (self.follow.get("seen") or 0) + 1, body["seq"])
                self._request_snapshot()
            elif body["sv"] != self.sv:
                self._request_snapshot()
        elif msg.command == "SENTINELS":
            self.sv = body["sv"]
            self.pair.update(sentinels=body["sentinels"], active=body["active"], sv=body["sv"])
            self.writes.save(self.state_dir / "pair.json", self.pair)
            self._load_sentinels_for(own=False)
            log.info("sentinel list from primary: active %s", body["active"])

    def _accept_manifest(self, seq: int, entries: dict[str, list[dict]]) -> None:
        seen = self.follow.get("seen") or 0
        if seq <= seen:
            return
        if seq != seen + 1:
            log.warning("manifest gap: expected %d, got %d: new snapshot", seen + 1, seq)
            self._request_snapshot()
            return
        self.follow["seen"] = seq
        self.follow["oldest_unapplied"] = self.follow.get("oldest_unapplied") or time.monotonic()
        self.syncer.submit_manifest(seq, entries)

    def _on_syncer(self, frames: list[bytes]) -> None:
        if self.syncer is None:
            return  # a report the stopped syncer left in the pipe
        kind, body = frames[0], orjson.loads(frames[1])
        if kind == b"applied":
            if body["gen"] != self.snapshots_submitted or not self.follow.get("run"):
                # about a snapshot before the latest one (or one we asked for and have not
                # got yet): its numbers mean nothing to the primary we follow now
                return
            self.applied = body["applied"]
            self.pending = (body["pending_files"], body["pending_bytes"])
            self.repl_error = body.get("error", "")
            self.through, self.stuck = body["through"], body["stuck"]
            caught_up = self.applied >= (self.follow.get("seen") or 0) and not self.pending[0]
            # in sync only with everything the primary says it has published
            self.synced = (caught_up and not self.repl_error and not self.watch.stalled
                           and self.applied >= self._primary_seq())
            if caught_up:
                self.follow["oldest_unapplied"] = None
                self.last_sync_wall = time.time()
            self._send_peer("ACK", {"name": self.cfg.name, "run": self.run_id,
                                    "applied": self.applied, "snapshot": body["snapshot"],
                                    "following": self.follow["run"]})
            self._send_ping()
            if self.repl_error:
                self.publish_event("error", where="sync", error=self.repl_error)
            if self.kept_new:
                self._announce_conflicts()
        elif kind == b"event":
            self.syncer_events += 1  # a file moved: progress for the link watch
            if body.get("event") == "conflict":
                self.kept_new.append(body)
            self.publish_event(body.pop("event"), **body)

    # ------------------------------------------------------------------ bus
    def publish_event(self, event: str, **fields: Any) -> None:
        self.pub.send_multipart(protocol.encode_bus(
            "EVENT", {"name": self.cfg.name, "event": event, "at": time.time(), **fields}))

    # ------------------------------------------------------------------ shutdown
    def close(self) -> None:
        self._stop_following()
        self._stop_scanner()
        if getattr(self, "blobs", None) is not None:
            self.blobs.stop()
        self.sentinels.stop_all()
        if getattr(self, "primacy", None) is not None:
            self.primacy.close()
        self.notifier.close(timeout=2.0)
        self.journal_jobs.put(None)
        self.journal.join(30)
        self.agreed.close()
        for sock in (getattr(self, "dealer", None), getattr(self, "router", None)):
            if sock is not None:
                sock.close(linger=500)  # let a last HANDOVER leave
        if self.auth is not None:
            self.auth.stop()
            self.auth = None
        self.ctx.destroy(linger=0)
        for s in (getattr(self, "wake_r", None), getattr(self, "wake_w", None)):
            if s is not None:
                s.close()
