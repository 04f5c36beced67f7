"""The sentinels: the services the primary runs, each a child process of the node.

One Sentinels object belongs to the node loop (a single thread) and is only ever called from it.
Nothing here blocks for long except stop_all(), which is bounded by the grace time (the node's
loop uses begin_stop_all() and stop_done(), which do not block): stop() and
configure() only send SIGTERM, and poll() escalates to SIGKILL once the grace time is over.

A sentinel never outlives its node (SPEC 9): the kernel SIGKILLs it when the node dies
(PR_SET_PDEATHSIG), and each one leads its own process group so a stop reaches everything it
started. PDEATHSIG reaches only the direct child, so what a sentinel starts itself (a shell
script's commands, a pre-forking server's workers) is covered by a guard process: it learns each
sentinel's group over a pipe and SIGKILLs the groups still listed when the pipe reaches EOF,
which the kernel brings about when the node dies, however it dies. The same guard holds when
the node does not: the node confirms its primacy with each heartbeat (confirm()), and a node
that is paused, stuck or starved past that deadline has its sentinels stopped by the guard
before the peer can take over (node/guard.py); the node learns it on its next turn and starts
nothing until it calls run() again (the guard's pipe is node/guardlink.py). Pids and start times
are kept in state_dir so the next run can clean up leftovers (node/sentinelpids.py).

What leaves the group (a daemon's setsid(), a double fork) is found in /proc (node/proctree.py,
node/sentinelproc.py) and stopped with the group: at each stop (SIGTERM, SIGKILL after the
grace, and a stop is done only once it is gone too), when the main process exits (a daemon's
parent does: SIGKILL, as for the rest of its group, before it is started again), by the guard
(the node tells it of each such process at each confirm()) and by the next run. What is being
stopped, until nothing of it is left, is node/stopping.py's.
"""

from __future__ import annotations

import itertools
import logging
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from . import proctree
from .fdio import LIBC
from .guardlink import GuardLink
from .protocol import SENTINEL_NAME_RE
from .sentinelpids import PIDS_FILE, PidsFile, start_ticks
from .sentinelproc import Child, describe, start_process
from .stopping import Stopping

__all__ = ["PIDS_FILE", "Sentinels"]  # PIDS_FILE: where the pid file lives, for its readers

log = logging.getLogger(__name__)

# How often a loop with children being stopped should come back to reap them.
_STOPPING_POLL = 0.1
# 2**30 times backoff_start is beyond any sane backoff_max; capping the exponent keeps a
# sentinel that has crashed for days from overflowing the float.
_MAX_EXPONENT = 30


@dataclass
class _Sentinel:
    command: str
    child: Child | None = None
    due: float | None = None  # monotonic time of a scheduled (re)start
    restarts: int = 0
    quick_exits: int = 0  # consecutive exits after a run shorter than stable_after
    last_exit: int | None = None  # Popen convention: negative means killed by that signal


