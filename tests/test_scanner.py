"""node.scanner: watch batches that arrive during a full rescan are published at once, and the
rescan's own result does not undo them."""
from __future__ import annotations

import orjson
import pytest
import zmq
from sbs.node import rolling
from sbs.node import scanner as scanner_module
from sbs.node import watcher as watcher_module
from sbs.node.config import FolderConfig
from sbs.node.scanner import Scanner


@pytest.fixture
def pipes():
    ctx = zmq.Context()
    reader = ctx.socket(zmq.PAIR)
    reader.bind("inproc://scanner-test")
    writer = ctx.socket(zmq.PAIR)
    writer.connect("inproc://scanner-test")
    yield ctx, reader, writer
    reader.close(0)
    writer.close(0)
    ctx.term()


def deltas(reader: zmq.Socket, sc: Scanner) -> list[tuple[str, dict[str, list[dict]]]]:
    """What the scanner sent, as the node loop takes it: a message, then its delta."""
    out = []
    while reader.poll(0):
        frames = reader.recv_multipart()
        assert frames[0] == b"delta" and frames[1] == sc.ident
        # through orjson, as the manifests will be: only JSON may travel in an Entry
        out.append((frames[2].decode(), orjson.loads(orjson.dumps(sc.take_delta()))))
    assert not sc.deltas, "a delta without its message"
    return out


def test_a_change_during_a_full_scan_is_published_between_directories(tmp_path, pipes,
                                                                       monkeypatch):
    ctx, reader, writer = pipes
    root = tmp_path / "docs"
    for d in range(5):
        (root / f"d{d}").mkdir(parents=True)
        for f in range(3):
            (root / f"d{d}" / f"f{f}.txt").write_text(f"{d}/{f}")
    (root / "a.txt").write_text("old")
    (root / "gone.txt").write_text("soon deleted")
    sc = Scanner(ctx, "inproc://unused", {"docs": FolderConfig("docs", root)}, period=60)
    sc._full_scan(writer)
    [(kind, first)] = deltas(reader, sc)
    assert kind == "full" and len(first["docs"]) == 5 + 15 + 2

    real_scan_folder = scanner_module.scan_folder
    calls = []

    def scan_folder(*args, between, **kw):
        def changing_between():
            calls.append(1)
            if len(calls) == 1:  # the root is walked first: its entries are in already
                (root / "a.txt").write_text("new and longer")
                (root / "gone.txt").unlink()
                (root / "late.txt").write_text("created during the scan")
                sc.jobs.put(("batch", {"docs": {"a.txt", "gone.txt", "late.txt"}}))
            between()
        return real_scan_folder(*args, between=changing_between, **kw)

    monkeypatch.setattr(scanner_module, "scan_folder", scan_folder)
    sc._full_scan(writer)
    got = deltas(reader, sc)
    assert len(calls) == 6  # the root and five folders
    assert [k for k, _ in got] == ["part", "full"]  # the batch went out before the walk ended
    part = {e["path"]: e for e in got[0][1]["docs"]}
    assert set(part) == {"a.txt", "gone.txt", "late.txt"}
    assert part["gone.txt"].get("deleted") and part["a.txt"]["size"] == len("new and longer")
    assert got[1][1].get("docs", []) == []  # the walk saw the old root: it must not undo that
    index = sc.index["docs"]
    assert index["a.txt"]["size"] == len("new and longer") and "late.txt" in index
    assert "gone.txt" not in index
    assert sc.jobs.empty()


def test_a_flush_or_an_overflow_marker_keeps_its_place(tmp_path, pipes):
    ctx, _, _ = pipes
    sc = Scanner(ctx, "inproc://unused", {"docs": FolderConfig("docs", tmp_path)}, period=60)
    sc.jobs.put(("batch", {"docs": {"x"}}))
    sc.jobs.put(("flush", "t1"))
    sc.jobs.put(("batch", {"docs": {"y"}}))
    assert sc._waiting_batches() == [{"docs": {"x"}}]
    assert sc.jobs.get_nowait() == ("flush", "t1")
    sc.jobs.put(("batch", None))  # the watcher lost events: a full rescan, in its turn
    assert sc._waiting_batches() == [{"docs": {"y"}}]
    assert sc.jobs.get_nowait() == ("batch", None)


