"""The watcher: inotify (through watchdog) on every folder, delivered as debounced batches of
relative paths for the scanner to look at again, or None when events were lost.

Imported by the scanner's thread when it starts watching, not with the node: the node's loop
is already running, and can hear its peer, while watchdog loads (~13 ms of imports).
"""
from __future__ import annotations

import logging
import os
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from typing import Any

from watchdog.events import (
    DirAttribEvent,
    DirCreatedEvent,
    DirDeletedEvent,
    DirMovedEvent,
    FileAttribEvent,
    FileClosedEvent,
    FileCreatedEvent,
    FileDeletedEvent,
    FileModifiedEvent,
    FileMovedEvent,
    FileSystemEvent,
    FileSystemEventHandler,
)

from .tree import TEMP_PREFIX, walk

log = logging.getLogger(__name__)

Batch = dict[str, set[str]]  # folder name -> relative paths to look at again ("" is the root)


try:  # watchdog >= 7 on Linux: the inotify reader thread is a class we can extend
    from watchdog.observers.api import DEFAULT_OBSERVER_TIMEOUT, BaseObserver
    from watchdog.observers.inotify import InotifyEmitter, InotifyWatchGroup
    from watchdog.observers.inotify_c import InotifyConstants, InotifyEvent, InotifyFD, Mask
except Exception:  # older watchdog, or not Linux: fall back to the default observer
    InotifyFD = None  # type: ignore[assignment,misc]

if InotifyFD is not None:

    class _OverflowAwareFD(InotifyFD):  # type: ignore[misc,valid-type]
        """watchdog 7 rebuilds its watches on IN_Q_OVERFLOW and logs it, but tells no handler:
        events were lost, so whoever keeps an index must rescan. (watchdog <= 6 dropped the
        overflow event silently: wd == -1 was skipped.)"""

        def __init__(self, on_overflow: Callable[[], None]):
            super().__init__()
            self._on_overflow = on_overflow

        def handle_event(self, event: InotifyEvent) -> None:
            super().handle_event(event)  # first: watches are rebuilt before we ask for a rescan
            if event.is_queue_overflow:
                self._on_overflow()

    def _tree(path: bytes) -> Iterator[tuple[bytes, list[str], list[str]]]:
        try:
            top = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError:
            return
        try:
            for rel, _, dirs, others in walk(top):
                yield (os.path.join(path, os.fsencode(rel)) if rel else path), dirs, others
        finally:
            os.close(top)

    class _WatchGroup(InotifyWatchGroup):  # type: ignore[misc,valid-type]
        """watchdog's recursive registration and its synthetic events walk with os.walk, which
        recurses (RecursionError on a tree deeper than about 1,000 levels, and the watcher dies):
        the same work on node.tree's walk."""

        def _add_all_callbacks(self, path: bytes) -> None:
            is_dir = os.path.isdir(path)
            self._add_callback(path)
            if is_dir and self.is_recursive:
                for root, dirs, _ in _tree(path):
                    for name in dirs:
                        self._add_callback(os.path.join(root, os.fsencode(name)))

        def _recursive_simulate(self, src_path: bytes) -> list[InotifyEvent]:
            events = []
            for root, dirs, others in _tree(src_path):
                if not (node := self._find_node_by_path(root)):
                    continue  # not watched (yet): its own IN_CREATE reports its content
                for name in dirs:
                    events.append(InotifyEvent(node.wd, Mask(InotifyConstants.IN_CREATE
                                                             | InotifyConstants.IN_ISDIR), 0,
                                               os.fsencode(name)))
                for name in others:
                    events.append(InotifyEvent(node.wd, InotifyConstants.IN_CREATE, 0,
                                               os.fsencode(name)))
            return events

    class _Emitter(InotifyEmitter):  # type: ignore[misc,valid-type]
        def on_thread_start(self) -> None:
            self._inotify = _WatchGroup(
                self._inotify_fd, os.fsencode(self.watch.path),
                is_recursive=self.watch.is_recursive,
                event_mask=self.get_event_mask_from_filter(),
                follow_symlink=self.watch.follow_symlink,
            )

    class _InotifyObserver(BaseObserver):  # type: ignore[misc,valid-type]
        """watchdog's InotifyObserver, with an inotify reader that reports queue overflows."""

        def __init__(self, on_overflow: Callable[[], None]):
            self.inotify_fd = _OverflowAwareFD(on_overflow)
            self.inotify_fd.start()
            super().__init__(_Emitter, timeout=DEFAULT_OBSERVER_TIMEOUT,
                             inotify_fd=self.inotify_fd)

        def healthy(self) -> bool:
            return self.is_alive() and self.inotify_fd.is_alive()

        def on_thread_stop(self) -> None:
            super().on_thread_stop()
            self.inotify_fd.stop()
            self.inotify_fd.join()


