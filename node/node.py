"""The node loop: one poller owns every ZeroMQ socket of the node.

Sockets (all CURVE servers/clients when curve = true), each with one owner
    router  ROUTER bound on local:port        Node: pings from the peer, hand-over; snapshot
                                              requests and ACKs go to the Primary, operator
                                              commands to Control
    dealer  DEALER to peer:port               Node: our pings, snapshot requests, acks, hand-over
    pub     PUB bound on local:port+1         Node: heartbeats, events; Primary: manifests
    sub     SUB to peer:port+1                Secondary, only while following: the primary's bus
    port+2  REP, owned by the BlobServer thread (file content, pure disk reads)
    inproc  PAIR pipes to the Scanner (Primary) and Syncer (Secondary) threads, a PULL for
            replies computed by short-lived worker threads (Control: verify), and the signal
            wake-up fd

The loop turns what it sees into fsm events and performs the actions the table returns; the
poll timeout is the nearest deadline (heartbeat, silence, probe, hand-over, sentinel restart,
and each side's own). Disk work (scanning, hashing, writing) never runs here, so a slow disk
cannot delay a heartbeat. The primary's and the secondary's replication live in node/primary.py
and node/secondary.py, the operator's commands and status in node/control.py, which lists
this node runs in node/pairlists.py, maintenance, alerts and sentinel health in node/ops.py,
reload and the pair-wide lists in node/listsync.py, the pings and hand-over messages in
node/peerlink.py; the sockets are opened and closed in node/wiring.py, and the ROUTER's
messages sorted in node/inbox.py.
"""
from __future__ import annotations

import logging
import secrets
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import zmq

from . import persist, protocol
from .config import Config, FolderConfig
from .control import Control
from .fsm import PRIMARY_LIKE, PUBLIC, A, E, FsmFailure, S, step
from .inbox import Inbox
from .journal import Agreed
from .listsync import lists_at_start
from .liveness import set_heartbeats
from .notify import Notifier
from .ops import Operator
from .pairlists import PairLists
from .peer import Peer
from .peerlink import PeerLink
from .primacy import Primacy, guard_kill_after
from .primary import Primary
from .reports import Reports
from .secondary import Secondary
from .security import load_keys, start_authenticator
from .sentinel_stop import SentinelStop
from .sentinels import Sentinels
from .wiring import NodeError, close_all, open_sockets

__all__ = ["FsmFailure", "Node", "NodeError", "PeerLink"]

log = logging.getLogger("sbs.node")

# node.json's fields and their checks (node/persist.py load_doc)
NODE_FIELDS = {"epoch": protocol.EPOCH, "max_seen_epoch": protocol.EPOCH,
               "last_role": protocol.one_of("", "primary", "secondary")}


def load_node_doc(state_dir: Path) -> dict[str, Any]:
    """node.json's fields that pass their checks. What cannot be read counts as 0: an epoch
    too low only loses the rule, and the node's next term is numbered above every epoch it
    hears of from now on."""
    return persist.load_doc(state_dir / "node.json", NODE_FIELDS, then=(
        "a missing epoch counts as 0: this node loses the split-brain rule to a peer that "
        "has been primary, and numbers its next term above every epoch it hears of"))


