"""node.journal.Agreed: persistence, torn last line, compaction, the open marker."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import orjson
from sbs.node.journal import COMPACT_SLACK, Agreed
from sbs.node.proctree import boot_id


def _lines(path) -> list[bytes]:
    return path.read_bytes().splitlines()


def test_missing_file_is_empty(tmp_path):
    with Agreed(tmp_path / "state" / "agreed.jsonl") as agreed:
        assert agreed.get("f", "a.txt") is None
        assert len(agreed) == 0


def test_updates_persist_across_reopen(tmp_path):
    path = tmp_path / "agreed.jsonl"
    with Agreed(path) as agreed:
        agreed.update([("f", "a.txt", "h1"), ("f", "d", "dir"), ("g", "a.txt", "link:x")])
        agreed.update([("f", "a.txt", "h2"), ("g", "a.txt", None)])
        assert agreed.get("f", "a.txt") == "h2"
    with Agreed(path) as agreed:
        assert agreed.get("f", "a.txt") == "h2"
        assert agreed.get("f", "d") == "dir"
        assert agreed.get("g", "a.txt") is None
        assert agreed.get("nope", "a.txt") is None
        assert len(agreed) == 2


def test_updates_are_flushed_before_close(tmp_path):
    path = tmp_path / "agreed.jsonl"
    agreed = Agreed(path)
    agreed.update([("f", "ü b/c.txt", "h")])
    assert orjson.loads(_lines(path)[-1]) == ["f", "ü b/c.txt", "h"]
    other = Agreed(path)  # what a restarted process would read
    assert other.get("f", "ü b/c.txt") == "h"
    other.close()
    agreed.close()


def test_what_is_recorded_already_is_not_appended_again(tmp_path):
    # a rejoin with an unchanged tree agrees on every path once more: nothing new to write
    path = tmp_path / "agreed.jsonl"
    with Agreed(path) as agreed:
        agreed.update([("f", f"k{i}", "h") for i in range(100)] + [("f", "d", "dir")])
        written = path.read_bytes()
        agreed.update([("f", f"k{i}", "h") for i in range(100)] + [("f", "d", "dir"),
                                                                   ("f", "never", None)])
        assert path.read_bytes() == written
        agreed.update([("f", "k1", "h"), ("f", "k2", "h2"), ("f", "k3", None), ("g", "k1", "h")])
        assert _lines(path)[len(written.splitlines()):] == [
            b'["f","k2","h2"]', b'["f","k3",null]', b'["g","k1","h"]']
    with Agreed(path) as agreed:
        assert (agreed.get("f", "k1"), agreed.get("f", "k2"), agreed.get("f", "k3")) == (
            "h", "h2", None)
        assert len(agreed) == 101


def test_torn_last_line_is_ignored_and_cut(tmp_path):
    path = tmp_path / "agreed.jsonl"
    with Agreed(path) as agreed:
        agreed.update([("f", "a", "h1"), ("f", "b", "h2")])
    with open(path, "ab") as f:
        f.write(b'["f","a","h9')  # a crash in the middle of an append
    with Agreed(path) as agreed:
        assert agreed.get("f", "a") == "h1"
        agreed.update([("f", "c", "h3")])
    with Agreed(path) as agreed:
        assert (agreed.get("f", "a"), agreed.get("f", "b"), agreed.get("f", "c")) == (
            "h1", "h2", "h3")
    assert all(orjson.loads(line) for line in _lines(path))


def test_bad_line_in_the_middle_is_skipped(tmp_path):
    path = tmp_path / "agreed.jsonl"
    path.write_bytes(b'["f","a","h1"]\nnot json\n[1,2,3]\n["f","b","h2"]\n')
    with Agreed(path) as agreed:
        assert agreed.get("f", "a") == "h1"
        assert agreed.get("f", "b") == "h2"


def test_compaction_keeps_live_entries_only(tmp_path):
    path = tmp_path / "agreed.jsonl"
    with Agreed(path) as agreed:
        agreed.update([("f", f"k{i}", "h") for i in range(10)])
        for n in range(COMPACT_SLACK // 500 + 2):
            agreed.update([("f", "hot", f"v{n}-{i}") for i in range(500)])
        agreed.update([("f", "k0", None)])
        assert len(_lines(path)) < COMPACT_SLACK  # rewritten at least once
        last = agreed.get("f", "hot")
    assert not (tmp_path / "agreed.jsonl.tmp").exists()
    with Agreed(path) as agreed:
        assert agreed.get("f", "hot") == last
        assert agreed.get("f", "k0") is None
        assert agreed.get("f", "k9") == "h"
        assert len(agreed) == 10


def test_token_of_entries():
    assert Agreed.token({"path": "d", "kind": "dir"}) == "dir"
    assert Agreed.token({"path": "l", "kind": "link", "target": "../x"}) == "link:../x"
    assert Agreed.token({"path": "f", "kind": "file", "hash": "abc"}) == "abc"
    assert Agreed.token({"path": "f", "kind": "file", "hash": "abc", "deleted": True}) is None


def test_a_large_update_is_written_in_batches_and_reads_back_whole(tmp_path):
    """100,000-file snapshots are journalled in bounded batches (a single join of every line
    cost the secondary hundreds of MB); every line, across the batch boundaries, comes back."""
    path = tmp_path / "agreed.jsonl"
    items = [("docs", f"d{i % 7}/f{i:05}.txt", f"{i:032x}") for i in range(5000)]
    items[4097] = ("docs", items[4097][1], None)  # a deletion in a later batch
    with Agreed(path) as j:
        j.update(items)
        j.compact()
        j.update(items[:10])
    lines = path.read_bytes().split(b"\n")
    assert lines[-1] == b"" and all(orjson.loads(line) for line in lines[:-1])
    with Agreed(path) as j:
        assert len(j) == 4999
        assert j.get("docs", items[4096][1]) == f"{4096:032x}"
        assert j.get("docs", items[4097][1]) is None
        assert j.get("docs", items[4999][1]) == f"{4999:032x}"


def test_a_failed_append_is_kept_in_memory_and_rewritten_whole(tmp_path):
    """A full state disk: the append fails (here on /dev/full, which refuses every write with
    ENOSPC), the writer goes on, the entries stay known, and rewrite() writes them all."""
    path = tmp_path / "agreed.jsonl"
    with Agreed(path) as agreed:
        agreed.update([("f", "before.txt", "h0")])
        agreed._file.close()
        agreed._file = open("/dev/full", "ab")  # the disk is full from now on
        agreed.update([("f", "a.txt", "h1")])  # no exception: the syncer's job goes on
        agreed.update([("f", "b.txt", "h2")])
        assert "No space left" in agreed.write_error
        assert agreed.get("f", "a.txt") == "h1" and agreed.get("f", "b.txt") == "h2"
        assert agreed.rewrite() is True and agreed.write_error == ""
        agreed.update([("f", "c.txt", "h3")])
    with Agreed(path) as agreed:
        assert [agreed.get("f", p) for p in ("before.txt", "a.txt", "b.txt", "c.txt")] == [
            "h0", "h1", "h2", "h3"]


def _crash(agreed: Agreed) -> None:
    """The node dies without closing its journal: what it appended is in the file (flushed),
    the marker stays."""
    agreed._file.close()


def test_a_clean_close_drops_the_marker_and_the_journal_is_trusted(tmp_path):
    path = tmp_path / "agreed.jsonl"
    with Agreed(path) as agreed:
        agreed.update([("f", "a.txt", "h1")])
        assert agreed.marker.read_text().strip() == boot_id()
    assert not agreed.marker.exists()
    with Agreed(path) as agreed:
        assert agreed.get("f", "a.txt") == "h1"


def test_a_journal_left_open_in_this_boot_is_trusted(tmp_path):
    """A node killed (kill -9, a crash of its own): the machine kept every flushed append."""
    path = tmp_path / "agreed.jsonl"
    agreed = Agreed(path)
    agreed.update([("f", "a.txt", "h1"), ("f", "a.txt", "h2")])
    _crash(agreed)
    with Agreed(path) as again:
        assert again.get("f", "a.txt") == "h2"


def test_a_journal_left_open_in_another_boot_is_not_trusted(tmp_path, caplog):
    """The machine went down with the journal open: its last appends may be lost, and an older
    agreement read as the last one would let a file changed back to that version be replaced
    without a conflict copy. The journal starts empty (a copy of every file that differs)."""
    path = tmp_path / "agreed.jsonl"
    agreed = Agreed(path)
    agreed.update([("f", "a.txt", "h1")])
    agreed.update([("f", "a.txt", "h2")])
    _crash(agreed)
    # what the machine's restart leaves: the last append lost, the marker of the boot before
    path.write_bytes(b"".join(line + b"\n" for line in _lines(path)[:-1]))
    agreed.marker.write_text("a-boot-before-this-one\n")
    with Agreed(path) as again:
        assert again.get("f", "a.txt") is None and len(again) == 0
        assert again.marker.read_text().strip() == boot_id()  # this boot's, from now on
        again.update([("f", "b.txt", "h3")])
    assert "not trusted" in caplog.text and "another boot" in caplog.text
    with Agreed(path) as again:  # what was agreed since is kept
        assert again.get("f", "b.txt") == "h3" and again.get("f", "a.txt") is None


def _h1_then_h2_on_a_full_disk(path: Path) -> Agreed:
    """A journal at path that holds h1 for f/a.txt; then the disk is full (/dev/full) and the
    pair agrees on h2, which memory holds and the file does not."""
    agreed = Agreed(path)
    agreed.update([("f", "a.txt", "h1")])
    agreed._file.close()
    agreed._file = open("/dev/full", "ab")  # the disk is full from now on
    agreed.update([("f", "a.txt", "h2")])
    return agreed


def test_a_journal_that_could_not_be_written_whole_is_not_trusted_after_a_stop(tmp_path):
    """A full state disk until the node stops: the file lags what was agreed, so the next
    start trusts it no more than after a machine crash."""
    path = tmp_path / "agreed.jsonl"
    agreed = _h1_then_h2_on_a_full_disk(path)
    agreed.path = tmp_path / "nowhere" / "agreed.jsonl"  # and rewrite() fails too
    agreed.close()
    agreed.path = path
    assert agreed.marker.read_text() == ""
    with Agreed(path) as again:
        assert again.get("f", "a.txt") is None


_KILLED_WHILE_FULL = """
import os, signal, sys
from sbs.node.journal import Agreed
agreed = Agreed(sys.argv[1])
agreed.update([("f", "a.txt", "h1")])
agreed._file.close()
agreed._file = open("/dev/full", "ab")  # the state disk is full from now on
agreed.update([("f", "a.txt", "h2")])  # agreed, in memory only: the file still says h1
assert "No space left" in agreed.write_error, agreed.write_error
os.kill(os.getpid(), signal.SIGKILL)  # before space returns and rewrite() catches up
"""


def test_a_journal_whose_append_failed_is_not_trusted_after_a_kill(tmp_path):
    """A full state disk, then the node is killed (same boot) before the journal is written
    again: the file says h1 while the pair last agreed on h2. Read as the last word, it would
    let a file changed back to h1 here be replaced without a conflict copy; it must be
    distrusted like a journal left open by a machine crash."""
    path = tmp_path / "agreed.jsonl"
    child = subprocess.run([sys.executable, "-c", _KILLED_WHILE_FULL, str(path)],
                           capture_output=True, text=True, timeout=60)
    assert child.returncode == -signal.SIGKILL, child.stderr
    assert orjson.loads(_lines(path)[-1]) == ["f", "a.txt", "h1"]  # what the file lags with
    with Agreed(path) as again:
        assert again.get("f", "a.txt") is None and len(again) == 0


def test_a_journal_written_whole_again_is_trusted_after_a_kill_again(tmp_path):
    """Once rewrite() has caught up after a failed append, the file holds what memory holds:
    the marker names this boot again, and a kill from then on keeps the journal."""
    path = tmp_path / "agreed.jsonl"
    agreed = _h1_then_h2_on_a_full_disk(path)
    assert agreed.marker.read_text() == ""  # a kill now: not trusted
    assert agreed.rewrite() is True  # space is back
    assert agreed.marker.read_text().strip() == boot_id()
    agreed.update([("f", "b.txt", "h3")])
    _crash(agreed)
    with Agreed(path) as again:
        assert (again.get("f", "a.txt"), again.get("f", "b.txt")) == ("h2", "h3")


def test_names_that_are_not_utf8_persist_across_reopen_and_compaction(tmp_path):
    """A path and a link target in Latin-1 (node/names.py escapes them in the JSON lines)."""
    import os

    path = tmp_path / "agreed.jsonl"
    name, target = os.fsdecode(b"d\xe8r/caf\xe9.txt"), os.fsdecode(b"link:target-\xff")
    with Agreed(path) as agreed:
        agreed.update([("f", name, "h1"), ("f", "link", target)])
    assert b"\\u0000" in path.read_bytes()  # escaped (node/names.py)
    with Agreed(path) as agreed:
        assert agreed.get("f", name) == "h1" and agreed.get("f", "link") == target
        for n in range(COMPACT_SLACK + 10):  # enough dead lines for a compaction
            agreed.update([("f", "churn", f"h{n}")])
    with Agreed(path) as agreed:
        assert agreed.get("f", name) == "h1" and agreed.get("f", "link") == target
        assert len(agreed) == 3


def test_a_journal_deleted_while_open_is_written_again_at_the_next_update(tmp_path, caplog):
    """agreed.jsonl removed by hand under a running node: its appends went to a file gone at
    close, and the next start trusted an empty journal (a helper's hunt saw it)."""
    path = tmp_path / "agreed.jsonl"
    with Agreed(path) as agreed:
        agreed.update([("f", "a.txt", "h1")])
        path.unlink()
        agreed.update([("f", "b.txt", "h2")])
        assert path.exists()
        assert "was deleted while the node runs" in caplog.text
    with Agreed(path) as agreed:
        assert agreed.get("f", "a.txt") == "h1" and agreed.get("f", "b.txt") == "h2"
