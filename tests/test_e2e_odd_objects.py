"""Odd objects in a replicated tree on the primary, changing while the node works: a file
replaced by a folder or a link between its manifest and its fetch; FIFOs, sockets and device
nodes, which do not replicate and must be skipped with a word."""
from __future__ import annotations

import os
import signal

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
    until its next snapshot: the primary's stop waited out handover_timeout for it."""
    pair = make_pair(node={"dead_after": 8})
    a, b = pair.folder("alpha"), pair.folder("beta")
    started(pair)
    at = seq(pair.alpha)
    pair.beta.signal(signal.SIGSTOP)
    try:
        write(a / "soon a folder", "a file for now\n")
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
