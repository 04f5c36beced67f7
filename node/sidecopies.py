"""The writer's side copies: the trash and the conflict copies, and the trash's purge.

What strict deletion removes, or what stands where the primary has something of another kind,
is moved to state_dir/trash/<stamp>/[<folder>/]<path>; a local change about to be overwritten
is copied to state_dir/conflicts/<stamp>/[<folder>/]<path> first. ``<folder>`` (optional)
keeps several folders apart under one state dir.
"""
from __future__ import annotations

import errno
import logging
import os
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

from .fdio import DIR_FLAGS, copy_out, delete_at, fsync_path, lstat_at
from .tree import check_relpath, rmtree

log = logging.getLogger("sbs.node.writer")

_STAMP_FORMAT = "%Y%m%dT%H%M%S"


def utc_stamp() -> str:
    """e.g. 20261125T160501.123Z: sortable, safe as a folder name."""
    now = datetime.now(UTC)
    return now.strftime(_STAMP_FORMAT) + f".{now.microsecond // 1000:03d}Z"


def _parse_stamp(name: str) -> datetime | None:
    try:
        return datetime.strptime(name, _STAMP_FORMAT + ".%fZ").replace(tzinfo=UTC)
    except ValueError:
        return None


class SideCopies:
    """Moves objects of the folder at ``root`` to the trash, and keeps conflict copies."""

    def __init__(self, root: str, trash_dir: str, conflicts_dir: str, name: str = ""):
        self.root, self.trash_dir, self.conflicts_dir, self.name = (root, trash_dir,
                                                                   conflicts_dir, name)

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
                sub = os.open(part, DIR_FLAGS, dir_fd=fd)
                os.close(fd)
                fd = sub
            name, n = parts[-1], 0
            while lstat_at(fd, name) is not None:
                n += 1
                name = f"{parts[-1]}~{n}"
        except BaseException:
            os.close(fd)
            raise
        return fd, name, os.path.join(top, *parts[:-1], name)

    def to_trash(self, dir_fd: int, name: str, relpath: str, stamp: str) -> str:
        """Move dir_fd/name (relpath in the folder) to trash/<stamp>/...; returns where to."""
        fd, final, dest = self._side_dir(self.trash_dir, stamp, relpath)
        try:
            os.rename(name, final, src_dir_fd=dir_fd, dst_dir_fd=fd)
        except OSError as e:
            if e.errno != errno.EXDEV:
                raise
            copy_out(dir_fd, name, dest, durable=False)
            delete_at(dir_fd, name)
        finally:
            os.close(fd)
        log.info("moved %s/%s to trash %s", self.root, relpath, dest)
        return dest

    def keep_conflict(self, dir_fd: int, name: str, relpath: str, stamp: str) -> str:
        """Copy dir_fd/name to conflicts/<stamp>/..., keeping mode and mtime, durably."""
        fd, _, dest = self._side_dir(self.conflicts_dir, stamp, relpath)
        os.close(fd)
        copy_out(dir_fd, name, dest, durable=True)
        fsync_path(os.path.dirname(dest))
        log.warning("kept %s/%s as conflict copy %s", self.root, relpath, dest)
        return dest


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
