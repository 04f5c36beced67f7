"""File operations relative to a directory fd, never following a link, for the writer.

syncfs(2) and sync_file_range(2) come from libc through ctypes (LIBC, shared with the node's
other C calls); the rest are small helpers
that the writer, its temp files and its trash share.
"""
from __future__ import annotations

import contextlib
import ctypes
import errno
import itertools
import os
import secrets
import stat

from .index import CHUNK, TEMP_PREFIX
from .tree import rmtree, walk

DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
NOT_A_DIR = (errno.ENOTDIR, errno.ELOOP)

# ---------------------------------------------------------------------------------------------
# syncfs(2): one flush of the whole filesystem instead of one fsync per small file

# The process's own C library, through its own symbols (no search for the library file:
# ctypes.util.find_library runs ldconfig); the node's other calls into it use it too (run.py:
# mallopt, prctl; sentinels.py: prctl in a sentinel's child).
LIBC = ctypes.CDLL(None, use_errno=True)
_syncfs = getattr(LIBC, "syncfs", None)
if _syncfs is not None:
    _syncfs.argtypes = [ctypes.c_int]
    _syncfs.restype = ctypes.c_int
HAS_SYNCFS = _syncfs is not None


def syncfs(fd: int) -> None:
    """Flush the filesystem holding fd. Reports writeback errors (ENOSPC, EIO) since Linux 5.8."""
    if _syncfs is None:
        raise OSError(errno.ENOSYS, "syncfs is not available")
    if _syncfs(fd) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


# sync_file_range(2): start writing a big temp file back while it is still arriving, so the
# fsync before its rename finds little left to do (a hint only: durability is the fsync's job)

_sync_file_range = getattr(LIBC, "sync_file_range", None)
if _sync_file_range is not None:
    _sync_file_range.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    _sync_file_range.restype = ctypes.c_int
_SYNC_FILE_RANGE_WRITE = 2


def start_writeback(fd: int, offset: int, nbytes: int) -> None:
    """Start asynchronous writeback of a range of fd; errors are ignored (fsync reports them)."""
    if _sync_file_range is not None:
        _sync_file_range(fd, offset, nbytes, _SYNC_FILE_RANGE_WRITE)


# A temp name is a random part drawn once per process and a counter: one getrandom(2) per
# name was ~4 % of the secondary's busy time writing 100,000 small files. O_EXCL makes a clash
# an error, never an overwrite; the random part keeps runs (and a forked child) apart.
_temp_run = secrets.token_hex(6)
_temp_seq = itertools.count()


def _new_temp_run() -> None:
    global _temp_run, _temp_seq
    _temp_run, _temp_seq = secrets.token_hex(6), itertools.count()


os.register_at_fork(after_in_child=_new_temp_run)


def temp_name() -> str:
    return f"{TEMP_PREFIX}{_temp_run}-{next(_temp_seq):x}"


# ---------------------------------------------------------------------------------------------
# low-level helpers, all relative to a directory fd and never following a link


def identity(path: str) -> tuple[int, int]:
    """(device, inode) of the folder at path, following a configured symlink: which folder
    it is, whatever its name (a disk unmounted leaves another folder at the same path)."""
    st = os.stat(path)
    return st.st_dev, st.st_ino


def removed(fd: int) -> bool:
    """Was what fd is open on removed from the tree (no link left: a file or folder deleted
    under the running node, by hand or a cleaner)? False when it cannot be told."""
    try:
        return os.fstat(fd).st_nlink == 0
    except OSError:
        return False


def lstat_at(dir_fd: int, name: str) -> os.stat_result | None:
    try:
        return os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return None


def copy_fd(src: int, dst: int) -> None:
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


def copy_out(dir_fd: int, name: str, dest: str, *, durable: bool) -> None:
    """Copy dir_fd/name (file, link or whole folder) to the absolute path dest, keeping mode and
    mtime. Sockets, fifos and devices are skipped."""
    st = lstat_at(dir_fd, name)
    if st is None:
        return
    if stat.S_ISLNK(st.st_mode):
        os.symlink(os.readlink(name, dir_fd=dir_fd), dest)
        os.utime(dest, ns=(st.st_atime_ns, st.st_mtime_ns), follow_symlinks=False)
    elif stat.S_ISDIR(st.st_mode):
        sub = os.open(name, DIR_FLAGS, dir_fd=dir_fd)
        try:
            os.mkdir(dest, 0o700)
            modes = [(dest, stat.S_IMODE(st.st_mode))]
            for rel, fd, dirs, others in walk(sub):
                base = os.path.join(dest, rel) if rel else dest
                for child in list(dirs):
                    cst = lstat_at(fd, child)
                    if cst is None:
                        dirs.remove(child)
                        continue
                    os.mkdir(os.path.join(base, child), 0o700)
                    modes.append((os.path.join(base, child), stat.S_IMODE(cst.st_mode)))
                for child in others:  # not a directory: no recursion
                    copy_out(fd, child, os.path.join(base, child), durable=durable)
            for path, mode in reversed(modes):  # children first: a 0500 folder is filled first
                os.chmod(path, mode)
        finally:
            os.close(sub)
    elif stat.S_ISREG(st.st_mode):
        src = os.open(name, READ_FLAGS, dir_fd=dir_fd)
        try:
            dst = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            try:
                copy_fd(src, dst)
                os.fchmod(dst, stat.S_IMODE(st.st_mode))
                os.utime(dst, ns=(st.st_atime_ns, st.st_mtime_ns))
                if durable:
                    os.fsync(dst)
            except BaseException:
                # (a full disk) no truncated copy is left to pass for the kept one
                with contextlib.suppress(OSError):
                    os.unlink(dest)
                raise
            finally:
                os.close(dst)
        finally:
            os.close(src)


def delete_at(dir_fd: int, name: str) -> None:
    st = lstat_at(dir_fd, name)
    if st is None:
        return
    if stat.S_ISDIR(st.st_mode):
        rmtree(dir_fd, name)  # fd-based, no recursion: any depth, no link followed
    else:
        try:
            os.unlink(name, dir_fd=dir_fd)
        except FileNotFoundError:
            pass


def fsync_path(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


