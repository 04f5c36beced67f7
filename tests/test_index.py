"""node.index: filters, hashing, full and incremental scans, compact entries (the watcher that
feeds them: tests/test_watcher.py)."""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import sys
import time
from fnmatch import fnmatchcase
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sbs.node import entries as entries_module
from sbs.node import index as index_module
from sbs.node.filters import Filter
from sbs.node.index import (
    TEMP_PREFIX,
    FolderMissing,
    HashCache,
    diff,
    hash_bytes,
    scan_folder,
    scan_paths,
)

from tests.as_nobody import run_as_nobody, temp_dir_for_nobody

WAIT = 15.0  # seconds: the deadline of every wait below


# --- helpers ---------------------------------------------------------------------------------


def write(path: Path, data: bytes = b"x") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def settle(root: Path, cache: HashCache) -> None:
    """Wait until every file under root is older than the cache's racy window, so the next
    hash of it is cached (a deadline-bounded wait on the clock, not a fixed sleep)."""
    newest = max((p.lstat().st_ctime_ns for p in root.rglob("*")), default=0)
    deadline = time.monotonic() + WAIT
    while time.time_ns() - newest <= cache.racy_ns:
        assert time.monotonic() < deadline, "clock did not move past the racy window"
        time.sleep(0.005)


# --- filters ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("patterns", "path", "expected"), [
    (["*"], ".hidden", True),
    (["*"], "a/b/c", True),
    (["*.lab"], "x.lab", True),
    (["*.lab"], "sub/deep/y.lab", True),
    (["*.lab"], "x.lab.bak", False),
    (["*.lab"], "lab", False),
    (["*.lab"], "a.lab/b.txt", False),
    (["a?c"], "d/abc", True),
    (["[!x]*.txt"], "d/a.txt", True),
    (["[!x]*.txt"], "d/x.txt", False),
    (["docs/**"], "docs/a", True),
    (["docs/**"], "docs/a/b/c", True),
    (["docs/**"], "xdocs/a", False),
    (["docs/**"], "sub/docs/a", False),
    (["**/*.lab"], "x.lab", True),
    (["**/*.lab"], "a/b/x.lab", True),
    (["a/*.txt"], "a/b.txt", True),
    (["a/*.txt"], "a/b/c.txt", False),
    (["a/*.txt"], "x/a/b.txt", False),
    (["a?b/c"], "a/b/c", False),
    (["a[/]b/c"], "a/b/c", False),
    (["a/**/z"], "a/z", True),
    (["x/a**"], "x/a/b", False),  # "**" inside a name is a plain "*"
    (["a**b"], "d/aXYb", True),
    (["a/**/z"], "a/b/c/z", True),
    (["/top.txt"], "top.txt", True),
    (["/top.txt"], "a/top.txt", False),
    (["*.lab", "*.cfg"], "x/y.cfg", True),
    (["*.lab", "conf/*"], "conf/a", True),
    (["*.lab", "conf/*"], "other/a", False),
    (["[ab"], "[ab", True),  # an unclosed set is a literal
    (["a+b(c).txt"], "a+b(c).txt", True),
])
def test_filter_examples(patterns, path, expected):
    assert Filter(patterns).match(path) is expected


def test_filter_rejects_a_broken_pattern():
    with pytest.raises(ValueError, match="filter"):
        Filter(["[z-a]"])


_component = st.text(alphabet="ab.", min_size=1, max_size=4)
_pattern_part = st.text(alphabet="ab.*?", min_size=1, max_size=4)
_paths = st.lists(_component, min_size=1, max_size=4).map("/".join)


@settings(max_examples=300, deadline=None)
@given(_pattern_part, _paths)
def test_filter_basename_pattern_is_fnmatch_of_the_base_name(pattern, path):
    assert Filter([pattern]).match(path) == fnmatchcase(path.rsplit("/", 1)[-1], pattern)


@settings(max_examples=300, deadline=None)
@given(st.lists(_pattern_part.filter(lambda p: p == "*" or set(p) != {"*"}), min_size=2,
                max_size=3).map("/".join), _paths)
def test_filter_path_pattern_never_crosses_folders(pattern, path):
    pp, sp = pattern.split("/"), path.split("/")
    expected = len(pp) == len(sp) and all(fnmatchcase(s, p) for s, p in zip(sp, pp, strict=True))
    assert Filter([pattern]).match(path) == expected


