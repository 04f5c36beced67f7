"""A sentinel that records its own life, and the check that two never overlapped.

The sentinel appends `start PID T`, then `tick PID T` every 20 ms, and `stop PID T` when it
stops on SIGTERM (T is CLOCK_MONOTONIC, the same clock for every process of the machine, so the
two nodes' sentinels compare directly). One killed by SIGKILL leaves no `stop`: its last tick
bounds its life to within 20 ms. Each node's copy has its own pid, and one node never runs two
at once, so any overlap of two pids' lives is the service running twice.
"""
from __future__ import annotations

import sys
from pathlib import Path

TICK = 0.02

_SCRIPT = """\
import os, signal, sys, time
record, mode = sys.argv[1], sys.argv[2]
fd = os.open(record, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
def rec(what):
    os.write(fd, f"{what} {os.getpid()} {time.monotonic():.4f}\\n".encode())
def stop(signum, frame):
    rec("stop")
    os._exit(0)
signal.signal(signal.SIGTERM, signal.SIG_IGN if mode == "stubborn" else stop)
rec("start")
while True:
    time.sleep(TICK)
    rec("tick")
""".replace("TICK", repr(TICK))


def recorder_command(folder: Path, record: Path, token: str, *, stubborn: bool = False) -> str:
    """The command line of a recording sentinel (`stubborn`: it ignores SIGTERM)."""
    script = folder / "recorder.py"
    if not script.exists():
        script.write_text(_SCRIPT)
    return f"{sys.executable} {script} {record} {'stubborn' if stubborn else 'polite'} {token}"


def lives(record: Path) -> dict[str, tuple[float, float]]:
    """pid -> (first start, last sign of life) as recorded."""
    spans: dict[str, list[float]] = {}
    try:
        text = record.read_text()
    except FileNotFoundError:
        return {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) != 3:
            continue  # a line being written
        _, pid, t = parts
        span = spans.setdefault(pid, [float(t), float(t)])
        span[0], span[1] = min(span[0], float(t)), max(span[1], float(t))
    return {pid: (a, b) for pid, (a, b) in spans.items()}


def overlaps(record: Path) -> list[tuple[str, str, float]]:
    """Every pair of lives that overlapped, with how long (seconds)."""
    spans = sorted(lives(record).items(), key=lambda item: item[1][0])
    found = []
    for i, (pid_a, (start_a, end_a)) in enumerate(spans):
        for pid_b, (start_b, end_b) in spans[i + 1:]:
            both = min(end_a, end_b) - max(start_a, start_b)
            if both > 0:
                found.append((pid_a, pid_b, round(both, 3)))
    return found


def starts(record: Path) -> int:
    return len(lives(record))
