"""node.unreplicable with the scans that feed it, on real files: what is skipped as not UTF-8
is recorded (filter respected), forgotten when gone or retargeted, and summed up escaped."""
from __future__ import annotations

import os
from pathlib import Path

from sbs.node.filters import Filter
from sbs.node.index import HashCache, scan_folder, scan_paths
from sbs.node.rolling import rescan_dir
from sbs.node.unreplicable import MAX_KEPT, NAME, TARGET, Unreplicable, summary

LATIN1 = os.fsdecode(b"caf\xe9.txt")
FOLDER = os.fsdecode(b"d\xe8r")


def make_tree(root: Path) -> None:
    (root / "plain.txt").write_text("plain\n")
    (root / LATIN1).write_text("Latin-1 name\n")
    (root / FOLDER).mkdir()
    (root / FOLDER / "inside.lab").write_text("in a Latin-1 folder\n")
    os.symlink(os.fsdecode(b"target-\xff"), root / "link")


def test_a_full_scan_records_what_it_skips_and_the_filter_leaves_out_what_it_excludes(
        tmp_path):
    make_tree(tmp_path)
    cache = HashCache()
    index = scan_folder(str(tmp_path), Filter(), cache)
    assert sorted(index) == ["plain.txt"]
    assert cache.unreplicable.paths == {LATIN1: NAME, FOLDER: NAME, "link": TARGET}
    only_lab = HashCache()  # *.lab: the Latin-1 .txt file is not wanted anyway
    scan_folder(str(tmp_path), Filter(["*.lab"]), only_lab)
    assert only_lab.unreplicable.paths == {FOLDER: NAME}


def test_watched_paths_are_recorded_while_there_and_forgotten_once_gone(tmp_path):
    (tmp_path / "plain.txt").write_text("plain\n")
    cache = HashCache()
    index = scan_folder(str(tmp_path), Filter(), cache)
    (tmp_path / LATIN1).write_text("made later\n")
    (tmp_path / FOLDER).mkdir()
    (tmp_path / FOLDER / "x.txt").write_text("x\n")
    assert scan_paths(str(tmp_path), Filter(), cache, index,
                      {LATIN1, f"{FOLDER}/x.txt"}) == []
    assert cache.unreplicable.paths == {LATIN1: NAME, FOLDER: NAME}
    os.unlink(tmp_path / LATIN1)
    assert scan_paths(str(tmp_path), Filter(), cache, index, {LATIN1}) == []
    assert cache.unreplicable.paths == {FOLDER: NAME}


def test_a_retargeted_link_and_a_deleted_name_are_pruned(tmp_path):
    make_tree(tmp_path)
    cache = HashCache()
    index = scan_folder(str(tmp_path), Filter(), cache)
    os.unlink(tmp_path / "link")
    os.symlink("plain.txt", tmp_path / "link")
    (tmp_path / LATIN1).unlink()  # no event: the rolling rescan's prune finds it gone
    cache.unreplicable.prune(str(tmp_path))
    assert cache.unreplicable.paths == {FOLDER: NAME}
    os.unlink(tmp_path / "link")  # and back, seen by the watcher's path: recorded again
    os.symlink(os.fsdecode(b"\xff"), tmp_path / "link")
    scan_paths(str(tmp_path), Filter(), cache, index, {"link"})
    assert cache.unreplicable.paths == {FOLDER: NAME, "link": TARGET}


def test_the_rolling_rescan_records_a_name_the_watcher_missed(tmp_path):
    (tmp_path / "plain.txt").write_text("plain\n")
    cache = HashCache()
    index = scan_folder(str(tmp_path), Filter(), cache)
    (tmp_path / LATIN1).write_text("missed by the watcher\n")
    changes, _, _ = rescan_dir(str(tmp_path), Filter(), cache, index, "", None, lambda: {})
    assert changes == []
    assert cache.unreplicable.paths == {LATIN1: NAME}


def test_the_summary_counts_names_a_few_escaped_and_says_when_capped():
    docs, more = Unreplicable(), Unreplicable()
    docs.add(LATIN1, NAME)
    docs.add(FOLDER, NAME)
    assert summary([("docs", docs), ("empty", more)]) == {
        "count": 2, "names": ["docs/caf\\xe9.txt", "docs/d\\xe8r"], "capped": False}
    for n in range(MAX_KEPT + 5):
        more.add(f"{n:05d}{LATIN1}", NAME)
    got = summary([("docs", docs), ("more", more)])
    assert got["count"] == MAX_KEPT + 2 and got["capped"] and len(got["names"]) == 5
    assert summary([("docs", Unreplicable())]) is None
