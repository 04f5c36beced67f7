"""Time from `kill -9` or SIGTERM of the primary node to its sentinel answering on the new primary.

Runs a real pair (tests/pair.py: two sbs-node processes on 127.0.0.1 and 127.0.0.2, CURVE on)
in a temp dir with one sentinel: a tiny TCP server that answers every connection with its own
pid and its parent's pid. The parent is the node that launched it, so an answer naming the
surviving node proves the service runs there; the old sentinel must be gone too, since it
holds the port (PDEATHSIG). Each run waits until the pair has settled, then a random 1-3
heartbeats more (so the kill lands at a random phase of the heartbeat, as a crash would),
kills the current primary with SIGKILL, polls the port every few milliseconds until the new
primary's sentinel answers, then restarts the killed node (it rejoins as secondary).

The same with SIGTERM (`--how term`): the primary finishes its last sync, stops its sentinel
and tells the peer to take over at once (a hand-over, no dead_after); and with `promote` sent to
the secondary (`--how promote`: the same hand-over, asked by the secondary; the old primary
stays up as secondary). Measured from the signal:
the old sentinel gone (the port stops answering from the old node), the peer primary (its own
clock: `in_state_for` in its status), and the new sentinel answering; the figure of interest is
"old sentinel gone -> peer primary", the hand-over itself.

    python bench/sentinel_takeover.py                 # 10 runs each: kill, term and promote,
                                                      # default and aggressive timing (~4 min)
    python bench/sentinel_takeover.py --quick         # 3 runs each
    python bench/sentinel_takeover.py --runs 30 --setting 0.2:1.0 --how kill

Writes bench/out/sentinel_takeover.json (--out; --result NAME keeps it in bench/results/).
"""
from __future__ import annotations

import argparse
import os
import platform
import random
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import common  # noqa: E402
from tests.pair import Pair, wait_for  # noqa: E402
from tools.client import request  # noqa: E402

HOWS = {"kill": signal.SIGKILL, "term": signal.SIGTERM, "promote": None}

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


def watch(port: int, old_node: int, new_node: int, deadline: float) -> dict[str, float]:
    """Poll the sentinel's port every ~2 ms from now: when the old node's sentinel stopped
    answering, and when the new node's first answered (monotonic times)."""
    seen: dict[str, float] = {}
    while True:
        answer = ask(port)
        now = time.monotonic()
        if "old_gone" not in seen and (answer is None or answer[1] != old_node):
            seen["old_gone"] = now
        if answer is not None and answer[1] == new_node:
            seen["new_answers"] = now
            return seen
        if now > deadline:
            return seen
        time.sleep(0.002)  # the polling interval of the measurement


def bench(root: Path, heartbeat: float, dead_after: float, runs: int,
          how: str) -> list[dict[str, float]]:
    root.mkdir(parents=True)
    script = root / "sentinel.py"
    script.write_text(SENTINEL)
    while True:  # the sentinel's port must not be one of the node's three
        port = free_port()
        pair = Pair(root, node={"heartbeat": heartbeat, "dead_after": dead_after},
                    sentinels={"svc": f"{sys.executable} {script} {port}"})
        if port not in range(pair.port, pair.port + 3):
            break
    results: list[dict[str, float]] = []
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
            sent = time.monotonic()
            if how == "promote":
                # in a thread: the reply may wait for the hand-over, the port is watched now
                threading.Thread(target=request, daemon=True, kwargs={"timeout": 30},
                                 args=(secondary.cfg, "PROMOTE", {"force": False})).start()
            else:
                os.kill(primary.pid, HOWS[how])
            seen = watch(port, primary.pid, secondary.pid, sent + dead_after + 15)
            if "new_answers" not in seen:
                raise RuntimeError(f"run {run}: no sentinel on {secondary.name} within "
                                   f"{dead_after + 15:.1f}s{secondary.tail_log()}")
            st = secondary.status(1.0)
            asked = time.monotonic()
            if not st or st["state"] != "primary":
                raise RuntimeError(f"run {run}: {secondary.name}'s sentinel runs but its status "
                                   f"says {st and st['state']}")
            # from the node's own clock: in_state_for is rounded to 1 ms, the reply's trip
            # adds its latency (under 1 ms here)
            became_primary = asked - st["in_state_for"]
            if how == "promote":  # the old primary stays up, as secondary
                code = None
                wait_for(lambda pid=before[0]: not alive(pid), 10, "the old sentinel to be reaped")
            else:
                code = primary.wait_exit(20)
            if alive(before[0]):
                raise RuntimeError(f"run {run}: the old sentinel {before[0]} outlived its node")
            r = {"run": run, "stopped": primary.name, "exit_code": code,
                 "to_new_sentinel_ms": round((seen["new_answers"] - sent) * 1e3, 2),
                 "to_peer_primary_ms": round((became_primary - sent) * 1e3, 2),
                 "to_old_sentinel_gone_ms": round((seen["old_gone"] - sent) * 1e3, 2),
                 "old_sentinel_gone_to_peer_primary_ms":
                     round((became_primary - seen["old_gone"]) * 1e3, 2),
                 "peer_primary_to_new_sentinel_ms":
                     round((seen["new_answers"] - became_primary) * 1e3, 2)}
            results.append(r)
            print(f"  run {run:3d}: {primary.name} {how}, sentinel gone after "
                  f"{r['to_old_sentinel_gone_ms']:7.1f} ms, {secondary.name} primary after "
                  f"{r['to_peer_primary_ms']:7.1f} ms, its sentinel answers after "
                  f"{r['to_new_sentinel_ms']:7.1f} ms", flush=True)
            if how != "promote":
                primary.start()  # rejoins as secondary
            primary, secondary = secondary, primary
    finally:
        pair.stop()
    return results


