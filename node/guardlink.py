"""The node's end of the sentinel guard (node/guard.py): the pipe that tells it each sentinel's
process group and the primacy deadline, and the line on which it says it stopped them.

Used by Sentinels only, from the node's loop. The guard is started on the first group it must
know of and ends on EOF (close()); a guard that died is started again with every live group.
What the guard hears: "D<deadline>" (the node vouches until then), "+<pid>" / "-<pid>" (a
sentinel's group, and its end), "*<pid> <start time>" / "~<pid>" (a process of a sentinel
outside its group, and its end).
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .sentinelproc import Child

log = logging.getLogger(__name__)

_GUARD_SCRIPT = Path(__file__).with_name("guard.py")  # run as a script: see node/guard.py
# How long to wait for the guard to end after EOF.
_CLOSE_TIMEOUT = 1.0


class GuardLink:
    """The guard process and its two pipes. See the module docstring."""

    def __init__(self, kill_after: float, children: Callable[[], list[Child]],
                 deadline: Callable[[], float | None]) -> None:
        self.kill_after = kill_after  # the guard's grace between SIGTERM and SIGKILL
        self._children = children  # the sentinels' children, running or being stopped
        self._deadline = deadline  # until when the node vouches for them (None: no deadline)
        self._proc: subprocess.Popen | None = None
        self._told: dict[int, int] = {}  # pid -> start time: the guard knows these processes

    def fired(self) -> bool:
        """Non-blocking: did the guard say "F" (it stopped the groups) since we last looked?"""
        fired = False
        if self._proc is not None and self._proc.stdout is not None:
            try:
                while chunk := os.read(self._proc.stdout.fileno(), 4096):
                    fired = fired or b"F" in chunk
            except (BlockingIOError, InterruptedError):
                pass
            except OSError as exc:
                log.debug("sentinel guard output: %s", exc)
        return fired

    def vouch(self, until: float) -> None:
        """The node vouches for the sentinels until `until` (monotonic), if a guard runs."""
        if self._proc is not None:
            self._tell(f"D{until:.6f}")

    def add_group(self, pid: int) -> None:
        self._tell(f"+{pid}")

    def drop_group(self, pid: int) -> None:
        self._tell(f"-{pid}")

    def others(self) -> None:
        """Tell the guard of each process of a sentinel outside its group, and of each gone."""
        now = {p.pid: p.ticks for c in self._children() for p in c.live_others}
        gone = [pid for pid, ticks in self._told.items() if now.get(pid) != ticks]
        new = [(pid, ticks) for pid, ticks in now.items() if self._told.get(pid) != ticks]
        for pid in gone:
            del self._told[pid]
            self._tell(f"~{pid}")
        for pid, ticks in new:
            self._told[pid] = ticks
            self._tell(f"*{pid} {ticks}")

    def _known(self) -> list[str]:
        """What a guard that starts afresh must know: every live group, every other process."""
        return ([f"+{c.pid}" for c in self._children() if not c.reaped]
                + [f"*{pid} {ticks}" for pid, ticks in self._told.items()])

    def _tell(self, line: str) -> None:
        """Send one line to the guard, starting it first if need be (with the deadline and
        the lines for every live group and process, so a guard that was restarted knows them
        all)."""
        if self._proc is None or self._proc.poll() is not None:
            if line.startswith(("-", "~")):
                return  # a new guard would not know that group or process anyway
            try:
                self._proc = subprocess.Popen(
                    [sys.executable, "-I", "-S", str(_GUARD_SCRIPT), str(self.kill_after)],
                    stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                    start_new_session=True,  # out of the terminal's reach, and of killpg
                )
                os.set_blocking(self._proc.stdout.fileno(), False)
            except OSError as exc:
                log.error("cannot start the sentinel guard (what a sentinel starts itself may "
                          "outlive a crashed node): %s", exc)
                self._proc = None
                return
            deadline = self._deadline()
            head = "" if deadline is None else f"D{deadline:.6f}\n"
            line = head + "".join(f"{known_line}\n" for known_line in self._known()) + line
        try:
            self._proc.stdin.write(f"{line}\n".encode())
            self._proc.stdin.flush()
        except OSError as exc:
            log.error("sentinel guard (pid %d) is gone: %s", self._proc.pid, exc)

    def close(self) -> None:
        """Nothing left to guard: EOF ends the guard, which has no group left to kill."""
        self._told.clear()
        guard, self._proc = self._proc, None
        if guard is None:
            return
        for pipe in (guard.stdin, guard.stdout):
            try:
                pipe.close()
            except OSError:
                pass
        try:
            guard.wait(timeout=_CLOSE_TIMEOUT)
        except subprocess.TimeoutExpired:
            guard.kill()
            guard.wait()
