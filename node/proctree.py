"""What a sentinel started, wherever it went: its processes outside its own process group.

A sentinel leads a process group of its own and os.killpg reaches what stays in it. A process
that calls setsid() or setpgid() (a daemon does) leaves the group, and one whose parent exits
(a double fork) is reparented: before this module such processes outlived every stop. Two
things keep them in reach:
- the node is a child subreaper (become_subreaper()), so an orphan below it becomes the node's
  child instead of init's: it stays in the node's tree of processes;
- each sentinel starts with MARK=<its own value> in its environment, which its descendants
  inherit whatever session or group they move to.
A sentinel's processes (members()) are its descendants, every process below the node that
carries its mark, what was seen as its before and is still the same process, and all their
descendants. Linux only (/proc); elsewhere nothing is found and killpg does what it can.
"""
from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass

MARK = "SBS_SENTINEL"  # the environment variable that carries a sentinel's mark
_PR_SET_CHILD_SUBREAPER = 36  # from <linux/prctl.h>


@dataclass(frozen=True)
class Proc:
    pid: int
    ppid: int
    pgid: int
    sid: int
    zombie: bool
    ticks: int  # start time after boot: tells this process apart from a later one with its pid
    comm: str

    def describe(self) -> str:
        return f"pid {self.pid} ({self.comm}, session {self.sid})"


def boot_id() -> str:
    """This boot's id (Linux); "" where there is none, which no recorded id matches."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return ""


def become_subreaper(prctl: Callable[..., int] | None) -> bool:
    """Make this process the reaper of its orphaned descendants (Linux 3.4+): the node's."""
    return prctl is not None and prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0


def snapshot() -> dict[int, Proc]:
    """Every process of the machine, from /proc/<pid>/stat (about 10 us a process)."""
    procs: dict[int, Proc] = {}
    try:
        entries = os.listdir("/proc")
    except OSError:
        return procs
    for entry in entries:
        if entry.isdigit() and (proc := read(int(entry))) is not None:
            procs[proc.pid] = proc
    return procs


def last_pid() -> int | None:
    """The pid most recently given to a process or thread on this machine (/proc/loadavg), or
    None. Unchanged since a snapshot: no process has started since, so none can have left a
    sentinel's group by a fork (what a daemon does) — one that already was a sentinel's is
    known by its pid and start time."""
    try:
        fd = os.open("/proc/loadavg", os.O_RDONLY)
        try:
            return int(os.read(fd, 256).split()[4])
        finally:
            os.close(fd)
    except (OSError, IndexError, ValueError):
        return None


def read(pid: int) -> Proc | None:
    try:  # os.open and os.read: half the time of open(), for every process at each look
        fd = os.open(f"/proc/{pid}/stat", os.O_RDONLY)
        try:
            stat = os.read(fd, 4096).decode("utf-8", "replace")
        finally:
            os.close(fd)
    except OSError:
        return None
    # the command name (field 2) may hold spaces and parentheses: split after the last ')'
    head, _, tail = stat.rpartition(")")
    fields = tail.split()
    try:
        return Proc(pid, int(fields[1]), int(fields[2]), int(fields[3]), fields[0] in "ZX",
                    int(fields[19]), head.partition("(")[2])
    except (IndexError, ValueError):
        return None


def descendants(procs: dict[int, Proc], roots: Iterable[int]) -> set[int]:
    """The processes below `roots` (not the roots themselves)."""
    children: dict[int, list[int]] = {}
    for proc in procs.values():
        children.setdefault(proc.ppid, []).append(proc.pid)
    found: set[int] = set()
    todo = list(roots)
    while todo:
        for kid in children.get(todo.pop(), ()):
            if kid not in found:
                found.add(kid)
                todo.append(kid)
    return found


def marks(procs: dict[int, Proc], node: int) -> dict[int, str]:
    """pid -> the MARK in its environment (as it was at its exec), for each live process below
    `node` that has one."""
    prefix = f"{MARK}=".encode()
    found = {}
    for pid in descendants(procs, [node]):
        if procs[pid].zombie:
            continue
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                environ = f.read()
        except OSError:
            continue
        for entry in environ.split(b"\0"):
            if entry.startswith(prefix):
                found[pid] = entry[len(prefix):].decode("utf-8", "replace")
    return found


def members(procs: dict[int, Proc], main: int, mark: str, known: dict[int, Proc],
            node: int, marked: dict[int, str]) -> dict[int, Proc]:
    """The sentinel's processes besides `main` (see the module docstring); `known` is what
    was found before, kept while the same process holds its pid; `marked` is marks()."""
    roots = {main} if main in procs else set()
    roots |= {pid for pid, proc in known.items()
              if pid in procs and procs[pid].ticks == proc.ticks}
    roots |= {pid for pid, value in marked.items() if value == mark and pid in procs}
    found = (roots | descendants(procs, roots)) - {main}
    # an orphan that has already exited shows no environment: a zombie child of the node in
    # the session of one of the sentinel's processes is one of its own, to be reaped
    sessions = {main} | {procs[pid].sid for pid in found}
    found |= {proc.pid for proc in procs.values()
              if proc.ppid == node and proc.zombie and proc.sid in sessions and proc.pid != main}
    return {pid: procs[pid] for pid in found}


def reap(pid: int) -> bool:
    """Collect an adopted child that has exited. False when it is not (or no longer) ours."""
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        return False
    return done == pid


def signal_each(procs: Iterable[Proc], sig: int) -> None:
    """Send `sig` to each live process that still is what the snapshot saw (same start time)."""
    for proc in procs:
        if proc.zombie:
            continue
        now = read(proc.pid)
        if now is None or now.ticks != proc.ticks:
            continue
        try:
            os.kill(proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass
