"""The benches' data and where they write: a kept folder is reused only when its marker names
the size asked for; the copies go to the filesystem the JSON names (a fresh ext4 if asked)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from bench.common import FilesystemError, filesystem_of, fresh_ext4
from bench.replication import KiB, kept_tree


def files_in(root: Path) -> int:
    return sum(1 for p in root.rglob("*") if p.is_file())


def test_a_marker_left_by_another_size_does_not_vouch_for_the_tree(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    assert files_in(kept_tree(data, 300)) == 300  # a "full" run
    assert files_in(kept_tree(data, 120)) == 120  # a smaller (--quick) run in between
    # the full run again: the first run's marker must not make it reuse 120 files
    src = kept_tree(data, 300)
    assert files_in(src) == 300
    assert sorted(p.name for p in data.glob("tree.*.done")) == [f"tree.300x{KiB}.done"]
    (src / "d0000" / "f000000.bin").write_bytes(b"x")  # kept as it is while the marker fits
    assert (kept_tree(data, 300) / "d0000" / "f000000.bin").read_bytes() == b"x"


def test_the_filesystem_of_a_path_is_the_innermost_mount_holding_it(tmp_path: Path) -> None:
    fs = filesystem_of(tmp_path)
    assert fs["type"], fs
    assert tmp_path.resolve() == Path(fs["mount_point"]) or \
        Path(fs["mount_point"]) in tmp_path.resolve().parents
    with open("/proc/self/mountinfo") as f:
        points = [line.split()[4] for line in f]
    assert fs["mount_point"] in points
    # no mount point between it and the path
    inner = [p for p in points if p != fs["mount_point"] and Path(p) in tmp_path.resolve().parents
             and Path(fs["mount_point"]) in Path(p).parents]
    assert not inner, inner


def _can_mount_loop() -> str | None:
    if os.geteuid() != 0:
        return "not root: --fresh-ext4 refuses, as test_fresh_ext4_refuses_without_root shows"
    if shutil.which("mkfs.ext4") is None or shutil.which("losetup") is None:
        return "no mkfs.ext4 or losetup here"
    if subprocess.run(["losetup", "-f"], capture_output=True).returncode != 0:
        return "no free loop device here"
    return None


@pytest.mark.skipif(_can_mount_loop() is not None, reason=str(_can_mount_loop()))
def test_fresh_ext4_is_a_journalled_ext4_mounted_for_the_run_and_gone_after(
        tmp_path: Path) -> None:
    image, mnt = tmp_path / "fs.img", tmp_path / "mnt"
    with fresh_ext4(image, mnt, 1) as fs:
        assert fs["type"] == "ext4" and fs["journal"] is True, fs
        assert Path(fs["mount_point"]) == mnt.resolve()
        (mnt / "runs").mkdir()
        (mnt / "runs" / "f").write_bytes(b"x" * 4096)
        assert filesystem_of(mnt / "runs")["device"] == fs["device"]
        assert filesystem_of(tmp_path)["device"] != fs["device"]
    assert not image.exists()
    assert filesystem_of(mnt)["device"] != fs["device"]  # unmounted
    assert not (mnt / "runs").exists()


def _refuses_without_root(tmp_path: Path) -> str:
    try:
        with fresh_ext4(tmp_path / "fs.img", tmp_path / "mnt", 1):
            return "mounted"
    except FilesystemError as e:
        return str(e)


def test_fresh_ext4_refuses_without_root(tmp_path: Path) -> None:
    """Not root: a clear error before anything is made (as root: in a forked child that
    has become `nobody`)."""
    if os.geteuid() != 0:
        said = _refuses_without_root(tmp_path)
    else:
        import pwd
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: nobody, then the same call; its answer through the pipe
            try:
                os.close(read)
                os.setgid(pwd.getpwnam("nobody").pw_gid)
                os.setuid(pwd.getpwnam("nobody").pw_uid)
                os.write(write, _refuses_without_root(tmp_path).encode())
            finally:
                os._exit(0)
        os.close(write)
        with os.fdopen(read) as f:
            said = f.read()
        os.waitpid(pid, 0)
    assert "run the bench as root" in said, said
    assert not (tmp_path / "fs.img").exists() and not (tmp_path / "mnt").exists()


@pytest.mark.skipif(_can_mount_loop() is not None, reason=str(_can_mount_loop()))
def test_fs_create_measures_both_filesystems_both_ways(tmp_path: Path) -> None:
    from bench import fs_create
    out = tmp_path / "fs_create.json"
    assert fs_create.main(["--files", "300", "--reps", "2", "--fresh-ext4", "1",
                           "--data", str(tmp_path), "--out", str(out)]) == 0
    j = json.loads(out.read_text())
    assert j["fresh_ext4"]["filesystem"]["journal"] is True
    assert j["data_folder"]["filesystem"]["type"]
    for place in ("data_folder", "fresh_ext4"):
        for way in ("in_place", "sbs"):
            s = j[place][way]["sys_us_per_file"]
            assert s["n"] == 2 and s["min"] >= 0 and len(j[place][way]["reps"]) == 2
    assert list(tmp_path.iterdir()) == [out]  # its folders and the image are gone
