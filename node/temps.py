"""Temp files of the writer: where they live, how they are written, what a killed run left.

A file being received is written to a TempFile (hashed on the way, never at its real name) in
the folder's temp area: state_dir/tmp/<folder>, one subdirectory per writing lane, when that is
on the folder's filesystem (a rename from there is atomic), else next to its target under a
hidden TEMP_PREFIX name.
"""
from __future__ import annotations

import errno
import logging
import os
import stat
import threading
import time
from collections.abc import Callable

from .entries import Entry
from .fdio import DIR_FLAGS, delete_at, lstat_at, removed, start_writeback, temp_name
from .index import TEMP_PREFIX, new_hasher
from .tree import walk

log = logging.getLogger("sbs.node.writer")

WRITEBACK_EVERY = 32 << 20


class HashMismatch(Exception):
    """The received content does not have the hash the manifest promised."""


class TempFile:
    """A file being received: written with os.write, hashed on the way, never at its real name.

    ``abort()`` closes and removes it (idempotent); FolderWriter.commit puts it in place.
    """

    def __init__(self, dir_fd: int, owns_dir_fd: bool, relpath: str):
        self.relpath = relpath
        self.name = temp_name()
        self.dir_fd = dir_fd
        self._owns_dir_fd = owns_dir_fd
        try:
            self.fd = os.open(self.name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                              | os.O_CLOEXEC, 0o600, dir_fd=dir_fd)
        except OSError as exc:
            # the error names the temp file by its full path (state_dir/tmp/<folder>, or the
            # folder itself): with the bare name, it pointed at the replicated folder
            try:
                exc.filename = os.path.join(os.readlink(f"/proc/self/fd/{dir_fd}"), self.name)
            except OSError:
                pass
            raise
        self.size = 0
        self._written_back = 0  # bytes already handed to start_writeback
        self._hasher = new_hasher()
        self._finished = False

    def write(self, b: bytes | bytearray | memoryview) -> None:
        if self._finished or self.fd < 0:
            raise ValueError(f"temp file for {self.relpath} is closed")
        try:
            n = os.write(self.fd, b)
            if n < len(b):
                view = memoryview(b)
                while n < len(view):
                    n += os.write(self.fd, view[n:])
        except BaseException:
            self.abort()  # a full disk must not leave a partial temp file behind
            raise
        self._hasher.update(b)
        self.size += len(b)
        if self.size - self._written_back >= WRITEBACK_EVERY:
            start_writeback(self.fd, self._written_back, self.size - self._written_back)
            self._written_back = self.size

    def hexdigest(self) -> str:
        return self._hasher.hexdigest()

    def close(self) -> None:
        """Close the write fd (keeps the file). Lets a caller hold many temps for commit_many."""
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            os.close(fd)

    def reopen(self) -> int:
        if self.fd < 0:
            self.fd = os.open(self.name, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC,
                              dir_fd=self.dir_fd)
        return self.fd

    def verify(self, entry: Entry) -> None:
        """HashMismatch unless the content written is what the entry promised."""
        if entry.get("kind", "file") != "file":
            raise ValueError(f"{entry.get('path')!r}: not a file entry")
        got = self.hexdigest()
        if got != entry["hash"]:
            raise HashMismatch(f"{entry['path']}: expected hash {entry['hash']}, got {got} "
                               f"({self.size} bytes)")

    def seal(self, entry: Entry, *, sync: bool) -> None:
        # Mode and mtime are set on the temp file: the real name appears with both already right.
        fd = self.reopen()
        mtime = int(entry["mtime_ns"])
        os.fchmod(fd, int(entry["mode"]) & 0o777)
        os.utime(fd, ns=(time.time_ns(), mtime))
        if sync:
            os.fsync(fd)
        self.close()

    def abort(self) -> None:
        if self._finished:
            return
        try:
            self.close()
        except OSError:
            pass
        try:
            os.unlink(self.name, dir_fd=self.dir_fd)
        except FileNotFoundError:
            pass
        except OSError as e:
            log.warning("cannot remove temp file %s for %s: %s", self.name, self.relpath, e)
        self._release()

    def mark_committed(self) -> None:
        """The file now lives at its real name: abort() must no longer touch it."""
        self._release()

    def _release(self) -> None:
        self._finished = True
        if self._owns_dir_fd:
            self._owns_dir_fd = False
            os.close(self.dir_fd)

    def __enter__(self) -> TempFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.abort()



