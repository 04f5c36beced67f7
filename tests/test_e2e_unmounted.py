"""A secondary's folder that looks like a disk not mounted: missing although the node held
files in it, or empty on another device than then (node/hashstore.py: vanished). Nothing is
written there, where the copy would fill the filesystem under the mount point; the status
says why, and the folder is taken on again once the disk is back.

Every wait polls a condition with a deadline.
"""
from __future__ import annotations

import time

from sbs.node.hashstore import WROTE_SPAN
from sbs.node.index import RACY_NS

from tests.pair import wait_for
from tests.test_e2e_replication import replication, started, wait_equal, write


def test_a_secondary_does_not_make_again_a_folder_it_held_files_in(make_pair):
    """beta held docs' files; beta is stopped, its disk taken away (the folder with it) and
    beta started again: it used to make the folder anew on the filesystem beneath and copy
    everything into it. It refuses the folder, naming why, until the disk is back."""
    pair = make_pair()
    a, b = pair.folder("alpha"), pair.folder("beta")
    for n in range(3):
        write(a / f"f{n}.txt", f"file {n}\n")
    started(pair)
    wait_equal(a, b, 15, "the first sync")
    # a graceful stop saves the hash caches, with the files written at least RACY_NS +
    # WROTE_SPAN before it (younger ones are not cached yet: their ctime may still move)
    newest = max(p.stat().st_ctime_ns for p in b.iterdir())
    wait_for(lambda: time.time_ns() - newest > 4 * (RACY_NS + WROTE_SPAN), 5,
             "beta's copies to be old enough to be cached")
    pair.beta.stop()
    assert (pair.root / "state" / "beta" / "hashes" / "docs.jsonl").exists()
    away = b.rename(b.with_name("docs-on-the-disk"))
    pair.beta.start()
    pair.beta.wait_state("secondary")
    st = wait_for(lambda: (r := replication(pair.beta)) and "disk not mounted"
                  in r.get("error", "") and r, 15, "beta to refuse the folder, naming why")
    assert "missing" in st["error"] and st["synced"] is False, st
    assert not b.exists(), "beta made the folder again"
    write(a / "while-away.txt", "written while beta's disk is away\n")
    away.rename(b)  # the disk is back
    wait_equal(a, b, 15, "beta's copy once its disk is back")
    st = wait_for(lambda: (r := replication(pair.beta)) and r.get("synced") and r, 15,
                  "beta in sync once its disk is back")
    assert st["error"] == "", st
