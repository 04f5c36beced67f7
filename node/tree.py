"""The one walk and the one path check for replicated trees.

A replicated tree is written by whoever can write the primary's folder, so it may be deeper than
Python's recursion limit (os.walk, os.fwalk and shutil.rmtree recurse) and may hold symlinks
where a directory was a moment ago. ``walk`` goes down one directory fd at a time (openat with
O_NOFOLLOW, never a path through a link), with an explicit stack instead of recursion; it keeps
one fd open per level of the directory it is in, so the node raises its open-file limit at start
(``raise_fd_limit``). ``check_relpath`` is the rule every path from the wire is held to;
``check_abspath`` the rule for a folder's absolute path pushed by the primary.
"""
from __future__ import annotations

import errno
import logging
import os
import resource
from collections.abc import Callable, Iterator

log = logging.getLogger(__name__)

TEMP_PREFIX = ".sbs-tmp-"
MAX_NAME_BYTES = 255
MAX_PATH_BYTES = 4096
DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_GONE = (errno.ENOENT, errno.ENOTDIR, errno.ELOOP)


class PathError(ValueError):
    """A path that must not be used: hostile, malformed, or leading through a symlink."""


def _text_problem(p: str) -> str | None:
    if "\x00" in p:
        return f"NUL byte in path: {p[:200]!r}"
    try:
        # a byte that is not UTF-8 comes as its surrogate (node/names.py); another is wrong
        size = len(p.encode("utf-8", "surrogateescape"))
    except UnicodeEncodeError:
        return f"path holds a character that is not a byte of a name: {p[:200]!r}"
    if size > MAX_PATH_BYTES:
        return f"path longer than {MAX_PATH_BYTES} bytes: {p[:64]!r}..."
    return None


def check_relpath(p: object) -> tuple[str, ...]:
    """The components of a relative path from the wire, or PathError naming the problem."""
    if not isinstance(p, str):
        raise PathError(f"path is not a string: {type(p).__name__}")
    if not p:
        raise PathError("empty path")
    if p.startswith("/"):
        raise PathError(f"absolute path: {p!r}")
    if (why := _text_problem(p)) is not None:
        raise PathError(why)
    parts = tuple(p.split("/"))
    for part in parts:
        if not part:
            raise PathError(f"empty component in path: {p!r}")
        if part in (".", ".."):
            raise PathError(f"{part!r} component in path: {p!r}")
        if len(part.encode("utf-8", "surrogateescape")) > MAX_NAME_BYTES:
            raise PathError(f"component longer than {MAX_NAME_BYTES} bytes in path: {p[:64]!r}")
        if part.startswith(TEMP_PREFIX):
            raise PathError(f"reserved temp name in path: {p!r}")
    return parts


def check_abspath(p: object) -> str:
    """A folder's absolute path as pushed by the peer, or PathError: absolute, no NUL,
    at most MAX_PATH_BYTES, no '.', '..' or empty component (it names one place, as written)."""
    if not isinstance(p, str):
        raise PathError(f"path is not a string: {type(p).__name__}")
    if not p.startswith("/"):
        raise PathError(f"not an absolute path: {p[:200]!r}")
    if (why := _text_problem(p)) is not None:
        raise PathError(why)
    parts = p.rstrip("/").split("/")[1:]
    if any(part in ("", ".", "..") for part in parts):
        raise PathError(f"'.', '..' or empty component in path: {p[:200]!r}")
    if any(len(part.encode("utf-8", "surrogateescape")) > MAX_NAME_BYTES for part in parts):
        raise PathError(f"component longer than {MAX_NAME_BYTES} bytes: {p[:64]!r}")
    return p


def _list(fd: int) -> tuple[list[str], list[str]]:
    """(subdirectories, everything else) of an open directory; a link is never a directory."""
    dirs, others = [], []
    with os.scandir(fd) as it:
        for de in it:
            try:
                is_dir = de.is_dir(follow_symlinks=False)
            except OSError:
                continue  # vanished meanwhile
            (dirs if is_dir else others).append(de.name)
    return dirs, others


Walked = tuple[str, int, list[str], list[str]]


def walk(top_fd: int, *, leave: Callable[[int, str], None] | None = None,
         onerror: Callable[[str, OSError], None] | None = None) -> Iterator[Walked]:
    """Every directory under the open directory ``top_fd``, top-down, as (relpath, fd, dirs,
    others); the top is "". The caller may remove names from ``dirs`` to skip them, and may use
    ``fd`` until the next step. ``leave(parent_fd, name)`` is called when a subdirectory's whole
    subtree has been walked (its own fd closed): where rmtree removes it. A directory that
    vanished or turned into a link meanwhile is skipped; another error on one goes to
    ``onerror(relpath, exc)`` (default: skipped) and the walk goes on."""
    fd = os.dup(top_fd)
    stack: list[tuple[str, int, Iterator[str]]] = [("", fd, iter(()))]
    try:
        try:
            dirs, others = _list(fd)
        except OSError as exc:
            if onerror is not None:
                onerror("", exc)
            return
        yield "", fd, dirs, others
        stack[-1] = ("", fd, iter(list(dirs)))
        while stack:
            rel, fd, names = stack[-1]
            name = next(names, None)
            if name is None:
                stack.pop()
                os.close(fd)
                if stack and leave is not None:
                    leave(stack[-1][1], rel.rpartition("/")[2])
                continue
            child = f"{rel}/{name}" if rel else name
            try:
                sub = os.open(name, DIR_FLAGS, dir_fd=fd)
            except OSError as exc:
                if exc.errno not in _GONE and onerror is not None:
                    onerror(child, exc)
                continue
            try:
                dirs, others = _list(sub)
            except OSError as exc:
                os.close(sub)
                if onerror is not None:
                    onerror(child, exc)
                continue
            stack.append((child, sub, iter(())))
            yield child, sub, dirs, others
            stack[-1] = (child, sub, iter(list(dirs)))
    finally:
        for _, open_fd, _ in stack:
            os.close(open_fd)


def rmtree(dir_fd: int, name: str) -> None:
    """Remove dir_fd/name and everything under it, without recursion and without following a
    link (a link is removed, never what it points at). Missing is fine."""
    try:
        top = os.open(name, DIR_FLAGS, dir_fd=dir_fd)
    except OSError as exc:
        if exc.errno == errno.ENOENT:
            return
        if exc.errno not in (errno.ENOTDIR, errno.ELOOP):
            raise
        _unlink(dir_fd, name)
        return

    def remove_dir(parent: int, child: str) -> None:
        try:
            os.rmdir(child, dir_fd=parent)
        except FileNotFoundError:
            pass

    try:
        for _, fd, _, others in walk(top, leave=remove_dir):
            for other in others:
                _unlink(fd, other)
    finally:
        os.close(top)
    remove_dir(dir_fd, name)


def _unlink(dir_fd: int, name: str) -> None:
    try:
        os.unlink(name, dir_fd=dir_fd)
    except FileNotFoundError:
        pass


def raise_fd_limit(want: int = 65536) -> None:
    """``walk`` holds one fd per level: a tree thousands of levels deep needs that many open
    files beyond the node's sockets, more than the usual soft limit of 1024."""
    try:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        target = want if hard == resource.RLIM_INFINITY else min(want, hard)
        if soft != resource.RLIM_INFINITY and soft < target:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (OSError, ValueError) as exc:
        log.warning("cannot raise the open-file limit: %s", exc)
