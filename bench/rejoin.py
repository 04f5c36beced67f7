"""A failover cycle of a synced pair over a big tree: what the new primary's first scan and the
old primary's rejoin cost, with the hash cache on disk (node/hashstore.py) and without it.

A pair (tests/pair.py, CURVE on, the defaults of bench/replication.py) replicates a tree of
`--files` x 1 KiB (100 to a folder) and settles. Then each rep runs, in a rotating order:

- ``sbs_cached`` / ``sbs_uncached``: `kill -9` of the primary; the survivor takes over and
  scans (``ready_s``: from the kill until its status says primary with its first scan done;
  ``scan_s``: the part after it became primary); the killed node is started again and timed
  until it is a synced secondary (``rejoin_s``, from its start). Before ``sbs_uncached`` both
  nodes' ``state_dir/hashes`` are removed (the survivor's before the kill, the other's before
  its restart): every file is read again, as before the cache. The roles swap each cycle.
- ``rsync_quick`` / ``rsync_checksum``: what an rsync-based pair pays to confirm the same,
  unchanged tree after downtime: `rsync -a` (size and mtime only) and `rsync -ac` (reads and
  checksums every file on both ends) from the daemon into a copy made before the reps.

Each cycle also records both nodes' agreed-state journals (``journal_mb_before``: the size of
each ``state_dir/agreed.jsonl`` before the kill, in MB): a rejoin of an unchanged tree should
leave them as they were, not append the whole tree again.

Both folders are read right before every clock (warm page cache for all four): on a cold
cache a read costs disk time too, which only the runs that read pay.

    python bench/rejoin.py                 # 100,000 files, 5 reps (~8 min)
    python bench/rejoin.py --files 20000 --reps 3
    python bench/rejoin.py --quick         # 5,000 files, 2 reps: a smoke test

rsync comes from Debian's packages (`apt-get install rsync`); without it the rsync rows are
left out and the bench says so. Prints a table and writes JSON (--out, --result).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.common import (  # noqa: E402
    OUT,
    add_common_args,
    fmt_spread,
    provenance,
    spread,
    write_report,
)
from bench.replication import (  # noqa: E402
    NODE,
    RsyncDaemon,
    SbsRun,
    kept_tree,
    read_source,
    same_tree,
    say,
)
from tests.pair import wait_for  # noqa: E402

FIRST_SCAN = re.compile(r"first scan: (\d+) file\(s\), (\d+) read and hashed")
SNAPSHOT = re.compile(r"snapshot \d+: (\d+) file\(s\) to fetch; (\d+) of the (\d+) file\(s\) "
                      r"here read")


def cpu_s(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def last_match(log: Path, pattern: re.Pattern[str], after: int) -> tuple[int, ...] | None:
    """The numbers of the last line matching pattern written past byte `after` of the log."""
    with open(log, "rb") as fh:
        fh.seek(after)
        text = fh.read().decode(errors="replace")
    found = pattern.findall(text)
    return tuple(int(x) for x in found[-1]) if found else None


def cycle(run: SbsRun, cached: bool, timeout: float = 600) -> dict[str, Any]:
    """One failover: kill -9 the primary, time the survivor to ready, restart the other and
    time it to a synced secondary."""
    roles = run.settle()
    prim, sec = run.pair.nodes[roles["primary"]], run.pair.nodes[roles["secondary"]]
    journal = {n: round((node.cfg.state_dir / "agreed.jsonl").stat().st_size / 1e6, 2)
               for n, node in sorted(run.pair.nodes.items())}
    if not cached:
        shutil.rmtree(sec.cfg.state_dir / "hashes", ignore_errors=True)
    for name in ("alpha", "beta"):
        read_source(run.folder_of(name))
    sec_log0 = sec.log.stat().st_size
    c0 = cpu_s(sec.pid)
    t0 = time.perf_counter()
    prim.kill()
    marks: dict[str, float] = {}

    def ready() -> bool:
        st = run.polls[sec.name].status()
        now = time.perf_counter()
        if st and st["state"] == "primary":
            marks.setdefault("primary_s", now - t0)
            if st["replication"]["ready"]:
                marks["ready_s"], marks["seq"] = now - t0, st["replication"]["seq"]
                return True
        return False

    wait_for(ready, timeout, f"{sec.name} to take over and scan{sec.tail_log()}", interval=0.02)
    took_over_cpu = cpu_s(sec.pid) - c0
    scan = last_match(sec.log, FIRST_SCAN, sec_log0)
    if not cached:
        shutil.rmtree(prim.cfg.state_dir / "hashes", ignore_errors=True)
    read_source(run.folder_of(prim.name))
    prim_log0 = prim.log.stat().st_size
    t1 = time.perf_counter()
    prim.start()

    def rejoined() -> bool:
        st = run.polls[prim.name].status()
        if st and st["state"] == "secondary":
            r = st["replication"]
            return bool(r["synced"] and r["applied"] >= marks["seq"])
        if prim.proc.poll() is not None:
            raise RuntimeError(f"{prim.name} exited{prim.tail_log()}")
        return False

    wait_for(rejoined, timeout, f"{prim.name} to rejoin{prim.tail_log()}", interval=0.02)
    rejoin_s = time.perf_counter() - t1
    rejoin_cpu = cpu_s(prim.pid)
    snap = last_match(prim.log, SNAPSHOT, prim_log0)
    return {"killed": prim.name, "ready_s": round(marks["ready_s"], 3),
            "scan_s": round(marks["ready_s"] - marks["primary_s"], 3),
            "takeover_cpu_s": round(took_over_cpu, 2),
            "scan_files": scan[0] if scan else None, "scan_read": scan[1] if scan else None,
            "rejoin_s": round(rejoin_s, 3), "rejoin_cpu_s": round(rejoin_cpu, 2),
            "journal_mb_before": journal,
            "rejoin_fetched": snap[0] if snap else None,
            "rejoin_read": snap[1] if snap else None}


def rsync_check(daemon: RsyncDaemon, dest: Path, src: Path, *extra: str) -> dict[str, Any]:
    read_source(src)
    read_source(dest)
    r = daemon.pull("tree", dest, *extra)
    return {"seconds": r["seconds"], "cpu_s": round(r["client_cpu_s"] + r["daemon_cpu_s"], 2)}


def med(rows: list[dict[str, Any]], key: str) -> float:
    vals = [r[key] for r in rows if r.get(key) is not None]
    return statistics.median(vals) if vals else float("nan")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--files", type=int, default=100_000)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--data", type=Path, help="where the tree is made (kept with --keep)")
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--out", type=Path, default=OUT / "rejoin.json")
    ap.add_argument("--quick", action="store_true", help="5,000 files, 2 reps: a smoke test")
    add_common_args(ap)
    args = ap.parse_args()
    if args.quick:
        args.files, args.reps = 5_000, 2
    data = args.data or Path(tempfile.mkdtemp(prefix="sbs-rejoin-"))
    src = kept_tree(data, args.files)
    rsync = shutil.which("rsync")
    if rsync is None:
        say("rsync is not installed (Debian: apt-get install rsync): its rows are left out")
    daemon = RsyncDaemon(data / "rsyncd", {"tree": src}) if rsync else None
    copy = data / "rsync-copy"
    res: dict[str, list[dict[str, Any]]] = {"sbs_cached": [], "sbs_uncached": []}
    try:
        if daemon is not None:
            shutil.rmtree(copy, ignore_errors=True)
            daemon.pull("tree", copy)  # the copy the checks confirm, made before the clocks
            res.update(rsync_quick=[], rsync_checksum=[])
        with SbsRun(data / "run", src) as run:
            run.start_alpha()
            run.sync_beta(run.polls["alpha"].status()["replication"]["seq"])
            # both nodes' caches are on disk before the first cycle (a cached cycle needs them)
            for name in ("alpha", "beta"):
                path = run.pair.nodes[name].cfg.state_dir / "hashes" / "docs.jsonl"
                wait_for(lambda p=path: p.exists() and p.stat().st_size > args.files * 50, 120,
                         f"{name}'s hash cache on disk")
            jobs = {
                "sbs_cached": lambda: cycle(run, True),
                "sbs_uncached": lambda: cycle(run, False),
                "rsync_quick": lambda: rsync_check(daemon, copy, src),
                "rsync_checksum": lambda: rsync_check(daemon, copy, src, "-c"),
            }
            names = list(res)
            for rep in range(args.reps):
                k = rep % len(names)
                order = names[k:] + names[:k]
                say(f" rep {rep + 1}/{args.reps}: {', '.join(order)}")
                for pos, name in enumerate(order):
                    r = jobs[name]()
                    r.update(rep=rep, position=pos)
                    res[name].append(r)
                    shown = {k: v for k, v in r.items() if k not in ("rep", "position")}
                    say(f"  {name:15} {json.dumps(shown)}")
            run.settle()
            differs = same_tree(run.folder_of("alpha"), run.folder_of("beta"))
    finally:
        if daemon is not None:
            daemon.stop()
        if not args.keep and args.data is None:
            shutil.rmtree(data, ignore_errors=True)
    c, u = res["sbs_cached"], res["sbs_uncached"]
    summary: dict[str, Any] = {
        key: {"cached": spread([r[key] for r in c]), "uncached": spread([r[key] for r in u]),
              "cached_over_uncached": round(med(c, key) / med(u, key), 3)}
        for key in ("scan_s", "ready_s", "takeover_cpu_s", "rejoin_s", "rejoin_cpu_s")}
    summary["journal_mb_before"] = spread([mb for r in c + u
                                           for mb in r["journal_mb_before"].values()])
    if "rsync_quick" in res:
        q, s = res["rsync_quick"], res["rsync_checksum"]
        summary["rsync"] = {"quick_s": spread([r["seconds"] for r in q]),
                            "checksum_s": spread([r["seconds"] for r in s]),
                            "quick_cpu_s": spread([r["cpu_s"] for r in q]),
                            "checksum_cpu_s": spread([r["cpu_s"] for r in s])}
        summary["rejoin_cached_over_rsync_quick"] = round(med(c, "rejoin_s")
                                                          / med(q, "seconds"), 3)
        summary["rejoin_uncached_over_rsync_checksum"] = round(med(u, "rejoin_s")
                                                               / med(s, "seconds"), 3)
    out = {"files": args.files, "reps": args.reps, "node": dict(NODE), "order": "rotating",
           "replicas_identical": not differs, "differs": differs, **res, "summary": summary,
           "quick": args.quick, "provenance": provenance(args.run_id)}
    say(f"{args.files} files, {args.reps} reps; median (min-max, n)      cached | uncached")
    for key, label in (("scan_s", "new primary's first scan, s"),
                       ("ready_s", "kill -9 to ready, s"),
                       ("takeover_cpu_s", "survivor's CPU to ready, s"),
                       ("rejoin_s", "old primary's rejoin, s"),
                       ("rejoin_cpu_s", "its CPU to synced, s")):
        row = summary[key]
        say(f"  {label:28} {fmt_spread(row['cached'])} | {fmt_spread(row['uncached'])}"
            f"  ratio {row['cached_over_uncached']}")
    say(f"  agreed.jsonl before each kill, MB  {fmt_spread(summary['journal_mb_before'])}"
        " (both nodes)")
    if "rsync" in summary:
        say(f"  rsync -a of the unchanged tree, s  {fmt_spread(summary['rsync']['quick_s'])}; "
            f"rsync -ac {fmt_spread(summary['rsync']['checksum_s'])}")
    if differs:
        say(f"REPLICA DIFFERS: {differs}")
    write_report(out, args.out, args.result)
    return 1 if differs else 0


if __name__ == "__main__":
    sys.exit(main())
