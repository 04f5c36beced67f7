"""Half-open links: socket heartbeats, and the secondary's watch over what it receives.

A link cut in one direction only (a pulled cable on one side, a firewall dropping one way) keeps
the primary's pings arriving while nothing the secondary sends gets through: no takeover, and
no error on any socket. Two things make that visible:

- every TCP connection of the context carries ZeroMQ heartbeats (and TCP keepalive), sized from
  `heartbeat`/`dead_after`: a connection whose peer stopped answering is dropped and made again
  instead of waiting forever;
- the secondary checks, while the primary's pings arrive, that the primary's bus heartbeat
  arrives too and that what it applied reaches the primary's `seq` (or at least moves: a
  manifest applied, a file answered). When either fails for `dead_after` it is a stall: the
  loop reports it (status, log, bus, email) and makes its connections to the primary again; a
  dead bus also means a new snapshot (manifests were missed). A slow transfer that moves is no
  stall, and a snapshot in progress is never restarted for being slow. Its end is reported.
"""
from __future__ import annotations

from dataclasses import dataclass

import zmq


def set_heartbeats(ctx: zmq.Context, heartbeat: float, dead_after: float) -> None:
    """Defaults for every socket made from `ctx` afterwards (inproc sockets ignore them)."""
    ivl = max(100, int(heartbeat * 1000))
    timeout = max(ivl * 2, int(dead_after * 1000))
    ctx.setsockopt(zmq.HEARTBEAT_IVL, ivl)
    ctx.setsockopt(zmq.HEARTBEAT_TIMEOUT, timeout)
    # what the other side waits without hearing from us before it drops the connection
    ctx.setsockopt(zmq.HEARTBEAT_TTL, timeout)
    # a handshake whose bytes were lost (a link cut while connecting) is given up and made
    # again, not waited on for libzmq's default 30 s
    ctx.setsockopt(zmq.HANDSHAKE_IVL, max(2000, 2 * timeout))
    ctx.setsockopt(zmq.TCP_KEEPALIVE, 1)
    ctx.setsockopt(zmq.TCP_KEEPALIVE_IDLE, max(1, int(dead_after)))
    ctx.setsockopt(zmq.TCP_KEEPALIVE_INTVL, max(1, int(heartbeat) or 1))
    ctx.setsockopt(zmq.TCP_KEEPALIVE_CNT, 3)


@dataclass
class Watch:
    """The secondary's view of its link to the primary. All times are monotonic."""

    dead_after: float
    # how long the bus may stay silent after the ping that showed it silent: a primary whose
    # loop was held up sends its ping and its bus heartbeat together, on two connections, and
    # the ping may be read first (the heartbeat interval)
    grace: float = 0.5
    bus_heard_at: float = 0.0
    bus_doubted_at: float = 0.0  # when a ping first showed the bus silent (0: it did not)
    progress: tuple = ()
    progress_at: float = 0.0
    stalled: str = ""  # why, while stalled
    stalled_at: float = 0.0
    remedied_at: float = 0.0

    def reset(self, now: float) -> None:
        """Following starts (again): everything counts from now."""
        self.heard_bus(now)
        self.progress_at, self.progress = now, ()

    def heard_bus(self, now: float) -> None:
        self.bus_heard_at = now
        self.bus_doubted_at = 0.0

    def check(self, now: float, *, pings_arrive: bool, pinged_at: float, primary_seq: int,
              applied: int, progress: tuple, apply_window: float | None = None
              ) -> tuple[str, str]:
        """(kind, why) of a stall now, or ("", ""); kind is "bus" (the primary's bus heartbeat
        does not arrive) or "apply" (behind the primary's seq, and nothing moves: no manifest
        applied, no file answered). Call on every turn of the loop. `pinged_at`: when the
        primary's last ping arrived; `apply_window`: how long nothing may move before it is
        an "apply" stall (dead_after unless given)."""
        if progress != self.progress:
            self.progress, self.progress_at = progress, now
        if not pings_arrive:
            # the primary is silent altogether: the failover rules deal with that
            self.heard_bus(now)
            self.progress_at = now
            return "", ""
        # measured to the last ping, not to now: a primary that dies stops both at once,
        # which is silence (a takeover), not a stall; and the bus must stay silent for
        # `grace` after the ping that showed it so
        if pinged_at - self.bus_heard_at > self.dead_after:
            if not self.bus_doubted_at:
                self.bus_doubted_at = now
            if now - self.bus_doubted_at >= self.grace:
                return "bus", (f"no bus heartbeat from the primary for "
                               f"{now - self.bus_heard_at:.1f}s while its pings arrive")
        window = self.dead_after if apply_window is None else apply_window
        if applied < primary_seq and now - self.progress_at > window:
            return "apply", (f"applied {applied} of the primary's {primary_seq} manifests, "
                             f"nothing received or applied for {now - self.progress_at:.1f}s")
        return "", ""
