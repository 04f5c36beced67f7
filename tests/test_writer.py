"""node.writer: hostile paths, symlink escapes, atomic verified commits, trash, conflicts,
ENOSPC."""

from __future__ import annotations

import json
import logging
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sbs.node.conflicts import listing
from sbs.node.filters import Filter
from sbs.node.index import TEMP_PREFIX, HashCache, hash_bytes, scan_folder
from sbs.node.writer import (
    FolderWriter,
    HashMismatch,
    PathError,
    check_relpath,
    purge_trash,
    utc_stamp,
)

REPO = Path(__file__).resolve().parents[1]
MTIME = 1_700_000_000_123_456_789


def file_entry(rel: str, data: bytes, mode: int = 0o644, mtime: int = MTIME) -> dict:
    return {"path": rel, "kind": "file", "size": len(data), "mtime_ns": mtime, "mode": mode,
            "hash": hash_bytes(data)}


def put(w: FolderWriter, rel: str, data: bytes, **kw) -> dict:
    entry = file_entry(rel, data, **kw)
    tmp = w.new_temp(rel)
    tmp.write(data)
    w.commit(tmp, entry)
    return entry


def leftovers(w: FolderWriter) -> list[str]:
    """Temp files anywhere: in the temp dir, or hidden in the folder tree."""
    found = []
    for dirpath, _, filenames in os.walk(w.temp_dir):  # lane directories hold files too
        found += [os.path.join(dirpath, n) for n in filenames]
    for dirpath, dirnames, filenames in os.walk(w.root):
        found += [os.path.join(dirpath, n) for n in dirnames + filenames
                  if n.startswith(TEMP_PREFIX)]
    return found


def make_writer(base: Path, temp_dir: Path | str | None = None) -> FolderWriter:
    return FolderWriter(base / "root", temp_dir or base / "state" / "tmp" / "f",
                        base / "state" / "trash", base / "state" / "conflicts", name="f")


@pytest.fixture
def far_dir(tmp_path):
    """A directory on another filesystem than tmp_path (tmpfs /dev/shm)."""
    if not os.path.isdir("/dev/shm"):
        pytest.skip("no /dev/shm: a temp file on another filesystem is not tested")
    d = tempfile.mkdtemp(dir="/dev/shm")
    try:
        if os.stat(d).st_dev == os.stat(tmp_path).st_dev:
            pytest.skip("/dev/shm is on the same filesystem as the temp folder: a temp file on "
                        "another filesystem is not tested")
        yield Path(d)
    finally:
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def writer(tmp_path):
    w = make_writer(tmp_path)
    assert w.temp_in_state
    yield w
    w.close()


@pytest.fixture(params=["temp-in-state", "temp-in-target"])
def any_writer(request, tmp_path):
    """Both ways of placing temp files: in state_dir (same fs) or hidden next to the target."""
    if request.param == "temp-in-state":
        w = make_writer(tmp_path)
    else:
        w = make_writer(tmp_path, request.getfixturevalue("far_dir") / "tmp")
        assert not w.temp_in_state
    yield w
    w.close()


# --- check_relpath ---------------------------------------------------------------------------

HOSTILE = [
    ("", "empty"),
    ("/etc/passwd", "absolute"),
    ("../x", "'..'"),
    ("a/../../b", "'..'"),
    ("..", "'..'"),
    (".", "'.'"),
    ("a/./b", "'.'"),
    ("a//b", "empty component"),
    ("a/", "empty component"),
    ("a\x00b", "NUL"),
    ("x" * 256, "255"),
    ("é" * 128, "255"),  # 256 bytes in UTF-8
    ("/".join(["d" * 200] * 21), "4096"),
    (TEMP_PREFIX + "abc", "temp"),
    ("a/" + TEMP_PREFIX + "x/b", "temp"),
    ("bad\ud800name", "not a byte of a name"),  # \udcff is byte 0xff: a name (node/names.py)
]


@pytest.mark.parametrize(("path", "problem"), HOSTILE)
def test_check_relpath_refuses_hostile_paths(path, problem):
    with pytest.raises(PathError, match=problem):
        check_relpath(path)


