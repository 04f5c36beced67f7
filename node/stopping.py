"""The sentinels' processes being stopped (Sentinels' other half, on the node's loop too).

A stopped sentinel's main process has had SIGTERM; it is SIGKILLed with everything of its once
its grace (`kill_at`) is over, reaped when it exits, and it is gone only once nothing of it is
left: its group and what left the group (node/proctree.py), as a second look at /proc confirms.
Until then its name may not run again (Sentinels._launch waits): never two at once, not even
on one node.
"""

from __future__ import annotations

import logging
import signal
import time
from collections.abc import Callable

from .sentinelproc import Child, describe

log = logging.getLogger("sbs.node.sentinels")

# How long to wait for a process to disappear after SIGKILL.
REAP_TIMEOUT = 1.0


class Stopping:
    def __init__(self, scan: Callable[[list[Child]], None],
                 stopped: Callable[[Child], None]) -> None:
        self.children: list[Child] = []
        self._scan = scan  # brings children's lists of their other processes up to date
        self._stopped = stopped  # reaps a main process that exited
        self._reap_deadline: float | None = None  # done(): how long SIGKILL may take

    def __bool__(self) -> bool:
        return bool(self.children)

    def of(self, name: str) -> bool:
        """Is a process of sentinel `name` still being stopped?"""
        return any(child.name == name for child in self.children)

    def add(self, child: Child, kill_at: float | None) -> None:
        child.kill_at = kill_at
        self.children.append(child)

    def kill_all_at(self, deadline: float) -> None:
        """Nothing being stopped outlives `deadline` (monotonic) before its SIGKILL."""
        for child in self.children:
            child.kill_at = deadline if child.kill_at is None else min(child.kill_at, deadline)
        self._reap_deadline = None

    def next_times(self, poll: float) -> list[float]:
        """When the loop should come back: `poll` to reap promptly, and each SIGKILL due."""
        if not self.children:
            return []
        return [poll] + [c.kill_at for c in self.children if c.kill_at is not None]

    def done(self) -> bool:
        """Reap what has exited, SIGKILL what outlived its grace; True once nothing is left
        (or what is left survived SIGKILL for REAP_TIMEOUT)."""
        self.reap()
        if self.children:
            if any(c.kill_at is not None for c in self.children):
                return False  # still within its grace
            now = time.monotonic()
            if self._reap_deadline is None:
                self._reap_deadline = now + REAP_TIMEOUT
            if now < self._reap_deadline:
                return False  # SIGKILL is sent: the kernel ends them
            for child in self.children:
                log.error("sentinel %s (pid %d) survives SIGKILL%s", child.name, child.pid,
                          f" ({describe(child.live_others)})" if child.live_others else "")
        self._reap_deadline = None
        return True

    def left_behind(self, child: Child) -> None:
        """A main process that exited (a daemon's parent does at once) takes what it started
        along, as its group always did: the service never runs twice, not even on one node."""
        if escaped := child.signal_all(signal.SIGKILL):
            log.warning("sentinel %s (pid %d) left processes running outside its group: "
                        "SIGKILL to %s (a sentinel's command must stay in the foreground)",
                        child.name, child.pid, describe(escaped))
        if not self._gone(child):
            self.add(child, None)  # its next run waits until they are gone

    def reap(self) -> None:
        """Reap what has stopped; SIGTERM what was started since the last look (SIGKILL once
        the grace is over), SIGKILL what outlived the grace. A child is gone once its main
        process and every other process of its are."""
        if not self.children:
            return
        # which main processes have exited, before the scan: what one started just before
        # it exited is then in the scan
        exited = [c for c in self.children if not c.reaped and c.has_exited()]
        self._scan(self.children)
        now = time.monotonic()
        for child in list(self.children):
            if child in exited:
                self._stopped(child)
            if self._gone(child):
                self.children.remove(child)
            elif child.kill_at is not None and now >= child.kill_at:
                others = child.live_others
                log.warning("sentinel %s (pid %d) ignored SIGTERM: SIGKILL%s", child.name,
                            child.pid, f" to it and {describe(others)}" if others else "")
                child.signal_all(signal.SIGKILL)
                child.kill_at = None
            elif escaped := child.signal_others(
                    signal.SIGTERM if child.kill_at is not None else signal.SIGKILL):
                log.warning("sentinel %s (pid %d): also stopping %s, started since",
                            child.name, child.pid, describe(escaped))

    def _gone(self, child: Child) -> bool:
        """Its main process reaped and nothing else of it left, as a second look at /proc
        confirms: a process forked while the first one read /proc is in the second."""
        if not child.reaped or child.live_others:
            return False
        self._scan([child])
        return not child.live_others