@settings(max_examples=200, deadline=None)
@given(_pattern_part, _paths)
def test_filter_double_star_slash_equals_any_depth(pattern, path):
    assert Filter(["**/" + pattern]).match(path) == Filter([pattern]).match(path)


# --- hashing and entries ---------------------------------------------------------------------


def hash_file(path: Path) -> str:
    fd = os.open(path, os.O_RDONLY)
    try:
        return index_module.hash_fd(fd)
    finally:
        os.close(fd)


def test_hash_fd_matches_hash_bytes_across_chunks(tmp_path):
    data = os.urandom(3 * (1 << 20) + 123)
    assert hash_file(write(tmp_path / "big", data)) == hash_bytes(data)
    assert hash_file(write(tmp_path / "empty", b"")) == hash_bytes(b"")
    assert len(hash_bytes(b"")) == 32


def entry_for(root: Path, relpath: str, filt: Filter, cache: HashCache) -> dict | None:
    """What a scan of `relpath` alone finds there now (None: nothing that is replicated)."""
    delta = scan_paths(str(root), filt, cache, {}, [relpath])
    return next((e for e in delta if e["path"] == relpath and not e.get("deleted")), None)


def test_a_scan_of_one_path(tmp_path):
    cache = HashCache()
    write(tmp_path / "d/f.txt", b"hello").chmod(0o4755)
    os.symlink("f.txt", tmp_path / "d/l")
    os.mkfifo(tmp_path / "d/fifo")
    e = entry_for(str(tmp_path), "d/f.txt", Filter(), cache)
    assert e["kind"] == "file" and e["mode"] == 0o755 and e["hash"] == hash_bytes(b"hello")
    assert e["size"] == 5 and e["mtime_ns"] == (tmp_path / "d/f.txt").stat().st_mtime_ns
    assert entry_for(str(tmp_path), "d/l", Filter(), cache)["target"] == "f.txt"
    assert entry_for(str(tmp_path), "d", Filter(), cache)["mtime_ns"] == 0
    assert entry_for(str(tmp_path), "d/fifo", Filter(), cache) is None
    assert entry_for(str(tmp_path), "d/missing", Filter(), cache) is None
    assert entry_for(str(tmp_path), "d/f.txt", Filter(["*.lab"]), cache) is None
    os.symlink("d", tmp_path / "via")
    assert entry_for(str(tmp_path), "via/f.txt", Filter(), cache) is None  # never through a link


@pytest.mark.parametrize("writes", [1, 99])
def test_a_file_written_while_hashed_is_hashed_again(tmp_path, monkeypatch, writes):
    """A writer appending during the read must not leave a hash paired with the wrong size."""
    path = write(tmp_path / "busy", b"start")
    real_hash_fd = index_module.hash_fd
    calls = []

    def hash_fd_during_a_write(fd):
        h = real_hash_fd(fd)
        calls.append(h)
        if len(calls) <= writes:
            with open(path, "ab") as f:  # the concurrent writer, between our two fstats
                f.write(b"+more")
        return h

    monkeypatch.setattr(index_module, "hash_fd", hash_fd_during_a_write)
    cache = HashCache(racy_ns=0)
    entry = entry_for(str(tmp_path), "busy", Filter(), cache)
    if writes == 1:  # settles on the second read
        assert cache.hashed == 2 and len(cache) == 1
        assert entry["hash"] == hash_bytes(path.read_bytes())
        assert entry["size"] == path.stat().st_size
    else:  # never settles: reported after 3 reads, but not cached, so it is read again
        assert cache.hashed == index_module.STABLE_TRIES and len(cache) == 0


# --- full scans ------------------------------------------------------------------------------


