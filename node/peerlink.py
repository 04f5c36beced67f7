"""The peer link: our DEALER to the peer's ROUTER with our pings on it (and an HB on the bus),
the peer's PING/PONG turned into what we know of it (node/peer.py) and into fsm events, the
hand-over messages obeyed only from the peer's current run, and a node back from a pause that
counts the peer's silence from its return (check_away, release_held).

It belongs to the Node (node/node.py), whose loop calls tick, on_ping and on_dealer.
"""
from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

import zmq

from . import protocol
from .fsm import PRIMARY_LIKE, E, S
from .primacy import GUARD_SHARE
from .protocol import Bad, Message
from .security import client

if TYPE_CHECKING:
    from .node import Node

log = logging.getLogger("sbs.node")

# a ping that found no connection to the peer is tried again this soon (seconds), so a peer
# that has just come up hears from us within milliseconds rather than at the next heartbeat;
# the wait doubles while the peer stays unreachable, up to the heartbeat itself
PING_RETRY = 0.025


class PeerLink:
    """The peer link: our DEALER to the peer's ROUTER with our pings on it (and an HB on the
    bus), the peer's PING/PONG turned into what we know of it (Peer) and into fsm events, and
    the hand-over messages, obeyed only from the peer's current run."""

    def __init__(self, node: Node):
        self.node = node
        self.n = 0  # our pings' number: the peer drops an older one that arrives late
        self.next_ping = self.retry_at = 0.0
        self.retry_in = PING_RETRY
        self.sent_at = 0.0  # when our last ping left (monotonic)
        # back from being away (see check_away): until then a HANDOVER is held, not obeyed
        self.away_until = 0.0
        self.held: Message | None = None
        self.ident: bytes | None = None  # ROUTER identity of the peer's DEALER
        self.last_refusal: str | None = None  # the peer's last error answer, logged once
        self.dealer = self._open_dealer()

    def _open_dealer(self) -> zmq.Socket:
        node = self.node
        dealer = node.socket(zmq.DEALER, maxmsg=protocol.MAX_REPLY_IN)
        # IMMEDIATE: a ping to a peer that is not connected is dropped, not queued; a queued
        # ping delivered seconds later would describe a state long gone.
        dealer.setsockopt(zmq.IMMEDIATE, 1)
        # No ZeroMQ heartbeat timeout here: with only the way back cut, our pings still reach
        # the peer, and dropping this connection for want of answers would stop them and make
        # a secondary take over while this primary runs (two primaries). Silence is the pings'
        # business; the secondary remakes its own connection when its link stalls.
        dealer.setsockopt(zmq.HEARTBEAT_IVL, 0)
        dealer.sndhwm = 1000
        dealer.reconnect_ivl = 100
        dealer.reconnect_ivl_max = 500
        client(dealer, node.keys)
        dealer.connect(f"tcp://{node.cfg.peer}:{node.cfg.control_port}")
        return dealer

    def reconnect(self) -> None:
        """A new connection to the peer (the secondary's link watch, when what it sends does
        not get through)."""
        self.node.poller.unregister(self.dealer)
        self.dealer.close()
        self.dealer = self._open_dealer()
        self.node.poller.register(self.dealer, zmq.POLLIN)

    def send(self, command: str, body: dict[str, Any]) -> bool:
        try:
            self.dealer.send_multipart(protocol.encode(command, body), zmq.NOBLOCK)
            return True
        except zmq.Again:
            return False  # not connected: the peer is down or unreachable; silence speaks

    # ------------------------------------------------------------------ pings
    def next_deadline(self) -> float:
        due = min(self.next_ping, self.retry_at) if self.retry_at else self.next_ping
        return min(due, self.away_until) if self.held is not None else due

    def check_away(self, now: float) -> None:
        """No ping of ours left for most of dead_after: this node was paused, stuck or starved,
        and the peer may have acted on its silence (taken over, or taken the role back after a
        hand-over it sent us). What we read now may be seconds old, and the peer's silence
        meanwhile was ours: the peer's silence counts from now, and a HANDOVER waits for the
        peer's news (release_held) instead of being obeyed at once."""
        node = self.node
        if not self.sent_at or now - self.sent_at <= node.cfg.dead_after * GUARD_SHARE:
            return
        log.warning("no ping left this node for %.2fs (paused, stuck or starved): the peer's "
                    "silence counts from now, and a hand-over waits %.1fs for its news",
                    now - self.sent_at, node.cfg.dead_after + node.cfg.heartbeat)
        self.away_until = now + node.cfg.dead_after + node.cfg.heartbeat
        node.peer.counts_from = now
        if node.state == S.STARTING:
            node.probe_deadline = max(node.probe_deadline, now + node.cfg.dead_after)
        self.send_ping()  # the peer hears at once that we are back, and as what
        self.next_ping = now + node.cfg.heartbeat

    def wait_for_leaving_peer(self, now: float) -> None:
        """A peer that answers as stopping hands over (or falls silent) once its sentinels are
        gone, which may take their grace time: a starting node's probe lasts until then."""
        node = self.node
        if (node.state == S.STARTING and now >= node.probe_deadline and node.peer.alive
                and node.peer.state == "stopping"):
            node.probe_deadline = now + node.cfg.heartbeat

    def release_held(self, now: float) -> None:
        """A HANDOVER read while back from being away, once the peer had time to tell us what
        it did meanwhile (or fell silent): obeyed only if it is still the peer's latest word."""
        if self.held is None or (now < self.away_until and not self.node.peer.silent(now)):
            return
        msg, self.held = self.held, None
        if self.node.peer.state == "primary":
            log.warning("dropped a HANDOVER read after a pause: %s is primary again (epoch %d)",
                        self.node.peer.name, self.node.peer.epoch)
            return
        self.obey(msg, E.PEER_HANDOVER)

    def tick(self, now: float) -> None:
        self.release_held(now)
        if now >= self.next_ping:
            self.send_ping()
            self.next_ping = now + self.node.cfg.heartbeat
        elif self.retry_at and now >= self.retry_at:
            # the last ping found no connection (the peer is starting, or down): try again
            # soon, so a peer that just came up hears from us in milliseconds, not a heartbeat
            self._ping(now)

    def send_ping(self) -> None:
        node = self.node
        node.primacy.confirm()  # the guard's deadline moves with each heartbeat we send
        self.sent_at = time.monotonic()
        self._ping(time.monotonic())
        node.pub.send_multipart(protocol.encode_bus("HB", {
            "name": node.cfg.name, "run": node.run_id, "epoch": node.epoch,
            "state": node.public_state(), "seq": node.primary.seq, "sv": node.lists.sv,
            "maintenance": node.ops.maintenance.on,
            **node.primacy.heartbeat_fields(),
        }))

    def _ping(self, now: float) -> None:
        if self.send("PING", self.our_state()):
            self.retry_at, self.retry_in = 0.0, PING_RETRY
        else:  # a peer that stays down costs no wakeups beyond the heartbeat's
            self.retry_at = now + min(self.node.cfg.heartbeat, self.retry_in)
            self.retry_in *= 2

    def our_state(self) -> dict[str, Any]:
        """The body of our PING and PONG."""
        node, secondary = self.node, self.node.secondary
        progress = secondary.progress
        self.n += 1
        return {
            "name": node.cfg.name, "run": node.run_id, "n": self.n,
            "state": node.public_state(),
            "epoch": node.epoch, "role": node.cfg.role, "restricted": node.restricted,
            "since": round(time.monotonic() - node.state_at, 3), "seq": node.primary.seq,
            "applied": progress.applied, "synced": progress.synced,
            "pending_files": progress.pending_files, "pending_bytes": progress.pending_bytes,
            "error": secondary.error[:1000],
            "through": progress.through, "stuck": progress.stuck[:1000],
            "following": secondary.following,
            **({"yielded": node.yielded} if node.yielded else {}),
            **node.ops.peer_fields(),  # maintenance, the lists' stamp, sick sentinels
        }

    # ------------------------------------------------------------------ the peer's messages
    def on_ping(self, ident: bytes, msg: Message) -> None:
        if msg.body["run"] != self.node.run_id:
            self.ident = ident
        self.on_peer_state(msg)
        self.node.reply(ident, protocol.encode("PONG", self.our_state()))

    def on_dealer(self, frames: list[bytes]) -> None:
        msg = protocol.decode(frames, expect=("PONG", "SNAPSHOT_REP", "REPLY", "HANDOVER"))
        if isinstance(msg, Bad):
            log.warning("dropped a bad message from the peer: %s", msg.reason)
            return
        if msg.command == "PONG":
            self.on_peer_state(msg)
        elif msg.command == "SNAPSHOT_REP":
            self.last_refusal = None
            if self._from_peer(msg):
                self.node.secondary.on_snapshot(msg)
            else:
                # perhaps the peer's first heartbeat of a new run has not arrived yet: ask again
                # soon rather than in 10 s
                self.node.secondary.retry_snapshot_soon()
        elif msg.command == "HANDOVER":
            self.obey(msg, E.PEER_HANDOVER)
        elif msg.command == "REPLY" and msg.body["status"] == "error":
            reason = msg.body.get("reason")
            # the same answer again (a peer not primary yet, asked every few hundred ms): once
            (log.debug if reason == self.last_refusal else log.warning)("peer answered: %s",
                                                                         reason)
            self.last_refusal = reason
            self.node.secondary.retry_snapshot_soon()  # not ready for a snapshot: ask again soon

    def on_peer_state(self, msg: Message) -> None:
        node, peer, body = self.node, self.node.peer, msg.body
        if body["name"] == node.cfg.name and body["run"] != node.run_id:
            log.error("peer calls itself %r like this node: names must differ", body["name"])
            return
        if body["run"] == node.run_id:
            log.error("received our own ping: peer address %s points at this node", node.cfg.peer)
            return
        now = time.monotonic()
        restarted = body["run"] != peer.run
        if not peer.update(body, now):
            return
        if restarted:
            log.info("peer %s (run %s) is %s, epoch %d", body["name"], body["run"],
                     body["state"], body["epoch"])
            if node.state == S.SECONDARY and body["state"] == "primary":
                node.secondary.request_snapshot()
        node.ops.on_peer(body)
        node.saw_epoch(body["epoch"])
        node.primary.peer_heard()
        yielded = body.get("yielded")
        if yielded and yielded["run"] == node.run_id and node.state in PRIMARY_LIKE:
            node.reports.split_brain_won(yielded["loser_epoch"], how="it yielded to this node")
        event = peer.event(node.me(), node.state, now - node.state_at)
        if event is not None:
            node.feed(event)

    def obey(self, msg: Message, event: E) -> None:
        """HANDOVER and ASK_HANDOVER: an event, when the current run of the peer sends it."""
        if self._from_peer(msg):
            if event == E.PEER_HANDOVER and time.monotonic() < self.away_until:
                log.warning("HANDOVER from %s read while back from a pause: held until %.1fs "
                            "from now, for the peer's news", self.node.peer.name,
                            self.away_until - time.monotonic())
                self.held = msg
                return
            if event == E.PEER_HANDOVER:
                self.node.ops.peer_handover_why = msg.body.get("why", "")
            self.node.feed(event)

    def _from_peer(self, msg: Message) -> bool:
        peer = self.node.peer
        if (why := protocol.stale(msg.body, peer.run, peer.epoch)) is not None:
            log.warning("ignored %s %s", msg.command, why)
            return False
        return True

    def send_handover(self, body: dict[str, Any]) -> None:
        self.send("HANDOVER", body)
        # Also back along the peer's own connection (its pings reach our ROUTER): our DEALER
        # may still be reconnecting to a peer that started a moment ago, and a lost HANDOVER
        # costs the peer dead_after of waiting. A duplicate is ignored by the table.
        if self.ident is not None:
            self.node.reply(self.ident, protocol.encode("HANDOVER", body))

    def close(self) -> None:
        self.dealer.close(linger=500)  # let a last HANDOVER leave
