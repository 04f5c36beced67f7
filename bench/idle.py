"""The idle cost of a synced pair watching a big tree, as CPU seconds of the primary's process.

A fresh pair (tests/pair.py, CURVE on, the product defaults of bench/replication.py) replicates
a tree of `--files` x 1 KiB files (100 to a folder, as the tree scenario's); once it is synced
and settled, nothing is written and the utime + stime of both processes (/proc/PID/stat) is
read at the start and the end of `--seconds`. CPU seconds, unlike a share of wall time, do not
grow when other work shares the cores; the share of one core is derived from them.

    python bench/idle.py                       # 100,000 files, 300 s idle window
    python bench/idle.py --files 20000 --seconds 30
    python bench/idle.py --node rescan_cycle=60  # any [node] key of sbs.ini
    python bench/idle.py --quick               # 5,000 files, 10 s: a smoke test

Prints one JSON line (and writes it to --out when given). The tree is made under --data
(default: a temp folder) and kept there with --keep for the next run.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.common import add_common_args, provenance, write_report  # noqa: E402
from bench.replication import NODE, SbsRun, kept_tree, say  # noqa: E402


def proc_cpu_seconds(pid: int) -> float:
    """utime + stime of a process, all threads, in seconds."""
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rpartition(")")[2].split()
    # fields[0] is the state (field 3 of proc(5)): utime and stime are fields 14 and 15
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--files", type=int, default=100_000)
    ap.add_argument("--seconds", type=float, default=300.0,
                    help="idle window (default: one rescan cycle at the defaults)")
    ap.add_argument("--node", action="append", default=[], metavar="KEY=VALUE",
                    help="an extra [node] key for both nodes (repeatable)")
    ap.add_argument("--data", type=Path, help="where the tree is made (kept with --keep)")
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--quick", action="store_true", help="5,000 files, 10 s: a smoke test")
    add_common_args(ap)
    args = ap.parse_args()
    if args.quick:
        args.files, args.seconds = 5_000, 10.0
    extra = dict(kv.split("=", 1) for kv in args.node)

    data = args.data or Path(tempfile.mkdtemp(prefix="sbs-idle-"))
    src = kept_tree(data, args.files)
    NODE.update(extra)  # SbsRun builds its pair from NODE
    try:
        with SbsRun(data / "run", src) as run:
            alpha = run.start_alpha()
            run.sync_beta(alpha["seq"])
            roles = run.settle()
            pids = {n: node.pid for n, node in run.pair.nodes.items()}
            c0, t0 = {n: proc_cpu_seconds(p) for n, p in pids.items()}, time.monotonic()
            say(f"synced; idle for {args.seconds:.0f} s ({roles['primary']} is primary)")
            time.sleep(args.seconds)
            c1, dt = {n: proc_cpu_seconds(p) for n, p in pids.items()}, time.monotonic() - t0
    finally:
        if not args.keep and args.data is None:
            shutil.rmtree(data, ignore_errors=True)
    cpu = {n: round(c1[n] - c0[n], 2) for n in c0}
    out = {"files": args.files, "node": dict(NODE), "idle_seconds": round(dt, 1),
           "primary": roles["primary"], "cpu_s": cpu,
           "pct_of_one_core": {n: round(100 * s / dt, 2) for n, s in cpu.items()},
           "loadavg_at_end": os.getloadavg(), "provenance": provenance(args.run_id)}
    out["quick"] = args.quick
    print(json.dumps(out))
    if args.out:
        write_report(out, args.out, args.result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
