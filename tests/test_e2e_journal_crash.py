"""The journal of agreed versions after a machine crash (node/journal.py), end to end.

A node's journal appends are flushed, not fsynced, so a machine that goes down may lose its
last lines. A file that the primary changed back to a version the pair agreed on before then
looked agreed when the node rejoined, and was replaced without a conflict copy: a change
finished on the primary, lost without a word. The machine's restart cannot be made here; what
it leaves can: the journal's tail cut and its open-marker naming another boot.
"""
from __future__ import annotations

import orjson
from sbs.node.index import hash_bytes

from tests.pair import wait_for
from tests.test_e2e_replication import conflicts, crash_with_unsent, started, wait_equal, write

V1, V2 = b"version 1\n", b"version 2\n"


def test_a_file_changed_back_before_a_machine_crash_is_kept_as_a_conflict_copy(make_pair):
    pair = make_pair()
    a, b = pair.folder("alpha"), pair.folder("beta")
    journal = pair.root / "state" / "alpha" / "agreed.jsonl"
    line_v2 = orjson.dumps(["docs", "notes.txt", hash_bytes(V2)])
    write(a / "notes.txt", V1)
    started(pair)
    write(a / "notes.txt", V2)
    wait_equal(a, b, 10)
    wait_for(lambda: line_v2 in journal.read_bytes().splitlines(), 10,
             "alpha to journal version 2 as agreed")
    # alpha changes the file back to version 1; beta, paused, never gets it; alpha's machine
    # goes down, and what its restart leaves is the journal's tail lost and its marker naming
    # the boot before

    def machine_restart() -> None:
        lines = journal.read_bytes().splitlines(keepends=True)
        cut = max(i for i, line in enumerate(lines) if line.rstrip(b"\n") == line_v2)
        journal.write_bytes(b"".join(lines[:cut]))
        marker = journal.with_name("agreed.jsonl.open")
        assert marker.exists(), "alpha's journal has no open-marker while alpha runs"
        marker.write_text("a-boot-before-this-one\n")

    took = crash_with_unsent(pair, lambda: write(a / "notes.txt", V1), machine_restart)
    assert took < pair.beta.cfg.dead_after + 5
    # alpha comes back as secondary: beta's version 2 replaces its version 1, which it keeps
    pair.alpha.start()
    pair.alpha.wait_state("secondary")
    wait_equal(b, a, 15, "alpha catching up with beta")
    assert (a / "notes.txt").read_bytes() == V2
    kept = wait_for(lambda: conflicts("alpha", pair), 10, "alpha's conflict copy")
    assert kept == {"notes.txt": V1}
    assert "not trusted" in pair.alpha.log.read_text()