def _make_temp_dir(temp_dir: str) -> None:
    """state_dir/tmp/<folder>, made. A file standing where it or state_dir/tmp belongs (not
    the node's: it makes folders there) is moved aside, named in the log, not removed: the
    folder would otherwise be refused here for good."""
    for path in (os.path.dirname(temp_dir), temp_dir):
        if os.path.lexists(path) and not os.path.isdir(path):
            stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
            os.rename(path, f"{path}.not-a-folder-{stamp}")
            log.warning("%s was not a folder: moved aside to %s.not-a-folder-%s", path, path,
                        stamp)
    os.makedirs(temp_dir, mode=0o700, exist_ok=True)


class TempArea:
    """The temp directory of one folder and its lanes. ``in_state``: a temp file there can be
    renamed into the folder (same filesystem); otherwise temps go next to their targets."""

    def __init__(self, temp_dir: str, root: str, open_root: Callable[[], int]):
        self.temp_dir = temp_dir
        _make_temp_dir(temp_dir)
        self.fd = os.open(self.temp_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        self._open_root = open_root
        # lane N > 0 has a temp directory of its own (temp_dir/laneN): creating a file locks
        # its directory, so writers sharing one directory would take turns
        self._lane_fds: dict[int, int] = {}
        self._lane_lock = threading.Lock()
        # fds of a temp dir removed under the running node (_made_again): another lane may
        # still be using one, so they are closed with the area, not when it is made again
        self._stale: list[int] = []
        self.in_state = self._can_rename_to(root)

    def close(self) -> None:
        self._close_lanes()
        stale, self._stale = self._stale, []
        for fd in stale:
            os.close(fd)
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            os.close(fd)

    def _close_lanes(self) -> None:
        with self._lane_lock:
            fds, self._lane_fds = list(self._lane_fds.values()), {}
        for fd in fds:
            os.close(fd)

    def lane_fd(self, lane: int) -> int:
        with self._lane_lock:
            if removed(self.fd):
                self._made_again()
            if lane == 0:
                return self.fd
            fd = self._lane_fds.get(lane)
            if fd is None:
                name = f"lane{lane}"
                try:
                    os.mkdir(name, 0o700, dir_fd=self.fd)
                except FileExistsError:
                    pass
                fd = self._lane_fds[lane] = os.open(name, DIR_FLAGS, dir_fd=self.fd)
            return fd

    def _made_again(self) -> None:
        """The temp dir was removed under the running node (a cleaner, an operator): every
        temp file would fail in it for good. Made again, its lanes when next used."""
        log.warning("%s was removed while the node runs: made again", self.temp_dir)
        self._stale += [self.fd, *self._lane_fds.values()]
        self._lane_fds = {}
        _make_temp_dir(self.temp_dir)
        self.fd = os.open(self.temp_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)

    def _can_rename_to(self, root: str) -> bool:
        # Same st_dev is necessary but not enough (two bind mounts of one filesystem give
        # EXDEV), so try the real operation once.
        if os.stat(self.temp_dir).st_dev != os.stat(root).st_dev:
            return False
        probe = temp_name()
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600,
                     dir_fd=self.fd)
        os.close(fd)
        root_fd = self._open_root()
        try:
            os.rename(probe, probe, src_dir_fd=self.fd, dst_dir_fd=root_fd)
            os.unlink(probe, dir_fd=root_fd)
            return True
        except OSError as e:
            if e.errno != errno.EXDEV:
                raise
            os.unlink(probe, dir_fd=self.fd)
            return False
        finally:
            os.close(root_fd)

    def cleanup(self) -> int:
        """Remove what a killed run left: everything in the temp dir and every TEMP_PREFIX name
        in the folder tree. Returns how many were removed."""
        count = 0
        self._close_lanes()  # their directories go too; they come back when next used
        for name in os.listdir(self.fd):
            st = lstat_at(self.fd, name)
            if st is not None and stat.S_ISDIR(st.st_mode) and name.startswith("lane"):
                fd = os.open(name, DIR_FLAGS, dir_fd=self.fd)
                try:
                    count += len(os.listdir(fd))
                finally:
                    os.close(fd)
            else:
                count += 1
            delete_at(self.fd, name)
        root_fd = self._open_root()
        try:
            for _, dir_fd, dirnames, others in walk(root_fd):
                for name in [d for d in dirnames if d.startswith(TEMP_PREFIX)]:
                    dirnames.remove(name)
                    delete_at(dir_fd, name)
                    count += 1
                for name in others:
                    if name.startswith(TEMP_PREFIX):
                        delete_at(dir_fd, name)
                        count += 1
        finally:
            os.close(root_fd)
        return count
