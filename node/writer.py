"""Applying replicated changes on the secondary: safe paths, verified atomic writes, trash.

Every path from the wire is checked by check_relpath, then reached from the folder root one
component at a time with O_NOFOLLOW directory fds (open_dir): a symlink planted inside the
folder can never redirect a write outside it. Files are written to a temp file, verified against
the expected xxh3_128 hash, fsynced and renamed into place, so a reader never sees a partial
file at its real name and a failed write (a full disk) leaves the previous copy intact.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import stat
import threading
import time
from collections.abc import Callable, Iterator
from typing import TypeVar

from .entries import Entry, dir_entry, link_entry
from .fdio import (
    DIR_FLAGS,
    HAS_SYNCFS,
    NOT_A_DIR,
    READ_FLAGS,
    delete_at,
    identity,
    lstat_at,
    syncfs,
    temp_name,
)
from .index import TEMP_PREFIX, Filter, HashCache, hashed_file_entry
from .sidecopies import SideCopies, purge_trash, utc_stamp  # noqa: F401  (re-exported)
from .temps import HashMismatch, TempArea, TempFile  # noqa: F401  (re-exported)
from .tree import (  # noqa: F401  (re-exported: the path rule's home is node/tree.py)
    MAX_NAME_BYTES,
    MAX_PATH_BYTES,
    PathError,
    check_relpath,
)

log = logging.getLogger(__name__)

T = TypeVar("T")


# ---------------------------------------------------------------------------------------------
# the writer of one replicated folder


class FolderWriter:
    """Applies entries to one folder. Thread-safe: every call uses its own fds.

    Its temp files live in a TempArea (node/temps.py); trash and conflict copies are made by
    SideCopies (node/sidecopies.py) under <trash_dir|conflicts_dir>/<stamp>/[<name>/]<relpath>,
    where ``name`` (the folder name, optional) keeps several folders apart under one state dir.
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
        self._root_id = identity(self.root)  # see replaced()
        self.side = SideCopies(self.root, self.trash_dir, self.conflicts_dir, name)
        self.temps = TempArea(self.temp_dir, self.root, self._open_root)
        self.temp_in_state = self.temps.in_state
        self._opening = threading.Lock()  # one folder opened up at a time (in_read_only)
        if not self.temp_in_state:
            log.info("%s: temp dir %s is on another filesystem; temp files go next to their "
                     "targets under hidden %s names", self.root, self.temp_dir, TEMP_PREFIX)

    def close(self) -> None:
        self.temps.close()

    def replaced(self) -> bool:
        """Is the folder at root no longer the one this writer opened (a disk unmounted under
        it, the folder moved away)? Nothing must be written there then: the copy would go to
        the filesystem under the mount point."""
        try:
            return identity(self.root) != self._root_id
        except OSError:
            return True

    def __enter__(self) -> FolderWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

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
            return os.open(name, DIR_FLAGS, dir_fd=fd)
        except FileNotFoundError:
            if not create:
                raise
        except OSError as e:
            if e.errno not in NOT_A_DIR:
                raise
            if displace_stamp is None:
                raise PathError(f"{'/'.join(parts)}: a symlink or not a directory") from None
            # The primary has a folder here: what is in the way goes to the trash, not away.
            self.side.to_trash(fd, name, "/".join(parts), displace_stamp)
        try:
            self.in_read_only(fd, lambda: os.mkdir(name, 0o755, dir_fd=fd))
            os.fsync(fd)  # the new entry in the parent must survive a crash too
        except FileExistsError:
            pass
        try:
            return os.open(name, DIR_FLAGS, dir_fd=fd)
        except OSError as e:
            if e.errno in NOT_A_DIR:
                raise PathError(f"{'/'.join(parts)}: a symlink or not a directory") from None
            raise

    def _open_parent(self, parts: tuple[str, ...]) -> int | None:
        """The parent's fd, or None when it is missing or not a real directory."""
        try:
            return self.open_dir(parts[:-1], create=False)
        except (FileNotFoundError, PathError):
            return None

    # -- files --

    def _displace(self, dir_fd: int, name: str, relpath: str, keep: int) -> None:
        """Move what is at name to the trash unless it is of file type ``keep`` (S_IFREG...)."""
        st = lstat_at(dir_fd, name)
        if st is not None and stat.S_IFMT(st.st_mode) != keep:
            self.side.to_trash(dir_fd, name, relpath, utc_stamp())

    def new_temp(self, relpath: str, lane: int = 0) -> TempFile:
        """A temp file for relpath. Threads writing at once pass different lanes."""
        parts = check_relpath(relpath)
        if self.temp_in_state:
            return TempFile(self.temps.lane_fd(lane), False, relpath)
        dir_fd = self.open_dir(parts[:-1], create=True)
        try:
            return self.in_read_only(dir_fd, lambda: TempFile(dir_fd, True, relpath))
        except BaseException:
            os.close(dir_fd)
            raise

    def _place(self, tmp: TempFile, parent: int, parts: tuple[str, ...]) -> None:
        def place() -> None:
            self._displace(parent, parts[-1], "/".join(parts), stat.S_IFREG)
            os.rename(tmp.name, parts[-1], src_dir_fd=tmp.dir_fd, dst_dir_fd=parent)

        self.in_read_only(parent, place)
        tmp.mark_committed()

    def in_read_only(self, dir_fd: int, change: Callable[[], T]) -> T:
        """change() of the folder dir_fd (an entry made, renamed or taken out). A node that
        does not run as root made the folder read-only as the primary's has it (mode 0555),
        so it cannot change it (EACCES), where root could: the folder is opened up for its
        owner for the change, and closed again."""
        try:
            return change()
        except PermissionError:
            with self._opening, self._opened_up(dir_fd) as opened:
                if not opened:
                    raise
                return change()

    @contextlib.contextmanager
    def _opened_up(self, dir_fd: int) -> Iterator[bool]:
        """u+w on a folder of ours that lacks it, for the block, then its mode as it was; yields
        whether it did (not ours, or writable already: the EACCES has another cause)."""
        st = os.fstat(dir_fd)
        if st.st_uid != os.geteuid() or st.st_mode & stat.S_IWUSR:
            yield False
            return
        os.fchmod(dir_fd, stat.S_IMODE(st.st_mode) | stat.S_IWUSR | stat.S_IXUSR)
        try:
            yield True
        finally:
            os.fchmod(dir_fd, stat.S_IMODE(st.st_mode))

    def commit(self, tmp: TempFile, entry: Entry) -> None:
        """Verify, fsync, rename into place, fsync the parent. On any error the temp file is
        removed and whatever was at the real name is untouched."""
        try:
            parts = check_relpath(entry["path"])
            tmp.verify(entry)
            tmp.seal(entry, sync=True)
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
        per_file_sync = not HAS_SYNCFS
        ready: dict[tuple[str, ...], list[tuple[int, TempFile, tuple[str, ...]]]] = {}
        for i, (tmp, entry) in enumerate(items):
            try:
                parts = check_relpath(entry["path"])
                tmp.verify(entry)
                tmp.seal(entry, sync=per_file_sync)
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
            syncfs(self.temps.fd)
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
            tmpname = temp_name()
            mtime = int(entry["mtime_ns"])

            def place() -> None:
                os.symlink(target, tmpname, dir_fd=parent)
                try:
                    os.utime(tmpname, ns=(mtime, mtime), dir_fd=parent, follow_symlinks=False)
                    self._displace(parent, parts[-1], "/".join(parts), stat.S_IFLNK)
                    os.rename(tmpname, parts[-1], src_dir_fd=parent, dst_dir_fd=parent)
                except BaseException:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(tmpname, dir_fd=parent)
                    raise

            self.in_read_only(parent, place)
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
                _chmod_file(parent, name, int(entry["mode"]) & 0o777, entry["path"])
            else:
                st = os.stat(name, dir_fd=parent, follow_symlinks=False)
                if not stat.S_ISLNK(st.st_mode):
                    raise PathError(f"{entry['path']}: not a symlink")
            os.utime(name, ns=(time.time_ns(), mtime), dir_fd=parent, follow_symlinks=False)
        finally:
            os.close(parent)

    # -- removal and preservation --

    def remove(self, relpath: str, *, trash: bool, stamp: str) -> None:
        """trash=True: move to trash_dir/<stamp>/...; False: delete (our own temps only).
        A missing path is not an error."""
        parts = check_relpath(relpath)
        parent = self._open_parent(parts)
        if parent is None:
            return
        try:
            if lstat_at(parent, parts[-1]) is None:
                return
            if trash:
                self.in_read_only(
                    parent, lambda: self.side.to_trash(parent, parts[-1], relpath, stamp))
            else:
                self.in_read_only(parent, lambda: delete_at(parent, parts[-1]))
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
            st = lstat_at(parent, parts[-1])
            if st is None or not (stat.S_ISREG(st.st_mode) or stat.S_ISLNK(st.st_mode)):
                return None
            return self.side.keep_conflict(parent, parts[-1], relpath, stamp)
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
            st = lstat_at(parent, name)
            if st is None:
                return None
            if stat.S_ISDIR(st.st_mode):
                return dir_entry(relpath, st)
            if not filt.match(relpath):
                return None
            if stat.S_ISREG(st.st_mode):
                return hashed_file_entry(relpath, os.path.join(self.root, relpath), st, cache,
                                         lambda: os.open(name, READ_FLAGS, dir_fd=parent))
            if stat.S_ISLNK(st.st_mode):
                return link_entry(relpath, st, os.readlink(name, dir_fd=parent))
            return None
        finally:
            os.close(parent)

    def cleanup_temps(self) -> int:
        """Remove what a killed run left: everything in temp_dir and every TEMP_PREFIX name in
        the folder tree. Returns how many were removed."""
        count = self.temps.cleanup()
        if count:
            log.info("%s: removed %d leftover temp files", self.root, count)
        return count


def _chmod_file(parent: int, name: str, mode: int, relpath: str) -> None:
    try:
        fd = os.open(name, READ_FLAGS, dir_fd=parent)
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