def test_without_a_watcher_the_periodic_rescan_still_publishes_every_change(tmp_path, pipes,
                                                                            monkeypatch, caplog):
    """The rescan every `period` is the safety net: with no watcher at all (inotify's watch
    limit reached, say) a change is still published, within a period, by the running thread."""
    import errno
    import time

    ctx = pipes[0]
    reader = ctx.socket(zmq.PAIR)  # the fixture's pair is taken: a PAIR has one peer
    reader.bind("inproc://scanner-alone")
    root = tmp_path / "docs"
    root.mkdir()
    (root / "old.txt").write_text("there before")

    def no_inotify(self):
        raise OSError(errno.ENOSPC, "inotify watch limit reached")

    monkeypatch.setattr(watcher_module.Watcher, "start", no_inotify)
    sc = Scanner(ctx, "inproc://scanner-alone", {"docs": FolderConfig("docs", root)},
                 period=0.2)
    sc.start()
    try:
        assert reader.poll(10_000), "no first scan"
        frames = reader.recv_multipart()
        assert frames[2] == b"full" and [e["path"] for e in sc.take_delta()["docs"]] == [
            "old.txt"]
        (root / "new.txt").write_text("written with nobody watching")
        (root / "old.txt").unlink()
        seen: dict[str, dict] = {}
        deadline = time.monotonic() + 10
        while not ({"new.txt", "old.txt"} <= set(seen)) and time.monotonic() < deadline:
            if reader.poll(100):
                reader.recv_multipart()
                seen.update({e["path"]: e for e in sc.take_delta().get("docs", [])})
        assert seen["new.txt"]["size"] == len("written with nobody watching")
        assert seen["old.txt"].get("deleted")
    finally:
        sc.stop()
        reader.close(0)
    assert "relying on the 0.2s rescan" in caplog.text


def test_the_rotation_covers_every_folder_within_the_cycle_new_and_deleted_ones_too():
    """Rotation: each directory is taken at least once every cycle, in slices of about
    entries * period / cycle; a new folder joins, a deleted one is never taken again."""
    from sbs.node.rolling import Rotation

    def dirs(n: int) -> dict[str, dict]:
        out = {}
        for d in range(n):
            out[f"d{d:02}"] = {"path": f"d{d:02}", "kind": "dir"}
            for f in range(9):
                out[f"d{d:02}/f{f}"] = {"path": f"d{d:02}/f{f}", "kind": "file"}
        return out

    index = {"docs": dirs(40), "more": dirs(10)}
    rot = Rotation(period=1.0, cycle=10.0, min_slice=1)
    rot.reset(index, 0.0)
    total = sum(len(ix) for ix in index.values())
    last = {k: 0.0 for k in rot.dirs}
    sizes = []
    for tick in range(1, 41):
        now = float(tick)
        if tick == 13:
            rot.note("docs", [{"path": "new", "kind": "dir"}, {"path": "new/f", "kind": "file"}],
                     now)
            last[("docs", "new")] = now
        if tick == 17:
            rot.note("docs", [{"path": "d05", "kind": "dir", "deleted": True}], now)
            del last[("docs", "d05")]
        taken = []
        for name, rel in rot.take(now, total):  # visited() before the next: it counts work
            assert (name, rel) in last, f"{name}/{rel} taken after it was deleted"
            rot.visited(name, rel, now, 10, None)
            last[(name, rel)] = now
            taken.append(rel)
        sizes.append(len(taken))
        for key, seen in last.items():
            assert now - seen <= 10.0, f"{key} not looked at for {now - seen} s"
    # a slice is about a tenth of the tree, not all of it
    # (one slice may take more: what would otherwise go unseen longer than the cycle)
    assert max(sizes) <= 52 // 4 and sum(sizes) / len(sizes) <= 52 / 10 + 1
    assert ("docs", "new") in rot.dirs and ("docs", "d05") not in rot.dirs


