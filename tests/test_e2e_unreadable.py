"""Folders and files a node cannot read or open (a failing disk's I/O errors, or permissions).
On the primary they are still there, so the secondary must not be told they were deleted (with
strict, it would move its good copy, perhaps the only readable one, to the trash). On the
secondary, a folder it cannot open is not replicated, and its status must say so."""
from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.pair import NodeProc, wait_for
from tests.test_e2e_replication import replication, started, wait_equal, write

UNMAPPED = 4242  # a uid and gid the node's user namespace does not map


class UsernsNodeProc(NodeProc):
    """A node in a user namespace of its own where only root is mapped (unshare -U -r): a file
    owned by an unmapped user with mode 000 cannot be opened by it (EACCES), as by a node that
    does not run as root, while the test (root outside) can still read it and put it back."""

    def start(self, *extra: str) -> NodeProc:
        self.logfh = open(self.log, "ab")
        self.proc = subprocess.Popen(
            ["unshare", "-U", "-r", sys.executable, "-m", "sbs.node.cli", "start", "--config",
             str(self.config), *extra], stdout=self.logfh, stderr=subprocess.STDOUT)
        self.running()
        return self


@contextlib.contextmanager
def unreadable_in_userns(*paths: Path) -> Iterator[None]:
    """paths owned by UNMAPPED with mode 000 for the block: a UsernsNodeProc cannot read or
    list them; afterwards root's again, 0755 for a folder and 0644 for a file."""
    modes = [0o755 if p.is_dir() else 0o644 for p in paths]
    try:
        for path in paths:
            os.chown(path, UNMAPPED, UNMAPPED)
            path.chmod(0)
        yield
    finally:
        for path, mode in zip(paths, modes, strict=True):
            path.chmod(mode)
            os.chown(path, 0, 0)


def beta_kept(pair, locked: str, inner: str) -> None:
    """beta still has its copies of locked.txt and sub/inner.txt as they were, and its trash
    holds nothing: no deletion reached them."""
    b = pair.folder("beta")
    assert (b / "locked.txt").read_text() == locked
    assert (b / "sub" / "inner.txt").read_text() == inner
    assert not (pair.root / "state" / "beta" / "trash").exists()


