"""Time from `kill -9` of the primary node to its sentinel answering on the new primary.

Runs a real pair (tests/pair.py: two sbs-node processes on 127.0.0.1 and 127.0.0.2, CURVE on)
in a temp dir with one sentinel: a tiny TCP server that answers every connection with its own
pid and its parent's pid. The parent is the node that launched it, so an answer naming the
surviving node proves the service runs there; the old sentinel must be gone too, since it
holds the port (PDEATHSIG). Each run waits until the pair has settled, then a random 1-3
heartbeats more (so the kill lands at a random phase of the heartbeat, as a crash would),
kills the current primary with SIGKILL, polls the port every few milliseconds until the new
primary's sentinel answers, then restarts the killed node (it rejoins as secondary).

    python bench/sentinel_takeover.py                 # 10 runs, default and aggressive timing
    python bench/sentinel_takeover.py --runs 30 --setting 0.2:1.0
"""
from __future__ import annotations

import argparse
import os
import random
import shutil
import signal
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.pair import Pair, wait_for  # noqa: E402

SENTINEL = """\
import os, socket, sys
srv = socket.create_server(("127.0.0.1", int(sys.argv[1])))
while True:
    conn, _ = srv.accept()
    with conn:
        conn.sendall(f"{os.getpid()} {os.getppid()}\\n".encode())
"""

SETTINGS = {"default": (0.5, 1.5), "aggressive": (0.1, 0.4)}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def ask(port: int) -> tuple[int, int] | None:
    """(sentinel pid, its parent's pid), or None when nothing answers."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2) as sock:
            data = sock.recv(64)
        pid, ppid = data.split()
        return int(pid), int(ppid)
    except (OSError, ValueError):
        return None


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[-1].split()[0] not in ("Z", "X")


def settled(primary, secondary) -> bool:
    p, s = primary.status(0.5), secondary.status(0.5)
    return bool(p and s and p["state"] == "primary" and s["state"] == "secondary"
                and p["peer_state"] == "secondary" and s["peer_state"] == "primary"
                and s["active_sentinels"] == ["svc"] and s["replication"]["synced"])


def bench(root: Path, heartbeat: float, dead_after: float, runs: int) -> list[float]:
    root.mkdir(parents=True)
    script = root / "sentinel.py"
    script.write_text(SENTINEL)
    while True:  # the sentinel's port must not be one of the node's three
        port = free_port()
        pair = Pair(root, node={"heartbeat": heartbeat, "dead_after": dead_after},
                    sentinels={"svc": f"{sys.executable} {script} {port}"})
        if port not in range(pair.port, pair.port + 3):
            break
    times: list[float] = []
    try:
        primary, secondary = pair.alpha, pair.beta
        primary.start()
        primary.wait_state("primary")
        secondary.start()
        for run in range(1, runs + 1):
            wait_for(lambda p=primary, s=secondary: settled(p, s), 30, "a settled pair")
            # Not synchronisation: `settled` turns true just as a ping arrives, so killing at
            # once would always kill right after a heartbeat (the worst case). A crash comes at
            # any moment: put the kill at a random phase of the heartbeat.
            time.sleep(random.uniform(heartbeat, 3 * heartbeat))
            before = wait_for(lambda: ask(port), 10, "the sentinel on the primary")
            if before[1] != primary.pid:
                raise RuntimeError(f"sentinel answers from pid {before[1]}, not the primary")
            killed = time.monotonic()
            os.kill(primary.pid, signal.SIGKILL)
            deadline = killed + dead_after + 10
            while True:
                answer = ask(port)
                if answer is not None and answer[1] == secondary.pid:
                    took = time.monotonic() - killed
                    break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"run {run}: no sentinel on {secondary.name} within "
                                       f"{deadline - killed:.1f}s{secondary.tail_log()}")
                time.sleep(0.002)  # the polling interval of the measurement
            primary.wait_exit(10)
            if alive(before[0]):
                raise RuntimeError(f"run {run}: the old sentinel {before[0]} outlived its node")
            times.append(took)
            print(f"  run {run:3d}: {primary.name} killed, sentinel on {secondary.name} after "
                  f"{took * 1000:7.1f} ms", flush=True)
            primary.start()  # rejoins as secondary
            primary, secondary = secondary, primary
    finally:
        pair.stop()
    return times


def summary(name: str, heartbeat: float, dead_after: float, times: list[float]) -> str:
    ms = sorted(t * 1000 for t in times)
    return (f"{name:10} heartbeat {heartbeat:g}s dead_after {dead_after:g}s: "
            f"min {ms[0]:.0f} ms  p50 {statistics.median(ms):.0f} ms  max {ms[-1]:.0f} ms  "
            f"({len(ms)} runs; p50 - dead_after = {statistics.median(ms) - dead_after * 1000:.0f}"
            f" ms)")


def parse_setting(text: str) -> tuple[str, float, float]:
    if text in SETTINGS:
        return (text, *SETTINGS[text])
    try:
        heartbeat, dead_after = (float(x) for x in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r}: use default, aggressive or HEARTBEAT:DEAD_AFTER") from None
    return text, heartbeat, dead_after


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=10, help="kills per setting (default 10)")
    parser.add_argument("--setting", type=parse_setting, action="append",
                        help="default, aggressive or HEARTBEAT:DEAD_AFTER (repeatable; "
                             "default: default and aggressive)")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (node logs)")
    args = parser.parse_args()
    settings = args.setting or [parse_setting("default"), parse_setting("aggressive")]
    tmp = Path(tempfile.mkdtemp(prefix="sbs-bench-"))
    lines = []
    try:
        for i, (name, heartbeat, dead_after) in enumerate(settings):
            print(f"{name}: heartbeat {heartbeat:g}s, dead_after {dead_after:g}s, "
                  f"{args.runs} runs", flush=True)
            times = bench(tmp / f"s{i}", heartbeat, dead_after, args.runs)
            lines.append(summary(name, heartbeat, dead_after, times))
            print(lines[-1], flush=True)
    finally:
        if args.keep:
            print(f"logs kept in {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    print("\nkill -9 of the primary -> sentinel answering on the new primary:")
    for line in lines:
        print("  " + line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
