"""The node's end of the sentinel guard (node/guard.py): the pipe that tells it each sentinel's
process group and the primacy deadline, and the line on which it says it stopped them.

Used by Sentinels only, from the node's loop. The guard is started on the first group it must
know of and ends on EOF (close()); a guard that died is started again with every live group.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from collections.abc import Callable, Iterable
from pathlib import Path

log = logging.getLogger(__name__)

_GUARD_SCRIPT = Path(__file__).with_name("guard.py")  # run as a script: see node/guard.py
# How long to wait for the guard to end after EOF.
_CLOSE_TIMEOUT = 1.0


class GuardLink:
    """The guard process and its two pipes. See the module docstring."""

    def __init__(self, kill_after: float) -> None:
        self.kill_after = kill_after  # the guard's grace between SIGTERM and SIGKILL
        self._proc: subprocess.Popen | None = None

    @property
    def started(self) -> bool:
        return self._proc is not None

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

    def tell(self, line: str, *, known: Callable[[], Iterable[str]],
             deadline: float | None) -> None:
        """Send one line to the guard, starting it first if need be (with `deadline` and the
        lines for every live group and process, `known()`, so a guard that was restarted
        knows them all)."""
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
            head = "" if deadline is None else f"D{deadline:.6f}\n"
            line = head + "".join(f"{known_line}\n" for known_line in known()) + line
        try:
            self._proc.stdin.write(f"{line}\n".encode())
            self._proc.stdin.flush()
        except OSError as exc:
            log.error("sentinel guard (pid %d) is gone: %s", self._proc.pid, exc)

    def close(self) -> None:
        """Nothing left to guard: EOF ends the guard, which has no group left to kill."""
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
