"""node.hashstore: the hash cache kept on disk. A restarted scan reads no file it already knew,
a file changed while the node was down is read again however it was disguised, a cache file
that is not this folder's, or not a cache at all, is not used, and the syncer's own writes are
cached only once their ctime is safe to key on."""
from __future__ import annotations

import logging
import os
import time
from types import SimpleNamespace

import orjson
import pytest
import zmq
from sbs.node import hashstore
from sbs.node.config import FolderConfig
from sbs.node.entries import FileEntry
from sbs.node.filters import Filter
from sbs.node.hashstore import CacheKeeper, cache_line, cache_path, load, save
from sbs.node.index import RACY_NS, HashCache, hash_bytes, scan_folder
from sbs.node.scanner import Scanner
from sbs.node.writer import FolderWriter

from .pair import wait_for


def make_tree(root, n: int = 40) -> None:
    for i in range(n):
        d = root / f"d{i % 4}"
        d.mkdir(parents=True, exist_ok=True)
        (d / f"f{i:03}.bin").write_bytes(os.urandom(100 + i))


def old_enough(root) -> None:
    """Every file's ctime is past the racy window (else nothing may be cached)."""
    newest = max(p.stat().st_ctime_ns for p in root.rglob("*"))
    wait_for(lambda: time.time_ns() - newest > RACY_NS, 5, "the files to leave the racy window")


def scanned(tmp_path, n: int = 40):
    """A tree of n files out of the racy window, scanned once: (root, its cache, the cache's
    path on disk)."""
    root = tmp_path / "docs"
    make_tree(root, n)
    old_enough(root)
    cache = HashCache()
    scan_folder(str(root), Filter(), cache)
    return root, cache, cache_path(tmp_path / "state", "docs")


def test_a_saved_cache_spares_every_read_of_the_next_scan(tmp_path):
    root = tmp_path / "docs"
    make_tree(root)
    old_enough(root)
    first = HashCache()
    index = scan_folder(str(root), Filter(), first)
    assert first.hashed == 40 and len(first) == 40
    path = cache_path(tmp_path / "state", "docs")
    assert save(path, str(root), first) == 40 and first.changed == 0

    again = load(path, str(root))
    assert len(again) == 40
    assert scan_folder(str(root), Filter(), again) == index
    assert again.hashed == 0  # nothing was read


def test_a_name_that_is_not_utf8_is_cached_and_known_after_a_reload(tmp_path):
    root = tmp_path / "docs"
    (root / os.fsdecode(b"d\xe8r")).mkdir(parents=True)
    (root / os.fsdecode(b"d\xe8r/caf\xe9.txt")).write_bytes(b"Latin-1\n")
    (root / "plain.txt").write_bytes(b"plain\n")
    old_enough(root)
    first = HashCache()
    index = scan_folder(str(root), Filter(), first)
    path = cache_path(tmp_path / "state", "docs")
    assert save(path, str(root), first) == 2
    assert b"\\u0000" in path.read_bytes()  # escaped (node/names.py)
    again = load(path, str(root))
    assert len(again) == 2
    assert scan_folder(str(root), Filter(), again) == index
    assert again.hashed == 0  # the Latin-1 name was known, not read again


def test_a_file_changed_while_down_is_read_again_even_with_its_size_and_mtime_put_back(
        tmp_path):
    root, cache, path = scanned(tmp_path)
    save(path, str(root), cache)

    victim = root / "d1" / "f005.bin"
    st = victim.stat()
    new = os.urandom(st.st_size)
    victim.write_bytes(new)  # same size...
    os.utime(victim, ns=(st.st_atime_ns, st.st_mtime_ns))  # ...and the old mtime put back
    assert victim.stat().st_mtime_ns == st.st_mtime_ns and victim.stat().st_size == st.st_size

    again = load(path, str(root))
    index = scan_folder(str(root), Filter(), again)
    assert again.hashed == 1
    assert index["d1/f005.bin"]["hash"] == hash_bytes(new)


def test_a_cache_of_another_root_is_not_used(tmp_path, caplog):
    root, other = tmp_path / "docs", tmp_path / "other"
    make_tree(root)
    make_tree(other, 3)
    old_enough(root)
    cache = HashCache()
    scan_folder(str(root), Filter(), cache)
    path = cache_path(tmp_path / "state", "docs")
    save(path, str(root), cache)
    with caplog.at_level(logging.INFO, logger="sbs.hashstore"):
        assert len(load(path, str(other))) == 0
    assert "not used: it was made for" in caplog.text


