"""What a node kept of its own changes before it fell in line with its peer.

A split-brain loser, or a crashed primary that rejoins, may hold changes made during its own
term that never reached the peer. The syncer keeps every file it would overwrite or delete
that differs from what the pair last agreed on (node/journal). Without strict deletions the
files the peer lacks would simply stay in the live folder (and `verify` would differ for
ever): after such a term they are moved out too, into the same place:

    state_dir/conflicts/<UTC time>/<folder>/<path>

This module decides which of those files are the node's own (own_extras), keeps the copies
while the secondary applies (ConflictKeeper) and lists what is kept (listing), for status and
`sbs-tools conflicts`.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .journal import Agreed
from .tree import DIR_FLAGS, PathError, walk

if TYPE_CHECKING:
    from .syncer import Syncer

log = logging.getLogger("sbs.syncer")


def own_extras(local: dict[str, dict], remote: dict[str, dict], agreed: Agreed,
               folder: str) -> list[dict]:
    """Local entries the peer lacks that this node made itself and never agreed on (a file
    created or changed during its own term); deepest first, so a folder follows its files.
    What the pair once agreed on and the peer later deleted is not among them: without
    strict deletions that stays, as ever."""
    out = [e for path, e in local.items() if path not in remote
           and Agreed.token(e) != agreed.get(folder, path)]
    return sorted(out, key=lambda e: e["path"], reverse=True)


class ConflictKeeper:
    """The secondary's conflict copies: of what it is about to replace or delete, and of its
    own files the primary lacks after its own term."""

    def __init__(self, syncer: Syncer):
        self.syncer = syncer
        self.kept: set[tuple[str, str, str | None]] = set()  # copies already made

    def keep_if_conflict(self, name: str, path: str, local: dict | None, incoming: str | None,
                         stamp: str) -> None:
        """Keep a copy of a local object that is about to be replaced or deleted when it is
        not what the pair last agreed on: a change made here that never reached the peer."""
        s = self.syncer
        if local is None or local["kind"] == "dir":
            return
        mine = Agreed.token(local)
        if mine == incoming or mine == s.agreed.get(name, path):
            return
        if (name, path, mine) in self.kept:
            return  # a retry of a fetch that failed: this very content is already kept
        kept = s.writers[name].preserve(path, stamp)
        self.kept.add((name, path, mine))
        if kept:
            log.warning("conflict: %s/%s differs from what the pair agreed on; kept at %s",
                        name, path, kept)
            s.emit("conflict", folder=name, path=path, kept=str(kept))

    def keep_tree_if_conflict(self, name: str, path: str, stamp: str) -> None:
        """keep_if_conflict for every file and link inside the local folder at path, about to
        go to the trash whole (the primary has a file or a link there now): a file made here
        inside it must be kept under conflicts/ like any other, not only trashed with it."""
        s = self.syncer
        try:
            top = s.writers[name].open_dir(tuple(path.split("/")), create=False)
        except (OSError, PathError):
            return
        inside: list[str] = []
        try:
            for rel, _, _, others in walk(top):
                base = f"{path}/{rel}" if rel else path
                inside.extend(f"{base}/{n}" for n in others)
        finally:
            os.close(top)
        for p, local in s.local(name, inside).items():
            self.keep_if_conflict(name, p, local, None, stamp)

    def set_aside(self, name: str, extras: list[dict], stamp: str) -> None:
        """Move this node's own unagreed files that the primary lacks to conflicts/ (a copy
        there, the original to the trash), so the live folder matches the primary's."""
        s = self.syncer
        writer = s.writers[name]
        for e in extras:  # deepest first: a folder's files go before it
            if (name, e["path"], Agreed.token(e)) in self.kept:
                continue  # kept already, with the folder it was in (keep_tree_if_conflict)
            try:
                if e["kind"] == "dir":
                    if not os.listdir(os.path.join(writer.root, e["path"])):
                        writer.remove(e["path"], trash=True, stamp=stamp)
                    continue
                kept = writer.preserve(e["path"], stamp)
                writer.remove(e["path"], trash=True, stamp=stamp)
            except (PathError, OSError) as exc:
                log.warning("could not set aside %s/%s: %s", name, e["path"], exc)
                continue
            log.warning("conflict: %s/%s was made here while primary and %s lacks it; kept"
                        " at %s", name, e["path"], s.cfg.peer, kept)
            s.emit("conflict", folder=name, path=e["path"], kept=str(kept),
                   why="only on this node")


def listing(state_dir: Path, limit: int = 10_000) -> list[dict[str, Any]]:
    """Every kept copy: {"time", "folder", "path", "size", "kept"}, newest first."""
    root = Path(state_dir) / "conflicts"
    out: list[dict[str, Any]] = []
    try:
        stamps = sorted((p for p in root.iterdir() if p.is_dir()), reverse=True)
    except OSError:
        return out
    for stamp in stamps:
        for folder in sorted(p for p in stamp.iterdir() if p.is_dir()):
            # a kept copy may be as deep as the replicated tree (deeper than Python's recursion
            # limit, longer than PATH_MAX): the no-recursion walk, each name under its dir fd
            try:
                top = os.open(folder, DIR_FLAGS)
            except OSError:
                continue
            try:
                for rel, fd, dirs, others in walk(top):
                    dirs.sort()
                    for name in sorted(others):
                        try:
                            size = os.lstat(name, dir_fd=fd).st_size
                        except OSError:
                            continue
                        path = f"{rel}/{name}" if rel else name
                        out.append({"time": stamp.name, "folder": folder.name, "path": path,
                                    "size": size, "kept": str(folder / path)})
                        if len(out) >= limit:
                            return out
            finally:
                os.close(top)
    return out
