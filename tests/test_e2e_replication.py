"""Replication with real node processes: the secondary holds a byte-exact copy, in near-real
time, never torn, never lost (issue 3). Nodes run on 127.0.0.1 (alpha) and 127.0.0.2 (beta).

Every wait polls a condition with a deadline; loops that write files are workload, not
synchronisation.
"""
from __future__ import annotations

import os
import shlex
import shutil
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import xxhash

from tests.pair import NodeProc, Pair, wait_for

MiB = 1 << 20


# ---------------------------------------------------------------------------------- helpers

def sbs_tools(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tools.cli", *args], capture_output=True,
                          text=True, timeout=timeout)


def digest(path: Path | int) -> str:
    """Content hash of a file (or of an open fd, from its start)."""
    h = xxhash.xxh3_128()
    if isinstance(path, int):
        offset = 0
        while chunk := os.pread(path, 4 * MiB, offset):
            h.update(chunk)
            offset += len(chunk)
        return h.hexdigest()
    with open(path, "rb") as f:
        while chunk := f.read(4 * MiB):
            h.update(chunk)
    return h.hexdigest()


class PathWatcher:
    """Polls one path from a thread and hashes every new inode that appears there: a reader's
    view of the secondary's copy. Anything but `allowed` hashes is a torn/partial file."""

    def __init__(self, path: Path, allowed: set[str]):
        self.path, self.allowed = path, allowed
        self.seen: dict[int, tuple[int, str]] = {}  # inode -> (size, hash) of its content
        self.bad: list[str] = []
        self.absent = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="test-path-watcher")
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                fd = os.open(self.path, os.O_RDONLY | os.O_NOFOLLOW)
            except FileNotFoundError:
                self.absent += 1
                continue
            try:
                ino = os.fstat(fd).st_ino
                if ino not in self.seen:
                    h = digest(fd)
                    self.seen[ino] = (os.fstat(fd).st_size, h)
                    if h not in self.allowed:
                        self.bad.append(f"inode {ino}: {os.fstat(fd).st_size} bytes, hash {h}")
            finally:
                os.close(fd)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)


def tree(root: Path) -> dict[str, tuple]:
    """Everything under root as {relpath: (type, size/target/content, mtime_ns, mode)} from
    os.lstat. Directories' mtimes are not replicated (by design), so they are left out."""
    out: dict[str, tuple] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath, name)
            rel = str(p.relative_to(root))
            if name.startswith(".sbs-tmp-"):
                out[rel] = ("TEMP",)
                continue
            try:
                st = os.lstat(p)
            except FileNotFoundError:
                continue
            mode = stat.S_IMODE(st.st_mode)
            if stat.S_ISDIR(st.st_mode):
                out[rel] = ("dir", mode)
            elif stat.S_ISLNK(st.st_mode):
                out[rel] = ("link", os.readlink(p), st.st_mtime_ns)
            else:
                try:
                    content = digest(p)
                except FileNotFoundError:
                    continue
                out[rel] = ("file", st.st_size, content, st.st_mtime_ns, mode)
    return out


def wait_equal(a: Path, b: Path, timeout: float = 20, what: str = "") -> dict[str, tuple]:
    last: list = [None, None]

    def same() -> bool:
        last[0], last[1] = tree(a), tree(b)
        return last[0] == last[1]

    try:
        wait_for(same, timeout, what or f"{b} to equal {a}", interval=0.05)
    except AssertionError as exc:
        ta, tb = last
        diff = {k: (ta.get(k), tb.get(k)) for k in set(ta) | set(tb) if ta.get(k) != tb.get(k)}
        raise AssertionError(f"{exc}; differences (primary, secondary): "
                             f"{dict(list(diff.items())[:10])}") from None
    return last[0]


