"""Sentinel health: failures counted in a sliding window, and the optional check commands.

A failure is an unexpected exit of a sentinel, or its `[checks]` command exiting non-zero (or
outliving `check_timeout`). More than `[health] restarts` failures within `window` seconds make
the sentinel unhealthy: the primary hands over to a synced secondary where it has not failed
lately (`sick`, which each node tells the other in its PING). If it fails there too, nobody
moves it again (no ping-pong) and it is reported. `restarts = 0` (the default) never moves.

The checks run on one worker thread (a check may take seconds; the loop must not wait);
results come back through a queue the loop drains on its tick.
"""
from __future__ import annotations

import collections
import logging
import os
import queue
import shlex
import subprocess
import threading
import time

from .config import HealthConfig

log = logging.getLogger("sbs.health")


class Health:
    def __init__(self, cfg: HealthConfig) -> None:
        self.cfg = cfg
        self._failures: dict[str, collections.deque[float]] = {}
        self._sick: dict[str, float] = {}  # name -> monotonic time it was found failing here
        self._results: queue.Queue[tuple[str, str]] = queue.Queue()
        self._wanted: frozenset[str] = frozenset()  # sentinels the checks should look at
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._groups: set[int] = set()  # process groups of checks that may have left children

    @property
    def enabled(self) -> bool:
        return self.cfg.restarts > 0

    def reconfigure(self, cfg: HealthConfig) -> None:
        self.cfg = cfg

    # -- counting ------------------------------------------------------------------------------

    def failed(self, name: str, why: str, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        self._failures.setdefault(name, collections.deque()).append(now)
        log.debug("sentinel %s failure: %s", name, why)

    def count(self, name: str, now: float) -> int:
        q = self._failures.get(name)
        while q and q[0] < now - self.cfg.window:
            q.popleft()
        return len(q) if q else 0

    def failing(self, now: float) -> list[str]:
        """Sentinels with more than `restarts` failures in the window."""
        if not self.enabled:
            return []
        return sorted(n for n in list(self._failures) if self.count(n, now) > self.cfg.restarts)

    def reset(self) -> None:
        """A new term as primary: failures of a previous one do not count."""
        self._failures.clear()

    def drain(self) -> None:
        """Take the check results the worker left (called from the loop's tick)."""
        while True:
            try:
                name, why = self._results.get_nowait()
            except queue.Empty:
                return
            if name in self._wanted:
                log.warning("check of sentinel %s failed: %s", name, why)
                self.failed(name, f"check: {why}")

    # -- sick marks ----------------------------------------------------------------------------

    def mark_sick(self, name: str, now: float) -> None:
        self._sick[name] = now

    def sick(self, now: float) -> list[str]:
        """Sentinels found failing here lately (kept ten windows): not to be moved back here."""
        keep = 10 * self.cfg.window
        for name in [n for n, at in self._sick.items() if now - at > keep]:
            del self._sick[name]
        return sorted(self._sick)

    # -- checks --------------------------------------------------------------------------------

    def watch(self, names: list[str]) -> None:
        """Check these sentinels from now on (an empty list: check nothing)."""
        self._wanted = frozenset(n for n in names if n in dict(self.cfg.checks))
        if self._wanted and self._thread is None:
            self._thread = threading.Thread(target=self._work, name="sbs-health", daemon=True)
            self._thread.start()

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(self.cfg.check_timeout + 5)
            self._thread = None

    def _work(self) -> None:
        while not self._stop.wait(self.cfg.check_interval):
            checks = dict(self.cfg.checks)
            for name in sorted(self._wanted):
                if self._stop.is_set():
                    return
                if (why := self._run(checks.get(name))) is not None:
                    self._results.put((name, why))

    def _run(self, command: str | None) -> str | None:
        if not command:
            return None
        try:
            # a session (and process group) of its own: what it leaves running in the
            # background keeps that group, by which the node reaps it (_reap_leftovers)
            proc = subprocess.Popen(shlex.split(command), stdin=subprocess.DEVNULL,
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                    start_new_session=True)
        except (OSError, ValueError) as exc:
            return f"cannot run {command!r}: {exc}"
        self._groups.add(proc.pid)
        try:
            code = proc.wait(timeout=self.cfg.check_timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            return f"no answer within {self.cfg.check_timeout:g}s"
        finally:
            self._reap_leftovers()
        return None if code == 0 else f"exit {code}"

    def _reap_leftovers(self) -> None:
        """A check's background processes that outlived it are the node's children (it is a
        child subreaper: node/proctree.py): reap those that have exited, by their group, or
        each would stay a zombie until the node stops. A group is forgotten once it is gone
        (its id is given to no other process while it exists)."""
        for pgid in list(self._groups):
            while True:
                try:
                    if os.waitid(os.P_PGID, pgid, os.WEXITED | os.WNOHANG) is None:
                        break  # some still run: the next check looks again
                except ChildProcessError:  # none of ours: forgotten once the group is gone
                    try:
                        os.killpg(pgid, 0)
                    except ProcessLookupError:
                        self._groups.discard(pgid)
                    except PermissionError:
                        pass
                    break
