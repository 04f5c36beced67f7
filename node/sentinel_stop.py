"""Stopping the sentinels as a state with a deadline, not a wait.

A primary that hands over or stops sends SIGTERM to its sentinels and runs the table's actions
after STOP_SENTINELS (hand-over, follow, exit) only once they are gone. Meanwhile the loop runs:
STATUS is answered and the peer keeps hearing "stopping" (a peer that is leaving: no takeover, a
HANDOVER or silence follows), so the service never runs on both nodes.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .fsm import A, E, S

if TYPE_CHECKING:
    from .node import Node

log = logging.getLogger("sbs.node")


@dataclass
class _Pending:
    rest: tuple[A, ...]  # the actions still to do once the sentinels are gone
    how: dict[str, Any]  # what they are called with (prev, event, context)
    since: float
    queued: list[tuple[E, Any]] = field(default_factory=list)  # events held meanwhile


class SentinelStop:
    def __init__(self, node: Node):
        self.node = node
        self.pending: _Pending | None = None
        self.blocking = False  # stop_now() is stopping them

    @property
    def running(self) -> bool:
        return self.pending is not None

    def stop_now(self) -> None:
        """The STOP_SENTINELS action outside a transition that waits (see feed()): stop them
        all before returning. A sentinel may take up to the grace time to stop, longer than
        dead_after: the peer must keep hearing us, as "stopping" (a peer that is leaving: no
        takeover, a HANDOVER or silence follows), or it takes over on silence while our
        sentinels still run and the same service runs twice."""
        node = self.node
        next_ping = 0.0

        def keep_the_peer_waiting() -> None:
            nonlocal next_ping
            if (now := time.monotonic()) >= next_ping:
                next_ping = now + node.cfg.heartbeat
                node.link.send_ping()

        self.blocking = True
        try:
            node.sentinels.stop_all(tick=keep_the_peer_waiting)
        finally:
            self.blocking = False
        node.ops.watch_checks()

    def begin(self, rest: tuple[A, ...], **how: Any) -> bool:
        """SIGTERM to the sentinels; `rest` runs once they are gone. False when nothing was
        running (the rest runs at once)."""
        sentinels = self.node.sentinels
        sentinels.begin_stop_all()
        if sentinels.stop_done():
            return False
        self.pending = _Pending(rest=rest, how=how, since=time.monotonic())
        log.info("stopping sentinels; then %s", [a.value for a in rest] or "nothing")
        return True

    def hold(self, event: E, context: Any) -> None:
        # the actions of the last transition are not done yet: this event is for the state
        # they leave us in. What the peer's state says is said again by its next ping (and
        # would be stale by then); silence, a hand-over and a stop are not.
        if event in (E.STOP, E.PEER_SILENT, E.PEER_HANDOVER):
            queued = self.pending.queued
            if (event, context) not in queued:
                queued.append((event, context))

    def tick(self, now: float) -> None:
        node, stop = self.node, self.pending
        if stop is None or not node.sentinels.stop_done():
            return
        self.pending = None
        log.info("sentinels stopped in %.1fs", now - stop.since)
        for action in stop.rest:
            node.perform(action, **stop.how)
        node.state_at = time.monotonic()  # the state counts from when its actions are done
        node.link.send_ping()
        for event, context in stop.queued:
            if event == E.PEER_SILENT and node.peer.alive:
                # heard again since: acting on a silence that is over would take the role back
                # from a peer we have just handed it to
                log.info("the peer's silence while the sentinels stopped is over: ignored")
                continue
            if self.pending is None and node.state != S.STOPPED:
                node.feed(event, context=context)