FIGURES = ("to_new_sentinel_ms", "to_peer_primary_ms", "to_old_sentinel_gone_ms",
           "old_sentinel_gone_to_peer_primary_ms", "peer_primary_to_new_sentinel_ms")


def summarize(runs: list[dict[str, float]]) -> dict[str, dict]:
    return {k: common.spread([r[k] for r in runs], 2) for k in FIGURES}


def summary_line(name: str, how: str, heartbeat: float, dead_after: float,
                 figures: dict[str, dict]) -> str:
    what = {"kill": "kill -9", "term": "SIGTERM", "promote": "promote"}[how]
    line = (f"{name:10} {what:7} heartbeat {heartbeat:g}s dead_after {dead_after:g}s: "
            f"-> new sentinel {common.fmt_spread(figures['to_new_sentinel_ms'], ' ms', 0)}")
    if how != "kill":
        line += ("; old sentinel gone -> peer primary "
                 f"{common.fmt_spread(figures['old_sentinel_gone_to_peer_primary_ms'], ' ms', 1)}")
    return line


def parse_setting(text: str) -> tuple[str, float, float]:
    if text in SETTINGS:
        return (text, *SETTINGS[text])
    try:
        heartbeat, dead_after = (float(x) for x in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r}: use default, aggressive or HEARTBEAT:DEAD_AFTER") from None
    return text, heartbeat, dead_after


def parse_hows(text: str) -> list[str]:
    hows = text.split(",")
    if not hows or any(h not in HOWS for h in hows):
        raise argparse.ArgumentTypeError(f"{text!r}: a comma-separated list of kill, term, "
                                         "promote")
    return hows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=10, help="runs per setting (default 10)")
    parser.add_argument("--quick", action="store_true", help="3 runs per setting: a smoke run")
    parser.add_argument("--setting", type=parse_setting, action="append",
                        help="default, aggressive or HEARTBEAT:DEAD_AFTER (repeatable; "
                             "default: default and aggressive)")
    parser.add_argument("--how", type=parse_hows, default=["kill", "term", "promote"],
                        help="kill, term, promote, comma-separated (default: all three): kill -9 "
                             "or SIGTERM of the primary, or `promote` of the secondary")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (node logs)")
    parser.add_argument("--out", type=Path, default=common.OUT / "sentinel_takeover.json")
    common.add_common_args(parser)
    args = parser.parse_args()
    if args.quick:
        args.runs = min(args.runs, 3)
    settings = args.setting or [parse_setting("default"), parse_setting("aggressive")]
    report: dict[str, Any] = {
        "bench": "sentinel_takeover", "provenance": common.provenance(args.run_id),
        "host": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "args": {"runs": args.runs, "quick": args.quick, "how": args.how},
        "poll_interval_ms": 2, "results": []}
    tmp = Path(tempfile.mkdtemp(prefix="sbs-bench-"))
    lines = []
    started = time.monotonic()
    try:
        for i, (name, heartbeat, dead_after) in enumerate(settings):
            for how in args.how:
                print(f"{name} ({how}): heartbeat {heartbeat:g}s, dead_after {dead_after:g}s, "
                      f"{args.runs} runs", flush=True)
                runs = bench(tmp / f"s{i}-{how}", heartbeat, dead_after, args.runs, how)
                figures = summarize(runs)
                report["results"].append({"setting": name, "heartbeat": heartbeat,
                                          "dead_after": dead_after, "how": how,
                                          "summary_ms": figures, "runs": runs})
                lines.append(summary_line(name, how, heartbeat, dead_after, figures))
                print(lines[-1], flush=True)
    finally:
        if args.keep:
            print(f"logs kept in {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    report["seconds"] = round(time.monotonic() - started, 1)
    print("\nthe primary stopped -> its sentinel answering on the new primary, median (range):")
    for line in lines:
        print("  " + line)
    written = common.write_report(report, args.out, args.result)
    print(f"run {report['provenance']['run_id']}: wrote {', '.join(map(str, written))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