@pytest.fixture
def odd_tree(tmp_path):
    root = tmp_path / "root"
    outside = tmp_path / "outside"
    write(outside / "secret.txt", b"not replicated")
    write(root / "a/b/c/deep.txt", b"deep")
    write(root / "sp ace/ünï cødé ✓.txt", "ünï".encode())
    write(root / "empty.txt", b"")
    (root / "empty dir/nested empty").mkdir(parents=True)
    write(root / ".hidden", b"h")
    write(root / ".hdir/x.lab", b"lab")
    os.symlink(outside, root / "link-to-outside")
    os.symlink("a/b", root / "rel-link")
    os.mkfifo(root / "fifo")
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(root / "sock"))
    write(root / os.fsdecode(b"latin1-\xe9.txt"), b"not UTF-8: travels escaped")
    write(root / (TEMP_PREFIX + "half"), b"temp")
    write(root / "a" / (TEMP_PREFIX + "dir") / "x", b"temp")
    (root / "a/b/c/deep.txt").chmod(0o600)
    yield root
    sock.close()


def test_scan_of_an_odd_tree(odd_tree):
    cache = HashCache()
    index = scan_folder(str(odd_tree), Filter(), cache)
    assert sorted(index) == sorted([
        "a", "a/b", "a/b/c", "a/b/c/deep.txt", "sp ace", "sp ace/ünï cødé ✓.txt", "empty.txt",
        "empty dir", "empty dir/nested empty", ".hidden", ".hdir", ".hdir/x.lab",
        "link-to-outside", "rel-link", os.fsdecode(b"latin1-\xe9.txt"),
    ])
    assert index["a/b/c/deep.txt"] == {
        "path": "a/b/c/deep.txt", "kind": "file", "size": 4, "mode": 0o600,
        "mtime_ns": (odd_tree / "a/b/c/deep.txt").stat().st_mtime_ns, "hash": hash_bytes(b"deep")}
    assert index["empty.txt"]["hash"] == hash_bytes(b"") and index["empty.txt"]["size"] == 0
    assert index["empty dir"] == {"path": "empty dir", "kind": "dir", "size": 0, "mtime_ns": 0,
                                  "mode": 0o755, "hash": ""}
    link = index["link-to-outside"]
    assert link["kind"] == "link" and link["target"] == str(odd_tree.parent / "outside")
    assert link["size"] == len(os.fsencode(link["target"])) and link["hash"] == ""
    assert all(e["path"] == p and "deleted" not in e for p, e in index.items())
    # parents come before their children, so a delta creates folders first
    order = list(index)
    assert order.index("a") < order.index("a/b") < order.index("a/b/c/deep.txt")


def test_scan_applies_the_filter_to_files_and_links_not_dirs(odd_tree):
    index = scan_folder(str(odd_tree), Filter(["*.lab"]), HashCache())
    assert {p for p, e in index.items() if e["kind"] != "dir"} == {".hdir/x.lab"}
    assert "empty dir/nested empty" in index


def test_missing_root_raises_folder_missing(tmp_path):
    with pytest.raises(FolderMissing):
        scan_folder(str(tmp_path / "nope"), Filter(), HashCache())
    with pytest.raises(FolderMissing):
        scan_paths(str(tmp_path / "nope"), Filter(), HashCache(), {"a": {}}, ["a"])
    write(tmp_path / "file")
    with pytest.raises(FolderMissing):
        scan_folder(str(tmp_path / "file"), Filter(), HashCache())
    assert issubclass(FolderMissing, OSError)


def _scan_as_nobody(base: Path) -> tuple[list[str], list[str], str]:
    """scan_folder(base) in a forked child as user nobody (tests/as_nobody.py)."""

    def scan() -> bytes:
        records: list[str] = []

        class Keep(logging.Handler):
            def emit(self, record: logging.LogRecord) -> None:
                records.append(record.getMessage())

        index_module.log.addHandler(Keep())
        skipped: list[str] = []
        index = scan_folder(str(base), Filter(), HashCache(), skipped=skipped)
        return json.dumps([sorted(index), skipped, records]).encode()

    index, skipped, records = json.loads(run_as_nobody(scan))
    return index, skipped, "\n".join(records)


def test_unreadable_subfolder_is_skipped():
    base = temp_dir_for_nobody()  # its own 0755 folder: nobody must reach it
    try:
        write(base / "ok/f")
        write(base / "locked/f")
        (base / "locked").chmod(0)
        index, skipped, logged = _scan_as_nobody(base)
    finally:
        (base / "locked").chmod(0o755)
        shutil.rmtree(base)
    assert index == ["locked", "ok", "ok/f"]  # the folder itself is listed, not its content
    assert skipped == ["locked"]
    assert "skipping unreadable folder" in logged


