"""The runs the README cites, all of them, on the code of one commit, kept in bench/results/.

    python bench/run_cited.py                 # everything (about 60-70 minutes on 2 cores)
    python bench/run_cited.py --dry-run       # the commands, not run
    python bench/run_cited.py --quick --allow-dirty   # smoke test of the sequence (~5 min)
    python bench/run_cited.py --only transport,takeover

Every bench gets the same run ID (UTC time, commit, '-dirty' for uncommitted code) and writes
bench/results/<run ID>/<name>.json (its figures, the command line and the commit) and
<name>.log (what it printed); manifest.json lists the commands, their exit codes and times.
Cite a figure as "run <run ID>, <name>.json". Uncommitted code is refused unless
--allow-dirty: a cited figure must come from a commit someone can check out.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import OUT, REPO, RESULTS, git_state, new_run_id  # noqa: E402

BENCHES = ("transport", "takeover", "sentinel_takeover", "never_twice", "replication", "idle",
           "rejoin", "fs_create", "replication_ext4")
# the benches that mount a fresh ext4 on a loop device: root only (left out otherwise, and said)
NEEDS_ROOT = ("fs_create", "replication_ext4")
RESULT_NAMES = {"replication_ext4": "replication-ext4"}  # the JSON bench/tables.py reads


def commands(run_id: str, only: list[str], replication_runs: int,
             quick: bool) -> list[tuple[str, list[str]]]:
    """(result name, argv) for each cited run, in the order they run: the transport limit on a
    machine left alone first, the replication runs (the longest) last. A --quick run is a
    smoke test of this very sequence and is not kept in bench/results/."""
    py = sys.executable
    out: list[tuple[str, list[str]]] = []
    for bench in only:
        names = ([f"replication-{i}" for i in range(1, replication_runs + 1)]
                 if bench == "replication" else [RESULT_NAMES.get(bench, bench)])
        script, extra = bench, []
        if bench == "replication_ext4":
            # the replication bench again with the copies on a fresh ext4 with its journal:
            # the initial syncs only (the big file and the latency do not depend on it)
            script, extra = "replication", ["--only", "small,tree", "--fresh-ext4", "8"]
        for name in names:
            argv = [py, f"bench/{script}.py", *extra, "--run-id", run_id,
                    "--out", f"bench/out/{run_id}/{name}.json"]
            if quick:
                argv += (["--files", "2000", "--reps", "1"] if bench == "fs_create"
                         else ["--quick"])
            else:
                argv += ["--result", f"{run_id}/{name}"]
            out.append((name, argv))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default=",".join(BENCHES),
                    help=f"comma-separated, from {', '.join(BENCHES)} (default: all)")
    ap.add_argument("--replication-runs", type=int, default=2,
                    help="full runs of bench/replication.py (default 2: a run-to-run spread)")
    ap.add_argument("--allow-dirty", action="store_true",
                    help="run on uncommitted code (the run ID says '-dirty')")
    ap.add_argument("--dry-run", action="store_true", help="print the commands only")
    ap.add_argument("--quick", action="store_true",
                    help="every bench with --quick: a smoke test of the sequence (minutes), "
                         "kept in bench/out/ only, never cited")
    args = ap.parse_args()
    only = [b for b in args.only.split(",") if b]
    if unknown := [b for b in only if b not in BENCHES]:
        ap.error(f"unknown bench {', '.join(unknown)}: use {', '.join(BENCHES)}")
    if os.geteuid() != 0 and (left := [b for b in only if b in NEEDS_ROOT]):
        print(f"left out, they mount a loop device and need root: {', '.join(left)} (the "
              f"README's fresh-ext4 table keeps the run it names)", file=sys.stderr)
        only = [b for b in only if b not in NEEDS_ROOT]
    git = git_state()
    if git["dirty"] and not args.allow_dirty and not args.dry_run:
        print(f"the code differs from commit {git['commit']} ({', '.join(git['dirty_files'])}):"
              " commit first, or --allow-dirty", file=sys.stderr)
        return 2
    run_id = new_run_id(git) + ("-quick" if args.quick else "")
    todo = commands(run_id, only, args.replication_runs, args.quick)
    for _, argv in todo:
        print(shlex.join(["python", *argv[1:]]))
    if args.dry_run:
        return 0
    folder = (OUT if args.quick else RESULTS) / run_id
    folder.mkdir(parents=True, exist_ok=True)
    manifest = {"run_id": run_id, "git": git, "python": sys.version.split()[0],
                "cpus": os.cpu_count(), "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                                     time.gmtime()),
                "runs": []}
    failed = 0
    for name, argv in todo:
        print(f"\n=== {name}: {shlex.join(['python', *argv[1:]])}", flush=True)
        t0 = time.monotonic()
        with open(folder / f"{name}.log", "wb") as log:
            # the bench's own output goes to the log and the terminal alike
            proc = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT)
            assert proc.stdout is not None
            for line in proc.stdout:
                log.write(line)
                sys.stdout.buffer.write(line)
                sys.stdout.flush()
            code = proc.wait()
        failed += code != 0
        manifest["runs"].append({"name": name, "command": shlex.join(["python", *argv[1:]]),
                                 "exit_code": code,
                                 "seconds": round(time.monotonic() - t0, 1),
                                 "json": f"{name}.json" if code == 0 else None})
        (folder / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    manifest["finished_utc"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    total = sum(r["seconds"] for r in manifest["runs"])
    print(f"\nrun {run_id}: {len(todo) - failed} of {len(todo)} benches done in {total:.0f} s "
          f"-> {folder.relative_to(REPO)}/")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