@pytest.mark.parametrize("value", [None, 5, b"a.txt", ["a"]])
def test_check_relpath_refuses_non_strings(value):
    with pytest.raises(PathError, match="not a string"):
        check_relpath(value)


@pytest.mark.parametrize("path", ["a", "a b/ü.txt", "..a/b..", ".hidden", "x" * 255,
                                  "sub/.sbs-tmpfoo", "a\\b"])
def test_check_relpath_accepts_odd_but_safe_paths(path):
    assert check_relpath(path) == tuple(path.split("/"))


# --- symlink escapes -------------------------------------------------------------------------


def test_temp_names_are_unique_across_threads_and_a_forked_child_without_a_random_draw_each(
        monkeypatch):
    from sbs.node import fdio
    first = fdio.temp_name()
    # one random draw per process, not per name (a getrandom(2) per small file cost ~4 %)
    monkeypatch.setattr(fdio.secrets, "token_hex", lambda n: pytest.fail("drew per name"))
    names: list[str] = []

    def draw() -> None:
        names.extend(fdio.temp_name() for _ in range(2000))

    threads = [threading.Thread(target=draw) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(set(names)) == len(names) == 8000 and first not in names
    assert all(n.startswith(TEMP_PREFIX) for n in names)
    monkeypatch.undo()
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child draws its own random part: its names are not the parent's next
        os.write(w, fdio.temp_name().encode())
        os._exit(0)
    os.close(w)
    child = os.read(r, 200).decode()
    os.close(r)
    os.waitpid(pid, 0)
    parent = fdio.temp_name()
    assert child.startswith(TEMP_PREFIX) and child.rsplit("-", 1)[0] != parent.rsplit("-", 1)[0]


def test_write_through_symlinked_parent_is_refused(any_writer, tmp_path):
    w = any_writer
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "x").write_bytes(b"precious")
    os.symlink(outside, os.path.join(w.root, "evil"))

    with pytest.raises(PathError, match="evil"):
        w.open_dir(("evil",), create=True)
    with pytest.raises(PathError):
        put(w, "evil/x", b"pwned")
    with pytest.raises(PathError):
        put(w, "evil/new/y", b"pwned")
    with pytest.raises(PathError):
        w.set_meta(file_entry("evil/x", b"precious", mode=0o777))
    with pytest.raises(PathError):
        w.make_link({"path": "evil/l", "kind": "link", "target": "/", "mtime_ns": 1,
                     "size": 1, "mode": 0})
    w.remove("evil/x", trash=True, stamp=utc_stamp())
    assert w.preserve("evil/x", utc_stamp()) is None
    assert w.local_entry("evil/x", Filter(), HashCache()) is None

    assert os.listdir(outside) == ["x"]
    assert (outside / "x").read_bytes() == b"precious"
    assert stat.S_IMODE((outside / "x").stat().st_mode) == 0o644
    assert leftovers(w) == []


def test_symlink_at_the_final_name_is_replaced_not_followed(writer, tmp_path):
    target = tmp_path / "outside.txt"
    target.write_bytes(b"precious")
    os.symlink(target, os.path.join(writer.root, "f.txt"))
    put(writer, "f.txt", b"replicated")
    assert target.read_bytes() == b"precious"
    real = Path(writer.root, "f.txt")
    assert not real.is_symlink() and real.read_bytes() == b"replicated"
    trashed = list(Path(writer.trash_dir).rglob("f.txt"))
    assert len(trashed) == 1 and trashed[0].is_symlink()