# watchdog 7 warns when a fast "mkdir -p a/b" makes it register the same callback twice on a new
# folder's watch; it just overwrites the callback with itself, so the warning is noise.
warnings.filterwarnings("ignore", message=r"Callback with id .* already exists",
                        category=RuntimeWarning, module=r"watchdog\.")

_IGNORED_EVENTS = frozenset({"opened", "closed_no_write"})
# Only what can change content or metadata. Leaving out IN_OPEN and IN_CLOSE_NOWRITE keeps every
# read of a replicated file (our own hashing included) out of the kernel queue and out of
# watchdog's per-event Python work, which also makes a queue overflow less likely.
_EVENT_FILTER = [FileCreatedEvent, FileDeletedEvent, FileModifiedEvent, FileMovedEvent,
                 FileClosedEvent, FileAttribEvent, DirCreatedEvent, DirDeletedEvent,
                 DirMovedEvent, DirAttribEvent]


class _RootHandler(FileSystemEventHandler):
    """Maps the events of one folder's watch to relative paths. Runs in the observer thread."""

    def __init__(self, watcher: Watcher, name: str, root: str):
        self._watcher, self._name, self._root = watcher, name, root
        self._prefix = root.rstrip("/") + "/"

    def _rel(self, path: str | bytes) -> str | None:
        path = os.fsdecode(path)
        if path == self._root:
            return ""
        if not path.startswith(self._prefix):
            return None
        rel = path[len(self._prefix):]
        if TEMP_PREFIX in rel and any(p.startswith(TEMP_PREFIX) for p in rel.split("/")):
            return None
        return rel

    def dispatch(self, event: FileSystemEvent) -> None:
        try:
            # Synthetic events (the content of a moved or created folder) are covered by the
            # folder's own event: scan_paths walks it. A DirModifiedEvent is the parent-mtime
            # echo of a child's event, which we get anyway.
            if getattr(event, "is_synthetic", False) or event.event_type in _IGNORED_EVENTS:
                return
            if event.is_directory and event.event_type == "modified":
                return
            rels = [r for p in (event.src_path, getattr(event, "dest_path", ""))
                    if p and (r := self._rel(p)) is not None]
            if rels:
                self._watcher._touch(self._name, rels)
        except Exception:  # an exception here would kill watchdog's observer thread
            log.exception("watch event %r not handled", event)


_NOTHING = object()


