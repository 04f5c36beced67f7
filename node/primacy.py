"""Primacy: when this node may run the sentinels, told to the guard, and the etcd lease.

A room of the node loop (like the primary's and the secondary's sides): it owns the lease's
inproc pipe when [cluster] dcs is set, and has a handler, a next deadline and a tick.

- Before every heartbeat the node confirms its primacy to the sentinel guard (node/guard.py):
  two-node mode, until GUARD_SHARE of dead_after later; with a lease, until LEASE_SHARE of ttl
  after the last renewal etcd took. A node that was paused, stuck or starved past that deadline
  finds its sentinels stopped by the guard (Sentinels reports "lapsed") and holds them: in the
  two-node mode for dead_after and a heartbeat (the peer's news: if it took over, the rule
  demotes us), with a lease until the lease is valid again.
- With a lease, the keeper thread's reports become fsm events (LEASE_TAKEN, LEASE_LOST), the
  node's wish for the key, the term, and the lease's part of status and heartbeats.
"""
from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

import zmq

from . import protocol
from .config import Config
from .fsm import PRIMARY_LIKE, S
from .lease import LEASE_KILL_SHARE, Lease

if TYPE_CHECKING:
    from .node import Node

log = logging.getLogger("sbs.node")

# The guard stops the sentinels GUARD_SHARE of dead_after after the last heartbeat we sent
# (SIGTERM), and SIGKILLs them GUARD_KILL_SHARE of it later: they are gone before the peer,
# which hears that heartbeat no earlier than we send it, can take over. The rest (1/3 of
# dead_after minus a heartbeat: 0.5 s at the defaults) is how late a busy loop may be.
GUARD_SHARE = 2 / 3
GUARD_KILL_SHARE = 1 / 6


def guard_kill_after(cfg: Config) -> float:
    """Seconds from the guard's SIGTERM to its SIGKILL."""
    return (cfg.cluster.ttl * LEASE_KILL_SHARE if cfg.cluster.enabled
            else cfg.dead_after * GUARD_KILL_SHARE)