def _userns_works() -> bool:
    try:
        res = subprocess.run(["unshare", "-U", "-r", "true"], capture_output=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return res.returncode == 0 and os.geteuid() == 0


@pytest.mark.skipif(not _userns_works(), reason="needs unshare -U -r, run as root")
def test_what_the_primary_cannot_read_is_not_deleted_on_the_secondary(make_pair):
    pair = make_pair(node={"strict": "true"})
    alpha = pair.nodes["alpha"] = pair.alpha = UsernsNodeProc(pair.alpha.config)
    a, b = pair.folder("alpha"), pair.folder("beta")
    write(a / "locked.txt", "a file the primary cannot read for now\n")
    write(a / "sub" / "inner.txt", "in a folder the primary cannot list for now\n")
    write(a / "plain.txt", "readable\n")
    started(pair)
    wait_equal(a, b, 20, "the first sync")
    with unreadable_in_userns(a / "locked.txt", a / "sub"):
        wait_for(lambda: "cannot read" in (log := alpha.log.read_text())
                 and "skipping unreadable folder" in log, 15,
                 "alpha to meet the file and the folder it cannot read")
        write(a / "after.txt", "written after\n")  # a later manifest: beta is past the others
        wait_for(lambda: (b / "after.txt").exists() and replication(pair.beta).get("synced"),
                 15, "beta to apply everything alpha published")
        beta_kept(pair, "a file the primary cannot read for now\n",
                  "in a folder the primary cannot list for now\n")
    assert alpha.state() == "primary" and pair.beta.state() == "secondary"

@pytest.mark.skipif(not _userns_works(), reason="needs unshare -U -r, run as root")
def test_a_folder_the_primary_cannot_read_does_not_stop_the_others(make_pair):
    """alpha can no longer read the root of one of its two folders. That folder keeps what it
    had; the other goes on replicating, and a stop's final sync (a full scan) still carries
    everything. The error used to end the scanner, and with it every folder's replication: a
    file written before a stop never reached the new primary."""
    folders = {n: {"folders": {"docs": f"data/{n}/docs", "more": f"data/{n}/more"}}
               for n in ("alpha", "beta")}
    pair = make_pair(**folders)
    alpha = pair.nodes["alpha"] = pair.alpha = UsernsNodeProc(pair.alpha.config)
    a, b = pair.folder("alpha"), pair.folder("beta")
    more_a, more_b = pair.folder("alpha", "more"), pair.folder("beta", "more")
    write(a / "first.txt", "first\n")
    write(more_a / "kept.txt", "in the folder alpha will not read\n")
    started(pair)
    wait_equal(more_a, more_b, 20, "the first sync of more")
    try:
        os.chown(more_a, UNMAPPED, UNMAPPED)
        more_a.chmod(0)
        wait_for(lambda: any(said in alpha.log.read_text() for said in (
            "cannot be read", "scanner failed", "skipping unreadable folder")), 15,
            "alpha to meet the folder it cannot read")
        write(a / "after.txt", "written after\n")
        wait_for(lambda: (b / "after.txt").exists(), 15, "after.txt on beta")
        write(a / "last.txt", "written right before the stop\n")
        alpha.signal(signal.SIGTERM)
        assert alpha.wait_exit(30) == 0
        pair.beta.wait_state("primary", timeout=10)
    finally:
        more_a.chmod(0o755)
        os.chown(more_a, 0, 0)
    assert (b / "last.txt").read_text() == "written right before the stop\n"
    assert (more_b / "kept.txt").read_text() == "in the folder alpha will not read\n"
    assert "final sync incomplete" not in alpha.log.read_text(), alpha.tail_log()

@pytest.mark.skipif(not _userns_works(), reason="needs unshare -U -r, run as root")
def test_a_file_the_primary_cannot_serve_is_named_by_both_nodes(make_pair):
    """alpha lists a file (it is there) that it cannot read when beta asks for it
    (permissions here; a bad sector under a file whose hash is cached alike, which no scan
    reads again). beta keeps asking; alpha says once which file it cannot serve, and why,
    and so does beta, in its log and in its status's error, until the file arrives.
    Neither node used to say anything: beta only showed one file pending, for ever, asking
    for it every 0.3 s."""
    pair = make_pair()
    alpha = pair.nodes["alpha"] = pair.alpha = UsernsNodeProc(pair.alpha.config)
    a, b = pair.folder("alpha"), pair.folder("beta")
    write(a / "locked.txt", "alpha cannot read this for now\n")
    write(a / "ok.txt", "readable\n")
    alpha.start()
    alpha.wait_state("primary")
    wait_for(lambda: replication(alpha).get("ready"), 15, "alpha's first scan")
    locked = a / "locked.txt"
    try:
        os.chown(locked, UNMAPPED, UNMAPPED)
        locked.chmod(0)
        wait_for(lambda: "cannot read" in alpha.log.read_text(), 15,
                 "alpha to meet the file it cannot read")
        pair.beta.start()
        pair.beta.wait_state("secondary")
        wait_for(lambda: (b / "ok.txt").exists()
                 and replication(pair.beta).get("pending_files") == 1, 15,
                 "beta with everything but the file alpha cannot read")
        wait_for(lambda: "cannot serve docs/locked.txt" in alpha.log.read_text(), 10,
                 "alpha to say which file it cannot serve")
        said = [line for line in alpha.log.read_text().splitlines() if "cannot serve" in line]
        assert len(said) == 1 and "Permission denied" in said[0], said
        st = wait_for(lambda: (r := replication(pair.beta)) and "cannot serve" in r.get(
            "error", "") and r, 10, "beta's status to name the file alpha cannot serve")
        assert "docs/locked.txt" in st["error"] and "Permission denied" in st["error"], st
        assert st["synced"] is False, st
        wait_for(lambda: "cannot serve docs/locked.txt" in pair.beta.log.read_text(), 10,
                 "beta to log the file alpha cannot serve")
    finally:
        locked.chmod(0o644)
        os.chown(locked, 0, 0)
    wait_equal(a, b, 15)
    st = wait_for(lambda: (r := replication(pair.beta)) and r.get("synced") and r, 15,
                  "beta in sync once alpha can read the file again")
    assert st["error"] == "", st
    said = [line for line in pair.beta.log.read_text().splitlines() if "cannot serve" in line]
    assert len(said) == 1 and "Permission denied" in said[0], said

@pytest.mark.skipif(not _userns_works(), reason="needs unshare -U -r, run as root")
def test_a_folder_the_secondary_cannot_open_is_not_reported_in_sync(make_pair):
    """beta cannot open its copy of docs: the folder is refused (logged), and beta used to
    report itself in sync all the same, so alpha would hand over to a node without the
    folder. The refusal is in beta's error, and beta is not synced. Once the folder can be
    opened (its permissions mended here; a disk mounted late alike), beta takes it on by itself
    and is in sync: it used to wait for the next snapshot, a reconnect or a restart away."""
    pair = make_pair()
    beta = pair.nodes["beta"] = pair.beta = UsernsNodeProc(pair.beta.config)
    a, b = pair.folder("alpha"), pair.folder("beta")
    write(a / "f.txt", "only on alpha so far\n")
    os.chown(b, UNMAPPED, UNMAPPED)
    b.chmod(0)
    try:
        pair.start_both()
        st = wait_for(lambda: (r := replication(beta)) and "cannot be replicated here"
                      in r.get("error", "") and r, 15, "the refused folder in beta's status")
        assert st["synced"] is False and "docs" in st["error"], st
        wait_for(lambda: "cannot be replicated here" in replication(pair.alpha).get(
            "peer_error", ""), 10, "beta's error in alpha's status")
        assert replication(pair.alpha)["peer_following"] is True
        assert not replication(beta)["synced"]
    finally:
        b.chmod(0o755)
        os.chown(b, 0, 0)
    wait_equal(a, b, 15, "beta's copy of docs once it can open it")
    st = wait_for(lambda: (r := replication(beta)) and r.get("synced") and r, 15,
                  "beta in sync with the folder it refused")
    assert st["error"] == "", st
    assert "docs (" in beta.log.read_text().split("can be replicated here now")[0][-200:], (
        beta.tail_log())


@pytest.mark.skipif(not _userns_works(), reason="needs unshare -U -r, run as root")
def test_what_the_primary_could_not_read_at_its_start_is_not_deleted_on_the_secondary(
        make_pair):
    """alpha starts with a file and a folder it cannot read, so its first index has no entry
    for them (nor has its hash cache): the snapshot names them as there but unreadable, and a
    strict beta keeps its copies. It used to move them to its trash: an index without them
    reads as "deleted" to a snapshot."""
    pair = make_pair(node={"strict": "true"})
    alpha = pair.nodes["alpha"] = pair.alpha = UsernsNodeProc(pair.alpha.config)
    a, b = pair.folder("alpha"), pair.folder("beta")
    for side in (a, b):  # both hold them already (beta has been a secondary before)
        write(side / "locked.txt", "a file the primary cannot read at its start\n")
        write(side / "sub" / "inner.txt", "in a folder it cannot list at its start\n")
    write(a / "plain.txt", "readable\n")
    with unreadable_in_userns(a / "locked.txt", a / "sub"):
        started(pair)
        wait_for(lambda: (b / "plain.txt").exists() and replication(pair.beta).get("synced"),
                 20, "beta synced with what alpha can read")
        beta_kept(pair, "a file the primary cannot read at its start\n",
                  "in a folder it cannot list at its start\n")
        said = pair.beta.log.read_text()
        assert "the primary cannot read 2 path(s)" in said and "locked.txt" in said, said[-2000:]
    write(a / "after.txt", "once readable again, the files replicate as ever\n")
    wait_for(lambda: (b / "after.txt").exists(), 15, "after.txt on beta")
    assert alpha.state() == "primary" and pair.beta.state() == "secondary"

@pytest.mark.skipif(not _userns_works(), reason="needs unshare -U -r, run as root")
def test_a_folder_the_primary_cannot_open_at_its_start_is_not_emptied_on_the_secondary(
        make_pair):
    """alpha starts unable to read the root of its folder: its first index of it is empty. The
    snapshot names the whole folder as unreadable, and a strict beta keeps every file it has
    there (a few files: the guard against an unmounted disk holds back only mass deletions)."""
    pair = make_pair(node={"strict": "true"})
    alpha = pair.nodes["alpha"] = pair.alpha = UsernsNodeProc(pair.alpha.config)
    a, b = pair.folder("alpha"), pair.folder("beta")
    for side in (a, b):
        write(side / "one.txt", "one\n")
        write(side / "sub" / "two.txt", "two\n")
    with unreadable_in_userns(a):
        started(pair)
        wait_for(lambda: pair.beta.state() == "secondary"
                 and replication(pair.beta).get("synced"), 20, "beta done with the snapshot")
        assert (b / "one.txt").read_text() == "one\n"
        assert (b / "sub" / "two.txt").read_text() == "two\n"
        assert not (pair.root / "state" / "beta" / "trash").exists()
        assert "cannot be read" in alpha.log.read_text()
        assert "the primary cannot read 1 path(s) it has ((the folder))" in (
            pair.beta.log.read_text())