def test_what_cannot_be_read_now_stays_in_the_index_and_is_not_deleted():
    """A watch batch (scan_paths) over a file and a folder that are there but cannot be read
    now (permissions here; an I/O error of a failing disk alike), the same at the root, and a
    file inside that folder: their entries stay, and no deletion is published. They were
    published as deleted, and a strict secondary moved its copies (perhaps the only readable
    ones) to the trash; the file inside ended the scan (and the scanner) with the error."""
    base = temp_dir_for_nobody()  # its own 0755 folder: nobody must reach it
    try:
        write(base / "locked.txt")
        write(base / "sub/inner.txt")
        write(base / "ok.txt")
        index = scan_folder(str(base), Filter(), HashCache())  # all readable (this is root)
        (base / "locked.txt").chmod(0)
        (base / "sub").chmod(0)

        def scan() -> bytes:
            out = []
            for paths in ({"locked.txt", "sub"}, {""}, {"sub/inner.txt"}):
                now = dict(index)
                delta = scan_paths(str(base), Filter(), HashCache(), now, paths)
                out.append([[[e["path"], bool(e.get("deleted"))] for e in delta], sorted(now)])
            return json.dumps(out).encode()

        batch, root, inside = json.loads(run_as_nobody(scan))
    finally:
        (base / "locked.txt").chmod(0o644)
        (base / "sub").chmod(0o755)
        shutil.rmtree(base)
    for delta, kept in (batch, root):
        assert delta == [["sub", False]]  # its mode changed; nothing deleted
        assert kept == ["locked.txt", "ok.txt", "sub", "sub/inner.txt"]
    assert inside == [[], ["locked.txt", "ok.txt", "sub", "sub/inner.txt"]]


def test_unchanged_rescan_reads_no_file(odd_tree):
    cache = HashCache()
    settle(odd_tree, cache)
    first = scan_folder(str(odd_tree), Filter(), cache)
    files = sum(1 for e in first.values() if e["kind"] == "file")
    assert cache.hashed == files
    second = scan_folder(str(odd_tree), Filter(), cache)
    assert second == first
    assert cache.hashed == files  # nothing read again
    # and nothing built again: an unchanged file's Entry is the very object of the last scan
    assert all(second[p] is e for p, e in first.items() if e["kind"] == "file")

    os.chmod(odd_tree / "a/b/c/deep.txt", 0o640)  # a new ctime: a new Entry, with the new mode
    settle(odd_tree, cache)
    chmodded = scan_folder(str(odd_tree), Filter(), cache)
    assert chmodded["a/b/c/deep.txt"]["mode"] == 0o640 and first["a/b/c/deep.txt"]["mode"] != 0o640
    assert diff(first, chmodded) == [chmodded["a/b/c/deep.txt"]]
    files += 1  # the chmod made it read again (the ctime is part of the key)
    assert cache.hashed == files
    first = chmodded

    write(odd_tree / "empty.txt", b"changed")
    settle(odd_tree, cache)
    third = scan_folder(str(odd_tree), Filter(), cache)
    assert cache.hashed == files + 1
    assert diff(first, third) == [third["empty.txt"]]


def test_a_file_changed_within_the_racy_window_is_not_cached(tmp_path):
    cache = HashCache(racy_ns=10**12)  # everything is "just written"
    write(tmp_path / "f", b"one")
    assert scan_folder(str(tmp_path), Filter(), cache)["f"]["hash"] == hash_bytes(b"one")
    assert scan_folder(str(tmp_path), Filter(), cache)["f"]["hash"] == hash_bytes(b"one")
    assert cache.hashed == 2 and len(cache) == 0


# --- incremental scans -----------------------------------------------------------------------


class Folder:
    """An index kept up to date by scan_paths, checked against a full scan after each step."""

    def __init__(self, root: Path):
        self.root, self.cache = root, HashCache()
        self.index = scan_folder(str(root), Filter(), self.cache)

    def rescan(self, *relpaths: str) -> dict[str, dict]:
        delta = scan_paths(str(self.root), Filter(), self.cache, self.index, relpaths)
        assert self.index == scan_folder(str(self.root), Filter(), HashCache())
        by_path = {e["path"]: e for e in delta}
        assert len(by_path) == len(delta), "a path twice in one delta"
        return by_path