def write(path: Path, data: bytes | str, mode: int | None = None,
          mtime_ns: int | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    if mode is not None:
        path.chmod(mode)
    if mtime_ns is not None:
        os.utime(path, ns=(mtime_ns, mtime_ns))
    return path


def started(pair: Pair) -> Pair:
    """alpha primary, then beta secondary and in sync."""
    pair.alpha.start()
    pair.alpha.wait_state("primary")
    pair.beta.start()
    pair.beta.wait_state("secondary")
    wait_for(lambda: replication(pair.beta).get("synced"), 20,
             f"beta to finish its first sync (log: {pair.beta.tail_log()})")
    return pair


def replication(node: NodeProc) -> dict:
    st = node.status(0.5)
    return st["replication"] if st else {}


def files_under(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if not p.is_dir())


# ---------------------------------------------------------------------------------- tests

def test_initial_sync_of_an_odd_tree_is_exact(make_pair):
    pair = make_pair()
    a = pair.folder("alpha")
    old = 1_600_000_000_123_456_789
    write(a / "top.txt", "top level\n", 0o644, old)
    write(a / "a" / "b" / "c" / "deep.txt", "deep\n" * 100, 0o600, old + 1)
    write(a / "ünïcødé ñame" / "文件 with spaces.txt", "unicode\n", 0o640, old + 2)
    write(a / "with space" / "file name .txt", "", 0o644, old + 3)  # empty file
    write(a / ".hidden", "hidden\n", 0o600, old + 4)
    write(a / ".hidden dir" / ".also hidden", "x", 0o755, old + 5)
    write(a / "run.sh", "#!/bin/sh\necho hi\n", 0o755, old + 6)
    (a / "empty folder" / "nested empty").mkdir(parents=True)
    (a / "private").mkdir(mode=0o700)
    (a / "private").chmod(0o700)
    os.symlink("a/b/c/deep.txt", a / "link to deep")
    os.symlink("does/not/exist", a / "dangling")
    os.symlink("/etc/passwd", a / "absolute link")
    for link in ("link to deep", "dangling", "absolute link"):
        os.utime(a / link, ns=(old + 7, old + 7), follow_symlinks=False)
    big = write(a / "big" / "fifty.bin", os.urandom(50 * MiB), 0o644, old + 8)
    started(pair)
    b = pair.folder("beta")
    want = wait_equal(a, b, 30)
    assert want["big/fifty.bin"][1] == 50 * MiB
    assert want["link to deep"][:2] == ("link", "a/b/c/deep.txt")
    assert os.path.islink(b / "absolute link") and not os.path.islink(b / "big" / "fifty.bin")
    assert want["empty folder/nested empty"] == ("dir", 0o755)
    assert want["private"] == ("dir", 0o700)
    assert want["with space/file name .txt"][1] == 0
    assert digest(b / "big" / "fifty.bin") == digest(big)
    # nothing of ours left in the folder, nothing half-done in the temp dir
    assert not [p for p in b.rglob(".sbs-tmp-*")]
    tmp = pair.root / "state" / "beta" / "tmp"
    assert not [p for p in tmp.rglob("*") if p.is_file()]


def test_filters_replicate_only_matching_files(make_pair):
    def folders(name: str) -> dict:
        return {"docs": f"data/{name}/docs", "labels": f"data/{name}/labels *.lab",
                "deep": f"data/{name}/deep **/keep/*.txt /top.cfg"}

    pair = make_pair(alpha={"folders": folders("alpha")}, beta={"folders": folders("beta")})
    la, da = pair.folder("alpha", "labels"), pair.folder("alpha", "deep")
    for rel in ("one.lab", "sub/two.lab", "no.txt", "sub/no.lab.bak", ".hidden.lab"):
        write(la / rel, rel)
    for rel in ("keep/a.txt", "x/y/keep/b.txt", "x/keep/c.log", "keep.txt", "top.cfg",
                "x/top.cfg", "x/y/z.txt"):
        write(da / rel, rel)
    started(pair)
    lb, db = pair.folder("beta", "labels"), pair.folder("beta", "deep")
    wait_for(lambda: files_under(lb) == [".hidden.lab", "one.lab", "sub/two.lab"], 10,
             f"labels on beta: {files_under(lb)}")
    wait_for(lambda: files_under(db) == ["keep/a.txt", "top.cfg", "x/y/keep/b.txt"], 10,
             f"deep on beta: {files_under(db)}")
    # folders replicate whatever the filter (an empty one included)
    assert (db / "x" / "y").is_dir() and (lb / "sub").is_dir()
    # live changes pass the same filter
    write(la / "sub" / "three.lab", "3")
    write(la / "three.txt", "3")
    write(da / "new" / "keep" / "d.txt", "d")
    wait_for(lambda: (lb / "sub" / "three.lab").exists() and (db / "new/keep/d.txt").exists(),
             10, "live filtered changes")
    assert not (lb / "three.txt").exists()
    # the pushed folder list is kept in beta's state_dir
    assert "labels" in (pair.root / "state" / "beta" / "pair.json").read_text()


def test_live_changes_without_strict_keep_old_files(make_pair):
    pair = started(make_pair())
    a, b = pair.folder("alpha"), pair.folder("beta")
    write(a / "new.txt", "one")
    write(a / "dir" / "nested.txt", "nested", 0o600)
    wait_equal(a, b, 10, "create")
    write(a / "new.txt", "one, modified and longer")
    (a / "dir" / "nested.txt").chmod(0o640)
    wait_equal(a, b, 10, "modify content and mode")
    os.rename(a / "new.txt", a / "renamed.txt")
    os.rename(a / "dir", a / "moved dir")
    wait_for(lambda: (b / "renamed.txt").exists() and (b / "moved dir" / "nested.txt").exists(),
             10, "rename")
    assert (b / "renamed.txt").read_text() == "one, modified and longer"
    (a / "renamed.txt").unlink()
    write(a / "marker", "after the delete")
    wait_for(lambda: (b / "marker").exists(), 10, "marker after the delete")
    wait_for(lambda: replication(pair.beta).get("synced"), 10, "beta in sync")
    # without strict, nothing is deleted on the secondary: renamed-away names stay too
    assert (b / "new.txt").read_text() == "one, modified and longer"
    assert (b / "renamed.txt").exists() and (b / "dir" / "nested.txt").exists()
    assert not (pair.root / "state" / "beta" / "trash").exists() or not any(
        (pair.root / "state" / "beta" / "trash").iterdir())


def test_live_changes_with_strict_delete_into_trash(make_pair):
    pair = started(make_pair(node={"strict": "true"}))
    a, b = pair.folder("alpha"), pair.folder("beta")
    write(a / "keep.txt", "keep")
    write(a / "doomed.txt", "doomed content")
    write(a / "dir" / "inner.txt", "inner")
    wait_equal(a, b, 10, "create")
    write(a / "keep.txt", "keep, modified")
    os.rename(a / "dir", a / "moved")
    wait_equal(a, b, 10, "modify and rename")
    (a / "doomed.txt").unlink()
    wait_equal(a, b, 10, "delete")
    trash = pair.root / "state" / "beta" / "trash"
    kept = {p.name: p for p in trash.rglob("*") if p.is_file()}
    assert kept["doomed.txt"].read_text() == "doomed content"
    assert kept["inner.txt"].read_text() == "inner"  # the rename's old name went to trash too
    shutil.rmtree(a / "moved")
    wait_equal(a, b, 10, "folder delete")


def test_strict_guard_refuses_mass_deletion_until_confirmed(make_pair):
    pair = make_pair(node={"strict": "true"})
    a = pair.folder("alpha")
    for n in range(10):
        write(a / f"f{n:02}.txt", f"file {n}")
    for n in range(14):
        write(a / "mount" / f"m{n:02}.txt", f"file {n} on a disk that will vanish")
    started(pair)
    b = pair.folder("beta")
    wait_equal(a, b, 10)
    # 14 of 24 files vanish in one go, as when a disk is unmounted on the primary
    os.rename(a / "mount", pair.root / "unmounted")
    wait_for(lambda: "strict guard" in replication(pair.beta).get("error", ""), 10,
             "the guard error in beta's status")
    write(a / "new.txt", "a new file still arrives")
    wait_for(lambda: (b / "new.txt").exists(), 10, "new file despite the guard")
    assert len(files_under(b)) == 25  # nothing deleted
    assert "strict guard" in replication(pair.beta)["error"]
    res = sbs_tools("confirm-deletions", "--config", str(pair.beta.config))
    assert res.returncode == 0, res.stdout + res.stderr
    wait_equal(a, b, 15, "deletions after confirm-deletions")
    assert len(files_under(b)) == 11
    wait_for(lambda: not replication(pair.beta).get("error"), 10, "the guard error cleared")
    trashed = [p for p in (pair.root / "state" / "beta" / "trash").rglob("*") if p.is_file()]
    assert len(trashed) == 14


def big_file(path: Path, mib: int) -> str:
    """Write `mib` MiB of incompressible data (distinct 1 MiB blocks); return its hash."""
    block = bytearray(os.urandom(MiB))
    with open(path, "wb") as f:
        for n in range(mib):
            block[:8] = n.to_bytes(8, "big")
            f.write(block)
    return digest(path)


def test_secondary_killed_mid_file_converges_and_never_shows_a_partial_file(make_pair):
    pair = started(make_pair())
    a, b = pair.folder("alpha"), pair.folder("beta")
    write(a / "big.bin", "the old version\n" * 1000)
    wait_equal(a, b, 10)
    old_hash = digest(b / "big.bin")
    staged = pair.root / "big.new"  # written aside, renamed in: the primary sees it complete
    new_hash = big_file(staged, 384)
    watcher = PathWatcher(b / "big.bin", {old_hash, new_hash})
    temps = pair.root / "state" / "beta" / "tmp" / "docs"

    def transfer_under_way() -> bool:
        return any(p.stat().st_size >= 32 * MiB for p in temps.iterdir())

    try:
        os.rename(staged, a / "big.bin")
        wait_for(transfer_under_way, 20, "beta to be receiving big.bin", interval=0.002)
        pair.beta.kill()
        assert digest(b / "big.bin") == old_hash  # the old copy, untouched
        pair.beta.start()
        pair.beta.wait_state("secondary")
        wait_equal(a, b, 60, "big.bin after beta's restart")
    finally:
        watcher.stop()
    assert not watcher.bad, watcher.bad
    assert {h for _, h in watcher.seen.values()} <= {old_hash, new_hash}
    assert digest(b / "big.bin") == new_hash
    assert not list(temps.iterdir()), "the killed run's temp file was not cleaned up"


def test_a_file_growing_while_it_is_sent_converges(make_pair):
    pair = started(make_pair())
    a, b = pair.folder("alpha"), pair.folder("beta")
    grow = a / "growing.log"
    big_file(grow, 32)
    watcher = PathWatcher(b / "growing.log", set())
    overlapped = 0
    try:
        with open(grow, "ab") as f:
            deadline = time.monotonic() + 1.5
            while time.monotonic() < deadline:  # the writer's own pace
                f.write(os.urandom(256 << 10))
                f.flush()
                overlapped += replication(pair.beta).get("pending_files", 0)
        wait_equal(a, b, 30, "the grown file")
    finally:
        watcher.stop()
    assert overlapped, "the appends never overlapped a transfer"
    # every version beta showed at the real name was whole: a prefix the primary really had
    with open(grow, "rb") as f:
        for size, h in watcher.seen.values():
            assert xxhash.xxh3_128_hexdigest(f.read(size)) == h, f"torn copy of {size} bytes"
            f.seek(0)


class TmpfsNodeProc(NodeProc):
    """A node whose first folder is a small tmpfs, mounted in a mount namespace of its own
    (unshare -m): its disk fills up without touching the host. The test reaches that folder
    through /proc/<pid>/root, which resolves paths in the node's namespace."""

    def __init__(self, config: Path, folder: Path, size: str):
        super().__init__(config)
        self.mountpoint, self.size = folder, size

    def start(self, *extra: str) -> NodeProc:
        self.logfh = open(self.log, "ab")
        script = (f"mount -t tmpfs -o size={self.size} tmpfs {shlex.quote(str(self.mountpoint))}"
                  f" && exec {shlex.quote(sys.executable)} -m node.cli start --config "
                  f"{shlex.quote(str(self.config))}")
        self.proc = subprocess.Popen(["unshare", "-m", "--propagation", "private", "sh", "-c",
                                      script], stdout=self.logfh, stderr=subprocess.STDOUT)
        return self

    def inside(self, path: Path) -> Path:
        return Path(f"/proc/{self.pid}/root{path}")


def _unshare_works() -> bool:
    try:
        res = subprocess.run(["unshare", "-m", "sh", "-c", "mount -t tmpfs -o size=1m tmpfs /mnt"],
                             capture_output=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return res.returncode == 0


@pytest.mark.skipif(not _unshare_works(), reason="needs unshare -m and mount (root)")
def test_a_full_disk_keeps_the_old_copy_and_recovers(make_pair):
    pair = make_pair()
    a, b = pair.folder("alpha"), pair.folder("beta")
    beta = pair.nodes["beta"] = pair.beta = TmpfsNodeProc(pair.beta.config, b, "8m")
    v1 = write(a / "keep.bin", os.urandom(MiB)).read_bytes()
    write(a / "filler.bin", os.urandom(5 * MiB))
    started(pair)
    bb = beta.inside(b)
    wait_equal(a, bb, 20, "the first sync into the tmpfs")
    assert os.statvfs(bb).f_bsize * os.statvfs(bb).f_bavail < 3 * MiB
    v2 = os.urandom(3 * MiB)
    write(a / "keep.bin", v2)  # does not fit: 2 MiB free
    write(a / "small.txt", "small files still fit")
    wait_for(lambda: "disk full" in replication(beta).get("error", ""), 10,
             f"the disk-full error in beta's status {beta.tail_log()}")
    assert (bb / "keep.bin").read_bytes() == v1  # the old copy, intact
    wait_for(lambda: (bb / "small.txt").exists(), 10, "the small file")
    assert not list(bb.rglob(".sbs-tmp-*")), "a temp file was left on the full disk"
    st = beta.status()
    assert st["state"] == "secondary" and st["replication"]["pending_files"] >= 1
    (bb / "filler.bin").unlink()  # the operator frees space on the secondary
    wait_for(lambda: (bb / "keep.bin").read_bytes() == v2, 15, "keep.bin once space returned")
    wait_for(lambda: not replication(beta).get("error"), 10, "the error cleared")
    assert replication(beta)["pending_files"] == 0
