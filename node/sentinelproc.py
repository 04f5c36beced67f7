"""One run of one sentinel: its main process and everything it started (node/proctree.py finds
what left its process group), started, signalled and reaped from the node's loop.

The main process leads a process group of its own (start_new_session), dies with the node
(PR_SET_PDEATHSIG), and carries a mark in its environment that its descendants inherit.
"""
from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import shlex
import signal
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from . import proctree
from .proctree import Proc

log = logging.getLogger("sbs.node.sentinels")

_PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>


@dataclass
class Child:
    name: str
    popen: subprocess.Popen
    started: float  # monotonic
    # Field 22 of /proc/<pid>/stat: tells this process apart from a later one with the same pid.
    start_ticks: int | None
    mark: str = ""  # proctree.MARK's value in its environment
    kill_at: float | None = None  # monotonic; set when SIGTERM was sent, cleared after SIGKILL
    # its other processes as last seen, and the signal each was last sent
    others: dict[int, Proc] = field(default_factory=dict)
    signalled: dict[int, int] = field(default_factory=dict)

    @property
    def pid(self) -> int:
        return self.popen.pid

    @property
    def reaped(self) -> bool:
        return self.popen.returncode is not None

    @property
    def live_others(self) -> list[Proc]:
        return [proc for proc in self.others.values() if not proc.zombie]

    def moved(self) -> bool:
        """One of its other processes has left the group or session it was seen in (a setsid()
        after the last look, which starts no process: proctree.last_pid() misses it)."""
        for proc in self.live_others:
            now = proctree.read(proc.pid)
            if now is not None and now.ticks == proc.ticks and (now.pgid, now.sid) != (
                    proc.pgid, proc.sid):
                return True
        return False

    def outside_group(self) -> list[int]:
        return sorted(p.pid for p in self.live_others if p.pgid != self.pid)

    def has_exited(self) -> bool:
        """True once the main process has exited, without reaping it: while it is an unreaped
        zombie its pid, and so its process group id, cannot be reused, so reap() can still
        signal the group."""
        if self.reaped:
            return True
        try:
            info = os.waitid(os.P_PID, self.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:
            return True
        return info is not None

    def reap(self) -> int:
        """SIGKILL whatever the main process left in its group, then collect its exit status."""
        self.signal_group(signal.SIGKILL)
        return self.popen.wait()

    def signal_group(self, sig: signal.Signals) -> None:
        if self.reaped:
            return  # reaped: the group id may belong to someone else now
        try:
            os.killpg(self.pid, sig)
        except ProcessLookupError:
            pass
        except PermissionError as exc:
            log.error("cannot signal sentinel %s (pid %d): %s", self.name, self.pid, exc)

    def scan(self, procs: dict[int, Proc], marked: dict[int, str], exclude: set[int]) -> None:
        """Find its other processes in `procs` (`marked`: proctree.marks()), and reap those the
        node adopted and that have exited. `exclude`: every sentinel's main process (Popen
        reaps those)."""
        found = proctree.members(procs, self.pid, self.mark, self.others, os.getpid(), marked)
        for pid in exclude & found.keys():
            del found[pid]
        for proc in list(found.values()):
            if proc.zombie and proc.ppid == os.getpid() and proctree.reap(proc.pid):
                del found[proc.pid]
        self.others = found

    def signal_all(self, sig: signal.Signals) -> list[Proc]:
        """`sig` to its group and to each of its other live processes; returns those outside
        its group that had not had `sig` before (for the log)."""
        self.signal_group(sig)
        return self.signal_others(sig)

    def signal_others(self, sig: signal.Signals) -> list[Proc]:
        """`sig` to each of its other live processes that has not had it yet (one started
        since the last signal): returns those of them outside its group."""
        targets = [p for p in self.live_others if self.signalled.get(p.pid) != sig]
        proctree.signal_each(targets, sig)
        for proc in targets:
            self.signalled[proc.pid] = sig
        return [p for p in targets if p.pgid != self.pid]

def describe(procs: list[Proc]) -> str:
    return ", ".join(proc.describe() for proc in procs)


def start_process(command: str, log_path: Path, prctl: Callable[..., int],
                  mark: str) -> subprocess.Popen:
    """Start one sentinel's process: its own process group, killed when the node dies, its
    mark in its environment, its output appended to its log."""
    argv = shlex.split(command)
    if not argv:
        raise ValueError("empty command line")
    with _open_log(log_path, command) as out:
        # PR_SET_PDEATHSIG fires when the *thread* that forked the child dies, not the
        # process: spawn only from the node's main thread (the loop), never a worker.
        return subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, proctree.MARK: mark},
            start_new_session=True,  # its own process group, for os.killpg
            preexec_fn=_die_with_parent(prctl, os.getpid()),
        )


@contextlib.contextmanager
def _open_log(path: Path, command: str) -> Iterator[Any]:
    """The sentinel's log file, opened for its output; DEVNULL when the state disk cannot take
    it (full): the service must start anyway, its output is what is lost."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        out = open(path, "ab", buffering=0)  # unbuffered: a failed write leaves nothing behind
    except OSError as exc:
        log.error("cannot open %s: %s: the sentinel's output is discarded", path, exc)
        yield subprocess.DEVNULL
        return
    with out:
        try:
            stamp = datetime.now(UTC).isoformat(timespec="seconds")
            out.write(f"--- {stamp} sbs starts: {command}\n".encode())
        except OSError as exc:
            log.error("cannot write to %s: %s", path, exc)
        yield out


def _die_with_parent(prctl: Callable[..., int], parent_pid: int) -> Callable[[], None]:
    """The preexec_fn: runs in the child between fork and exec, so it stays tiny."""

    def preexec() -> None:
        if prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
        # The parent may have died before prctl: then no signal will ever come.
        if os.getppid() != parent_pid:
            os._exit(1)

    return preexec
