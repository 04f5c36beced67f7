"""Takeover time and false takeovers of a real pair (127.0.0.1 / 127.0.0.2, CURVE on).

Part 1, takeover time: for each setting, start a pair, then `--runs` times: kill -9 the primary,
poll the survivor's status every 10 ms until it says "primary" (kill -> primary as a client sees
it), restart the killed node and wait until both nodes see each other as primary/secondary again.
The kill comes at a random moment 1-3 heartbeats after the pair is linked: killing at once would
always hit just after a heartbeat (the rejoin itself exchanges one) and always measure the
worst case, dead_after, instead of a crash at a random phase.

Part 2, false takeovers: for each setting, start a pair, saturate every core with busy-loop
processes at normal priority for `--load-seconds`, and watch both nodes' status (epoch, state,
how long since each last heard its peer) with nobody killed. Any epoch change is a takeover that
should not have happened; a missed status answer (none within 1 s) is counted too.

    python bench/takeover.py            # the full run (~5 minutes on 2 cores)
    python bench/takeover.py --quick    # smoke check (~1 minute)

Prints a table and writes bench/out/takeover.json.
"""
from __future__ import annotations

import argparse
import os
import platform
import random
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import add_common_args, provenance, write_report  # noqa: E402
from tests.pair import NodeProc, Pair, wait_for  # noqa: E402