def test_make_dir_replaces_a_planted_symlink_with_a_real_dir(writer, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    os.symlink(outside, os.path.join(writer.root, "d"))
    writer.make_dir({"path": "d/sub", "kind": "dir", "size": 0, "mtime_ns": 0, "mode": 0o750})
    put(writer, "d/sub/f", b"data")
    assert os.listdir(outside) == []
    assert not os.path.islink(os.path.join(writer.root, "d"))
    assert stat.S_IMODE(os.stat(os.path.join(writer.root, "d/sub")).st_mode) == 0o750
    assert Path(writer.root, "d/sub/f").read_bytes() == b"data"


# --- commits ---------------------------------------------------------------------------------


def test_commit_is_atomic_and_sets_mode_and_mtime(any_writer):
    w = any_writer
    put(w, "dir/f.txt", b"old content")
    real = Path(w.root, "dir/f.txt")
    entry = file_entry("dir/f.txt", b"new content, longer", mode=0o600, mtime=MTIME)
    tmp = w.new_temp("dir/f.txt")
    tmp.write(b"new content, ")
    assert real.read_bytes() == b"old content"
    tmp.write(b"longer")
    assert tmp.size == len(b"new content, longer")
    assert real.read_bytes() == b"old content"  # the real name never holds a partial file
    w.commit(tmp, entry)
    assert real.read_bytes() == b"new content, longer"
    st = real.stat()
    assert stat.S_IMODE(st.st_mode) == 0o600
    assert st.st_mtime_ns == MTIME
    assert leftovers(w) == []
    tmp.abort()  # idempotent, and must not touch the committed file
    assert real.read_bytes() == b"new content, longer"


def test_temp_files_are_never_scanned(any_writer):
    w = any_writer
    tmp = w.new_temp("a/b.txt")
    tmp.write(b"partial")
    index = scan_folder(w.root, Filter(), HashCache())
    assert all(TEMP_PREFIX not in p for p in index)
    assert "a/b.txt" not in index
    tmp.abort()


def test_hash_mismatch_keeps_old_file_and_leaves_no_temp(any_writer):
    w = any_writer
    put(w, "f.bin", b"good")
    tmp = w.new_temp("f.bin")
    tmp.write(b"evil")
    with pytest.raises(HashMismatch, match="f.bin"):
        w.commit(tmp, file_entry("f.bin", b"good!"))
    assert Path(w.root, "f.bin").read_bytes() == b"good"
    assert leftovers(w) == []
    with pytest.raises(ValueError):
        tmp.write(b"more")


def test_commit_moves_a_dir_in_the_way_to_trash(writer):
    os.makedirs(os.path.join(writer.root, "x/inner"))
    Path(writer.root, "x/inner/keep.txt").write_bytes(b"keep me")
    put(writer, "x", b"now a file")
    assert Path(writer.root, "x").read_bytes() == b"now a file"
    kept = list(Path(writer.trash_dir).rglob("keep.txt"))
    assert [p.read_bytes() for p in kept] == [b"keep me"]


def test_commit_many(any_writer):
    w = any_writer
    put(w, "a/old.txt", b"old")
    specs = [("a/old.txt", b"replaced", True), ("a/1.txt", b"one", True),
             ("b/c/2.txt", b"two", True), ("a/bad.txt", b"three", False),
             ("top.txt", b"", True)]
    items = []
    for rel, data, good in specs:
        tmp = w.new_temp(rel)
        tmp.write(data)
        tmp.close()  # a caller may hold many temps without their fds
        items.append((tmp, file_entry(rel, data if good else b"other", mode=0o640)))
    results = w.commit_many(items)
    assert [r is None for r in results] == [good for _, _, good in specs]
    assert isinstance(results[3], HashMismatch)
    for rel, data, good in specs:
        p = Path(w.root, rel)
        if good:
            assert p.read_bytes() == data
            assert stat.S_IMODE(p.stat().st_mode) == 0o640
            assert p.stat().st_mtime_ns == MTIME
        else:
            assert not p.exists()
    assert leftovers(w) == []
    assert w.commit_many([]) == []


def test_commit_many_reports_a_refused_path_per_item(writer, tmp_path):
    os.symlink(tmp_path, os.path.join(writer.root, "evil"))
    items = []
    for rel in ("ok.txt", "evil/x.txt"):
        tmp = writer.new_temp(rel)
        tmp.write(b"x")
        items.append((tmp, file_entry(rel, b"x")))
    results = writer.commit_many(items)
    assert results[0] is None and isinstance(results[1], PathError)
    assert not (tmp_path / "x.txt").exists()
    assert leftovers(writer) == []


# --- links, dirs, metadata -------------------------------------------------------------------


def test_links_are_created_atomically_and_never_followed(writer):
    entry = {"path": "l/link", "kind": "link", "target": "../../../etc/passwd", "size": 19,
             "mtime_ns": MTIME, "mode": 0, "hash": ""}
    writer.make_link(entry)
    p = os.path.join(writer.root, "l/link")
    assert os.readlink(p) == "../../../etc/passwd"
    assert os.lstat(p).st_mtime_ns == MTIME
    writer.make_link(dict(entry, target="elsewhere"))
    assert os.readlink(p) == "elsewhere"
    local = writer.local_entry("l/link", Filter(), HashCache())
    assert local == {"path": "l/link", "kind": "link", "size": 9, "mtime_ns": MTIME, "mode": 0,
                     "hash": "", "target": "elsewhere"}
    with pytest.raises(PathError):
        writer.make_link(dict(entry, target="a\x00b"))
    assert leftovers(writer) == []


def test_make_link_over_a_file_keeps_the_file_in_trash(writer):
    put(writer, "x", b"data")
    writer.make_link({"path": "x", "kind": "link", "target": "y", "size": 1, "mtime_ns": 1,
                      "mode": 0, "hash": ""})
    assert os.readlink(os.path.join(writer.root, "x")) == "y"
    assert [p.read_bytes() for p in Path(writer.trash_dir).rglob("x")] == [b"data"]


def test_make_dir_and_set_meta(writer):
    writer.make_dir({"path": "a/b/c", "kind": "dir", "size": 0, "mtime_ns": 0, "mode": 0o700})
    assert stat.S_IMODE(os.stat(os.path.join(writer.root, "a/b/c")).st_mode) == 0o700
    writer.make_dir({"path": "a/b/c", "kind": "dir", "size": 0, "mtime_ns": 0, "mode": 0o755})
    assert stat.S_IMODE(os.stat(os.path.join(writer.root, "a/b/c")).st_mode) == 0o755
    writer.set_meta({"path": "a/b", "kind": "dir", "size": 0, "mtime_ns": 0, "mode": 0o711})
    assert stat.S_IMODE(os.stat(os.path.join(writer.root, "a/b")).st_mode) == 0o711

    entry = put(writer, "a/f", b"x")
    writer.set_meta(dict(entry, mode=0o604, mtime_ns=42))
    st = os.stat(os.path.join(writer.root, "a/f"))
    assert (stat.S_IMODE(st.st_mode), st.st_mtime_ns) == (0o604, 42)

    writer.make_link({"path": "a/l", "kind": "link", "target": "f", "size": 1, "mtime_ns": 1,
                      "mode": 0, "hash": ""})
    with pytest.raises(PathError):  # a link where a file is expected: never chmod its target
        writer.set_meta(dict(entry, path="a/l", mode=0o777))
    assert stat.S_IMODE(os.stat(os.path.join(writer.root, "a/f")).st_mode) == 0o604
    writer.set_meta({"path": "a/l", "kind": "link", "target": "f", "size": 1, "mtime_ns": 7,
                     "mode": 0, "hash": ""})
    assert os.lstat(os.path.join(writer.root, "a/l")).st_mtime_ns == 7


def test_local_entry(writer):
    entry = put(writer, "d/f.txt", b"hello", mode=0o640)
    cache = HashCache()
    assert writer.local_entry("d/f.txt", Filter(), cache) == entry
    assert writer.local_entry("d", Filter(), cache)["kind"] == "dir"
    assert writer.local_entry("d/f.txt", Filter(["*.lab"]), cache) is None
    assert writer.local_entry("d/missing", Filter(), cache) is None
    assert writer.local_entry("nope/missing", Filter(), cache) is None


# --- removal, trash, conflicts ---------------------------------------------------------------


def test_remove_to_trash_and_for_good(writer):
    put(writer, "d/sub/f.txt", b"file in dir")
    put(writer, "g.txt", b"single")
    stamp = utc_stamp()
    writer.remove("d", trash=True, stamp=stamp)
    writer.remove("g.txt", trash=True, stamp=stamp)
    assert os.listdir(writer.root) == []
    trash = Path(writer.trash_dir, stamp, "f")
    assert (trash / "d/sub/f.txt").read_bytes() == b"file in dir"
    assert (trash / "g.txt").read_bytes() == b"single"
    assert (trash / "g.txt").stat().st_mtime_ns == MTIME

    put(writer, "g.txt", b"again")
    writer.remove("g.txt", trash=True, stamp=stamp)  # same stamp: kept side by side
    assert sorted(p.name for p in trash.iterdir()) == ["d", "g.txt", "g.txt~1"]

    put(writer, "h/x", b"x")
    writer.remove("h", trash=False, stamp=stamp)
    assert not os.path.exists(os.path.join(writer.root, "h"))
    writer.remove("never/there", trash=True, stamp=stamp)  # missing: no error


def test_remove_to_trash_on_another_filesystem(tmp_path, far_dir):
    w = FolderWriter(tmp_path / "root", tmp_path / "tmp", far_dir / "trash",
                     far_dir / "conflicts")
    put(w, "d/a.txt", b"a")
    os.symlink("a.txt", os.path.join(w.root, "d/l"))
    w.remove("d", trash=True, stamp="S")
    assert not os.path.exists(os.path.join(w.root, "d"))
    assert (far_dir / "trash/S/d/a.txt").read_bytes() == b"a"
    assert os.readlink(far_dir / "trash/S/d/l") == "a.txt"
    w.close()


def test_preserve_keeps_content_mode_and_mtime(writer):
    put(writer, "c/f.txt", b"local change", mode=0o600)
    writer.make_link({"path": "c/l", "kind": "link", "target": "f.txt", "size": 5,
                      "mtime_ns": MTIME, "mode": 0, "hash": ""})
    stamp = utc_stamp()
    copy = writer.preserve("c/f.txt", stamp)
    assert copy == os.path.join(writer.conflicts_dir, stamp, "f", "c/f.txt")
    st = os.stat(copy)
    assert Path(copy).read_bytes() == b"local change"
    assert (stat.S_IMODE(st.st_mode), st.st_mtime_ns) == (0o600, MTIME)
    link_copy = writer.preserve("c/l", stamp)
    assert os.readlink(link_copy) == "f.txt"
    assert writer.preserve("c", stamp) is None  # folders are not copied
    assert writer.preserve("c/none", stamp) is None
    assert Path(writer.root, "c/f.txt").read_bytes() == b"local change"  # a copy, not a move


def test_conflicts_listing_lists_a_kept_copy_2000_levels_deep(writer, tmp_path):
    # a replicated tree may be deeper than Python's recursion limit, and so may a kept copy:
    # os.walk recursed (RecursionError); made one openat at a time, as no path this long opens
    put(writer, "top.txt", b"top")
    stamp = utc_stamp()
    writer.preserve("top.txt", stamp)
    names = ["d"] * 1999 + ["f.txt"]
    fd = os.open(Path(writer.conflicts_dir, stamp, "f"), os.O_RDONLY | os.O_DIRECTORY)
    try:
        for name in names[:-1]:
            os.mkdir(name, dir_fd=fd)
            sub = os.open(name, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = sub
        f = os.open(names[-1], os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd)
        os.write(f, b"deep down")
        os.close(f)
        os.close(fd)
        deep = "/".join(names)
        kept = listing(tmp_path / "state")
        assert [(k["time"], k["folder"], k["path"], k["size"]) for k in kept] == [
            (stamp, "f", "top.txt", 3), (stamp, "f", deep, 9)]
        assert kept[1]["kept"] == os.path.join(writer.conflicts_dir, stamp, "f", deep)
        assert len(listing(tmp_path / "state", limit=1)) == 1
    finally:  # pytest's own cleanup (shutil.rmtree) recurses: remove the deep tree here
        subprocess.run(["rm", "-rf", str(tmp_path / "state" / "conflicts")], check=False,
                       timeout=120)


# --- cleanup and purge -----------------------------------------------------------------------


def test_cleanup_temps_removes_leftovers_of_a_killed_run(writer):
    put(writer, "keep/me.txt", b"keep")
    Path(writer.temp_dir, TEMP_PREFIX + "1").write_bytes(b"half")
    Path(writer.temp_dir, TEMP_PREFIX + "2").write_bytes(b"half")
    Path(writer.root, TEMP_PREFIX + "3").write_bytes(b"half")
    Path(writer.root, "keep", TEMP_PREFIX + "4").write_bytes(b"half")
    os.symlink("/", os.path.join(writer.root, "keep", TEMP_PREFIX + "5"))
    os.mkdir(os.path.join(writer.root, TEMP_PREFIX + "6"))
    assert writer.cleanup_temps() == 6
    assert leftovers(writer) == []
    assert Path(writer.root, "keep/me.txt").read_bytes() == b"keep"
    assert writer.cleanup_temps() == 0


def test_lanes_write_at_once_each_in_its_own_temp_dir(writer):
    """Small files are written by several threads; each lane creates its temp files in a
    directory of its own (one directory would make them take turns on its lock)."""
    seen: dict[int, set[str]] = {}
    errors: list[BaseException] = []

    def lane_work(lane: int) -> None:
        try:
            items = []
            for i in range(100):
                rel = f"d{i % 3}/lane{lane}-{i}.txt"
                data = f"{lane}:{i}".encode() * (i + 1)
                tmp = writer.new_temp(rel, lane)
                tmp.write(data)
                items.append((tmp, file_entry(rel, data)))
            seen[lane] = set(os.listdir(Path(writer.temp_dir, f"lane{lane}")))
            assert seen[lane] == {tmp.name for tmp, _ in items}
            assert writer.commit_many(items) == [None] * len(items)
        except BaseException as exc:  # noqa: BLE001 -- reported by the test thread
            errors.append(exc)

    threads = [threading.Thread(target=lane_work, args=(lane,)) for lane in (1, 2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == []
    assert set(seen) == {1, 2}
    for lane in (1, 2):
        for i in range(100):
            p = Path(writer.root, f"d{i % 3}/lane{lane}-{i}.txt")
            assert p.read_bytes() == f"{lane}:{i}".encode() * (i + 1)
            assert p.stat().st_mtime_ns == MTIME
    assert leftovers(writer) == []


def test_cleanup_temps_empties_lane_dirs_and_lanes_work_after(writer):
    tmp = writer.new_temp("a.txt", 1)
    tmp.write(b"half")
    tmp.close()  # a killed run: the temp file stays behind in lane 1's directory
    Path(writer.temp_dir, TEMP_PREFIX + "x").write_bytes(b"half")
    assert writer.cleanup_temps() == 2
    assert leftovers(writer) == [] and os.listdir(writer.temp_dir) == []
    put_lane = writer.new_temp("a.txt", 1)  # the lane's directory comes back when used
    put_lane.write(b"whole")
    writer.commit(put_lane, file_entry("a.txt", b"whole"))
    assert Path(writer.root, "a.txt").read_bytes() == b"whole"


def test_purge_trash_by_stamp_age(tmp_path):
    trash = tmp_path / "trash"
    old = (datetime.now(UTC) - timedelta(days=8)).strftime("%Y%m%dT%H%M%S.000Z")
    new = utc_stamp()
    for stamp in (old, new):
        (trash / stamp / "f").mkdir(parents=True)
        (trash / stamp / "f" / "x").write_bytes(b"x")
    (trash / "not-a-stamp").mkdir()
    assert purge_trash(trash, 7) == 1
    assert sorted(p.name for p in trash.iterdir()) == sorted([new, "not-a-stamp"])
    assert purge_trash(tmp_path / "missing", 7) == 0
    # a stop asked for between folders leaves the rest for the next purge
    big = tmp_path / "big trash"
    for n in range(3):
        stamp = (datetime.now(UTC) - timedelta(days=9, seconds=n)).strftime("%Y%m%dT%H%M%S.000Z")
        (big / stamp).mkdir(parents=True)
    asked = []
    assert purge_trash(big, 7, stop=lambda: len(asked) > 1 or asked.append(1)) == 2
    assert purge_trash(big, 7) == 1 and not any(big.iterdir())


def test_utc_stamp_is_sortable_and_safe():
    a = utc_stamp()
    deadline = time.monotonic() + 2
    while (b := utc_stamp()) == a and time.monotonic() < deadline:
        pass
    assert len(a) == len("20261125T160501.123Z") and a.endswith("Z") and "/" not in a
    assert a < b
    assert datetime.strptime(a, "%Y%m%dT%H%M%S.%fZ")


# --- a full disk -----------------------------------------------------------------------------

ENOSPC_SCRIPT = textwrap.dedent("""
    import errno, json, os, sys
    sys.path.insert(0, sys.argv[1])
    from sbs.node.writer import FolderWriter
    from sbs.node.index import TEMP_PREFIX, hash_bytes

    mnt, far = sys.argv[2], sys.argv[3]
    out = {}
    for mode, temp in (("state", mnt + "/state/tmp"), ("target", far + "/tmp")):
        w = FolderWriter(mnt + "/" + mode, temp, far + "/trash", far + "/conflicts")
        old = b"old content" * 10
        t = w.new_temp("d/f.bin")
        t.write(old)
        w.commit(t, {"path": "d/f.bin", "kind": "file", "size": len(old), "mtime_ns": 1,
                     "mode": 0o644, "hash": hash_bytes(old)})
        t = w.new_temp("d/f.bin")
        err = None
        try:
            for _ in range(4096):  # 4 MiB into a 1 MiB tmpfs
                t.write(b"x" * 1024)
        except OSError as e:
            err = errno.errorcode.get(e.errno)
        temps = [n for _, ds, fs in os.walk(mnt) for n in ds + fs if n.startswith(TEMP_PREFIX)]
        temps += os.listdir(temp)
        with open(mnt + "/" + mode + "/d/f.bin", "rb") as f:
            intact = f.read() == old
        out[mode] = {"temp_in_state": w.temp_in_state, "error": err, "intact": intact,
                     "temps": temps}
        w.close()
    print(json.dumps(out))
""")


def _on_a_full_tmpfs(tmp_path: Path, script_text: str, far: Path) -> dict:
    """Run script_text (argv: the repo, the mountpoint, far) in a mount namespace of its own
    with a 1 MiB tmpfs mounted at tmp_path/mnt; its JSON output. Skips where that cannot be."""
    probe = subprocess.run(["unshare", "-m", "true"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip(f"unshare -m not permitted here: {probe.stderr.decode().strip()}")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    script = tmp_path / "on_tmpfs.py"
    script.write_text(script_text)
    shell = 'mount -t tmpfs -o size=1m tmpfs "$1" && exec "$2" "$3" "$4" "$1" "$5"'
    proc = subprocess.run(
        ["unshare", "-m", "sh", "-c", shell, "sh", str(mnt), sys.executable, str(script),
         str(REPO), str(far)],
        capture_output=True, text=True, timeout=60)
    if proc.returncode != 0 and "mount" in proc.stderr and "permission" in proc.stderr.lower():
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()}")
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_full_disk_keeps_the_old_file_and_no_temp(tmp_path, far_dir):
    result = _on_a_full_tmpfs(tmp_path, ENOSPC_SCRIPT, far_dir)
    assert result["state"] == {"temp_in_state": True, "error": "ENOSPC", "intact": True,
                               "temps": []}
    assert result["target"] == {"temp_in_state": False, "error": "ENOSPC", "intact": True,
                                "temps": []}


SIDE_COPY_SCRIPT = textwrap.dedent("""
    import errno, json, os, sys
    sys.path.insert(0, sys.argv[1])
    from sbs.node.writer import FolderWriter

    mnt, far = sys.argv[2], sys.argv[3]
    # the state dir (trash, conflicts) on the 1 MiB tmpfs, the folder on another filesystem
    w = FolderWriter(far + "/folder", far + "/tmp", mnt + "/trash", mnt + "/conflicts")
    content = os.urandom(3 << 20)
    with open(far + "/folder/big.bin", "wb") as f:
        f.write(content)
    out = {}
    for side, make in (("conflicts", lambda: w.preserve("big.bin", "20260101T000000.000Z")),
                       ("trash", lambda: w.remove("big.bin", trash=True,
                                                  stamp="20260101T000000.000Z"))):
        try:
            make()
            err = None
        except OSError as e:
            err = errno.errorcode.get(e.errno)
        left = [os.path.relpath(os.path.join(d, n), mnt) for d, _, fs in os.walk(mnt)
                for n in fs]
        with open(far + "/folder/big.bin", "rb") as f:
            intact = f.read() == content
        out[side] = {"error": err, "left": left, "intact": intact}
    w.close()
    print(json.dumps(out))
""")


def test_a_side_copy_that_does_not_fit_leaves_no_truncated_copy(tmp_path):
    """A conflict copy (or a move to the trash across filesystems) on a full state disk: the
    copy fails and the original stays, and no truncated copy is left under conflicts/ or
    trash/, where `sbs-tools conflicts` would list it as the kept version."""
    far = tmp_path / "far"
    far.mkdir()
    result = _on_a_full_tmpfs(tmp_path, SIDE_COPY_SCRIPT, far)
    assert result == {"conflicts": {"error": "ENOSPC", "left": [], "intact": True},
                      "trash": {"error": "ENOSPC", "left": [], "intact": True}}


def test_big_temp_file_is_written_back_early_and_still_exact(writer, monkeypatch):
    import sbs.node.temps as writer_module
    calls = []
    real_start = writer_module.start_writeback
    monkeypatch.setattr(writer_module, "WRITEBACK_EVERY", 4096)
    monkeypatch.setattr(writer_module, "start_writeback",
                        lambda fd, off, n: (calls.append((off, n)), real_start(fd, off, n)))
    data = os.urandom(3 * 4096 + 100)
    entry = file_entry("big.bin", data)
    tmp = writer.new_temp("big.bin")
    for i in range(0, len(data), 1000):
        tmp.write(memoryview(data)[i:i + 1000])
    writer.commit(tmp, entry)
    assert Path(writer.root, "big.bin").read_bytes() == data
    assert calls and calls[0][0] == 0  # contiguous ranges from the start, never overlapping
    assert all(a[0] + a[1] == b[0] for a, b in zip(calls, calls[1:], strict=False))


def test_a_writer_knows_when_its_folder_is_no_longer_the_one_it_opened(tmp_path):
    """FolderWriter.replaced: a folder moved away and another made at its path (what a disk
    unmounted under a running node looks like, its mount point left) is not the writer's; the
    same folder moved back is."""
    from sbs.node.writer import FolderWriter

    root = tmp_path / "docs"
    w = FolderWriter(root, tmp_path / "state/tmp/docs", tmp_path / "state/trash",
                     tmp_path / "state/conflicts")
    try:
        assert not w.replaced()
        root.rename(tmp_path / "docs.away")
        assert w.replaced()  # missing
        root.mkdir()
        assert w.replaced()  # another folder at its path
        root.rmdir()
        (tmp_path / "docs.away").rename(root)
        assert not w.replaced()
    finally:
        w.close()


def test_a_file_where_the_temp_folder_belongs_is_moved_aside(tmp_path, caplog):
    """state_dir/tmp (or tmp/<folder>) that is a file made the folder's writer fail, and the
    folder was refused on this node for good. The file is moved aside, named in the log,
    and the writer made."""
    from sbs.node.writer import FolderWriter

    for stray in (tmp_path / "state/tmp", tmp_path / "state/tmp/docs"):
        stray.parent.mkdir(parents=True, exist_ok=True)
        if stray.is_dir():
            shutil.rmtree(stray)  # the writer of the first round made it
        stray.write_text("not the node's\n")
        with caplog.at_level(logging.WARNING):
            w = FolderWriter(tmp_path / "docs", tmp_path / "state/tmp/docs",
                             tmp_path / "state/trash", tmp_path / "state/conflicts")
        w.close()
        assert (tmp_path / "state/tmp/docs").is_dir()
        aside = list(stray.parent.glob(f"{stray.name}.not-a-folder-*"))
        assert len(aside) == 1 and aside[0].read_text() == "not the node's\n", aside
        assert f"{stray} was not a folder" in caplog.text
        aside[0].unlink()
        caplog.clear()


def test_a_temp_file_that_cannot_be_made_is_named_by_its_full_path(tmp_path):
    """The error of a temp file that cannot be made (a temp area not writable, gone) names
    where: with the bare temp name it read as the replicated folder's trouble."""
    from sbs.node.temps import TempFile

    gone = tmp_path / "tmp-area"
    gone.mkdir()
    fd = os.open(gone, os.O_RDONLY | os.O_DIRECTORY)
    try:
        gone.rmdir()
        with pytest.raises(OSError) as err:
            TempFile(fd, False, "docs/new.txt")
        assert str(gone) in str(err.value), err.value
    finally:
        os.close(fd)