class Watcher:
    """Watches every folder (inotify, recursive) and delivers debounced batches.

    ``on_batch`` is called from the watcher's own thread with {folder name: {relpaths}} once
    ``quiet`` seconds pass without a new event, or ``max_delay`` after the first event of the
    batch. A folder's root is "". ``on_batch(None)`` means "events were lost: rescan everything"
    (inotify queue overflow, a watch that died, a folder that came back). Pending events at
    stop() are dropped: a stopping node does its own final scan.
    """

    HEALTH_INTERVAL = 0.25
    RETRY_MAX = 30.0

    def __init__(self, roots: dict[str, str], on_batch: Callable[[Batch | None], None], *,
                 quiet: float = 0.004, max_delay: float = 0.05):
        # Watch the real path: a watch on a symlinked root (IN_DONT_FOLLOW) would see nothing.
        self._roots = {name: os.path.realpath(path) for name, path in roots.items()}
        self._on_batch = on_batch
        self._quiet, self._max_delay = quiet, max_delay
        self._cond = threading.Condition()
        self._pending: Batch = {}
        self._rescan = False
        self._first = self._last = 0.0
        self._stopping = False
        self._observer: Any = None
        self._watches: dict[str, Any] = {}
        self._broken: dict[str, list[float]] = {}  # folder -> [retry at, next delay]
        self._thread: threading.Thread | None = None

    # -- lifecycle --

    def start(self) -> None:
        """Returns once every folder that exists is watched (a missing one is retried)."""
        self._observer = self._new_observer()
        for name in self._roots:
            if not self._schedule(name):
                self._broken[name] = [0.0, self.HEALTH_INTERVAL]
        self._thread = threading.Thread(target=self._run, name="sbs-watcher", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self._stop_observer()

    def __enter__(self) -> Watcher:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _new_observer(self) -> Any:
        if InotifyFD is not None:
            observer = _InotifyObserver(self.request_rescan)
        else:
            from watchdog.observers import Observer

            log.warning("this watchdog cannot report lost events; relying on periodic rescans")
            observer = Observer()
        observer.start()
        return observer

    def _stop_observer(self) -> None:
        if self._observer is not None:
            self._observer.stop()
            self._observer.join()
            self._observer = None
        self._watches.clear()

    def _schedule(self, name: str, *, quiet: bool = False) -> bool:
        root = self._roots[name]
        try:
            self._watches[name] = self._observer.schedule(
                _RootHandler(self, name, root), root, recursive=True, event_filter=_EVENT_FILTER)
        except OSError as e:
            log.log(logging.DEBUG if quiet else logging.WARNING,
                    "cannot watch folder %s (%s): %s", name, root, e)
            return False
        return True

    # -- events (observer thread) --

    def _touch(self, name: str, rels: list[str]) -> None:
        with self._cond:
            now = time.monotonic()
            idle = not self._pending and not self._rescan
            if idle:
                self._first = now
            self._last = now
            self._pending.setdefault(name, set()).update(rels)
            if idle:  # the debouncer recomputes its deadline when it wakes: no notify per event
                self._cond.notify()

    def request_rescan(self) -> None:
        """Deliver on_batch(None) soon. Called on inotify overflow; callable from any thread."""
        with self._cond:
            now = time.monotonic()
            if not self._pending and not self._rescan:
                self._first = now
            self._last = now
            self._rescan = True
            self._cond.notify()

    # -- debouncer thread --

    def _due(self) -> float | None:
        if not self._pending and not self._rescan:
            return None
        return min(self._last + self._quiet, self._first + self._max_delay)

    def _take(self) -> Batch | None:
        batch = None if self._rescan else self._pending
        self._pending, self._rescan = {}, False
        return batch

    def _run(self) -> None:
        next_health = time.monotonic() + self.HEALTH_INTERVAL
        while True:
            with self._cond:
                if self._stopping:
                    return
                now = time.monotonic()
                due = self._due()
                if (due is None or now < due) and now < next_health:
                    wake = next_health if due is None else min(due, next_health)
                    self._cond.wait(wake - now)
                    continue
                batch = self._take() if due is not None and now >= due else _NOTHING
            if batch is not _NOTHING:
                try:
                    self._on_batch(batch)  # type: ignore[arg-type]
                except Exception:
                    log.exception("watch batch handler failed")
            if now >= next_health:
                try:
                    self._check_health()
                except Exception:  # e.g. no inotify instance left: try again next time
                    log.exception("file watcher health check failed")
                next_health = time.monotonic() + self.HEALTH_INTERVAL

    def _check_health(self) -> None:
        """Re-establish what died: the whole observer, or one folder's watch (root deleted)."""
        observer = self._observer
        alive = observer.healthy() if hasattr(observer, "healthy") else observer.is_alive()
        if not alive:
            log.warning("file watcher died; restarting it")
            self._stop_observer()
            self._observer = self._new_observer()
            self._broken = {name: [0.0, self.HEALTH_INTERVAL] for name in self._roots}
        running = {e.watch for e in list(self._observer.emitters) if e.is_alive()}
        for name, watch in list(self._watches.items()):
            if watch not in running:
                log.warning("watch on folder %s stopped (folder removed?)", name)
                self._unschedule(name)
                self._broken[name] = [0.0, self.HEALTH_INTERVAL]
                self.request_rescan()
        now = time.monotonic()
        for name, retry in sorted(self._broken.items()):
            # A missing folder costs one stat per check; a failing watch (an inotify limit) walks
            # the whole tree, so those retries back off.
            if now < retry[0] or not os.path.isdir(self._roots[name]):
                continue
            if self._schedule(name, quiet=True):
                log.info("watching folder %s again", name)
                del self._broken[name]
                self.request_rescan()
            else:
                retry[:] = [now + retry[1], min(2 * retry[1], self.RETRY_MAX)]

    def _unschedule(self, name: str) -> None:
        watch = self._watches.pop(name, None)
        if watch is not None:
            try:
                self._observer.unschedule(watch)
            except KeyError:
                pass