class Primacy:
    def __init__(self, node: Node):
        self.node = node
        self.cfg = node.cfg
        self.hold_until: float | None = None  # sentinels held after a lapse
        self.lease: Lease | None = None
        self.pipe: zmq.Socket | None = None
        # a hand-over's campaign (the peer resigned for us): asked for even in maintenance
        self.campaign_until = 0.0
        self.held_back = False  # maintenance keeps this secondary from asking for the key
        if self.cfg.cluster.enabled:
            self.lease = Lease(node.ctx, self.cfg.cluster, self.cfg.name, node.run_id)
            self.pipe = self.lease.pipe

    @property
    def dcs(self) -> bool:
        return self.lease is not None

    # -- the guard -----------------------------------------------------------------------------
    def confirm(self) -> bool:
        """Tell the guard we are alive and primary: right before a heartbeat leaves."""
        now = time.monotonic()
        if self.lease is not None:
            until = self.lease.valid_until()
            return self.node.sentinels.confirm(now - 1 if until is None else until)
        return self.node.sentinels.confirm(now + self.cfg.dead_after * GUARD_SHARE)

    def run_sentinels(self) -> None:
        self.hold_until = None
        if self.confirm():
            self.node.sentinels.run()

    def on_lapse(self) -> None:
        """The guard stopped our sentinels: we went unheard for too long, and the peer may have
        taken over meanwhile. Wait dead_after (and a heartbeat) for its news: if it is primary
        now, the rule demotes us; if we are still primary after that, run them again."""
        self.hold_until = time.monotonic() + self.cfg.dead_after + self.cfg.heartbeat
        self.node.publish_event("guard", action="stopped", why="primacy unconfirmed")

    def _check_hold(self, now: float) -> None:
        if self.hold_until is None or now < self.hold_until:
            return
        if self.lease is not None and not self.lease.ok(now):
            self.hold_until = now + self.cfg.heartbeat  # only a renewed lease brings them back
            return
        self.hold_until = None
        # a hand-over under way may still be aborted (the peer goes silent): the sentinels must
        # not stay down on a node that is then primary, with nothing left to start them
        if self.node.state in (S.PRIMARY, S.HANDOVER) and not self.node.restricted:
            log.warning("still primary %.1f s after the guard stopped the sentinels: starting "
                        "them again", self.cfg.dead_after + self.cfg.heartbeat)
            self.run_sentinels()

    # -- the loop's turn -----------------------------------------------------------------------
    def next_deadline(self) -> float | None:
        return self.hold_until

    def tick(self, now: float) -> None:
        self._check_hold(now)
        self._update_want()

    # -- the lease -----------------------------------------------------------------------------
    def on_report(self, frames: list[bytes]) -> None:
        lease, node = self.lease, self.node
        before = (lease.holder, lease.term, lease.reachable, lease.mine)
        if not lease.on_report(frames):
            return
        if (lease.holder, lease.term, lease.reachable, lease.mine) != before:
            log.info("leader key %s: holder %s, term %s, etcd %s%s", self.cfg.cluster.key,
                     lease.holder, lease.term, "reachable" if lease.reachable else "unreachable",
                     f" ({lease.error})" if lease.error else "")
            node.publish_event("lease", holder=lease.holder, term=lease.term,
                               reachable=lease.reachable, mine=lease.mine)
        if lease.term and lease.term > node.max_seen_epoch:
            node.max_seen_epoch = lease.term
            node._save_node()
        if (event := lease.event(node.state)) is not None:
            node.feed(event)
        elif lease.mine and node.state in PRIMARY_LIKE and lease.term != node.epoch:
            log.warning("took the leader key again after it expired: term %s", lease.term)
            node.epoch = lease.term
            node._save_node()
        self.tick(time.monotonic())

    def _update_want(self) -> None:
        if self.lease is not None:
            node, peer = self.node, self.node.peer
            # maintenance: no takeover, by the key either (fsm.MAINTENANCE holds the silence);
            # a hand-over the operator asked for still moves the key (campaign)
            hold = (node.state == S.SECONDARY and node.ops.maintenance.on
                    and time.monotonic() >= self.campaign_until)
            if hold != self.held_back:
                self.held_back = hold
                if hold:
                    log.warning("maintenance mode: this secondary does not ask etcd for the "
                                "leader key (no takeover)")
            if hold:
                self.lease.want(False)
                return
            rival = {"epoch": peer.epoch, "role": peer.role, "name": peer.name}
            self.lease.wish(node.state, starting_may_ask=node.probed or (
                peer.alive and peer.state == "starting" and protocol.wins(node.me(), rival)))

    def term(self) -> int | None:
        """The term a new primary takes: the leader key's create revision (dcs), else None."""
        return self.lease.term if self.lease is not None else None

    def stale(self, what: str, body: dict[str, Any]) -> bool:
        return self.lease is not None and self.lease.stale(what, body)

    def campaign(self, **_: Any) -> None:
        if self.lease is not None:
            log.info("the primary handed over: taking the leader key")
            self.campaign_until = time.monotonic() + 2 * self.cfg.cluster.ttl
            self.lease.campaign_now()

    def resign(self) -> None:
        if self.lease is not None:  # the key goes first: the peer takes it on HANDOVER
            self.lease.resign(hold_off=self.cfg.cluster.ttl)

    def status(self, now: float) -> dict[str, Any] | None:
        if self.lease is None:
            return None
        return self.lease.status(now, lone_secondary=self.node.state == S.SECONDARY
                                 and not self.node.peer.alive)

    def heartbeat_fields(self) -> dict[str, Any]:
        if self.lease is None:
            return {}
        lease = self.lease.status(time.monotonic())
        return {"lease": {k: lease[k] for k in ("holder", "term", "time_left", "reachable")}}

    def close(self) -> None:
        if self.lease is not None:
            self.lease.close()
            self.lease = self.pipe = None