SETTINGS = {
    "default": {"heartbeat": 0.5, "dead_after": 1.5},
    "aggressive": {"heartbeat": 0.1, "dead_after": 0.4},
}
POLL = 0.01  # status poll interval while waiting for the takeover
WATCH = 0.1  # status poll interval of each node during the load
MISSED_AFTER = 1.0  # a status request unanswered this long counts as missed


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of a non-empty list."""
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(q / 100 * len(ordered) + 0.5)))
    return ordered[rank - 1]


def summary(values: list[float]) -> dict[str, float] | None:
    if not values:
        return None
    return {"n": len(values), "min": min(values), "p50": statistics.median(values),
            "p90": percentile(values, 90), "max": max(values)}


def loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process from /proc, in seconds (0 when it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def machine_busy() -> tuple[int, int]:
    """(busy, total) jiffies of all cores since boot, from /proc/stat."""
    try:
        values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return (0, 0)
    idle = values[3] + (values[4] if len(values) > 4 else 0)  # idle + iowait
    return (sum(values) - idle, sum(values))


def own_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def linked(primary: NodeProc, secondary: NodeProc) -> bool:
    """Both nodes up and each seeing the other in the complementary role."""
    p, s = primary.status(0.5), secondary.status(0.5)
    return bool(p and s and p["state"] == "primary" and s["state"] == "secondary"
                and p["peer_state"] == "secondary" and s["peer_state"] == "primary")


def start_pair(root: Path, setting: dict[str, float]) -> tuple[Pair, NodeProc, NodeProc]:
    """alpha first (it becomes primary), then beta (secondary); returns (pair, primary, sec)."""
    pair = Pair(root, node=dict(setting))
    pair.alpha.start()
    pair.alpha.wait_state("primary", timeout=20)
    pair.beta.start()
    pair.beta.wait_state("secondary", timeout=20)
    wait_for(lambda: linked(pair.alpha, pair.beta), 20, "alpha and beta to see each other")
    return pair, pair.alpha, pair.beta


# ---------------------------------------------------------------------------- part 1
def one_takeover(primary: NodeProc, survivor: NodeProc, setting: dict[str, float]
                 ) -> dict[str, Any]:
    dead_after = setting["dead_after"]
    deadline_s = 4 * dead_after + 5
    time.sleep(random.uniform(1, 3) * setting["heartbeat"])  # a random phase, not a sync
    t_kill = time.monotonic()
    os.kill(primary.pid, signal.SIGKILL)
    result: dict[str, Any] = {"killed": primary.name, "survivor": survivor.name,
                              "takeover": None, "node_side": None, "polls": 0, "missed": 0}
    next_poll = t_kill
    while True:
        st = survivor.status(timeout=0.25)
        now = time.monotonic()
        result["polls"] += 1
        if st is None:
            result["missed"] += 1
        elif st["state"] == "primary":
            result["takeover"] = now - t_kill
            # when the node itself switched, from its own clock (excludes our polling delay)
            result["node_side"] = max(0.0, now - st["in_state_for"] - t_kill)
            result["epoch"] = st["epoch"]
            break
        if now - t_kill > deadline_s:
            break
        next_poll += POLL
        time.sleep(max(0.0, next_poll - time.monotonic()))
    primary.wait_exit(10)
    return result


def takeover_runs(root: Path, name: str, setting: dict[str, float], runs: int) -> dict[str, Any]:
    dead_after = setting["dead_after"]
    results: list[dict[str, Any]] = []
    pair, primary, secondary = start_pair(root, setting)
    try:
        for i in range(runs):
            r = one_takeover(primary, secondary, setting)
            t_restart = time.monotonic()
            primary.start()
            if r["takeover"] is not None:
                try:
                    wait_for(lambda p=secondary, s=primary: linked(p, s), 4 * dead_after + 20,
                             f"{primary.name} to rejoin as secondary")
                    r["rejoin"] = time.monotonic() - t_restart
                except AssertionError as exc:
                    r["error"] = str(exc)
            else:
                r["error"] = f"no takeover by {secondary.name} within the deadline"
            results.append(r)
            shown = "TIMEOUT" if r["takeover"] is None else f"{r['takeover']:.3f}s"
            print(f"  {name:10} run {i + 1:2}/{runs}: {r['killed']} killed, {r['survivor']}"
                  f" primary after {shown}", flush=True)
            if "error" in r:
                print(f"  ! {r['error']}; starting a fresh pair", flush=True)
                pair.stop()
                pair, primary, secondary = start_pair(root / f"retry{i}", setting)
            else:
                primary, secondary = secondary, primary
    finally:
        pair.stop()
    times = [r["takeover"] for r in results if r["takeover"] is not None]
    node_side = [r["node_side"] for r in results if r["node_side"] is not None]
    rejoin = [r["rejoin"] for r in results if "rejoin" in r]
    return {
        **setting, "runs": results, "failures": sum(1 for r in results if "error" in r),
        "takeover": summary(times), "node_side": summary(node_side), "rejoin": summary(rejoin),
        "ratio": summary([t / dead_after for t in times]),
    }


# ---------------------------------------------------------------------------- part 2
def start_hogs(n: int) -> list[subprocess.Popen]:
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]


def stop_hogs(hogs: list[subprocess.Popen]) -> None:
    for h in hogs:
        if h.poll() is None:
            h.kill()
    for h in hogs:
        try:
            h.wait(5)
        except subprocess.TimeoutExpired:
            pass


def log_size(node: NodeProc) -> int:
    try:
        return node.log.stat().st_size
    except OSError:
        return 0


def log_lines_since(node: NodeProc, offset: int, needle: str) -> list[str]:
    try:
        with open(node.log, "rb") as fh:
            fh.seek(offset)
            text = fh.read().decode(errors="replace")
    except OSError:
        return []
    return [line for line in text.splitlines() if needle in line]


def false_takeovers(root: Path, name: str, setting: dict[str, float],
                    seconds: float) -> dict[str, Any]:
    pair, primary, secondary = start_pair(root, setting)
    nodes = [primary, secondary]
    hogs: list[subprocess.Popen] = []
    try:
        last = {n.name: n.status(1.0) for n in nodes}
        first_epoch = {k: v["epoch"] for k, v in last.items()}
        offsets = {n.name: log_size(n) for n in nodes}
        stats: dict[str, Any] = {
            n.name: {"missed": 0, "answers": 0, "state_changes": [], "max_last_heard": 0.0,
                     "latency": []} for n in nodes}
        dual_primary = 0
        ncpu = os.cpu_count() or 2
        node_cpu0 = {n.name: cpu_seconds(n.pid) for n in nodes}
        self_cpu0 = own_cpu()
        busy0 = machine_busy()
        hogs = start_hogs(ncpu)
        t0 = time.monotonic()
        end = t0 + seconds
        next_poll = t0
        while time.monotonic() < end:
            states = {}
            for n in nodes:
                t = time.monotonic()
                st = n.status(MISSED_AFTER)
                s = stats[n.name]
                if st is None:
                    s["missed"] += 1
                    states[n.name] = "no answer"
                    continue
                s["answers"] += 1
                s["latency"].append(time.monotonic() - t)
                heard = st["peer"]["last_heard"]
                if heard is not None:
                    s["max_last_heard"] = max(s["max_last_heard"], heard)
                prev = last[n.name]
                if (st["state"], st["epoch"]) != (prev["state"], prev["epoch"]):
                    change = {"at": round(time.monotonic() - t0, 3), "from": prev["state"],
                              "to": st["state"], "epoch": [prev["epoch"], st["epoch"]]}
                    s["state_changes"].append(change)
                    print(f"  ! {name}: {n.name} {change}", flush=True)
                last[n.name] = st
                states[n.name] = st["state"]
            if list(states.values()).count("primary") == 2:
                dual_primary += 1
            next_poll += WATCH
            time.sleep(max(0.0, next_poll - time.monotonic()))
        wall = time.monotonic() - t0
        hog_cpu = sum(cpu_seconds(h.pid) for h in hogs)
        node_cpu = {n.name: round(cpu_seconds(n.pid) - node_cpu0[n.name], 2) for n in nodes}
        self_cpu = round(own_cpu() - self_cpu0, 2)
        busy1 = machine_busy()
        machine_share = (busy1[0] - busy0[0]) / max(1, busy1[1] - busy0[1])
        stop_hogs(hogs)
        load_end = loadavg()
        # after the load: still one primary, one secondary?
        try:
            wait_for(lambda: linked(primary, secondary) or linked(secondary, primary), 15,
                     "one primary and one secondary after the load")
            settled = True
        except AssertionError:
            settled = False
        final = {n.name: n.status(1.0) for n in nodes}
        takeovers = sum(
            (final[k]["epoch"] if final[k] else last[k]["epoch"]) - first_epoch[k] for k in last)
        silences = {n.name: len(log_lines_since(n, offsets[n.name], "silent for")) for n in nodes}
        for s in stats.values():
            lat = s.pop("latency")
            s["status_latency"] = summary(lat)
            s["max_last_heard"] = round(s["max_last_heard"], 3)
        return {
            **setting, "seconds": round(wall, 1), "hogs": len(hogs),
            "hog_cpu_share": round(hog_cpu / (wall * ncpu), 3),
            "machine_busy_share": round(machine_share, 3),
            "node_cpu_seconds": node_cpu, "bench_cpu_seconds": self_cpu,
            "loadavg_end": load_end,
            "takeovers": takeovers,  # epoch increments: every becoming-primary counts one
            "role_changes": sum(len(s["state_changes"]) for s in stats.values()),
            "dual_primary_samples": dual_primary,
            "missed": sum(s["missed"] for s in stats.values()),
            "peer_silent_logged": silences,
            "max_silence": max(s["max_last_heard"] for s in stats.values()),
            "settled": settled,
            "nodes": stats,
        }
    finally:
        stop_hogs(hogs)
        pair.stop()


# ---------------------------------------------------------------------------- report
def fmt(d: dict[str, float] | None, key: str, scale: float = 1.0) -> str:
    return "-" if not d else f"{d[key] * scale:.3f}"


def print_table(report: dict[str, Any]) -> None:
    print()
    print("takeover: kill -9 of the primary -> survivor's status says primary (seconds)")
    print(f"{'setting':11}{'hb':>5}{'dead':>6}{'runs':>6}{'fail':>5}{'min':>8}{'p50':>8}"
          f"{'p90':>8}{'max':>8}   ratio p50/max   node-side p50   rejoin p50")
    for name, r in report["takeover"].items():
        t, ratio = r["takeover"], r["ratio"]
        print(f"{name:11}{r['heartbeat']:>5}{r['dead_after']:>6}{len(r['runs']):>6}"
              f"{r['failures']:>5}{fmt(t, 'min'):>8}{fmt(t, 'p50'):>8}{fmt(t, 'p90'):>8}"
              f"{fmt(t, 'max'):>8}   {fmt(ratio, 'p50')}/{fmt(ratio, 'max'):<9}"
              f"{fmt(r['node_side'], 'p50'):>11}{fmt(r['rejoin'], 'p50'):>13}")
    print()
    print("false takeovers: both nodes up, every core busy with another process"
          " (busy: all cores, hogs: the busy loops' share)")
    print(f"{'setting':11}{'hb':>5}{'dead':>6}{'secs':>6}{'busy':>6}{'hogs':>6}{'takeovers':>11}"
          f"{'role chg':>10}{'2 prim':>8}{'missed':>8}{'max silence':>13}{'status p90':>12}")
    for name, r in report["false_takeover"].items():
        p90 = max((s["status_latency"]["p90"] for s in r["nodes"].values()
                   if s["status_latency"]), default=float("nan"))
        print(f"{name:11}{r['heartbeat']:>5}{r['dead_after']:>6}{r['seconds']:>6}"
              f"{r['machine_busy_share']:>6.0%}{r['hog_cpu_share']:>6.0%}{r['takeovers']:>11}{r['role_changes']:>10}"
              f"{r['dual_primary_samples']:>8}{r['missed']:>8}{r['max_silence']:>12.3f}s"
              f"{p90:>11.3f}s")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=20, help="kills per setting (default 20)")
    ap.add_argument("--load-seconds", type=float, default=60,
                    help="seconds of full CPU load per setting (default 60)")
    ap.add_argument("--quick", action="store_true", help="3 runs, 10 s of load: a smoke check")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "out" / "takeover.json")
    add_common_args(ap)
    args = ap.parse_args()
    if args.quick:
        args.runs, args.load_seconds = min(args.runs, 3), min(args.load_seconds, 10)

    report: dict[str, Any] = {
        "bench": "takeover", "provenance": provenance(args.run_id),
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                    "platform": platform.platform(), "loadavg_start": loadavg()},
        "args": {"runs": args.runs, "load_seconds": args.load_seconds, "quick": args.quick},
        "takeover": {}, "false_takeover": {},
    }
    work = Path(tempfile.mkdtemp(prefix="sbs-bench-takeover-"))
    keep = False
    started = time.monotonic()
    try:
        for name, setting in SETTINGS.items():
            print(f"takeover, {name} {setting}: {args.runs} runs", flush=True)
            r = takeover_runs(work / f"takeover-{name}", name, setting, args.runs)
            report["takeover"][name] = r
            keep |= r["failures"] > 0
        for name, setting in SETTINGS.items():
            print(f"false takeovers, {name} {setting}: {args.load_seconds:g}s of load on"
                  f" {os.cpu_count()} cores", flush=True)
            r = false_takeovers(work / f"load-{name}", name, setting, args.load_seconds)
            report["false_takeover"][name] = r
            keep |= bool(r["takeovers"] or r["role_changes"] or not r["settled"])
    finally:
        report["seconds"] = round(time.monotonic() - started, 1)
        if keep:
            print(f"logs kept in {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    print_table(report)
    written = write_report(report, args.out, args.result)
    print(f"\nrun {report['provenance']['run_id']}: wrote {', '.join(map(str, written))} "
          f"({report['seconds']}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
