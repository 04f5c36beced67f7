"""The sentinel guard: a small process beside each node that stops the node's sentinels when the
node no longer vouches for them.

The node runs it as `python -I -S guard.py KILL_AFTER` (its own session, so neither a signal to
the node nor the terminal reaches it) and writes lines to its stdin:

    +PGID     a sentinel's process group started
    -PGID     that group was reaped (its id may be reused from now on)
    *PID T    a process of a sentinel outside its group (one that called setsid(), a daemon):
              signalled with the groups while PID still has start time T (field 22 of
              /proc/PID/stat), so never a later process that got its pid
    ~PID      forget that process
    DWHEN     the node confirmed its primacy: keep the groups until WHEN, a time.monotonic()
              value (CLOCK_MONOTONIC, the same clock in every process of the machine)
    D-        no deadline (the sentinels are stopping anyway)

Two things end the sentinels without the node's help:
- the deadline passes (the node is paused, stuck or starved, or lost its lease): SIGTERM to
  every group and process, SIGKILL KILL_AFTER seconds later, and "F" on stdout so the node, if
  it ever runs again, knows; until a new deadline comes, a group that starts is killed at once;
- EOF on stdin, which the kernel brings about when the node dies however it dies: SIGKILL to
  every group and process still listed (what a sentinel started itself is not reached by
  PDEATHSIG).

Only the standard library, and nothing imported from the node: it starts in milliseconds and
keeps working whatever state the node's interpreter is in.
"""
import os
import select
import signal
import sys
import time


class Guard:
    def __init__(self, kill_after: float, out=None):
        self.kill_after = kill_after
        self.out = out
        self.groups: set[int] = set()
        self.procs: dict[int, int] = {}  # pid -> start time
        self.deadline: float | None = None
        self.kill_at: float | None = None
        self.fired = False

    def line(self, text: str) -> None:
        kind, arg = text[:1], text[1:].strip()
        try:
            if kind == "+":
                pgid = int(arg)
                self.groups.add(pgid)
                if self.fired:  # started after the deadline, before a new confirmation
                    self._signal({pgid}, signal.SIGKILL)
            elif kind == "-":
                self.groups.discard(int(arg))
            elif kind == "*":
                pid, ticks = arg.split()
                self.procs[int(pid)] = int(ticks)
                if self.fired:
                    self._signal(set(), signal.SIGKILL, {int(pid): int(ticks)})
            elif kind == "~":
                self.procs.pop(int(arg), None)
            elif kind == "D":
                self.deadline = None if arg == "-" else float(arg)
                self.fired = False
        except ValueError:
            pass  # a torn line: the next one will be whole

    def next_wakeup(self) -> float | None:
        times = [t for t in (self.deadline, self.kill_at) if t is not None]
        return min(times, default=None)

    def tick(self, now: float) -> None:
        if self.deadline is not None and now >= self.deadline:
            late = now - self.deadline
            self.deadline, self.fired = None, True
            if self.groups or self.procs:
                self._signal(self.groups, signal.SIGTERM, self.procs)
                self.kill_at = now + self.kill_after
            if self.out is not None:
                try:
                    self.out.write(f"F {late:.3f}\n".encode())
                    self.out.flush()
                except OSError:
                    pass
        if self.kill_at is not None and now >= self.kill_at:
            self.kill_at = None
            self._signal(self.groups, signal.SIGKILL, self.procs)

    def eof(self) -> None:
        self._signal(self.groups, signal.SIGKILL, self.procs)

    @staticmethod
    def _signal(groups: set[int], sig: int, procs: dict[int, int] | None = None) -> None:
        for pgid in list(groups):
            try:
                os.killpg(pgid, sig)
            except OSError:
                pass
        for pid, ticks in list((procs or {}).items()):
            if start_ticks(pid) == ticks:
                try:
                    os.kill(pid, sig)
                except OSError:
                    pass


def start_ticks(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return int(f.read().rsplit(b")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def main(argv: list[str]) -> None:
    guard = Guard(float(argv[1]) if len(argv) > 1 else 0.25, out=sys.stdout.buffer)
    fd = sys.stdin.fileno()
    pending = b""
    while True:
        wake = guard.next_wakeup()
        timeout = None if wake is None else max(0.0, wake - time.monotonic())
        if select.select([fd], [], [], timeout)[0]:
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            # lines first: a deadline the node sent before the old one passed still counts,
            # even if this process was itself too starved to read it in time
            *lines, pending = (pending + chunk).split(b"\n")
            for raw in lines:
                guard.line(raw.decode("ascii", "replace"))
        guard.tick(time.monotonic())
    guard.eof()


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    main(sys.argv)