class Sentinels:
    """Starts, watches, restarts and stops the sentinels. See the module docstring."""

    def __init__(
        self,
        state_dir: Path,
        *,
        grace: float = 5.0,
        on_event: Callable[[dict], None] | None = None,
        backoff_start: float = 0.5,
        backoff_max: float = 30.0,
        fail_report_after: int = 5,
        stable_after: float = 10.0,
        guard_kill_after: float = 0.25,
    ) -> None:
        self._state_dir = Path(state_dir)
        self._grace = grace
        self._on_event = on_event
        self._backoff_start = backoff_start
        self._backoff_max = backoff_max
        self._fail_report_after = fail_report_after
        self._stable_after = stable_after
        self._sentinels: dict[str, _Sentinel] = {}
        self._active: set[str] = set()
        self._stopping = Stopping(self._scan, self._stopped)  # what is being stopped
        self._running = False
        self._pids = PidsFile(self._state_dir)
        self._guard = GuardLink(guard_kill_after, self._children, lambda: self._deadline)
        # monotonic time until which the node vouches for the sentinels (confirm()); None: no
        # deadline (the node never confirmed: nothing to hold it to)
        self._deadline: float | None = None
        self.lapses = 0
        # Resolved here, before any fork: the child between fork and exec must do as little as
        # possible (the node has other threads, whose locks a forked child may find held).
        self._prctl = LIBC.prctl
        self._serial = itertools.count(1)  # each run's mark (sentinelproc.py) is its own
        self._last_pid: int | None = None  # proctree.last_pid() at confirm()'s last look

    @property
    def pids_error(self) -> str:
        """Why the pid file could not be written last time ("" if it was)."""
        return self._pids.error

    # -- configuration -------------------------------------------------------------------------

    def configure(self, definitions: dict[str, str]) -> None:
        """Set the name -> command line table. A removed or changed running sentinel is stopped;
        a changed one is started again with its new command once the old process is gone."""
        for name in definitions:
            if not SENTINEL_NAME_RE.fullmatch(name):  # a log file name: it must stay in logs/
                raise ValueError(f"invalid sentinel name {name!r}: use letters, digits, _ . -")
        for name in list(self._sentinels):
            if name not in definitions:
                self._terminate(name)
                del self._sentinels[name]
        for name, command in definitions.items():
            sentinel = self._sentinels.get(name)
            if sentinel is None:
                self._sentinels[name] = _Sentinel(command)
            elif sentinel.command != command:
                sentinel.command = command
                sentinel.quick_exits = 0
                self._terminate(name)
        self._start_wanted()
        self._sync_pids_file()

    def set_active(self, names: Iterable[str]) -> None:
        """Replace the active list. Names need not be defined yet (the list replicates on its
        own). In running mode the change applies at once."""
        self._active = set(names)
        for name, sentinel in self._sentinels.items():
            if name not in self._active:
                sentinel.due = None
                self._terminate(name)
        self._start_wanted()
        self._sync_pids_file()

    @property
    def active(self) -> list[str]:
        return sorted(self._active)

    # -- running mode --------------------------------------------------------------------------

    def confirm(self, until: float) -> bool:
        """The node vouches for the sentinels until `until` (monotonic): the guard stops them
        then unless it hears again. False when the last deadline has already passed while they
        ran (the node was paused or starved): they are being stopped, and stay so until run()."""
        if self._running and self._expired(time.monotonic()):
            self._lapse()
            return False
        self._deadline = until
        if running := [s.child for s in self._sentinels.values() if s.child]:
            # the guard hears of a daemon before a pause can stop us; a look at every process
            # costs ~10 us each, so it is skipped while no process started (proctree.last_pid)
            # and none of theirs moved to another group
            last = proctree.last_pid()
            if last is None or last != self._last_pid or any(c.moved() for c in running):
                self._scan(running)
                self._last_pid = last
        self._guard.vouch(until)
        return True

    def run(self) -> None:
        """Enter running mode: start every active, defined sentinel that is not running."""
        if self._expired(time.monotonic()):
            self._lapse()
            return
        self._running = True
        self._start_wanted()
        self._sync_pids_file()

    def stop_all(self, grace: float | None = None,
                 tick: Callable[[], None] | None = None) -> None:
        """Leave running mode and stop every sentinel: SIGTERM to each process group, SIGKILL to
        what is left after `grace` seconds. Blocks, but never much longer than `grace`; calls
        `tick` about every 20 ms meanwhile. The node's loop uses begin_stop_all() and
        stop_done() instead, so that it keeps answering while a sentinel drains."""
        tick = tick or (lambda: None)
        self.begin_stop_all(grace)
        while not self.stop_done():
            tick()
            time.sleep(0.02)  # polling the children, bounded by the grace and reap deadlines

    def begin_stop_all(self, grace: float | None = None) -> None:
        """Leave running mode and send SIGTERM to every sentinel; returns at once. stop_done()
        finishes the job (SIGKILL after `grace`)."""
        grace = self._grace if grace is None else grace
        self._check_guard()  # a node back from a pause says what the guard did meanwhile
        self._running = False
        for name, sentinel in self._sentinels.items():
            sentinel.due = None
            self._terminate(name, grace)
        self._stopping.kill_all_at(time.monotonic() + grace)
        self._sync_pids_file()

    def stop_done(self) -> bool:
        """Non-blocking, after begin_stop_all(): reap what has exited, SIGKILL what outlived
        its grace; True once nothing is left (or what is left survived SIGKILL for a while)."""
        if not self._stopping.done():
            return False
        self._sync_pids_file()
        if not self._stopping:
            self._guard.close()
        return True

    def start(self, name: str) -> None:
        """Activate `name`, and start it now when in running mode."""
        sentinel = self._get(name)
        self._active.add(name)
        sentinel.quick_exits = 0  # an operator asked: give it a fresh backoff
        if self._running and sentinel.child is None:
            self._launch(name)
        self._sync_pids_file()

    def stop(self, name: str) -> None:
        """Deactivate `name` and stop its process (SIGTERM now, SIGKILL from poll() later)."""
        sentinel = self._get(name)
        self._active.discard(name)
        sentinel.due = None
        self._terminate(name)
        self._sync_pids_file()

    # -- the loop's side -----------------------------------------------------------------------

    def poll(self) -> None:
        """Non-blocking: reap exited children, schedule restarts, start the due ones."""
        self._check_guard()
        if self._pids.error:
            self._pids.forget()  # write it again
        self._stopping.reap()
        now = time.monotonic()
        for name, sentinel in self._sentinels.items():
            child = sentinel.child
            if child is not None and child.has_exited():
                sentinel.child = None
                self._scan([child])
                self._guard.drop_group(child.popen.pid)
                code = sentinel.last_exit = child.reap()
                ran_for = now - child.started
                log.warning(
                    "sentinel %s (pid %d) exited with %s after %.1f s",
                    name, child.popen.pid, code, ran_for,
                )
                self._stopping.left_behind(child)
                self._emit("exited", name, pid=child.popen.pid, code=code)
                if self._wanted(name):
                    self._schedule_restart(name, ran_for)
        for name, sentinel in self._sentinels.items():
            if sentinel.due is not None and sentinel.due <= now and self._wanted(name):
                self._launch(name)
        self._sync_pids_file()

    def next_wakeup(self) -> float | None:
        """Monotonic time when poll() next has timed work, else None. Exits of running children
        are not timed events: the loop should also call poll() on its regular turns."""
        times = [
            s.due for name, s in self._sentinels.items()
            if s.due is not None and self._wanted(name) and not self._stopping.of(name)
        ]
        # a stopping child is reaped (and its successor started) promptly this way
        times.extend(self._stopping.next_times(time.monotonic() + _STOPPING_POLL))
        return min(times, default=None)

    def status(self) -> list[dict]:
        result = []
        for name in sorted(self._sentinels):
            sentinel = self._sentinels[name]
            result.append({
                "name": name,
                "command": sentinel.command,
                "active": name in self._active,
                "state": _state(sentinel, self._fail_report_after),
                "pid": sentinel.child.popen.pid if sentinel.child else None,
                # what left its group (a daemon), as of the last heartbeat: stopped with it
                "outside_group": sentinel.child.outside_group() if sentinel.child else [],
                "restarts": sentinel.restarts,
                "last_exit": sentinel.last_exit,
            })
        return result

    def cleanup_leftovers(self) -> list[int]:
        """At node start: SIGKILL every process recorded by a previous run of this node that is
        still alive and provably the same process (same boot, same start time). Returns them."""
        killed = self._pids.kill_leftovers()
        self._sync_pids_file()
        if killed:
            log.warning("killed %d leftover sentinel process(es) of a previous run: %s",
                        len(killed), killed)
        return killed

    # -- internals -----------------------------------------------------------------------------

    def _get(self, name: str) -> _Sentinel:
        try:
            return self._sentinels[name]
        except KeyError:
            defined = ", ".join(sorted(self._sentinels)) or "none"
            raise ValueError(f"unknown sentinel {name!r} (defined: {defined})") from None

    def _wanted(self, name: str) -> bool:
        return self._running and name in self._active and name in self._sentinels

    def _start_wanted(self) -> None:
        for name in sorted(self._sentinels):
            sentinel = self._sentinels[name]
            if self._wanted(name) and sentinel.child is None and sentinel.due is None:
                self._launch(name)

    def _launch(self, name: str) -> None:
        """Start `name` now, or as soon as its previous process is gone: never two at once."""
        sentinel = self._sentinels[name]
        if self._stopping.of(name):
            sentinel.due = time.monotonic()
            return
        sentinel.due = None
        self._spawn(name)

    def _spawn(self, name: str) -> None:
        sentinel = self._sentinels[name]
        log_path = self._state_dir / "logs" / f"{name}.log"
        try:
            mark = f"{os.getpid()}.{name}.{next(self._serial)}"
            popen = start_process(sentinel.command, log_path, self._prctl, mark)
        except (OSError, ValueError, subprocess.SubprocessError) as exc:
            log.error("sentinel %s cannot start (%s): %s", name, sentinel.command, exc)
            sentinel.last_exit = None
            self._emit("exited", name, error=str(exc))
            self._schedule_restart(name, ran_for=0.0)
            return
        sentinel.child = Child(name, popen, time.monotonic(), start_ticks(popen.pid), mark)
        self._guard.add_group(popen.pid)
        log.info("sentinel %s started (pid %d): %s", name, popen.pid, sentinel.command)
        self._emit("started", name, pid=popen.pid)

    def _schedule_restart(self, name: str, ran_for: float) -> None:
        sentinel = self._sentinels[name]
        if ran_for >= self._stable_after:
            sentinel.quick_exits = 0
            delay = self._backoff_start
        else:
            sentinel.quick_exits += 1
            exponent = min(sentinel.quick_exits - 1, _MAX_EXPONENT)
            delay = min(self._backoff_start * 2**exponent, self._backoff_max)
        sentinel.restarts += 1
        sentinel.due = time.monotonic() + delay
        self._emit("restarting", name, code=sentinel.last_exit, delay=delay)
        if sentinel.quick_exits == self._fail_report_after:
            log.error(
                "sentinel %s is failing: %d quick exits in a row (last exit %s), "
                "retrying every %.1f s at most", name, sentinel.quick_exits,
                sentinel.last_exit, self._backoff_max,
            )
            self._emit("failing", name, code=sentinel.last_exit, delay=delay)

    def _terminate(self, name: str, grace: float | None = None) -> None:
        """Send SIGTERM to the sentinel's process group; poll() or stop_all() finishes the job."""
        sentinel = self._sentinels.get(name)
        if sentinel is None or sentinel.child is None:
            return
        child, sentinel.child = sentinel.child, None
        grace = self._grace if grace is None else grace
        self._scan([child])
        escaped = child.signal_all(signal.SIGTERM)
        log.info("stopping sentinel %s (pid %d)%s", name, child.pid,
                 f" and what it started outside its group: {describe(escaped)}" if escaped
                 else "")
        self._stopping.add(child, time.monotonic() + grace)

    def _scan(self, children: list[Child]) -> None:
        """Bring each child's list of its other processes up to date (node/proctree.py)."""
        procs = proctree.snapshot()
        marked = proctree.marks(procs, os.getpid())
        mains = {c.pid for c in self._children()} | {c.pid for c in children}
        for child in children:
            child.scan(procs, marked, mains)
        self._guard.others()

    def _stopped(self, child: Child) -> None:
        """A stopped sentinel's main process exited: reaped, and said so."""
        self._guard.drop_group(child.popen.pid)
        code = child.reap()
        sentinel = self._sentinels.get(child.name)
        if sentinel is not None:
            sentinel.last_exit = code
        log.info("sentinel %s (pid %d) stopped: %s", child.name, child.popen.pid, code)
        self._emit("stopped", child.name, pid=child.popen.pid, code=code)

    def _expired(self, now: float) -> bool:
        return self._deadline is not None and now > self._deadline

    def _check_guard(self) -> None:
        """Before anything is reaped or restarted: did the deadline pass, by our clock or the
        guard's (it says "F" when it stopped the groups)?"""
        fired = self._guard.fired()
        if self._running and (fired or self._expired(time.monotonic())):
            self._lapse()

    def _lapse(self) -> None:
        """The node's primacy went unconfirmed past the deadline: stop everything now (the guard
        did or does the same) and start nothing until the node calls run() again."""
        late = time.monotonic() - (self._deadline or time.monotonic())
        self._running = False
        self._deadline = None
        self.lapses += 1
        for name, sentinel in self._sentinels.items():
            sentinel.due = None
            self._terminate(name, self._guard.kill_after)
        log.error("primacy unconfirmed for %.2f s past the guard's deadline (paused, stuck or "
                  "starved): sentinels stopped", late)
        self._emit("lapsed", "", late=round(late, 3))

    def _children(self) -> list[Child]:
        return [s.child for s in self._sentinels.values() if s.child] + self._stopping.children

    def _emit(self, event: str, name: str, *, pid: int | None = None, code: int | None = None,
              delay: float | None = None, **extra: object) -> None:
        if self._on_event is None:
            return
        message = {"event": event, "name": name, "pid": pid, "code": code, "delay": delay}
        message.update(extra)
        try:
            self._on_event(message)
        except Exception:  # a broken listener must not break supervision
            log.exception("sentinel event listener failed on %s", message)

    def _sync_pids_file(self) -> None:
        """Rewrite state_dir/sentinels.pids.json when the set of live children changed."""
        children = self._children()
        self._pids.sync([(c.name, c.pid, c.start_ticks, True) for c in children if not c.reaped]
                        + [(c.name, p.pid, p.ticks, False) for c in children
                           for p in c.live_others if p.pgid != c.pid])


def _state(sentinel: _Sentinel, fail_report_after: int) -> str:
    if sentinel.child is not None:
        return "running"
    if sentinel.due is not None and sentinel.quick_exits >= fail_report_after:
        return "failing"
    return "stopped" if sentinel.due is None else "backoff"
