"""Applying replicated changes on the secondary: safe paths, verified atomic writes, trash.

Every path from the wire is checked by check_relpath, then reached from the folder root one
component at a time with O_NOFOLLOW directory fds (open_dir): a symlink planted inside the
folder can never redirect a write outside it. Files are written to a temp file, verified against
the expected xxh3_128 hash, fsynced and renamed into place, so a reader never sees a partial
file at its real name and a failed write (a full disk) leaves the previous copy intact.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import secrets
import stat
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

from node.scan import (
    CHUNK,
    TEMP_PREFIX,
    Entry,
    Filter,
    HashCache,
    dir_entry,
    hashed_file_entry,
    link_entry,
    new_hasher,
)
from node.tree import (  # noqa: F401  (re-exported: the path rule's home is node/tree.py)
    MAX_NAME_BYTES,
    MAX_PATH_BYTES,
    PathError,
    check_relpath,
    rmtree,
    walk,
)

log = logging.getLogger(__name__)

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
_NOT_A_DIR = (errno.ENOTDIR, errno.ELOOP)
_STAMP_FORMAT = "%Y%m%dT%H%M%S"


class HashMismatch(Exception):
    """The received content does not have the hash the manifest promised."""


def utc_stamp() -> str:
    """e.g. 20261125T160501.123Z: sortable, safe as a folder name."""
    now = datetime.now(UTC)
    return now.strftime(_STAMP_FORMAT) + f".{now.microsecond // 1000:03d}Z"


def _parse_stamp(name: str) -> datetime | None:
    try:
        return datetime.strptime(name, _STAMP_FORMAT + ".%fZ").replace(tzinfo=UTC)
    except ValueError:
        return None


# ---------------------------------------------------------------------------------------------
# syncfs(2): one flush of the whole filesystem instead of one fsync per small file

_libc = ctypes.CDLL(None, use_errno=True)
_syncfs = getattr(_libc, "syncfs", None)
if _syncfs is not None:
    _syncfs.argtypes = [ctypes.c_int]
    _syncfs.restype = ctypes.c_int


def syncfs(fd: int) -> None:
    """Flush the filesystem holding fd. Reports writeback errors (ENOSPC, EIO) since Linux 5.8."""
    if _syncfs is None:
        raise OSError(errno.ENOSYS, "syncfs is not available")
    if _syncfs(fd) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


# sync_file_range(2): start writing a big temp file back while it is still arriving, so the
# fsync before its rename finds little left to do (a hint only: durability is the fsync's job)

_sync_file_range = getattr(_libc, "sync_file_range", None)
if _sync_file_range is not None:
    _sync_file_range.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    _sync_file_range.restype = ctypes.c_int
_SYNC_FILE_RANGE_WRITE = 2
WRITEBACK_EVERY = 32 << 20


def start_writeback(fd: int, offset: int, nbytes: int) -> None:
    """Start asynchronous writeback of a range of fd; errors are ignored (fsync reports them)."""
    if _sync_file_range is not None:
        _sync_file_range(fd, offset, nbytes, _SYNC_FILE_RANGE_WRITE)


def _temp_name() -> str:
    return TEMP_PREFIX + secrets.token_hex(8)


# ---------------------------------------------------------------------------------------------
# low-level helpers, all relative to a directory fd and never following a link


def _lstat_at(dir_fd: int, name: str) -> os.stat_result | None:
    try:
        return os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return None


def _copy_fd(src: int, dst: int) -> None:
    try:
        while os.copy_file_range(src, dst, 8 * CHUNK):
            pass
        return
    except OSError as e:
        # Not supported between these filesystems: copy by hand. Offsets did not move when the
        # first call failed, which is the only case these errors happen in practice.
        if e.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
            raise
    buf = memoryview(bytearray(CHUNK))
    while n := os.readv(src, [buf]):
        done = 0
        while done < n:
            done += os.write(dst, buf[done:n])


def _copy_out(dir_fd: int, name: str, dest: str, *, durable: bool) -> None:
    """Copy dir_fd/name (file, link or whole folder) to the absolute path dest, keeping mode and
    mtime. Sockets, fifos and devices are skipped."""
    st = _lstat_at(dir_fd, name)
    if st is None:
        return
    if stat.S_ISLNK(st.st_mode):
        os.symlink(os.readlink(name, dir_fd=dir_fd), dest)
        os.utime(dest, ns=(st.st_atime_ns, st.st_mtime_ns), follow_symlinks=False)
    elif stat.S_ISDIR(st.st_mode):
        sub = os.open(name, _DIR_FLAGS, dir_fd=dir_fd)
        try:
            os.mkdir(dest, 0o700)
            modes = [(dest, stat.S_IMODE(st.st_mode))]
            for rel, fd, dirs, others in walk(sub):
                base = os.path.join(dest, rel) if rel else dest
                for child in list(dirs):
                    cst = _lstat_at(fd, child)
                    if cst is None:
                        dirs.remove(child)
                        continue
                    os.mkdir(os.path.join(base, child), 0o700)
                    modes.append((os.path.join(base, child), stat.S_IMODE(cst.st_mode)))
                for child in others:  # not a directory: no recursion
                    _copy_out(fd, child, os.path.join(base, child), durable=durable)
            for path, mode in reversed(modes):  # children first: a 0500 folder is filled first
                os.chmod(path, mode)
        finally:
            os.close(sub)
    elif stat.S_ISREG(st.st_mode):
        src = os.open(name, _READ_FLAGS, dir_fd=dir_fd)
        try:
            dst = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            try:
                _copy_fd(src, dst)
                os.fchmod(dst, stat.S_IMODE(st.st_mode))
                os.utime(dst, ns=(st.st_atime_ns, st.st_mtime_ns))
                if durable:
                    os.fsync(dst)
            finally:
                os.close(dst)
        finally:
            os.close(src)


def _delete_at(dir_fd: int, name: str) -> None:
    st = _lstat_at(dir_fd, name)
    if st is None:
        return
    if stat.S_ISDIR(st.st_mode):
        rmtree(dir_fd, name)  # fd-based, no recursion: any depth, no link followed
    else:
        try:
            os.unlink(name, dir_fd=dir_fd)
        except FileNotFoundError:
            pass


def _fsync_path(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------------------------
# temp files


class TempFile:
    """A file being received: written with os.write, hashed on the way, never at its real name.

    ``abort()`` closes and removes it (idempotent); FolderWriter.commit puts it in place.
    """

    def __init__(self, dir_fd: int, owns_dir_fd: bool, relpath: str):
        self.relpath = relpath
        self.name = _temp_name()
        self.dir_fd = dir_fd
        self._owns_dir_fd = owns_dir_fd
        self.fd = os.open(self.name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                          | os.O_CLOEXEC, 0o600, dir_fd=dir_fd)
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


# ---------------------------------------------------------------------------------------------
# the writer of one replicated folder


class FolderWriter:
    """Applies entries to one folder. Thread-safe: every call uses its own fds.

    Trash and conflict copies go to <trash_dir|conflicts_dir>/<stamp>/[<name>/]<relpath>, where
    ``name`` (the folder name, optional) keeps several folders apart under one state dir.
    """

    def __init__(self, root: str | os.PathLike[str], temp_dir: str | os.PathLike[str],
                 trash_dir: str | os.PathLike[str], conflicts_dir: str | os.PathLike[str], *,
                 name: str = ""):
        self.root = os.path.abspath(os.fspath(root))
        self.temp_dir = os.path.abspath(os.fspath(temp_dir))
        self.trash_dir = os.path.abspath(os.fspath(trash_dir))
        self.conflicts_dir = os.path.abspath(os.fspath(conflicts_dir))
        self.name = name
        os.makedirs(self.root, exist_ok=True)
        os.makedirs(self.temp_dir, mode=0o700, exist_ok=True)
        self._temp_fd = os.open(self.temp_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        # lane N > 0 has a temp directory of its own (temp_dir/laneN): creating a file locks
        # its directory, so writers sharing one directory would take turns
        self._lane_fds: dict[int, int] = {}
        self._lane_lock = threading.Lock()
        self.temp_in_state = self._can_rename_from_temp_dir()
        if not self.temp_in_state:
            log.info("%s: temp dir %s is on another filesystem; temp files go next to their "
                     "targets under hidden %s names", self.root, self.temp_dir, TEMP_PREFIX)

    def close(self) -> None:
        self._close_lanes()
        if self._temp_fd >= 0:
            fd, self._temp_fd = self._temp_fd, -1
            os.close(fd)

    def _close_lanes(self) -> None:
        with self._lane_lock:
            fds, self._lane_fds = list(self._lane_fds.values()), {}
        for fd in fds:
            os.close(fd)

    def _lane_fd(self, lane: int) -> int:
        if lane == 0:
            return self._temp_fd
        with self._lane_lock:
            fd = self._lane_fds.get(lane)
            if fd is None:
                name = f"lane{lane}"
                try:
                    os.mkdir(name, 0o700, dir_fd=self._temp_fd)
                except FileExistsError:
                    pass
                fd = self._lane_fds[lane] = os.open(name, _DIR_FLAGS, dir_fd=self._temp_fd)
            return fd

    def __enter__(self) -> FolderWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _can_rename_from_temp_dir(self) -> bool:
        # Same st_dev is necessary but not enough (two bind mounts of one filesystem give
        # EXDEV), so try the real operation once.
        if os.stat(self.temp_dir).st_dev != os.stat(self.root).st_dev:
            return False
        probe = _temp_name()
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600,
                     dir_fd=self._temp_fd)
        os.close(fd)
        root_fd = self._open_root()
        try:
            os.rename(probe, probe, src_dir_fd=self._temp_fd, dst_dir_fd=root_fd)
            os.unlink(probe, dir_fd=root_fd)
            return True
        except OSError as e:
            if e.errno != errno.EXDEV:
                raise
            os.unlink(probe, dir_fd=self._temp_fd)
            return False
        finally:
            os.close(root_fd)

    # -- safe directory walk --

    def _open_root(self) -> int:
        # The configured root itself may be a symlink: the operator chose it.
        return os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)

    def open_dir(self, parts: tuple[str, ...], create: bool) -> int:
        """An fd of root/parts, reached one component at a time without following links.

        Missing components are created (0o755) when ``create``; a symlink or a non-directory on
        the way raises PathError. FileNotFoundError when missing and not ``create``. The caller
        closes the fd.
        """
        return self._walk(parts, create, None)

    def _walk(self, parts: tuple[str, ...], create: bool, displace_stamp: str | None) -> int:
        fd = self._open_root()
        try:
            for i, name in enumerate(parts):
                sub = self._step(fd, name, parts[: i + 1], create, displace_stamp)
                os.close(fd)
                fd = sub
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _step(self, fd: int, name: str, parts: tuple[str, ...], create: bool,
              displace_stamp: str | None) -> int:
        try:
            return os.open(name, _DIR_FLAGS, dir_fd=fd)
        except FileNotFoundError:
            if not create:
                raise
        except OSError as e:
            if e.errno not in _NOT_A_DIR:
                raise
            if displace_stamp is None:
                raise PathError(f"{'/'.join(parts)}: a symlink or not a directory") from None
            # The primary has a folder here: what is in the way goes to the trash, not away.
            self._to_trash(fd, name, "/".join(parts), displace_stamp)
        try:
            os.mkdir(name, 0o755, dir_fd=fd)
            os.fsync(fd)  # the new entry in the parent must survive a crash too
        except FileExistsError:
            pass
        try:
            return os.open(name, _DIR_FLAGS, dir_fd=fd)
        except OSError as e:
            if e.errno in _NOT_A_DIR:
                raise PathError(f"{'/'.join(parts)}: a symlink or not a directory") from None
            raise

    def _open_parent(self, parts: tuple[str, ...]) -> int | None:
        """The parent's fd, or None when it is missing or not a real directory."""
        try:
            return self.open_dir(parts[:-1], create=False)
        except (FileNotFoundError, PathError):
            return None

    # -- trash --

    def _side_dir(self, base: str, stamp: str, relpath: str) -> tuple[int, str, str]:
        """(fd of the parent, free name, path for messages) of relpath's place under
        base/stamp/[name]: created one component at a time from an fd, so a deep relpath
        needs neither recursion nor an absolute path shorter than PATH_MAX."""
        top = os.path.join(base, stamp, self.name) if self.name else os.path.join(base, stamp)
        os.makedirs(top, exist_ok=True)
        parts = check_relpath(relpath)
        fd = os.open(top, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            for part in parts[:-1]:
                try:
                    os.mkdir(part, 0o755, dir_fd=fd)
                except FileExistsError:
                    pass
                sub = os.open(part, _DIR_FLAGS, dir_fd=fd)
                os.close(fd)
                fd = sub
            name, n = parts[-1], 0
            while _lstat_at(fd, name) is not None:
                n += 1
                name = f"{parts[-1]}~{n}"
        except BaseException:
            os.close(fd)
            raise
        return fd, name, os.path.join(top, *parts[:-1], name)

    def _side_path(self, base: str, stamp: str, relpath: str) -> str:
        fd, _, path = self._side_dir(base, stamp, relpath)
        os.close(fd)
        return path

    def _to_trash(self, dir_fd: int, name: str, relpath: str, stamp: str) -> str:
        fd, final, dest = self._side_dir(self.trash_dir, stamp, relpath)
        try:
            os.rename(name, final, src_dir_fd=dir_fd, dst_dir_fd=fd)
        except OSError as e:
            if e.errno != errno.EXDEV:
                raise
            _copy_out(dir_fd, name, dest, durable=False)
            _delete_at(dir_fd, name)
        finally:
            os.close(fd)
        log.info("moved %s/%s to trash %s", self.root, relpath, dest)
        return dest

    def _displace(self, dir_fd: int, name: str, relpath: str, keep: int) -> None:
        """Move what is at name to the trash unless it is of file type ``keep`` (S_IFREG...)."""
        st = _lstat_at(dir_fd, name)
        if st is not None and stat.S_IFMT(st.st_mode) != keep:
            self._to_trash(dir_fd, name, relpath, utc_stamp())

    # -- files --

    def new_temp(self, relpath: str, lane: int = 0) -> TempFile:
        """A temp file for relpath. Threads writing at once pass different lanes."""
        parts = check_relpath(relpath)
        if self.temp_in_state:
            return TempFile(self._lane_fd(lane), False, relpath)
        dir_fd = self.open_dir(parts[:-1], create=True)
        try:
            return TempFile(dir_fd, True, relpath)
        except BaseException:
            os.close(dir_fd)
            raise

    @staticmethod
    def _verify(tmp: TempFile, entry: Entry) -> None:
        if entry.get("kind", "file") != "file":
            raise ValueError(f"{entry.get('path')!r}: not a file entry")
        got = tmp.hexdigest()
        if got != entry["hash"]:
            raise HashMismatch(f"{entry['path']}: expected hash {entry['hash']}, got {got} "
                               f"({tmp.size} bytes)")

    @staticmethod
    def _seal(tmp: TempFile, entry: Entry, *, sync: bool) -> None:
        # Mode and mtime are set on the temp file: the real name appears with both already right.
        fd = tmp.reopen()
        mtime = int(entry["mtime_ns"])
        os.fchmod(fd, int(entry["mode"]) & 0o777)
        os.utime(fd, ns=(time.time_ns(), mtime))
        if sync:
            os.fsync(fd)
        tmp.close()

    def _place(self, tmp: TempFile, parent: int, parts: tuple[str, ...]) -> None:
        self._displace(parent, parts[-1], "/".join(parts), stat.S_IFREG)
        os.rename(tmp.name, parts[-1], src_dir_fd=tmp.dir_fd, dst_dir_fd=parent)
        tmp.mark_committed()

    def commit(self, tmp: TempFile, entry: Entry) -> None:
        """Verify, fsync, rename into place, fsync the parent. On any error the temp file is
        removed and whatever was at the real name is untouched."""
        try:
            parts = check_relpath(entry["path"])
            self._verify(tmp, entry)
            self._seal(tmp, entry, sync=True)
            parent = self.open_dir(parts[:-1], create=True)
            try:
                self._place(tmp, parent, parts)
                os.fsync(parent)
            finally:
                os.close(parent)
        except BaseException:
            tmp.abort()
            raise

    def commit_many(self, items: list[tuple[TempFile, Entry]]) -> list[Exception | None]:
        """commit() for a batch of small files, with one syncfs(2) instead of one fsync per file
        and one fsync per distinct parent folder. Results are aligned with items."""
        results: list[Exception | None] = [None] * len(items)
        per_file_sync = _syncfs is None
        ready: dict[tuple[str, ...], list[tuple[int, TempFile, tuple[str, ...]]]] = {}
        for i, (tmp, entry) in enumerate(items):
            try:
                parts = check_relpath(entry["path"])
                self._verify(tmp, entry)
                self._seal(tmp, entry, sync=per_file_sync)
            except Exception as e:
                tmp.abort()
                results[i] = e
                continue
            ready.setdefault(parts[:-1], []).append((i, tmp, parts))
        if not ready:
            return results
        if not per_file_sync:
            try:
                self._sync_filesystem()
            except OSError as e:
                for members in ready.values():
                    for i, tmp, _ in members:
                        tmp.abort()
                        results[i] = e
                return results
        for parent_parts, members in ready.items():
            self._place_group(parent_parts, members, results)
        return results

    def _sync_filesystem(self) -> None:
        if self.temp_in_state:  # the temp dir shares the folder's filesystem
            syncfs(self._temp_fd)
            return
        fd = self._open_root()
        try:
            syncfs(fd)
        finally:
            os.close(fd)

    def _place_group(self, parent_parts: tuple[str, ...],
                     members: list[tuple[int, TempFile, tuple[str, ...]]],
                     results: list[Exception | None]) -> None:
        try:
            parent = self.open_dir(parent_parts, create=True)
        except Exception as e:
            for i, tmp, _ in members:
                tmp.abort()
                results[i] = e
            return
        try:
            placed = []
            for i, tmp, parts in members:
                try:
                    self._place(tmp, parent, parts)
                    placed.append(i)
                except Exception as e:
                    tmp.abort()
                    results[i] = e
            if placed:
                try:
                    os.fsync(parent)
                except OSError as e:
                    for i in placed:
                        results[i] = e
        finally:
            os.close(parent)

    # -- dirs, links, metadata --

    def make_dir(self, entry: Entry) -> None:
        """mkdir -p through real directories only; anything else in the way goes to trash."""
        parts = check_relpath(entry["path"])
        fd = self._walk(parts, True, utc_stamp())
        try:
            os.fchmod(fd, int(entry["mode"]) & 0o777)
        finally:
            os.close(fd)

    def make_link(self, entry: Entry) -> None:
        """Create the link under a temp name and rename it over: atomic, target never followed."""
        parts = check_relpath(entry["path"])
        target = entry.get("target")
        if not isinstance(target, str) or not target or "\x00" in target \
                or len(target.encode("utf-8", "surrogateescape")) > MAX_PATH_BYTES:
            raise PathError(f"{entry['path']}: bad link target {target!r:.80}")
        parent = self.open_dir(parts[:-1], create=True)
        try:
            tmpname = _temp_name()
            os.symlink(target, tmpname, dir_fd=parent)
            try:
                mtime = int(entry["mtime_ns"])
                os.utime(tmpname, ns=(mtime, mtime), dir_fd=parent, follow_symlinks=False)
                self._displace(parent, parts[-1], "/".join(parts), stat.S_IFLNK)
                os.rename(tmpname, parts[-1], src_dir_fd=parent, dst_dir_fd=parent)
            except BaseException:
                try:
                    os.unlink(tmpname, dir_fd=parent)
                except FileNotFoundError:
                    pass
                raise
            os.fsync(parent)
        finally:
            os.close(parent)

    def set_meta(self, entry: Entry) -> None:
        """Mode and mtime of an object whose content already matches (dirs: mode only)."""
        parts = check_relpath(entry["path"])
        kind = entry["kind"]
        if kind == "dir":
            fd = self.open_dir(parts, create=False)
            try:
                os.fchmod(fd, int(entry["mode"]) & 0o777)
            finally:
                os.close(fd)
            return
        parent = self.open_dir(parts[:-1], create=False)
        try:
            name, mtime = parts[-1], int(entry["mtime_ns"])
            if kind == "file":
                self._chmod_file(parent, name, int(entry["mode"]) & 0o777, entry["path"])
            else:
                st = os.stat(name, dir_fd=parent, follow_symlinks=False)
                if not stat.S_ISLNK(st.st_mode):
                    raise PathError(f"{entry['path']}: not a symlink")
            os.utime(name, ns=(time.time_ns(), mtime), dir_fd=parent, follow_symlinks=False)
        finally:
            os.close(parent)

    @staticmethod
    def _chmod_file(parent: int, name: str, mode: int, relpath: str) -> None:
        try:
            fd = os.open(name, _READ_FLAGS, dir_fd=parent)
        except PermissionError:
            # Not root and the file is unreadable: fchmodat refuses (rather than follows) links.
            try:
                os.chmod(name, mode, dir_fd=parent, follow_symlinks=False)
            except (ValueError, NotImplementedError):
                raise PathError(f"{relpath}: not a regular file") from None
            return
        except OSError as e:
            if e.errno == errno.ELOOP:
                raise PathError(f"{relpath}: a symlink, not a file") from None
            raise
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise PathError(f"{relpath}: not a regular file")
            os.fchmod(fd, mode)
        finally:
            os.close(fd)

    # -- removal and preservation --

    def remove(self, relpath: str, *, trash: bool, stamp: str) -> None:
        """trash=True: move to trash_dir/<stamp>/...; False: delete (our own temps only).
        A missing path is not an error."""
        parts = check_relpath(relpath)
        parent = self._open_parent(parts)
        if parent is None:
            return
        try:
            if _lstat_at(parent, parts[-1]) is None:
                return
            if trash:
                self._to_trash(parent, parts[-1], relpath, stamp)
            else:
                _delete_at(parent, parts[-1])
        finally:
            os.close(parent)

    def preserve(self, relpath: str, stamp: str) -> str | None:
        """Copy the current file or link (not a folder) to conflicts_dir/<stamp>/..., keeping
        mode and mtime, durably. Returns the copy's path, or None when there is nothing."""
        parts = check_relpath(relpath)
        parent = self._open_parent(parts)
        if parent is None:
            return None
        try:
            st = _lstat_at(parent, parts[-1])
            if st is None or not (stat.S_ISREG(st.st_mode) or stat.S_ISLNK(st.st_mode)):
                return None
            dest = self._side_path(self.conflicts_dir, stamp, relpath)
            _copy_out(parent, parts[-1], dest, durable=True)
            _fsync_path(os.path.dirname(dest))
            log.warning("kept %s/%s as conflict copy %s", self.root, relpath, dest)
            return dest
        finally:
            os.close(parent)

    def local_entry(self, relpath: str, filt: Filter, cache: HashCache) -> Entry | None:
        """The Entry of what is at relpath on disk now, reached through real directories only."""
        parts = check_relpath(relpath)
        parent = self._open_parent(parts)
        if parent is None:
            return None
        try:
            name = parts[-1]
            st = _lstat_at(parent, name)
            if st is None:
                return None
            if stat.S_ISDIR(st.st_mode):
                return dir_entry(relpath, st)
            if not filt.match(relpath):
                return None
            if stat.S_ISREG(st.st_mode):
                return hashed_file_entry(relpath, os.path.join(self.root, relpath), st, cache,
                                         lambda: os.open(name, _READ_FLAGS, dir_fd=parent))
            if stat.S_ISLNK(st.st_mode):
                return link_entry(relpath, st, os.readlink(name, dir_fd=parent))
            return None
        finally:
            os.close(parent)

    def cleanup_temps(self) -> int:
        """Remove what a killed run left: everything in temp_dir and every TEMP_PREFIX name in
        the folder tree. Returns how many were removed."""
        count = 0
        self._close_lanes()  # their directories go too; they come back when next used
        for name in os.listdir(self._temp_fd):
            st = _lstat_at(self._temp_fd, name)
            if st is not None and stat.S_ISDIR(st.st_mode) and name.startswith("lane"):
                fd = os.open(name, _DIR_FLAGS, dir_fd=self._temp_fd)
                try:
                    count += len(os.listdir(fd))
                finally:
                    os.close(fd)
            else:
                count += 1
            _delete_at(self._temp_fd, name)
        root_fd = self._open_root()
        try:
            for _, dir_fd, dirnames, others in walk(root_fd):
                for name in [d for d in dirnames if d.startswith(TEMP_PREFIX)]:
                    dirnames.remove(name)
                    _delete_at(dir_fd, name)
                    count += 1
                for name in others:
                    if name.startswith(TEMP_PREFIX):
                        _delete_at(dir_fd, name)
                        count += 1
        finally:
            os.close(root_fd)
        if count:
            log.info("%s: removed %d leftover temp files", self.root, count)
        return count


def purge_trash(trash_dir: str | os.PathLike[str], days: float,
                stop: Callable[[], bool] = lambda: False) -> int:
    """Delete trash/<stamp> folders older than ``days`` (by the stamp: the time of deletion).
    Returns how many were removed. `stop()` is asked between folders: a node taking over must
    not wait for a large trash to be removed (the rest goes at the next purge)."""
    trash = Path(trash_dir)
    if not trash.is_dir():
        return 0
    cutoff = datetime.now(UTC) - timedelta(days=days)
    count = 0
    for child in trash.iterdir():
        if stop():
            break
        when = _parse_stamp(child.name)
        if when is None or when >= cutoff or child.is_symlink():
            continue
        if child.is_dir():
            parent = os.open(trash, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                rmtree(parent, child.name)
            finally:
                os.close(parent)
        else:
            child.unlink()
        count += 1
    if count:
        log.info("purged %d trash folders older than %g days from %s", count, days, trash)
    return count
