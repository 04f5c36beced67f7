"""What every bench JSON carries so a figure can be traced to the run and the code behind it.

- `provenance()`: the exact command line, the git commit (`git rev-parse HEAD`) and whether the
  work tree differed from it (bench/results/ and bench/out/ not counted: a cited run writes
  there as it goes), and a run ID.
- `write_report()`: writes the JSON to its --out path and, with `--result NAME`, copies it to
  bench/results/NAME.json, the only place README figures are cited from.
- `spread()`: median and range of a series; every figure is reported with both.
- `compile_node()`: the node's bytecode, as an installed package has it (every bench's
  provenance calls it and records it).
- `fresh_ext4()` / `filesystem_of()`: where the copies are written, and a fresh journalled
  ext4 to write them to (--fresh-ext4): on a filesystem that has created and deleted millions
  of files, creating one more can cost 10 or 250 us of kernel time from one run to the next
  (see bench/README.md, "The filesystem under the copies").
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "bench" / "out"
RESULTS = REPO / "bench" / "results"
# the folders a bench run itself writes to: changes there do not make the code dirty
_OWN_OUTPUT = (":(exclude)bench/results", ":(exclude)bench/out")
_RESULT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?")


def _git(*args: str) -> str | None:
    try:
        done = subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True,
                              timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    # rstrip only: a porcelain status line starts with a meaningful space
    return done.stdout.rstrip() if done.returncode == 0 else None


def git_state() -> dict[str, Any]:
    """HEAD's commit and whether tracked files differ from it (a run of uncommitted code)."""
    commit = _git("rev-parse", "HEAD")
    if commit is None:
        return {"commit": None, "dirty": None, "note": "not a git checkout or git missing"}
    changed = _git("status", "--porcelain", "--untracked-files=no", "--", ".", *_OWN_OUTPUT)
    files = [line[3:] for line in (changed or "").splitlines()]
    return {"commit": commit, "dirty": bool(files), "dirty_files": files[:20],
            "branch": _git("rev-parse", "--abbrev-ref", "HEAD")}