class Node:
    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.state_dir = cfg.state_dir
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.run_id = secrets.token_hex(8)
        saved = load_node_doc(self.state_dir)
        # every state_dir write goes through this: a full state disk is logged, shown in
        # status and retried, never the end of the node
        self.writes = persist.Guarded()
        self.epoch = saved.get("epoch", 0)
        # kept on disk: a node restarted alone must still number its next term above every
        # primary it has seen, or an old primary coming back would win the split-brain rule
        self.max_seen_epoch = max(self.epoch, saved.get("max_seen_epoch", 0))
        self.last_role = saved.get("last_role", "")
        self.sentinel_stop = SentinelStop(self)  # the actions that wait for it, if any
        self.state = S.STARTING
        self.probed = False  # the first probe window is over (run() starts it)
        self.state_at = time.monotonic()
        self.started_at = self.state_at
        self.restricted = False
        self.peer = Peer(dead_after=cfg.dead_after)
        # after yielding in a split brain: told in every ping, so the winner learns of it
        self.yielded: dict[str, Any] | None = None
        self.keys = load_keys(cfg)
        self.agreed = Agreed(self.state_dir / "agreed.jsonl")

        self.notifier = Notifier(cfg.email)
        self.reports = Reports(self)
        self.sentinels = Sentinels(self.state_dir, on_event=self._sentinel_event,
                                   guard_kill_after=guard_kill_after(cfg))
        # before anything configures the sentinels: that rewrites the pid file, and what a
        # previous run left running would be forgotten, not killed
        self.sentinels.cleanup_leftovers()
        self.writes.extra["sentinels.pids.json"] = lambda: self.sentinels.pids_error
        self.writes.extra["agreed.jsonl"] = lambda: self.agreed.write_error
        self.lists = PairLists(cfg, self.sentinels, self.writes)
        lists_at_start(self)  # an edit of sbs.ini made while stopped becomes the pair's lists
        self.ops = Operator(self)
        self.reload_requested = 0
        self.folders: dict[str, FolderConfig] = self.lists.pushed_folders()
        self.lists.load_sentinels(own=True)

        self.ctx = zmq.Context()
        set_heartbeats(self.ctx, cfg.heartbeat, cfg.dead_after)  # a dead link is dropped, remade
        self.auth = start_authenticator(self.ctx, self.keys)
        open_sockets(self)
        self.link = PeerLink(self)
        self.primary = Primary(self)
        self.secondary = Secondary(self)
        self.control = Control(self)
        self.control.commands.update(self.ops.commands())
        self.primacy = Primacy(self)
        self.inbox = Inbox(self)
        self.poller = zmq.Poller()
        for sock in (self.router, self.link.dealer, self.control.results, self.primary.pipe,
                     self.secondary.pipe, self.primacy.pipe):
            if sock is not None:  # the primacy pipe only with [cluster] dcs
                self.poller.register(sock, zmq.POLLIN)
        self.poller.register(self.wake_r.fileno(), zmq.POLLIN)
        # who reads which socket, in the order the loop serves them; a socket looked up each
        # time, since a handler may close one (the SUB on takeover)
        self.handlers: list[tuple[Callable[[], zmq.Socket | None], Callable]] = [
            (lambda: self.router, self.inbox.on_router),
            (lambda: self.link.dealer, self.link.on_dealer),
            (lambda: self.secondary.sub, self.secondary.on_bus),
            (lambda: self.control.results, self.control.on_result),
            (lambda: self.primary.pipe, self.primary.on_scanner),
            (lambda: self.secondary.pipe, self.secondary.on_syncer),
            (lambda: self.primacy.pipe, self.primacy.on_report),
        ]

    # ------------------------------------------------------------------ sockets
    def socket(self, kind: int, *, maxmsg: int) -> zmq.Socket:
        sock = self.ctx.socket(kind)
        sock.linger = 0
        sock.setsockopt(zmq.MAXMSGSIZE, maxmsg)
        return sock

    # ------------------------------------------------------------------ main loop
    def run(self) -> int:
        self.stop_requested = 0
        old = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
        old[signal.SIGHUP] = signal.signal(signal.SIGHUP, self._on_sighup)
        old_fd = signal.set_wakeup_fd(self.wake_w.fileno(), warn_on_full_buffer=False)
        log.info("node %s starting: epoch %d, role %s, probing %s:%d", self.cfg.name,
                 self.epoch, self.cfg.role, self.cfg.peer, self.cfg.control_port)
        self.probe_deadline = time.monotonic() + self.cfg.dead_after
        self.probed = False  # the first probe window is over
        if not self.primacy.dcs and self.last_role != "secondary":
            # a node alone becomes primary after dead_after: its first scan runs in that wait
            # (node/primary.py); a node that was following a primary expects to follow again
            self.primary.prescan(self.lists.pushed_folders() or self.lists.own_folders())
        try:
            while self.state != S.STOPPED or self.sentinel_stop.running:
                self._loop_once()
        finally:
            signal.set_wakeup_fd(old_fd)
            for sig, handler in old.items():
                signal.signal(sig, handler)
            self.close()
        return 0

    def _on_signal(self, signum: int, frame: Any) -> None:
        self.stop_requested += 1

    def _on_sighup(self, signum: int, frame: Any) -> None:
        self.reload_requested += 1

    def _loop_once(self) -> None:
        now = time.monotonic()
        timeout = max(0.0, self._next_deadline(now) - now)
        ready = dict(self.poller.poll(timeout * 1000))
        self.link.check_away(time.monotonic())  # before anything read now is acted on
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
        if self.reload_requested:
            self.reload_requested = 0
            self.ops.listsync.reload("SIGHUP")
        for sock_of, handler in self.handlers:
            # drain what is there now, bounded so one busy socket cannot starve the others
            for _ in range(1000):
                sock = sock_of()
                if sock is None or sock.closed or sock not in ready:
                    break
                try:  # the ROUTER's frames carry the sender's key (ZAP User-Id)
                    frames = sock.recv_multipart(zmq.NOBLOCK, copy=sock is not self.router)
                except zmq.Again:
                    break
                try:
                    handler(frames)
                except FsmFailure:
                    raise  # the node's own state is in doubt: that ends it
                except Exception:  # a malformed or hostile message is dropped, the node goes on
                    log.exception("dropped a message: %s failed on it",
                                  getattr(handler, "__qualname__", handler))
                if self.state == S.STOPPED and not self.sentinel_stop.running:
                    return
                self.beat()
        self._tick(time.monotonic())

    def beat(self) -> None:
        """The heartbeat, if it is due, in the middle of long loop work: between the messages
        of a burst (a 100,000-entry snapshot arrives in 21 parts) and between the parts of a
        first scan's manifests or of a snapshot the primary sends. On a loaded machine such
        work took the loop ~1 s, past the sentinel guard's deadline (2/3 of dead_after after
        the last heartbeat): the guard stopped the sentinels of a healthy primary, and the
        secondary, hearing a ping just before the bus heartbeat sent with it, took the
        silence for a stalled bus. The work is the same; the heartbeat no longer waits for
        it."""
        now = time.monotonic()
        self.link.check_away(now)
        self.link.tick(now)

    def _next_deadline(self, now: float) -> float:
        deadlines = [self.link.next_deadline(), now + 0.5, self.sentinels.next_wakeup(),
                     self.primary.next_deadline(), self.secondary.next_deadline(),
                     self.primacy.next_deadline()]
        if self.state == S.STARTING:
            deadlines.append(self.probe_deadline)
        if self.writes.failing:
            deadlines.append(self.writes.next_retry)
        if (expiry := self.peer.expires_at()) is not None:
            deadlines.append(expiry + 0.001)  # wake just past it, when silent() holds
        return min(d for d in deadlines if d is not None)

    def _tick(self, now: float) -> None:
        self.sentinel_stop.tick(now)
        if self.writes.failing or self.agreed.write_error:
            self._retry_writes(now)
        self.link.wait_for_leaving_peer(now)
        if self.state == S.STARTING and now >= self.probe_deadline:
            if not self.probed:
                log.info("no answer from peer %s within %.1fs", self.cfg.peer,
                         self.cfg.dead_after)
            self.probed = True
            self.feed(E.PROBE_TIMEOUT)
            if self.state == S.STARTING:  # dcs: still waiting for the key; ask again later
                self.probe_deadline = now + self.cfg.dead_after
        self.link.release_held(now)  # a held HANDOVER is obeyed rather than the silence after it
        if self.peer.silent(now):
            self.peer.alive = False
            log.warning("peer %s silent for %.2fs (last state %s)", self.peer.name or self.cfg.peer,
                        now - self.peer.heard_at, self.peer.state)
            self.feed(E.PEER_SILENT)
        self.link.tick(now)
        if self.state in PRIMARY_LIKE and not self.restricted:
            self.sentinels.poll()
        self.primacy.tick(now)
        if (event := self.primary.tick(now)) is not None:
            self.feed(event)
        self.secondary.tick(now)
        self.ops.tick(now)

    # ------------------------------------------------------------------ fsm glue
    def feed(self, event: E, *, context: tuple[bytes, str] | None = None) -> tuple[A, ...]:
        if self.sentinel_stop.running:
            self.sentinel_stop.hold(event, context)
            return ()
        nxt, actions = step(self.state, event, dcs=self.primacy.dcs,
                            maintenance=self.ops.maintenance.on)
        if nxt != self.state or actions:
            log.info("%s + %s -> %s %s", self.state, event, nxt, [a.value for a in actions])
        prev = self.state
        if nxt != self.state:
            self.state = nxt
            self.state_at = time.monotonic()
        try:
            for i, action in enumerate(actions):
                if action == A.STOP_SENTINELS and self.sentinel_stop.begin(
                        actions[i + 1:], prev=prev, event=event, context=context):
                    break  # the rest runs once they have stopped: SentinelStop.tick
                self.perform(action, prev=prev, event=event, context=context)
        except FsmFailure:
            raise
        except Exception as exc:  # a transition done half-way: not for the loop to drop
            raise FsmFailure(f"{prev.value} + {event.value} -> {nxt.value}: "
                             f"{type(exc).__name__}: {exc}") from exc
        if nxt != prev:
            # the state counts from when its actions are done: stopping a slow sentinel before
            # a hand-over must not make a fresh secondary look like one of long standing (two
            # secondaries "for dead_after" would take over again at once)
            self.state_at = time.monotonic()
            self.publish_event("role", state=PUBLIC[nxt], internal=nxt.value, was=prev.value,
                               why=event.value, epoch=self.epoch)
            self.link.send_ping()  # tell the peer at once, not at the next heartbeat
        return actions

    def perform(self, action: A, **how: Any) -> None:
        getattr(self, f"_do_{action.value}")(**how)

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
        self.secondary.stop()
        self.primary.start(self.folders)
        if restricted:
            log.warning("role = backup and started without a peer: restricted, no sentinels")
        else:
            self.primacy.run_sentinels()
        self.ops.became_primary()
        log.info("PRIMARY now (epoch %d, %s)%s", self.epoch, why,
                 " [restricted]" if restricted else "")

    def saw_epoch(self, epoch: int) -> None:
        """A peer's epoch: our next term is numbered above it, even after a restart."""
        if epoch > self.max_seen_epoch:
            self.max_seen_epoch = epoch
            self._save_node()

    def _save_node(self, last_role: str | None = None) -> None:
        self.last_role = last_role or self.last_role
        # a full state disk: kept in memory and written again by the loop (self.writes)
        self.writes.save(self.state_dir / "node.json", {"epoch": self.epoch,
                                                        "max_seen_epoch": self.max_seen_epoch,
                                                        "last_role": self.last_role})

    def _retry_writes(self, now: float) -> None:
        retry_journal = self.agreed.write_error and now >= self.writes.next_retry
        self.writes.retry(now)
        if retry_journal:
            self.writes.next_retry = now + self.writes.retry_every
            self.primary.rewrite_journal()

    def _do_start_primary(self, **_: Any) -> None:
        # the pair's lists (state_dir/pair.json, node/listedits.py): an edit of this node's
        # sbs.ini made while it was stopped is in them already; a node that was following a
        # primary runs what that primary pushed last
        if self.last_role == "secondary":
            log.info("was secondary when it stopped: running the folder and sentinel lists "
                     "its primary pushed last (%s)", self.lists.path)
        log.info("running the pair's folder and sentinel lists, %s",
                 self.ops.listsync.stamp.describe())
        self.lists.load_sentinels(own=False)
        self.folders = self.lists.pushed_folders() or self.lists.own_folders()
        self._become_primary(restricted=self.cfg.role == "backup", why="started without a peer")

    def _do_take_over(self, prev: S, event: E, **_: Any) -> None:
        old = self.peer.name or self.cfg.peer
        self.lists.load_sentinels(own=False)
        self.folders = self.lists.pushed_folders() or self.lists.own_folders()
        why = {
            E.PEER_SILENT: f"no heartbeat from {old} for {self.cfg.dead_after}s",
            E.PEER_HANDOVER: f"{old} handed over",
            E.PROMOTE_FORCE: "operator forced promotion",
            E.DUAL_SECONDARY_WE_WIN: "two secondaries; the rule picked this node",
        }.get(event, event.value)
        self._become_primary(restricted=False, why=why)
        self.reports.took_over(old, why, event)

    def _do_follow(self, **_: Any) -> None:
        self.primary.stop()
        self.restricted = False
        # a node that was primary (a split-brain loser, a crashed primary back, an old
        # primary after a hand-over) may hold changes of its own term the peer lacks
        own_term = self.last_role == "primary"
        self._save_node("secondary")
        self.secondary.start(own_term=own_term)

    def _do_stop_sentinels(self, **_: Any) -> None:
        self.sentinel_stop.stop_now()

    def public_state(self) -> str:
        stopping = self.sentinel_stop.blocking or self.sentinel_stop.running
        return "stopping" if stopping else PUBLIC[self.state]

    def _do_split_brain_lost(self, **_: Any) -> None:
        # the winner learns it from our pings (it may not have seen two primaries)
        self.yielded = {"run": self.peer.run, "epoch": self.peer.epoch,
                        "loser_epoch": self.epoch}
        self.reports.split_brain_lost()

    def _do_split_brain_won(self, **_: Any) -> None:
        self.reports.split_brain_won(self.peer.epoch, how="this node wins by the rule")

    def _do_final_sync(self, event: E, **_: Any) -> None:
        self.primary.begin_final_sync(self.ops.handover_reason(event))

    def _do_abort_handover(self, **_: Any) -> None:
        self.primary.abort_final_sync()
        log.warning("hand-over aborted: the peer went silent; staying primary")

    def _do_send_handover(self, **_: Any) -> None:
        self.primacy.resign()  # dcs: the key goes first, the peer takes it on HANDOVER
        # the peer's term will be at least ours + 1: should we take the role back (the peer went
        # silent, perhaps only to us), our term must be above it, or a tie by name could make
        # the node that hears the other one keep the role while the deaf one keeps it too
        self.saw_epoch(self.epoch + 1)
        body = {"name": self.cfg.name, "run": self.run_id, "epoch": self.epoch,
                "seq": self.primary.seq, "why": self.ops.handover_why[:300]}
        self.link.send_handover(body)
        log.info("handed over to %s", self.peer.name or self.cfg.peer)

    def _do_ask_handover(self, **_: Any) -> None:
        self.link.send("ASK_HANDOVER", {"name": self.cfg.name, "run": self.run_id,
                                        "epoch": self.epoch})
        log.info("asked primary %s to hand over", self.peer.name)

    def _do_refuse(self, context: tuple[bytes, str] | None, **_: Any) -> None:
        if context is not None:
            ident, command = context
            self.reply(ident, protocol.reply_error(f"cannot {command} while {self.state.value}"))

    def _do_campaign(self, **_: Any) -> None:
        self.primacy.campaign()

    def _do_peer_lost(self, **_: Any) -> None:
        self.publish_event("peer_lost", peer=self.peer.name)
        self.ops.standby_lost(f"silent for more than dead_after = {self.cfg.dead_after:g}s")

    def _do_hold(self, event: E, **_: Any) -> None:
        log.warning("maintenance mode: %s held back (no takeover, no automatic hand-over)",
                    event.value)
        self.publish_event("maintenance_hold", held=event.value)

    def _do_exit(self, **_: Any) -> None:
        log.info("node %s stopped", self.cfg.name)

    # ------------------------------------------------------------------ ROUTER
    def reply(self, ident: bytes, frames: list[bytes]) -> bool:
        """Queue a reply for `ident` without waiting; False when it could not be."""
        try:
            self.router.send_multipart([ident, *frames], zmq.NOBLOCK)
        except zmq.ZMQError as exc:
            log.debug("reply dropped: %s", exc)
            return False
        return True

    # ------------------------------------------------------------------ bus
    def publish_event(self, event: str, **fields: Any) -> None:
        self.pub.send_multipart(protocol.encode_bus(
            "EVENT", {"name": self.cfg.name, "event": event, "at": time.time(), **fields}))

    def _sentinel_event(self, event: dict[str, Any]) -> None:
        if event["event"] == "lapsed":  # the guard's deadline passed: primacy's business
            self.primacy.on_lapse()
            return
        self.ops.on_sentinel_event(event)

    # ------------------------------------------------------------------ shutdown
    def close(self) -> None:
        close_all(self)
