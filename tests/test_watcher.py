"""node.watcher: inotify on real folders, batched and debounced, lost events reported as a
rescan (a real inotify observer; every wait has a deadline)."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from sbs.node.filters import Filter
from sbs.node.index import TEMP_PREFIX, HashCache, scan_folder, scan_paths
from sbs.node.watcher import Watcher

from tests.test_index import WAIT, write


@pytest.fixture
def no_leaked_threads():
    before = set(threading.enumerate())
    yield
    leaked = [t for t in threading.enumerate() if t not in before and t.is_alive()]
    assert not leaked, f"threads left running: {leaked}"


class Batches:
    """Collects on_batch calls; wait_for() blocks on a condition with a deadline."""

    def __init__(self):
        self.cond = threading.Condition()
        self.items: list[dict[str, set[str]] | None] = []

    def __call__(self, batch):
        with self.cond:
            self.items.append(batch)
            self.cond.notify_all()

    def paths(self, name: str = "f", start: int = 0) -> set[str]:
        with self.cond:
            return set().union(*(b.get(name, set()) for b in self.items[start:] if b))

    def rescans(self, start: int = 0) -> int:
        with self.cond:
            return sum(1 for b in self.items[start:] if b is None)

    def mark(self) -> int:
        with self.cond:
            return len(self.items)

    def wait_for(self, predicate, what: str, timeout: float = WAIT) -> None:
        deadline = time.monotonic() + timeout
        with self.cond:
            while not predicate():
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"timed out waiting for {what}; got {self.items!r:.2000}")
                self.cond.wait(left)

    def wait_paths(self, expected: set[str], name: str = "f", start: int = 0) -> None:
        self.wait_for(lambda: expected <= self._paths_locked(name, start), f"paths {expected}")

    def _paths_locked(self, name: str, start: int) -> set[str]:
        return set().union(*(b.get(name, set()) for b in self.items[start:] if b))


def rescan_asked_then_watching(root: Path, batches: Batches, after: str) -> None:
    """Events were lost: the watcher asks for a full rescan, and a new file is seen again."""
    batches.wait_for(lambda: None in batches.items, f"a rescan request after {after}")
    mark = batches.mark()
    write(root / "after")
    batches.wait_paths({"after"}, start=mark)


@pytest.fixture
def watched(tmp_path, no_leaked_threads):
    root = tmp_path / "root"
    root.mkdir()
    batches = Batches()
    watcher = Watcher({"f": str(root)}, batches)
    watcher.start()
    try:
        yield root, batches, watcher
    finally:
        watcher.stop()


def test_watcher_reports_create_modify_move_delete(watched):
    root, batches, _ = watched
    write(root / "a.txt", b"1")
    batches.wait_paths({"a.txt"})

    mark = batches.mark()
    with open(root / "a.txt", "ab") as f:
        f.write(b"2")
    batches.wait_paths({"a.txt"}, start=mark)

    mark = batches.mark()
    os.rename(root / "a.txt", root / "b.txt")
    batches.wait_paths({"a.txt", "b.txt"}, start=mark)

    mark = batches.mark()
    (root / "b.txt").unlink()
    batches.wait_paths({"b.txt"}, start=mark)

    mark = batches.mark()
    (root / "d").mkdir()
    write(root / "d/x")
    batches.wait_paths({"d"}, start=mark)
    mark = batches.mark()
    os.rename(root / "d", root / "e")
    batches.wait_paths({"d", "e"}, start=mark)
    mark = batches.mark()
    shutil.rmtree(root / "e")
    batches.wait_paths({"e"}, start=mark)

    mark = batches.mark()
    (root / "f").mkdir()
    (root / "f").chmod(0o700)
    batches.wait_paths({"f"}, start=mark)
    assert batches.rescans() == 0


def test_watcher_ignores_temp_names_but_sees_their_rename(watched):
    root, batches, _ = watched
    write(root / (TEMP_PREFIX + "x"), b"partial")
    os.rename(root / (TEMP_PREFIX + "x"), root / "real.txt")
    batches.wait_paths({"real.txt"})
    write(root / "sentinel")
    batches.wait_paths({"sentinel"})
    assert not any(TEMP_PREFIX in p for p in batches.paths())


def test_watcher_ignores_reads(watched):
    root, batches, _ = watched
    write(root / "read-me", b"data")
    batches.wait_paths({"read-me"})
    # the write's last events (its close) may come in the batch after the first one: a file
    # written after it is seen only once every event of the write before it has been
    write(root / "barrier")
    batches.wait_paths({"barrier"})
    mark = batches.mark()
    for _ in range(3):
        assert (root / "read-me").read_bytes() == b"data"
    scan_folder(str(root), Filter(), HashCache())
    write(root / "sentinel")
    batches.wait_paths({"sentinel"}, start=mark)
    assert "read-me" not in batches.paths(start=mark)


def test_watcher_batches_feed_scan_paths_to_the_same_index(watched):
    root, batches, _ = watched
    cache = HashCache()
    index = scan_folder(str(root), Filter(), cache)
    write(root / "a/b/c.txt", b"1")
    write(root / "x.txt", b"2")
    os.rename(root / "a", root / "z")
    write(root / "z/b/d.txt", b"3")
    (root / "x.txt").unlink()
    write(root / "done")
    batches.wait_paths({"done"})
    scan_paths(str(root), Filter(), cache, index, batches.paths())
    assert index == scan_folder(str(root), Filter(), HashCache())


def test_watcher_batches_a_storm_of_writes(watched):
    """1000 writes that reach the watcher at once come in a few batches, not one a write.
    watchdog's reader is held while they are made: a writer descheduled on a loaded machine
    would otherwise leave gaps longer than the batch's quiet time (4 ms) between them, and
    the count would say how busy the machine was, not how the watcher batches."""
    root, batches, watcher = watched
    fd = getattr(watcher._observer, "inotify_fd", None)
    if fd is None or not hasattr(fd, "_lock"):
        pytest.skip("watchdog internals changed: node/watcher.py's inotify reader is not in use")
    # Written by another process, as the applications on a primary would be.
    script = ("import sys\nfor i in range(1000):\n"
              "    open(f'{sys.argv[1]}/s{i}', 'wb').write(b'x')\n")
    with fd._lock:
        subprocess.run([sys.executable, "-c", script, str(root)], check=True, timeout=60)
    expected = {f"s{i}" for i in range(1000)}
    batches.wait_paths(expected)
    assert batches.paths() == expected
    assert len(batches.items) <= 100, f"{len(batches.items)} batches for 1000 writes"


def test_watcher_delivers_a_batch_promptly(watched):
    root, batches, _ = watched
    start = time.monotonic()
    write(root / "quick")
    batches.wait_paths({"quick"})
    assert time.monotonic() - start < 1.0


def test_watcher_queue_overflow_asks_for_a_full_rescan(watched, tmp_path):
    root, batches, watcher = watched
    fd = getattr(watcher._observer, "inotify_fd", None)
    if fd is None or not hasattr(fd, "_lock"):
        pytest.skip("watchdog internals changed: node/watcher.py's overflow-aware inotify "
                    "reader is not in use (overflows are caught only by the periodic rescan)")
    # A real kernel overflow: hold up watchdog's reader while another process makes far more
    # events than fs.inotify.max_queued_events (16384 by default) can hold.
    limit = int(Path("/proc/sys/fs/inotify/max_queued_events").read_text())
    files = limit // 2 + 2000  # >= 3 events each (create, modify, close)
    script = ("import sys\nfor i in range(int(sys.argv[2])):\n"
              "    open(f'{sys.argv[1]}/o{i}', 'wb').write(b'x')\n")
    with fd._lock:
        subprocess.run([sys.executable, "-c", script, str(root), str(files)], check=True,
                       timeout=60)
    rescan_asked_then_watching(root, batches, "the overflow")


def test_watcher_recovers_a_dead_watch(watched):
    root, batches, watcher = watched
    for emitter in list(watcher._observer.emitters):
        emitter.stop()  # as if the emitter thread had died on an error
    rescan_asked_then_watching(root, batches, "the watch died")


def test_watcher_survives_its_folder_being_removed_and_recreated(watched):
    root, batches, _ = watched
    write(root / "x")
    batches.wait_paths({"x"})
    mark = batches.mark()
    shutil.rmtree(root)
    batches.wait_for(lambda: "" in batches.paths(start=mark) or batches.rescans(mark),
                     "the folder's removal")
    mark = batches.mark()
    root.mkdir()
    batches.wait_for(lambda: batches.rescans(mark) > 0, "a rescan once the folder is back")
    mark = batches.mark()
    write(root / "y")
    batches.wait_paths({"y"}, start=mark)


def test_watcher_waits_for_a_missing_folder(tmp_path, no_leaked_threads):
    batches = Batches()
    later = tmp_path / "later"
    with Watcher({"g": str(later)}, batches):
        later.mkdir()
        batches.wait_for(lambda: None in batches.items, "a rescan when the folder appears")
        mark = batches.mark()
        write(later / "z")
        batches.wait_paths({"z"}, name="g", start=mark)


def test_watcher_several_folders_and_a_symlinked_root(tmp_path, no_leaked_threads):
    (tmp_path / "one").mkdir()
    (tmp_path / "two/inner").mkdir(parents=True)
    os.symlink(tmp_path / "two", tmp_path / "two-link")
    batches = Batches()
    watcher = Watcher({"one": str(tmp_path / "one"), "two": str(tmp_path / "two-link"),
                       "inner": str(tmp_path / "two/inner")}, batches)
    watcher.start()
    try:
        write(tmp_path / "one/a")
        write(tmp_path / "two/inner/b")
        batches.wait_paths({"a"}, name="one")
        batches.wait_paths({"inner/b"}, name="two")
        batches.wait_paths({"b"}, name="inner")
    finally:
        watcher.stop()


def test_watcher_stop_leaves_no_thread(tmp_path):
    before = set(threading.enumerate())
    (tmp_path / "r").mkdir()
    watcher = Watcher({"f": str(tmp_path / "r")}, Batches())
    watcher.start()
    assert len(set(threading.enumerate()) - before) >= 3  # observer, inotify reader, debouncer
    watcher.stop()
    assert set(threading.enumerate()) <= before


def test_the_node_starts_without_importing_the_watcher():
    """watchdog is imported by the scanner's thread when it starts watching (node/watcher.py),
    not on the node's way to a running loop: a fresh interpreter that imports what
    `sbs-node start` runs before the loop has neither loaded."""
    code = ("import sys; import sbs.node.cli, sbs.node.run, sbs.node.node, sbs.node.scanner; "
            "print(sorted(m for m in sys.modules "
            "if m.startswith(('watchdog', 'sbs.node.watcher'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