def test_a_small_tree_is_rescanned_whole_every_period():
    from sbs.node.rolling import Rotation

    rot = Rotation(period=5.0, cycle=60.0)
    rot.reset({"docs": {f"d{i}": {"path": f"d{i}", "kind": "dir"} for i in range(30)}}, 0.0)
    taken = []
    for name, rel in rot.take(5.0, 30):
        rot.visited(name, rel, 5.0, 1, None)
        taken.append(rel)
    assert len(taken) == 31  # the root and 30 folders


def test_a_slice_finds_new_changed_and_deleted_entries_on_its_own(tmp_path, pipes):
    """No watch batch at all: the rolling rescan alone publishes a new folder with its
    content, a changed file, a deleted file and a deleted folder's whole subtree."""
    import os

    ctx, reader, writer = pipes
    root = tmp_path / "docs"
    for d in ("a", "b", "b/deep", "c"):
        (root / d).mkdir(parents=True)
        (root / d / "f.txt").write_text(d)
    sc = Scanner(ctx, "inproc://unused", {"docs": FolderConfig("docs", root)}, period=1,
                 rescan_cycle=4)
    sc._full_scan(writer)
    deltas(reader, sc)
    os.utime(root / "a", ns=(1, 1))  # an old folder mtime: its key can be kept from now on
    (root / "a" / "f.txt").write_text("A, longer")
    (root / "c" / "f.txt").unlink()
    for p in (root / "b" / "deep" / "f.txt", root / "b" / "f.txt"):
        p.unlink()
    (root / "b" / "deep").rmdir()
    (root / "b").rmdir()
    (root / "new" / "sub").mkdir(parents=True)
    (root / "new" / "sub" / "n.txt").write_text("new")
    seen: dict[str, dict] = {}
    for tick in range(1, 6):  # one cycle and a little more
        sc.rotation.dirs = type(sc.rotation.dirs)(  # pretend the time passed: age them all
            (k, (v[0] - tick, v[1])) for k, v in sc.rotation.dirs.items())
        sc._rolling_scan(writer)
        for _, delta in deltas(reader, sc):
            seen.update({e["path"]: e for e in delta.get("docs", [])})
    assert seen["a/f.txt"]["size"] == len("A, longer")
    assert {p for p, e in seen.items() if e.get("deleted")} == {
        "c/f.txt", "b", "b/f.txt", "b/deep", "b/deep/f.txt"}
    assert {"new", "new/sub", "new/sub/n.txt"} <= set(seen)
    assert sc.index["docs"]["new/sub/n.txt"]["size"] == 3 and "b" not in sc.index["docs"]
    assert ("docs", "new/sub") in sc.rotation.dirs and ("docs", "b") not in sc.rotation.dirs


def test_a_rescan_of_an_unchanged_folder_takes_every_file_from_the_hash_cache(tmp_path):
    """The rolling rescan reads HashCache's entries itself (its inner loop): an unchanged file
    costs a stat and a look-up, gives no delta and keeps its Entry; a changed one is found."""
    import os

    from sbs.node.filters import Filter
    from sbs.node.index import HashCache, scan_folder

    root = tmp_path / "docs"
    (root / "d").mkdir(parents=True)
    for n in range(5):
        (root / "d" / f"f{n}").write_text(f"file {n}")
    cache = HashCache(racy_ns=0)  # no file is too fresh to cache
    index = scan_folder(str(root), Filter(), cache)
    assert len(cache) == 5
    before = dict(index)
    delta, names, _ = rolling.rescan_dir(str(root), Filter(), cache, index, "d", None,
                                                lambda: {"d": set()})
    assert delta == [] and names == 5
    assert all(index[p] is before[p] for p in before)
    (root / "d" / "f3").write_text("changed, longer")
    os.utime(root / "d" / "f3", ns=(1, 1))
    delta, _, _ = rolling.rescan_dir(str(root), Filter(), cache, index, "d", None,
                                            lambda: {"d": set()})
    assert [e["path"] for e in delta] == ["d/f3"] and index["d/f3"]["size"] == 15