def test_scan_paths_files(tmp_path):
    folder = Folder(tmp_path)
    write(tmp_path / "a.txt", b"1")
    delta = folder.rescan("a.txt")
    assert list(delta) == ["a.txt"] and delta["a.txt"]["hash"] == hash_bytes(b"1")

    assert folder.rescan("a.txt") == {}  # unchanged: nothing to send

    write(tmp_path / "a.txt", b"22")
    assert folder.rescan("a.txt")["a.txt"]["size"] == 2

    (tmp_path / "a.txt").chmod(0o600)
    assert folder.rescan("a.txt")["a.txt"]["mode"] == 0o600

    os.rename(tmp_path / "a.txt", tmp_path / "b.txt")
    delta = folder.rescan("a.txt", "b.txt")
    assert delta["a.txt"]["deleted"] is True and delta["a.txt"]["kind"] == "file"
    assert "deleted" not in delta["b.txt"] and delta["b.txt"]["hash"] == hash_bytes(b"22")

    (tmp_path / "b.txt").unlink()
    assert folder.rescan("b.txt") == {"b.txt": {**delta["b.txt"], "deleted": True}}
    assert folder.rescan("never-there") == {}


def test_scan_paths_whole_dirs(tmp_path):
    folder = Folder(tmp_path)
    for rel in ("d/x.txt", "d/sub/y.txt", "d/sub/deeper/z.txt"):
        write(tmp_path / rel, rel.encode())
    (tmp_path / "d/empty").mkdir()
    delta = folder.rescan("d")
    assert set(delta) == {"d", "d/x.txt", "d/sub", "d/sub/y.txt", "d/sub/deeper",
                          "d/sub/deeper/z.txt", "d/empty"}
    assert list(delta).index("d/sub") < list(delta).index("d/sub/y.txt")

    os.rename(tmp_path / "d", tmp_path / "e")
    delta = folder.rescan("d", "e", "d/x.txt", "e/x.txt")  # as a watcher reports a move
    assert {p for p, e in delta.items() if e.get("deleted")} == {
        "d", "d/x.txt", "d/sub", "d/sub/y.txt", "d/sub/deeper", "d/sub/deeper/z.txt", "d/empty"}
    assert {p for p, e in delta.items() if not e.get("deleted")} == {
        "e", "e/x.txt", "e/sub", "e/sub/y.txt", "e/sub/deeper", "e/sub/deeper/z.txt", "e/empty"}
    deleted = [p for p, e in delta.items() if e.get("deleted")]
    assert deleted.index("d/sub/deeper/z.txt") < deleted.index("d/sub") < deleted.index("d")

    shutil.rmtree(tmp_path / "e/sub")
    assert set(folder.rescan("e/sub")) == {"e/sub", "e/sub/y.txt", "e/sub/deeper",
                                            "e/sub/deeper/z.txt"}
    shutil.rmtree(tmp_path / "e")
    assert all(e["deleted"] for e in folder.rescan("e").values())
    assert folder.index == {}


def test_scan_paths_kind_changes_and_new_parents(tmp_path):
    folder = Folder(tmp_path)
    write(tmp_path / "x/inner.txt")
    folder.rescan("x")
    shutil.rmtree(tmp_path / "x")
    write(tmp_path / "x", b"now a file")
    delta = folder.rescan("x")
    assert delta["x"]["kind"] == "file" and delta["x/inner.txt"]["deleted"]

    write(tmp_path / "n/m/f.txt")  # only the file is reported: its new parents come too
    assert list(folder.rescan("n/m/f.txt")) == ["n", "n/m", "n/m/f.txt"]

    (tmp_path / "x").unlink()
    os.symlink("n", tmp_path / "x")
    assert folder.rescan("x")["x"] == {"path": "x", "kind": "link", "size": 1,
                                       "mtime_ns": (tmp_path / "x").lstat().st_mtime_ns,
                                       "mode": 0, "hash": "", "target": "n"}
    assert folder.rescan("x/m/f.txt") == {}  # never through a link
    write(tmp_path / (TEMP_PREFIX + "t"))
    assert folder.rescan(TEMP_PREFIX + "t", "../etc", "/abs", "a//b") == {}


