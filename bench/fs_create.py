"""The kernel's cost of creating small files: the data folder's filesystem against a fresh ext4.

The receiving side of an initial sync without the network: `--files` files of 1 KiB, 100 to a
new folder, written two ways, then removed (as every bench removes its copy between reps):
- `in_place`: each file created (O_CREAT|O_EXCL) in its folder, written, closed (rsync's
  receiver writes a temp file next to its target, which costs the same);
- `sbs`: each file created in one temp folder, written, fchmod and futimens, closed, then
  renamed into its folder (what SBS's secondary does, without the syncfs and fsyncs).
Both run on the filesystem of --data and on a fresh ext4 with its journal on a loop device
(bench/common.py fresh_ext4; root only), alternated, `--reps` times. The figure is the
process's system CPU per file (getrusage), with wall time beside it.

On this VM the root filesystem is an ext4 without a journal, where ext4's inode allocator
looks at every free inode it passes for a recent deletion (find_inode_bit -> recently_deleted,
only without a journal): the cost of a file then depends on what was created and deleted
before, which no copier controls. The fresh ext4 is what a server's data disk looks like.

    python bench/fs_create.py                  # 20,000 files, 5 reps each (~1-2 min)
    python bench/fs_create.py --files 5000 --reps 2
"""
from __future__ import annotations

import argparse
import os
import resource
import shutil
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
    FilesystemError,
    add_common_args,
    filesystem_of,
    fresh_ext4,
    fs_record,
    provenance,
    spread,
    write_report,
)

DATA = b"x" * 1024
PER_DIR = 100
FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC


def create(base: Path, files: int, way: str) -> dict[str, float]:
    """Create `files` files under base (a new folder) one way; times and removes them."""
    base.mkdir()
    (base / "tmp").mkdir()
    root = os.open(base, DIR_FLAGS)
    tmp = os.open(base / "tmp", DIR_FLAGS)
    folder = -1
    r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    try:
        for i in range(files):
            if i % PER_DIR == 0:
                name = f"d{i // PER_DIR:04d}"
                os.mkdir(name, 0o755, dir_fd=root)
                if folder >= 0:
                    os.close(folder)
                folder = os.open(name, DIR_FLAGS, dir_fd=root)
            name = f"f{i:06d}"
            if way == "in_place":
                fd = os.open(name, FLAGS, 0o644, dir_fd=folder)
                os.write(fd, DATA)
                os.close(fd)
            else:
                fd = os.open(name, FLAGS, 0o600, dir_fd=tmp)
                os.write(fd, DATA)
                os.fchmod(fd, 0o644)
                os.utime(fd, ns=(time.time_ns(), 1_700_000_000_000_000_000))
                os.close(fd)
                os.rename(name, name, src_dir_fd=tmp, dst_dir_fd=folder)
        r1, t1 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    finally:
        for fd in (folder, tmp, root):
            if fd >= 0:
                os.close(fd)
        shutil.rmtree(base)
    return {"sys_us_per_file": round((r1.ru_stime - r0.ru_stime) / files * 1e6, 1),
            "user_us_per_file": round((r1.ru_utime - r0.ru_utime) / files * 1e6, 1),
            "wall_s": round(t1 - t0, 3)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--files", type=int, default=20_000)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--data", type=Path, help="a folder on the filesystem to measure (default: "
                    "a temp folder, which is where the benches' --data lives)")
    ap.add_argument("--fresh-ext4", type=int, default=2, metavar="GIB",
                    help="the size of the fresh ext4 (default 2)")
    ap.add_argument("--out", type=Path, default=OUT / "fs_create.json")
    add_common_args(ap)
    args = ap.parse_args(argv)
    prov = provenance(args.run_id)
    print(f"run {prov['run_id']}: {prov['command']}", flush=True)
    data = Path(tempfile.mkdtemp(prefix="sbs-fs-create-", dir=args.data))
    report: dict[str, Any] = {"bench": "fs_create", "provenance": prov, "files": args.files,
                              "reps": args.reps, "per_dir": PER_DIR, "file_bytes": len(DATA)}
    try:
        with fresh_ext4(data / "fresh.img", data / "fresh", args.fresh_ext4) as fs:
            places = {"data_folder": (data / "here", filesystem_of(data)),
                      "fresh_ext4": (Path(fs["mount_point"]) / "here", fs)}
            runs: dict[str, dict[str, list[dict[str, float]]]] = {
                p: {"in_place": [], "sbs": []} for p in places}
            for rep in range(args.reps):
                order = list(places) if rep % 2 == 0 else list(reversed(places))
                for place in order:
                    for way in ("in_place", "sbs"):
                        r = create(places[place][0], args.files, way)
                        runs[place][way].append(r)
                        print(f"rep {rep + 1}/{args.reps} {place:12s} {way:8s} "
                              f"{r['sys_us_per_file']:7.1f} us/file system, {r['wall_s']:.2f} s",
                              flush=True)
    except FilesystemError as e:
        print(f"ERROR: {e}", file=sys.stderr)
        return 2
    finally:
        shutil.rmtree(data, ignore_errors=True)
    for place, (_, fs_info) in places.items():
        report[place] = {
            "filesystem": fs_record(fs_info),
            **{way: {"sys_us_per_file": spread([r["sys_us_per_file"] for r in rs], 1),
                     "wall_s": spread([r["wall_s"] for r in rs]), "reps": rs}
               for way, rs in runs[place].items()}}
        for way in ("in_place", "sbs"):
            s = report[place][way]["sys_us_per_file"]
            print(f"{place:12s} {way:8s} system CPU per file: median {s['median']} us "
                  f"({s['min']}-{s['max']}, n={s['n']})")
    written = write_report(report, args.out, args.result)
    print(f"-> {', '.join(map(str, written))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
