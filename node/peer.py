"""What a node knows of its peer, and the events that knowledge turns into."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .fsm import E, S
from .protocol import wins


@dataclass
class Peer:
    dead_after: float
    name: str = ""
    run: str = ""
    n: int = -1
    state: str = "stopped"
    epoch: int = 0
    role: str = "main"
    restricted: bool = False
    since: float = 0.0  # seconds the peer says it has been in `state`, as of `heard_at`
    seq: int = 0
    applied: int = 0
    synced: bool = False
    pending_files: int = 0
    pending_bytes: int = 0
    error: str = ""
    through: int = 0
    stuck: str = ""
    following: str | None = None  # the run of ours its applied/through count in ("": none;
    # None: a peer too old to say, trusted as before)
    heard_at: float = -1e9  # monotonic
    alive: bool = False
    # the peer's silence counts from here at the earliest: this node was away (paused, stuck or
    # starved) until then, and what it did not hear meanwhile proves nothing about the peer
    counts_from: float = -1e9

    def update(self, body: dict[str, Any], now: float) -> bool:
        """Take a PING/PONG body. False when it is stale (an older message of the same run)."""
        if body["run"] == self.run and body["n"] <= self.n:
            return False
        self.run, self.n = body["run"], body["n"]
        for key in ("name", "state", "epoch", "role", "restricted", "since", "seq", "applied",
                    "synced", "pending_files", "pending_bytes", "error"):
            setattr(self, key, body[key])
        self.through, self.stuck = body.get("through", 0), body.get("stuck", "")
        self.following = body.get("following")
        self.heard_at = now
        self.alive = True
        return True

    def follows(self, run: str) -> bool:
        """Do its applied/through count in our manifests of `run` (a peer too old to say is
        trusted as before)?"""
        return self.following in (run, None)

    def expires_at(self) -> float | None:
        """When the peer counts as dead unless heard from again (None: it is not alive)."""
        return max(self.heard_at, self.counts_from) + self.dead_after if self.alive else None

    def silent(self, now: float) -> bool:
        return (expiry := self.expires_at()) is not None and now > expiry

    def event(self, me: dict[str, Any], my_state: S, my_since: float) -> E | None:
        """The FSM event for the peer's latest state, seen from a node described by `me`."""
        we_win = wins(me, {"epoch": self.epoch, "role": self.role, "name": self.name})
        if self.state == "primary":
            return E.PEER_PRIMARY_WE_WIN if we_win else E.PEER_PRIMARY_WE_LOSE
        if self.state == "starting":
            return E.PEER_STARTING_WE_WIN if we_win else E.PEER_STARTING_WE_LOSE
        if self.state == "secondary":
            if my_state == S.PRIMARY and me.get("restricted") and self.role == "main" and (
                self.synced and self.follows(me.get("run", ""))
            ):
                return E.MAIN_PEER_READY
            # Two secondaries only count once both have been so for dead_after: right after a
            # hand-over the old primary is secondary before the peer's news arrives.
            if my_state == S.SECONDARY and my_since > self.dead_after and (
                self.since > self.dead_after
            ):
                return E.DUAL_SECONDARY_WE_WIN if we_win else E.DUAL_SECONDARY_WE_LOSE
            return E.PEER_SECONDARY
        return None  # stopping/stopped: the peer is leaving; a HANDOVER or silence follows