def test_scan_paths_root_means_everything(tmp_path):
    folder = Folder(tmp_path)
    write(tmp_path / "a/b")
    write(tmp_path / "c")
    assert set(folder.rescan("")) == {"a", "a/b", "c"}


def test_diff():
    old = {"a": {"path": "a", "kind": "file", "size": 1, "mtime_ns": 1, "mode": 0o644,
                 "hash": "h"},
           "d": {"path": "d", "kind": "dir", "size": 0, "mtime_ns": 0, "mode": 0o755,
                 "hash": ""},
           "d/x": {"path": "d/x", "kind": "link", "size": 1, "mtime_ns": 1, "mode": 0,
                   "hash": "", "target": "a"}}
    new = {"a": dict(old["a"], mtime_ns=2), "b": dict(old["a"], path="b")}
    delta = diff(old, new)
    assert delta[:2] == [new["a"], new["b"]]
    assert [(e["path"], e["deleted"]) for e in delta[2:]] == [("d/x", True), ("d", True)]
    assert diff(new, new) == []


# --- compact entries ---------------------------------------------------------------------------


def test_entries_share_one_object_per_mode_and_kind(tmp_path):
    """A mode above 256 is an int of its own per Entry unless shared (28 bytes a file), and
    orjson makes a new kind string for each entry from the wire: both are shared objects."""
    import orjson
    from sbs.node.syncer import valid_entries

    for n in range(3):
        (tmp_path / f"f{n}").write_text("x")
        os.chmod(tmp_path / f"f{n}", 0o644)
    index = scan_folder(str(tmp_path), Filter(), HashCache())
    modes = {id(e["mode"]) for e in index.values()}
    assert len(modes) == 1 and index["f0"]["mode"] == 0o644
    wire = orjson.loads(orjson.dumps(list(index.values())))
    assert len({id(e["kind"]) for e in wire}) == 3  # as decoded: one string each
    taken = list(valid_entries("docs", wire, lambda *a, **k: None))
    assert len(taken) == 3 and all(e == index[e["path"]] for e in taken)
    assert len({id(e["kind"]) for e in taken}) == 1
    assert {id(e["mode"]) for e in taken} == modes


def test_kept_entries_read_and_travel_as_the_dicts_they_replace(tmp_path):
    """What a node keeps per object is a slotted FileEntry/LinkEntry, not a dict: read like
    one, equal to one, and the same bytes on the wire."""
    import orjson
    (tmp_path / "d").mkdir(mode=0o750)
    (tmp_path / "d" / "f").write_bytes(b"hello")
    os.symlink("f", tmp_path / "d" / "l")
    settle(tmp_path, HashCache())
    index = scan_folder(str(tmp_path), Filter(), HashCache())
    f, d, ln = index["d/f"], index["d"], index["d/l"]
    st_f = os.lstat(tmp_path / "d" / "f")
    want_f = {"path": "d/f", "kind": "file", "size": 5, "mtime_ns": st_f.st_mtime_ns,
              "mode": st_f.st_mode & 0o777, "hash": hash_bytes(b"hello")}
    want_l = {"path": "d/l", "kind": "link", "size": 1,
              "mtime_ns": os.lstat(tmp_path / "d" / "l").st_mtime_ns, "mode": 0, "hash": "",
              "target": "f"}
    for e, want in ((f, want_f), (ln, want_l)):
        assert not isinstance(e, dict)
        assert dict(e) == want and {**e} == want and dict(e.items()) == want
        assert e == want and want == e and not (e != want)
        assert orjson.dumps(e) == orjson.dumps(want)  # same keys, same order, nothing more
        assert orjson.loads(orjson.dumps({"entries": [e]})) == {"entries": [want]}
        assert list(e) == list(want) and len(e) == len(want)
        for k, v in want.items():
            assert e[k] == v and e.get(k) == v and k in e
        assert "deleted" not in e and e.get("deleted") is None and e.get("deleted", 1) == 1
        with pytest.raises(KeyError):
            e["deleted"]
        assert e != {**want, "deleted": True} and e != {**want, "size": 6} and e != [1]
        assert repr(e) == repr(want)
        with pytest.raises((TypeError, AttributeError)):
            e["size"] = 7  # read-only: an Entry is replaced, never changed
        # a dict costs ~290 bytes; the compact one under half of that
        assert sys.getsizeof(e) * 2 < sys.getsizeof(want)
    assert "target" not in f and f.get("target") is None and ln["target"] == "f"
    assert dict(d) == {"path": "d", "kind": "dir", "size": 0, "mtime_ns": 0, "mode": 0o750,
                       "hash": ""}
    gone = entries_module.deleted_entry(f)
    assert type(gone) is dict and gone == {**want_f, "deleted": True}
    assert diff(index, {**index, "d/f": dict(f)}) == []  # an equal dict is no change
    assert diff(index, {**index, "d/f": {**want_f, "mode": 0o600}}) == [
        {**want_f, "mode": 0o600}]