def test_two_folders_with_the_same_relative_paths_keep_their_cached_hashes_apart(tmp_path,
                                                                                 pipes):
    """The hash cache is keyed by relative path, one per folder: a second full scan of two
    folders holding the same names reads no file again, and each keeps its own hash."""
    ctx, reader, writer = pipes
    folders = {}
    for name in ("one", "two"):
        root = tmp_path / name
        (root / "d").mkdir(parents=True)
        for n in range(3):
            (root / "d" / f"f{n}").write_text(f"{name} {n}")
        folders[name] = FolderConfig(name, root)
    sc = Scanner(ctx, "inproc://unused", folders, period=1)
    for cache in sc.caches.values():
        cache.racy_ns = 0  # no file is too fresh to cache
    sc._full_scan(writer)
    deltas(reader, sc)
    first = {n: dict(ix) for n, ix in sc.index.items()}
    assert sum(c.hashed for c in set(sc.caches.values())) == 6
    sc._full_scan(writer)
    assert sum(c.hashed for c in set(sc.caches.values())) == 6  # nothing read again
    assert first["one"]["d/f0"]["hash"] != first["two"]["d/f0"]["hash"]
    assert all(sc.index[n][p] is e for n in first for p, e in first[n].items()
               if e["kind"] == "file")


def test_the_rolling_rescan_finds_deletions_in_directories_kept_as_tuples_and_as_sets(
        tmp_path, pipes):
    """Rotation.kids holds an untouched directory's entries as a tuple (a tenth of a set's
    memory) and turns it into a set when a delta changes it: a name that vanished with no
    event is found either way, and one added by a delta is known to its directory."""
    import os

    ctx, reader, writer = pipes
    root = tmp_path / "docs"
    for d in ("a", "b"):
        (root / d).mkdir(parents=True)
        for n in range(3):
            (root / d / f"f{n}").write_text(f"{d}{n}")
    sc = Scanner(ctx, "inproc://unused", {"docs": FolderConfig("docs", root)}, period=1,
                 rescan_cycle=2)
    sc._full_scan(writer)
    deltas(reader, sc)

    def one_cycle() -> dict[str, dict]:
        seen: dict[str, dict] = {}
        for tick in range(1, 4):
            sc.rotation.dirs = type(sc.rotation.dirs)(
                (k, (v[0] - 10 * tick, v[1])) for k, v in sc.rotation.dirs.items())
            sc._rolling_scan(writer)
            for _, delta in deltas(reader, sc):
                seen.update({e["path"]: e for e in delta.get("docs", [])})
        return seen

    assert one_cycle() == {}
    kids = sc.rotation.kids["docs"]
    assert sorted(kids["a"]) == ["a/f0", "a/f1", "a/f2"] and isinstance(kids["a"], tuple)
    assert isinstance(kids["b"], tuple)
    (root / "a" / "new").write_text("new")  # as the watcher reports it
    sc._partial_scan(writer, [{"docs": {"a/new"}}])
    assert [e["path"] for _, d in deltas(reader, sc) for e in d["docs"]] == ["a/new"]
    assert kids["a"] == {"a/f0", "a/f1", "a/f2", "a/new"} and isinstance(kids["b"], tuple)
    for gone in ("a/new", "a/f1", "b/f2"):  # no event for any of these
        os.unlink(root / gone)
    for d in ("a", "b"):
        os.utime(root / d, ns=(1, 1))  # an old mtime: not too fresh to compare
    seen = one_cycle()
    assert {p for p, e in seen.items() if e.get("deleted")} == {"a/new", "a/f1", "b/f2"}
    assert set(sc.index["docs"]) == {"a", "b", "a/f0", "a/f2", "b/f0", "b/f1"}
