"""Odd objects in a replicated tree on the primary, changing while the node works: a file
replaced by a folder or a link between its manifest and its fetch; FIFOs, sockets and device
nodes, which do not replicate and must be skipped with a word."""
from __future__ import annotations

import os
import signal
import socket
import stat

from tests.pair import wait_for
from tests.test_e2e_replication import replication, started, wait_equal, write


def seq(node) -> int:
    st = node.status(1.0)
    return st["replication"]["seq"] if st else -1


def test_a_file_replaced_before_its_fetch_leaves_the_secondary_synced(make_pair):
    """beta is paused while alpha publishes a file and then, in the next manifest, a folder
    and a link in place of two files: beta, resumed, asks for the files, which alpha can no
    longer serve, then takes the folder and the link. Nothing is pending, so the error of the
    refused fetch is over: beta is in sync. It used to keep that error, and so "not synced",
    until its next snapshot: the primary's stop waited out handover_timeout for it. alpha
    says once that it refused the file, not once for each of its chunks beta asked for."""
    pair = make_pair(node={"dead_after": 8})
    a, b = pair.folder("alpha"), pair.folder("beta")
    started(pair)
    at = seq(pair.alpha)
    pair.beta.signal(signal.SIGSTOP)
    try:
        # 3 chunks of 1 MiB to ask for, renamed in whole: written in place, alpha could
        # publish it at 0 bytes (nothing to fetch, so nothing refused)
        os.rename(write(pair.root / "soon a folder", os.urandom(3 << 20)), a / "soon a folder")
        write(a / "soon a link", "a file for now\n")
        at = wait_for(lambda: (s := seq(pair.alpha)) > at and s, 10, "the files' manifest")
        os.unlink(a / "soon a folder")
        write(a / "soon a folder" / "inside.txt", "now a folder\n")
        os.unlink(a / "soon a link")
        os.symlink("soon a folder/inside.txt", a / "soon a link")
        wait_for(lambda: seq(pair.alpha) > at, 10, "the folder's manifest")
    finally:
        pair.beta.signal(signal.SIGCONT)
    wait_equal(a, b)
    rep = wait_for(lambda: (r := replication(pair.beta)) and r["synced"] and r, 10,
                   "beta in sync, the refused fetch over")
    assert rep["error"] == "" and rep["pending_files"] == 0, rep
    # a race, not a disk error: alpha refuses the folder and the link, and logs no error;
    # it says so once a path, not once a chunk asked for
    log = pair.alpha.log.read_text()
    assert "cannot serve" not in log, pair.alpha.tail_log(30)
    assert log.count("refused fetch of 'soon a folder'") == 1, pair.alpha.tail_log(30)


def test_fifos_sockets_and_devices_are_skipped_with_a_word(make_pair):
    """Only regular files, folders and links replicate. A FIFO, a socket and a device node on
    the primary are not opened and not sent, but not in silence either: the primary logs each
    once and counts them in status (replication.unreplicable), naming a few (a byte that is
    not UTF-8 as \\xNN), and the secondary says the same of the primary, `sbs-tools status`
    too. One made while the pair runs (the watcher's path) counts too, and stops counting once
    it is a regular file again."""
    from tests.test_e2e_operator import sbs_tools

    pair = make_pair()
    a, b = pair.folder("alpha"), pair.folder("beta")
    write(a / "plain.txt", "plain\n")
    os.mkfifo(a / "pipe")
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(a / "sock"))
    os.mknod(a / "null", 0o600 | stat.S_IFCHR, os.makedev(1, 3))
    os.mkfifo(os.path.join(os.fsencode(a), b"fif\xe9"))
    try:
        started(pair)

        def unreplicable(node, count: int) -> dict | None:
            got = replication(node).get("unreplicable")
            return got if got and got["count"] == count else None

        got = wait_for(lambda: unreplicable(pair.alpha, 4), 10, "alpha to count 4")
        assert got["names"] == ["docs/fif\\xe9", "docs/null", "docs/pipe", "docs/sock"], got
        wait_for(lambda: unreplicable(pair.beta, 4), 10, "beta to say the primary's 4")
        assert replication(pair.beta)["synced"]  # in sync with everything that can travel
        shown = sbs_tools("status", "--config", str(pair.beta.config))
        assert "not replicated: 4 object(s) on the primary" in shown.stdout, shown.stdout
        assert "docs/fif\\xe9" in shown.stdout, shown.stdout
        log = pair.alpha.log.read_text()
        for name, kind in (("pipe", "a FIFO"), ("sock", "a socket"),
                           ("null", "a character device")):
            assert f"skipping {str(a / name)!r}: {kind}" in log, pair.alpha.tail_log(30)
        os.mkfifo(a / "later")  # while the pair runs: the watcher's path
        wait_for(lambda: unreplicable(pair.alpha, 5), 10, "alpha to count the new one")
        os.unlink(a / "later")
        write(a / "later", "a file now\n")
        wait_for(lambda: unreplicable(pair.alpha, 4), 10, "alpha to count 4 again")
        wait_equal(a, b)
        assert not any(os.path.lexists(b / n) for n in ("pipe", "sock", "null"))
    finally:
        sock.close()