def test_a_wire_entry_is_kept_compact_only_when_it_has_the_usual_keys():
    shared = entries_module.shared_values
    h = "ab" * 16
    f = shared({"path": "a", "kind": "file", "size": 3, "mtime_ns": 9, "mode": 420,
                "hash": h})
    assert type(f) is entries_module.FileEntry and f == {"path": "a", "kind": "file", "size": 3,
                                                       "mtime_ns": 9, "mode": 420, "hash": h}
    wire_kind = "".join(["fi", "le"])  # a string of its own, as orjson makes one
    assert shared({"path": "b", "kind": wire_kind, "size": 3, "mtime_ns": 9, "mode": 420,
                   "hash": h})["kind"] is f["kind"]  # one shared "file" object
    ln = shared({"path": "c", "kind": "link", "size": 1, "mtime_ns": 9, "mode": 0, "hash": "",
                 "target": "a"})
    assert type(ln) is entries_module.LinkEntry and ln["target"] == "a"
    for odd in ({"path": "a", "kind": "file", "size": 3, "mtime_ns": 9, "mode": 420,
                 "hash": h, "deleted": True},                      # a deletion
                {"path": "d", "kind": "dir", "size": 0, "mtime_ns": 0, "mode": 493},  # no hash
                {"path": "c", "kind": "link", "size": 1, "mtime_ns": 9, "mode": 0,
                 "target": "a"}):
        kept = shared(dict(odd))
        assert type(kept) is dict and kept == odd


def test_the_hash_cache_keeps_the_entry_itself_and_reads_a_changed_file_again(tmp_path):
    p = tmp_path / "f"
    p.write_bytes(b"one")
    cache = HashCache()
    settle(tmp_path, cache)
    first = scan_folder(str(tmp_path), Filter(), cache)["f"]
    again = scan_folder(str(tmp_path), Filter(), cache)["f"]
    assert again is first and cache.hashed == 1 and len(cache) == 1
    st = p.stat()
    assert first.cache_key == index_module.cache_key_of(st)
    assert first.cache_key == (st.st_ino << 64) + st.st_ctime_ns
    os.chmod(p, 0o600)  # same content, new ctime: read again
    settle(tmp_path, cache)
    third = scan_folder(str(tmp_path), Filter(), cache)["f"]
    assert third is not first and cache.hashed == 2 and third["mode"] == 0o600


def test_a_snapshot_part_is_kept_compact_on_arrival_and_a_bad_entry_is_still_refused():
    """keep_entries (the node thread, as each part arrives) converts what the schema accepts;
    the rest stays as it came, and valid_entries (the syncer) still refuses both what the
    schema refuses and a path that passed the schema but not the path rule."""
    from sbs.node.syncer import keep_entries, valid_entries

    good = {"path": "a", "kind": "file", "size": 1, "mtime_ns": 5, "mode": 0o644,
            "hash": "cd" * 16}
    bad_mode = {**good, "path": "b", "mode": 0o77777}
    escape = {**good, "path": "../x"}
    index = {"docs": [dict(good), dict(bad_mode), dict(escape), "junk"]}
    keep_entries(index)
    kept = index["docs"]
    assert type(kept[0]) is entries_module.FileEntry and kept[0] == good
    assert type(kept[1]) is dict and kept[1] == bad_mode
    assert type(kept[2]) is entries_module.FileEntry and kept[3] == "junk"
    refused: list[dict] = []
    taken = list(valid_entries("docs", kept, lambda *a, **k: refused.append(k), consume=True))
    assert taken == [good] and taken[0] is not None
    assert len(refused) == 3 and kept == [None] * 4  # let go as they were read