def new_run_id(git: dict[str, Any]) -> str:
    """UTC time, then the commit's short hash, '-dirty' when the code was not committed."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    commit = (git.get("commit") or "nogit")[:10]
    return f"{stamp}-{commit}{'-dirty' if git.get('dirty') else ''}"


def compile_node() -> dict[str, Any]:
    """Compile node/ and tools/ into their __pycache__ folders, as `pip install .` does for an
    operator's install. An editable install never compiles, and where PYTHONDONTWRITEBYTECODE
    is set (this machine's sessions) Python does not write what it compiled: every node start
    then compiled the node's ~40 modules again, ~0.1 s of each start (a takeover, a rejoin, a
    secondary joining) that an installed node does not spend."""
    import compileall

    ok = all(compileall.compile_dir(REPO / sub, quiet=1, force=False)
             for sub in ("node", "tools"))
    return {"node_bytecode": "compiled" if ok else "compile failed",
            "PYTHONDONTWRITEBYTECODE": os.environ.get("PYTHONDONTWRITEBYTECODE", "")}


def provenance(run_id: str | None = None) -> dict[str, Any]:
    git = git_state()
    return {
        **compile_node(),
        "command": shlex.join(["python", os.path.relpath(sys.argv[0], REPO), *sys.argv[1:]]),
        "cwd_is_repo": Path.cwd().resolve() == REPO,
        "git": git,
        "run_id": run_id or os.environ.get("SBS_BENCH_RUN_ID") or new_run_id(git),
        "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "loadavg_at_start": os.getloadavg(),
    }


def result_name(text: str) -> str:
    """argparse type for --result: NAME or RUN/NAME, kept inside bench/results/."""
    if not _RESULT_NAME.fullmatch(text) or ".." in text:
        raise argparse.ArgumentTypeError(
            f"{text!r}: use NAME or RUN/NAME (letters, digits, '.', '_', '-')")
    return text


def add_common_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--result", type=result_name, metavar="NAME",
                    help="also copy the JSON to bench/results/NAME.json (a run the README "
                         "may cite; bench/out/ is not kept in git)")
    ap.add_argument("--run-id", help="the run ID to record (default: time, commit, dirty flag; "
                                     "bench/run_cited.py gives all its benches one)")


def write_report(report: dict[str, Any], out: Path, result: str | None) -> list[Path]:
    """Write to `out`; with `result`, copy to bench/results/<result>.json. Returns both
    (relative to the repository when inside it)."""
    report.setdefault("provenance", {})["finished_utc"] = time.strftime(
        "%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    report["provenance"]["loadavg_at_end"] = os.getloadavg()
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    written = [out]
    if result:
        kept = RESULTS / f"{result}.json"
        kept.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(out, kept)
        written.append(kept)
    # shown relative to the repository: what a bench prints goes into kept logs
    return [p.resolve().relative_to(REPO) if p.resolve().is_relative_to(REPO) else p
            for p in written]


def spread(values: list[float], digits: int = 3) -> dict[str, Any]:
    """Median, min and max of a series, and the series itself (in run order)."""
    vals = [v for v in values if v is not None]
    if not vals:
        return {"n": 0}
    return {"n": len(vals), "median": round(statistics.median(vals), digits),
            "min": round(min(vals), digits), "max": round(max(vals), digits),
            "values": [round(v, digits) for v in vals]}


def fmt_spread(s: dict[str, Any], unit: str = "", digits: int = 3) -> str:
    """'1.23 (1.10-1.40, n=5)': a median with its range, as every printed figure is."""
    if not s.get("n"):
        return "-"
    f = f"{{:.{digits}f}}"
    return (f"{f.format(s['median'])}{unit} ({f.format(s['min'])}-{f.format(s['max'])}, "
            f"n={s['n']})")


class FilesystemError(RuntimeError):
    """A fresh filesystem for the copies could not be made (the message says why)."""


def filesystem_of(path: Path) -> dict[str, Any]:
    """The filesystem holding `path`: its type, its device and, for ext4, whether it has a
    journal (jbd2 lists the device when it has one)."""
    path = path.resolve()
    best: tuple[str, str, str] | None = None
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            mount_point = left.split()[4].replace("\\040", " ")
            fstype, device = right.split()[:2]
            inside = path == Path(mount_point) or Path(mount_point) in path.parents
            if inside and (best is None or len(mount_point) > len(best[0])):
                best = (mount_point, fstype, device)
    if best is None:
        return {"type": None}
    mount_point, fstype, device = best
    out: dict[str, Any] = {"type": fstype, "device": device, "mount_point": mount_point}
    if fstype == "ext4":
        dev = os.path.basename(device)
        out["journal"] = any(p.name.startswith(dev + "-") for p in Path("/proc/fs/jbd2").glob("*"))
    return out


def fs_record(fs: dict[str, Any]) -> dict[str, Any]:
    """What a JSON keeps of a filesystem: what it is, not where this machine has it."""
    return {k: v for k, v in fs.items() if k not in ("device", "mount_point")}


@contextlib.contextmanager
def fresh_ext4(image: Path, mount_point: Path, gib: int) -> Iterator[dict[str, Any]]:
    """A fresh ext4 of `gib` GiB (mkfs.ext4's defaults, journal included, inode tables and
    journal written out now rather than by a background thread during the bench) in a sparse
    file, mounted on a loop device at `mount_point`; unmounted and removed afterwards. Needs
    root, mkfs.ext4 and a free loop device: FilesystemError names what is missing."""
    if os.geteuid() != 0:
        raise FilesystemError("--fresh-ext4 mounts a loop device: run the bench as root")
    mkfs = shutil.which("mkfs.ext4")
    if mkfs is None:
        raise FilesystemError("--fresh-ext4 needs mkfs.ext4 (Debian: apt-get install e2fsprogs)")
    image.parent.mkdir(parents=True, exist_ok=True)
    mount_point.mkdir(parents=True, exist_ok=True)
    image.unlink(missing_ok=True)
    with open(image, "wb") as f:
        f.truncate(gib << 30)
    mkfs_cmd = [mkfs, "-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0", str(image)]
    mounted = False
    try:
        for cmd in (mkfs_cmd, ["mount", "-o", "loop", str(image), str(mount_point)]):
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
            if done.returncode != 0:
                raise FilesystemError(f"--fresh-ext4: {shlex.join(cmd)} failed: "
                                      f"{(done.stderr or done.stdout).strip()[:300]}")
        mounted = True
        yield {"made": "fresh ext4 on a loop device (--fresh-ext4)", "gib": gib,
               "mkfs": shlex.join(["mkfs.ext4", *mkfs_cmd[1:-1], "IMAGE"]),
               **filesystem_of(mount_point)}
    finally:
        if mounted:
            subprocess.run(["umount", str(mount_point)], capture_output=True, timeout=300)
        image.unlink(missing_ok=True)