@pytest.mark.parametrize("content", [
    b"", b"\x00" * 300, b"not json at all\n", b'{"v": 99}\n', b"[1, 2, 3]\n",
    os.urandom(4096),
])
def test_a_file_that_is_no_cache_is_not_used_and_nothing_fails(tmp_path, content):
    root = tmp_path / "docs"
    make_tree(root, 2)
    path = cache_path(tmp_path / "state", "docs")
    path.parent.mkdir(parents=True)
    path.write_bytes(content)
    cache = load(path, str(root))
    assert len(cache) == 0
    scan_folder(str(root), Filter(), cache)  # and the scan hashes as it would without it
    assert cache.hashed == 2


def test_hostile_lines_are_skipped_and_counted_the_good_ones_kept(tmp_path, caplog):
    root, cache, path = scanned(tmp_path, 3)
    save(path, str(root), cache)
    head, *good = path.read_bytes().splitlines()
    h = "0" * 32
    hostile = [
        b"not json", b"{}", b"[]", b'["a", 1, 2, 420, "' + h.encode() + b'", 3]',  # 6 fields
        orjson.dumps(["a", -1, 2, 420, h, 3, 4]),  # negative size
        orjson.dumps(["a", 1, 2, 0o7777, h, 3, 4]),  # a mode above 0o777
        orjson.dumps(["a", 1, 2, 420, "zz" * 16, 3, 4]),  # not a hash
        orjson.dumps(["a", 1, 2, 420, h, 3, 2**64 - 1]),  # ctime out of range
        orjson.dumps([7, 1, 2, 420, h, 3, 4]),  # a path that is not a string
        orjson.dumps(["a", 1.5, 2, 420, h, 3, 4]),  # a float
        orjson.dumps(["a", True, 2, 420, h, 3, 4]),  # a bool is not a size
        b"\xff\xfe" * 40,
    ]
    path.write_bytes(b"\n".join([head, *hostile, *good, good[0][:20]]) + b"\n")
    with caplog.at_level(logging.WARNING, logger="sbs.hashstore"):
        again = load(path, str(root))
    assert len(again) == 3
    assert f"{len(hostile) + 1} line(s) skipped" in caplog.text
    scan_folder(str(root), Filter(), again)
    assert again.hashed == 0


def test_a_save_keeps_only_what_is_still_wanted_and_never_builds_the_file_in_memory(tmp_path):
    root, cache, path = scanned(tmp_path, 40)
    assert save(path, str(root), cache, lambda e: e.path.startswith("d1/")) == 10
    assert len(cache) == 10  # the others are dropped from the cache too
    assert len(load(path, str(root))) == 10
    assert not list(path.parent.glob(".*.tmp"))
    leftover = path.with_name(f".{path.name}.999999999.7.tmp")  # a killed process's save
    leftover.write_bytes(b"half")
    assert len(load(path, str(root))) == 10 and not leftover.exists()


