"""Maintenance mode: pair-wide, kept on disk, the newest switch wins.

While it is on, nothing moves by itself: no takeover on silence, no automatic hand-over (a
stopping primary does not hand over, a restricted backup does not give way, a crash-looping
sentinel does not move), sentinels are left as they are; replication goes on. What the operator
asks for explicitly (`promote`) still happens. The table of what it holds back is
fsm.MAINTENANCE.

Either node can switch it; the switch carries its wall time and node name, travels in every
PING/PONG, and the newer of two records wins, so the peer adopts it within a heartbeat, and a
node that was stopped meanwhile adopts it when it hears its peer again.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import persist

log = logging.getLogger("sbs.maintenance")
FILE = "maintenance.json"


@dataclass(frozen=True)
class Record:
    on: bool = False
    at: float = 0.0  # wall time of the switch (0: never switched)
    by: str = ""  # node where it was switched

    def newer_than(self, other: Record) -> bool:
        return (self.at, self.by) > (other.at, other.by)

    def wire(self) -> dict[str, Any]:
        # in every PING: spelled out, dataclasses.asdict deep-copies field by field
        return {"on": self.on, "at": self.at, "by": self.by}


def from_wire(body: Any) -> Record | None:
    """A Record from a peer's PING field, or None when it is not one (logged by the caller)."""
    if not isinstance(body, dict):
        return None
    on, at, by = body.get("on"), body.get("at"), body.get("by")
    if not isinstance(on, bool) or not isinstance(at, int | float) or isinstance(at, bool):
        return None
    if not isinstance(by, str) or len(by) > 64 or not 0 <= at < 1e11:
        return None
    return Record(on, float(at), by)


class Maintenance:
    def __init__(self, state_dir: Path, node: str, writes: persist.Guarded) -> None:
        self.path = state_dir / FILE
        self.node = node
        self.writes = writes  # the node's guarded writer: a failure is shown and retried
        self.record = self._load()
        if self.record.on:
            log.warning("MAINTENANCE mode is on (switched on by %s at %s): no takeover, no "
                        "automatic hand-over", self.record.by, _clock(self.record.at))

    def _load(self) -> Record:
        saved = persist.load(self.path, {})
        record = from_wire(saved)
        if record is None and saved != {}:
            # the peer's record, in every PING, is adopted when it is newer
            log.error("ignoring %s: not a maintenance record (%s): maintenance is off here "
                      "until switched on or told by the peer", self.path, str(saved)[:100])
        return record or Record()

    @property
    def on(self) -> bool:
        return self.record.on

    def switch(self, on: bool) -> Record:
        """The operator's switch on this node."""
        # never older than what we hold, even if this node's clock is behind the peer's
        at = max(time.time(), self.record.at + 0.001)
        return self._take(Record(on, at, self.node), "switched here")

    def offer(self, record: Record, peer: str) -> bool:
        """A record from the peer: adopted when newer than ours. True when adopted."""
        if not record.newer_than(self.record):
            return False
        self._take(record, f"adopted from {peer}")
        return True

    def _take(self, record: Record, how: str) -> Record:
        changed = record.on != self.record.on
        self.record = record
        # a full state disk: kept in memory, shown in status, written again by the loop
        self.writes.save(self.path, record.wire())
        if changed:
            log.warning("MAINTENANCE mode %s (%s, by %s at %s)", "ON" if record.on else "off",
                        how, record.by, _clock(record.at))
        return record

    def status(self) -> dict[str, Any]:
        return self.record.wire()


def _clock(wall: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(wall)) if wall else "never"
