"""node.unreplicable with the scans that feed it, on real files: a FIFO, a socket is skipped
and recorded (filter respected), forgotten when gone or replaced by a file, and summed up
escaped; a name that is not UTF-8 is no reason to skip (it travels, node/names.py), by any of
the three scans (full, watched paths, rolling)."""
from __future__ import annotations

import os
import socket
from pathlib import Path

from sbs.node.filters import Filter
from sbs.node.index import HashCache, scan_folder, scan_paths
from sbs.node.rolling import rescan_dir
from sbs.node.unreplicable import MAX_KEPT, Unreplicable, special, summary

LATIN1 = os.fsdecode(b"caf\xe9.txt")
FOLDER = os.fsdecode(b"d\xe8r")
LINK_TARGET = os.fsdecode(b"target-\xff")
FIFO = f"a FIFO: {special(0o010644).split(': ', 1)[1]}"


def make_tree(root: Path) -> None:
    (root / "plain.txt").write_text("plain\n")
    (root / LATIN1).write_text("Latin-1 name\n")
    (root / FOLDER).mkdir()
    (root / FOLDER / "inside.lab").write_text("in a Latin-1 folder\n")
    os.symlink(LINK_TARGET, root / "link")
    os.mkfifo(root / "pipe")
    os.mkfifo(root / FOLDER / os.fsdecode(b"pip\xe9.lab"))


def test_a_full_scan_takes_names_that_are_not_utf8_and_records_only_specials(tmp_path):
    make_tree(tmp_path)
    cache = HashCache()
    index = scan_folder(str(tmp_path), Filter(), cache)
    assert sorted(index) == sorted(["plain.txt", LATIN1, FOLDER, f"{FOLDER}/inside.lab", "link"])
    assert index["link"]["target"] == LINK_TARGET
    assert index["link"]["size"] == len(b"target-\xff")
    assert index[LATIN1]["size"] == len("Latin-1 name\n")
    fifo_in_folder = f"{FOLDER}/" + os.fsdecode(b"pip\xe9.lab")
    assert cache.unreplicable.paths == {"pipe": FIFO, fifo_in_folder: FIFO}
    only_lab = HashCache()  # *.lab: the FIFO named pipe is not wanted anyway
    index = scan_folder(str(tmp_path), Filter(["*.lab"]), only_lab)
    assert only_lab.unreplicable.paths == {fifo_in_folder: FIFO}
    assert sorted(index) == sorted([FOLDER, f"{FOLDER}/inside.lab"])


def test_watched_paths_that_are_not_utf8_are_scanned_and_specials_recorded_while_there(
        tmp_path):
    (tmp_path / "plain.txt").write_text("plain\n")
    cache = HashCache()
    index = scan_folder(str(tmp_path), Filter(), cache)
    (tmp_path / LATIN1).write_text("made later\n")
    (tmp_path / FOLDER).mkdir()
    (tmp_path / FOLDER / "x.txt").write_text("x\n")
    os.mkfifo(tmp_path / "pipe")
    delta = scan_paths(str(tmp_path), Filter(), cache, index,
                       {LATIN1, f"{FOLDER}/x.txt", "pipe"})
    assert sorted(e["path"] for e in delta) == sorted([LATIN1, FOLDER, f"{FOLDER}/x.txt"])
    assert cache.unreplicable.paths == {"pipe": FIFO}
    os.unlink(tmp_path / LATIN1)
    os.unlink(tmp_path / "pipe")
    delta = scan_paths(str(tmp_path), Filter(), cache, index, {LATIN1, "pipe"})
    assert [(e["path"], e.get("deleted")) for e in delta] == [(LATIN1, True)]
    assert cache.unreplicable.paths == {}


def test_a_special_replaced_by_a_file_or_deleted_is_pruned(tmp_path):
    make_tree(tmp_path)
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(tmp_path / "sock"))
    try:
        cache = HashCache()
        scan_folder(str(tmp_path), Filter(), cache)
        assert set(cache.unreplicable.paths) >= {"pipe", "sock"}
        os.unlink(tmp_path / "pipe")
        (tmp_path / "pipe").write_text("a file now\n")  # no event: the prune finds it
        os.unlink(tmp_path / "sock")
        cache.unreplicable.prune(str(tmp_path))
        assert set(cache.unreplicable.paths) == {f"{FOLDER}/" + os.fsdecode(b"pip\xe9.lab")}
    finally:
        sock.close()


def test_the_rolling_rescan_takes_a_name_the_watcher_missed(tmp_path):
    (tmp_path / "plain.txt").write_text("plain\n")
    cache = HashCache()
    index = scan_folder(str(tmp_path), Filter(), cache)
    (tmp_path / LATIN1).write_text("missed by the watcher\n")
    os.mkfifo(tmp_path / "pipe")
    changes, _, _ = rescan_dir(str(tmp_path), Filter(), cache, index, "", None, lambda: {})
    assert [e["path"] for e in changes] == [LATIN1]
    assert cache.unreplicable.paths == {"pipe": FIFO}


def test_the_summary_counts_a_few_escaped_and_says_when_capped():
    docs, more = Unreplicable(), Unreplicable()
    docs.add(os.fsdecode(b"fif\xe9"), FIFO)
    docs.add("sock", FIFO)
    assert summary([("docs", docs), ("empty", more)]) == {
        "count": 2, "names": ["docs/fif\\xe9", "docs/sock"], "capped": False}
    for n in range(MAX_KEPT + 5):
        more.add(f"{n:05d}", FIFO)
    got = summary([("docs", docs), ("more", more)])
    assert got["count"] == MAX_KEPT + 2 and got["capped"] and len(got["names"]) == 5
    assert summary([("docs", Unreplicable())]) is None