def test_a_filesystem_with_whole_second_times_gets_a_wider_racy_window():
    """ext4 with small inodes keeps whole seconds: a write in the same second as the hash
    leaves ctime as it was, so such a file is cached only once its second is well past."""
    cache = HashCache()
    now = time.time_ns()
    for ctime, cached in ((now - 500_000_000, True), (now // 10**9 * 10**9 - 10**9, False),
                          (now // 10**9 * 10**9 - 3 * 10**9, True)):
        st = SimpleNamespace(st_ino=1, st_ctime_ns=ctime, st_mtime_ns=ctime, st_size=1)
        entry = FileEntry(f"f{ctime}", "file", 1, ctime, 0o644, "0" * 32)
        cache.store(st, entry)
        assert (entry.path in cache._map) is cached, (ctime, now)


def test_the_syncers_writes_are_cached_as_they_are_on_disk_once_settled(tmp_path):
    """What gets cached is what is on disk when the file is looked at again, at least the
    racy window after it was put in place: a change made right after the rename (same size,
    mtime put back: invisible to size, mtime and, within one tick, ctime) is not hidden."""
    root = tmp_path / "docs"
    writer = FolderWriter(root, tmp_path / "state" / "tmp", tmp_path / "state" / "trash",
                          tmp_path / "state" / "conflicts")
    keeper = CacheKeeper(tmp_path / "state", "syncer")
    cache, filt = HashCache(), Filter()
    written = {}
    for name in ("kept.bin", "changed.bin", "gone.bin"):
        written[name] = os.urandom(500)
        (root / name).write_bytes(written[name])
        os.utime(root / name, ns=(1_700_000_000_000_000_000, 1_700_000_000_000_000_000))
        keeper.wrote("docs", name)
    # right after the rename: one file's content changes, its size and mtime put back
    changed = os.urandom(500)
    (root / "changed.bin").write_bytes(changed)
    os.utime(root / "changed.bin", ns=(1_700_000_000_000_000_000, 1_700_000_000_000_000_000))
    (root / "gone.bin").unlink()

    def look(path: str) -> object:
        return writer.local_entry(path, filt, cache)

    keeper.racy_ns = 3600 * 10**9  # within the window: nothing is looked at yet
    keeper.settle("docs", look)
    assert len(cache) == 0 and cache.hashed == 0 and keeper._unsettled() == 3

    keeper.racy_ns = RACY_NS
    newest = max(p.stat().st_ctime_ns for p in root.iterdir())

    def settled() -> bool:
        if time.time_ns() - newest > RACY_NS:  # else the read would not be cached yet
            keeper.settle("docs", look)
        return "docs" not in keeper.unsettled

    wait_for(settled, 5, "the writes to settle")
    assert set(cache._map) == {"kept.bin", "changed.bin"}
    assert cache._map["kept.bin"]["hash"] == hash_bytes(written["kept.bin"])
    assert cache._map["changed.bin"]["hash"] == hash_bytes(changed)  # not what was written
    writer.close()


def test_settling_gives_way_to_the_syncers_work_and_goes_on_where_it_was(tmp_path):
    """Right after a 100,000-file snapshot the syncer settled every file it wrote in one go: a
    change that arrived meanwhile waited 1.9 s. A settle now looks at the syncer's queue every
    SETTLE_SLICE files; a save that gave way writes nothing, is due again at once, and the
    next pass goes on in order, then writes the file."""
    root, cache, path = scanned(tmp_path, 40)
    jobs: list[str] = []
    keeper = CacheKeeper(tmp_path / "state", "syncer", busy=lambda: bool(jobs))
    keeper.racy_ns = 0
    names = [f"w{i:04}" for i in range(1000)]
    for name in names:
        keeper.wrote("docs", name)
    wait_for(lambda: time.monotonic_ns() - keeper.unsettled["docs"][-1][0] > hashstore.WROTE_SPAN,
             5, "the writes to be ripe")
    looked: list[str] = []

    def look(p: str) -> None:
        looked.append(p)
        if len(looked) == 300:
            jobs.append("manifest")  # a job comes in while it settles

    def look_of(name: str):
        return look

    now = time.monotonic()
    assert keeper.due({"docs": cache}, now)
    keeper.save({"docs": (str(root), cache)}, look=look_of)
    assert len(looked) == 2 * hashstore.SETTLE_SLICE  # gave way at the next slice's start
    assert not path.exists()  # nothing written while settling is not done
    assert keeper.due({"docs": cache}, now)  # due again at once
    jobs.clear()  # the syncer took its job
    keeper.save({"docs": (str(root), cache)}, look=look_of)
    assert looked == names  # each once, in order
    assert "docs" not in keeper.unsettled and path.exists()
    assert len(load(path, str(root))) == 40
    assert not keeper.due({"docs": cache}, now)


def test_a_wall_clock_set_back_does_not_hold_the_written_files_unsettled(tmp_path, monkeypatch):
    """The wall clock is set back an hour (an NTP step, an operator's `date`) between two files
    the syncer wrote. Their spans are timed on the monotonic clock: both are looked at once
    racy_ns has passed, in order. Timed on the wall clock, the first span was not ripe for an
    hour and every file written meanwhile waited with it (settling stops at the first unripe
    span): none was cached, and a takeover in that hour read them all again."""
    keeper = CacheKeeper(tmp_path / "state", "syncer")
    keeper.wrote("docs", "before.bin")
    wall = time.time_ns
    monkeypatch.setattr(time, "time_ns", lambda: wall() - 3600 * 10**9)
    keeper.wrote("docs", "after.bin")
    looked: list[str] = []

    def settled() -> bool:
        keeper.settle("docs", looked.append)
        return "docs" not in keeper.unsettled

    wait_for(settled, 5, "both writes to settle")
    assert looked == ["before.bin", "after.bin"]


def test_a_save_gives_up_when_its_thread_is_told_to_stop(tmp_path):
    root, cache, path = scanned(tmp_path, 5)
    keeper = CacheKeeper(tmp_path / "state", "scanner", stopping=lambda: True)
    assert not keeper.due({"docs": cache}, time.monotonic() + 10**6)
    keeper.save({"docs": (str(root), cache)})
    assert not path.exists() and not list(path.parent.glob(".*"))


def cache_file(tmp_path, root, lines: int):
    """A cache file of `lines` well-formed entries for `root` (no such files need exist)."""
    path = cache_path(tmp_path / "state", "docs")
    path.parent.mkdir(parents=True)
    head = {"v": hashstore.FORMAT, "root": str(root), "dev": os.stat(root).st_dev}
    body = b"".join(cache_line(orjson.dumps([f"f{i}", i, 1, 0o644, "0" * 32, i + 1, 2])) + b"\n"
                    for i in range(lines))
    path.write_bytes(orjson.dumps(head) + b"\n" + body)
    return path


def test_loading_gives_up_when_the_scan_it_is_for_is_dropped(tmp_path):
    """A scan begun at start-up is dropped when the peer turns out to be primary: its hash
    cache (0.3 s of CPU at 100,000 files) is not read to the end for nothing. The syncer,
    which scans with what it loads, never gives up (it would hash every file instead)."""
    root = tmp_path / "docs"
    root.mkdir()
    path = cache_file(tmp_path, root, 5 * hashstore._LINES)
    assert len(load(path, str(root))) == 5 * hashstore._LINES
    looks = []

    def stop_at_the_second_look() -> bool:
        looks.append(1)
        return len(looks) >= 2

    assert len(load(path, str(root), stop_at_the_second_look)) == 0
    assert len(looks) == 2  # it looked every _LINES lines, and stopped at the second look
    told = CacheKeeper(tmp_path / "state", "scanner", stopping=lambda: True)
    assert len(told.load("docs", str(root), give_up=True)) == 0
    assert len(told.load("docs", str(root))) == 5 * hashstore._LINES  # the syncer's way
    told.at_exit = True  # a node stopping: its scanner saves on the way out, so it loads all
    assert len(told.load("docs", str(root), give_up=True)) == 5 * hashstore._LINES


def test_loading_gives_the_gil_away_every_few_hundred_lines(tmp_path, monkeypatch):
    """A node restarted next to a primary loads its cache while its loop hears that primary:
    the load lets the GIL go every YIELD_LINES lines (time.sleep(0)), or the loop, which
    must win it back after each of its system calls, followed up to 250 ms late."""
    root = tmp_path / "docs"
    root.mkdir()
    lines = 5 * hashstore._LINES
    path = cache_file(tmp_path, root, lines)
    given: list[float] = []
    real_sleep = time.sleep
    monkeypatch.setattr(hashstore.time, "sleep",
                        lambda s: given.append(s) if s == 0 else real_sleep(s))
    assert len(load(path, str(root))) == lines
    assert given.count(0) >= lines // hashstore.YIELD_LINES


@pytest.mark.parametrize("finish_loading", [False, True], ids=["dropped", "for-a-syncer"])
def test_a_scanner_dropped_before_its_cache_is_loaded_scans_nothing_and_keeps_the_file(
        tmp_path, finish_loading):
    """A prescan dropped as the node loop drops it (without waiting, here before it even
    starts): it scans nothing and leaves the cache file as it was. Dropped because the node
    follows a primary (finish_loading), it reads the cache to the end instead of giving up (the
    syncer would read the same file) and, once its thread has ended, loaded_cache hands it over
    for the same root only."""
    root = tmp_path / "docs"
    make_tree(root, 10)
    path = cache_file(tmp_path, root, 3 * hashstore._LINES)
    before = path.read_bytes()
    ctx = zmq.Context()
    reader = ctx.socket(zmq.PAIR)
    reader.bind("inproc://dropped-prescan")
    try:
        sc = Scanner(ctx, "inproc://dropped-prescan", {"docs": FolderConfig("docs", root)},
                     period=60, state_dir=tmp_path / "state")
        sc.stop(wait=False, finish_loading=finish_loading)
        sc.start()
        sc.thread.join(10)
        assert not sc.thread.is_alive()
        assert not reader.poll(0)  # no scan was reported
        assert sc.caches["docs"].hashed == 0  # nothing read from the folder
        assert path.read_bytes() == before  # the cache on disk is left as it was
        cache = sc.loaded_cache("docs", str(root))
        if not finish_loading:
            assert len(sc.caches["docs"]) == 0 and cache is None
        else:
            assert cache is not None and len(cache) == 3 * hashstore._LINES
            assert sc.loaded_cache("docs", str(tmp_path / "elsewhere")) is None
            assert sc.loaded_cache("other", str(root)) is None
    finally:
        reader.close(0)
        ctx.term()


def test_a_state_disk_that_refuses_the_save_is_not_rewritten_on_every_pass(tmp_path, caplog):
    root = tmp_path / "docs"
    make_tree(root, 100)
    old_enough(root)
    cache = HashCache()
    scan_folder(str(root), Filter(), cache)
    (tmp_path / "state").write_text("a file where the state folder should be")
    keeper = CacheKeeper(tmp_path / "state", "scanner")
    now = time.monotonic()
    assert keeper.due({"docs": cache}, now)  # 100 new hashes: due at once
    with caplog.at_level(logging.WARNING, logger="sbs.hashstore"):
        keeper.save({"docs": (str(root), cache)})
    assert "hash cache of docs not saved" in caplog.text
    assert cache.changed == 100  # kept for the next try
    assert not keeper.due({"docs": cache}, now + 1)  # not on every pass...
    assert keeper.due({"docs": cache}, now + keeper.save_every + 1)  # ...but again later


def test_a_restarted_scanner_reads_nothing_it_knew(tmp_path, caplog):
    root = tmp_path / "docs"
    make_tree(root, 60)
    old_enough(root)
    state = tmp_path / "state"
    ctx = zmq.Context()
    try:
        for run, expect_read in ((1, 60), (2, 0)):
            reader = ctx.socket(zmq.PAIR)
            reader.bind(f"inproc://hashstore-{run}")
            sc = Scanner(ctx, f"inproc://hashstore-{run}", {"docs": FolderConfig("docs", root)},
                         period=60, state_dir=state)
            sc.start()
            try:
                assert reader.poll(10_000), "no first scan"
                assert reader.recv_multipart()[2] == b"full"
                assert len(sc.take_delta()["docs"]) == 60 + 4  # the files and their folders
                assert sc.caches["docs"].hashed == expect_read, run
            finally:
                sc.stop(save=True)
                reader.close(0)
            assert not sc.thread.is_alive()
            assert len(load(cache_path(state, "docs"), str(root))) == 60
    finally:
        ctx.term()


def test_the_cache_holds_an_equal_entry_kept_elsewhere_instead_of_its_own(tmp_path):
    """The syncer keeps the primary's Entry in the cache for a file it read back with the same
    content (HashCache.swap): one object a file, under the key the file was read at."""
    root, cache, _ = scanned(tmp_path, 4)
    path = next(iter(cache._map))
    held = cache._map[path]
    same = FileEntry(path, "file", held.size, held.mtime_ns, held.mode, held.hash)
    assert cache.swap(held, same) and cache._map[path] is same
    assert same.cache_key == held.cache_key
    assert not cache.swap(held, same)  # it holds something else for that path now
    st = (root / path).stat()
    assert cache.lookup(path, st) is same


def test_a_folder_that_looks_like_a_disk_not_mounted_is_named_by_its_cache(tmp_path):
    """hashstore.vanished: the folder this node held files in (its cache says so, for this
    very path) is missing, or empty on another device than then: both what a disk not mounted
    looks like. Anything else is not its business."""
    root, cache, path = scanned(tmp_path, 4)
    state = tmp_path / "state"
    assert save(path, str(root), cache) == 4
    assert hashstore.vanished(state, "docs", str(root)) == ""  # there, files in it
    assert hashstore.vanished(state, "other", str(root)) == ""  # no cache for that folder
    assert hashstore.vanished(state, "docs", str(tmp_path / "moved")) == ""  # another path
    for f in sorted(root.rglob("*"), reverse=True):
        f.unlink() if f.is_file() else f.rmdir()
    assert hashstore.vanished(state, "docs", str(root)) == ""  # emptied, the same device
    head, *rest = path.read_bytes().splitlines(keepends=True)
    dev = orjson.loads(head)["dev"]
    path.write_bytes(orjson.dumps({**orjson.loads(head), "dev": dev + 1}) + b"\n" + b"".join(rest))
    assert "empty and on another device" in hashstore.vanished(state, "docs", str(root))
    (root / "back.txt").write_text("not empty\n")
    assert hashstore.vanished(state, "docs", str(root)) == ""  # on another device, not empty
    (root / "back.txt").unlink()
    root.rmdir()
    why = hashstore.vanished(state, "docs", str(root))
    assert "missing" in why and str(path) in why, why
    save(path, str(root), HashCache())  # a cache of no files: nothing was held
    assert hashstore.vanished(state, "docs", str(root)) == ""
