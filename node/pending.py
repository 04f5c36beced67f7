"""What the secondary could not apply yet, and why (the Syncer's backlog).

A file that could not be applied (it changed again while in flight, the disk is full or
failing, the primary cannot read it, the primary vanished) is kept here to be tried again;
`error` says why in the status until a retry clears it. Each kind of trouble is logged once,
not at every retry: a full disk once per folder, another write error once per folder and
errno, a file the primary cannot serve once per file, while they stay pending.
"""
from __future__ import annotations

import errno
import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from .transfer import free_bytes
from .writer import HashMismatch, PathError

# how soon pending files are tried again: a file that changed in flight soon, after an error
# (a full or failing disk, a file the primary cannot read) less often
RETRY, RETRY_ERROR = 0.3, 2.0
# fetches of one entry whose content missed its hash before that is an error, not a change in
# flight (whose next manifest replaces the entry)
MISMATCHES = 3

log = logging.getLogger("sbs.syncer")

Key = tuple[str, str]  # (folder, path)


class Pending:
    def __init__(self, emit: Callable[..., None]):
        self.emit = emit
        self.files: dict[Key, dict] = {}  # entry still to apply
        # the manifest before the oldest pending change: what `applied` reports meanwhile
        # (0 while a snapshot is incomplete)
        self.since_seq: int | None = None
        self.error = ""
        # the error is this node's own (a full, read-only or failing disk): everything the
        # primary sent has arrived, so the link watch must not call it a stall of the link
        self.local = False
        self.error_of: Key | None = None  # the pending file `error` is about, if it is one
        self.no_room: set[Key] = set()  # found no room at their last try: waiting won't help
        self.unserved: set[Key] = set()  # the primary has them but cannot serve them (logged)
        self.mismatched: dict[Key, tuple[str, int]] = {}  # (the entry's hash, fetches missed)
        self.disk_full: set[str] = set()  # folders whose full disk was logged
        # (folder, errno) of other write errors logged: a read-only or failing disk fails
        # every file again at each retry
        self.failing: set[tuple[str, object]] = set()
        # folders found not to be the ones opened (a disk unmounted): looked at every
        # RETRY_ERROR until they are back (``back``); those that missed deletions meanwhile
        # (strict) want a snapshot then, which applies them
        self.away: set[str] = set()
        self.deletions_missed: set[str] = set()

    def __bool__(self) -> bool:
        return bool(self.files)

    def __len__(self) -> int:
        return len(self.files)

    def retry_in(self) -> float | None:
        """How long until the pending files are tried again (or a folder that missed
        deletions is looked at); None when there is nothing to wait for."""
        if self.away:
            return RETRY_ERROR
        return (RETRY_ERROR if self.error else RETRY) if self.files else None

    def bytes(self) -> int:
        return sum(e.get("size", 0) for e in self.files.values())

    def reset(self) -> None:
        """A snapshot: what is pending is worked out afresh."""
        self.files.clear()
        self.away.clear()  # the snapshot's apply finds them again
        self.deletions_missed.clear()
        self.no_room.clear()
        self.since_seq = None
        self.error, self.error_of, self.local = "", None, False

    def take(self) -> dict[str, list[dict]]:
        """Everything pending, by folder, to be tried again (what fails again comes back)."""
        by_folder: dict[str, list[dict]] = {}
        for (name, _), e in self.files.items():
            by_folder.setdefault(name, []).append(e)
        self.files.clear()
        self.no_room.clear()
        self.error, self.error_of, self.local = "", None, False
        return by_folder

    def still_failing(self, name: str, writer: Any, entries: list[dict]) -> bool:
        """Before a retry fetches a folder's files again: a folder that failed to write (read-
        only, a failing disk) and still cannot take a temp file keeps them pending without
        asking the primary for them again (a retry of 100,000 files every 2 s had it serve
        them all again and again). What the probe cannot tell is fetched as before."""
        if not entries or not any(f == name for f, _ in self.failing):
            return False
        if writer.replaced():
            self.replaced(name, writer.root, entries)
            return True
        try:
            writer.new_temp(entries[0]["path"]).abort()
        except PathError:
            return False
        except OSError as exc:
            for e in entries:
                self.files[(name, e["path"])] = e
            self._say(name, entries[0]["path"], f"{name}/{entries[0]['path']}: {exc}",
                      local=True)
            return True
        return False

    def replaced(self, name: str, root: Path, entries: list[dict], deletions: int = 0) -> None:
        """The folder is no longer the one the writer opened (FolderWriter.replaced): nothing
        is written or deleted there; its changes wait for it to be back, said once, and
        `deletions` (strict) are worked out by a snapshot once it is back (``back``)."""
        for e in entries:
            self.pend(name, e)
        self.away.add(name)
        if deletions:
            self.deletions_missed.add(name)
        kind = (name, "replaced")
        if kind not in self.failing:
            self.failing.add(kind)
            log.error("folder %s (%s) is no longer the folder this node opened (a disk "
                      "unmounted under it, or the folder moved away): nothing is written there "
                      "until it is back; restart the node to take a new folder there on", name,
                      root)
        self._local_error(_away(name, root))

    def back(self, writers: Mapping[str, Any]) -> list[str]:
        """Each folder away that is the one opened again (the disk is back) is over, its
        reason gone from `error`; those that missed deletions meanwhile are returned: each
        wants a snapshot. Those still away stay, with the reason in `error`."""
        found = []
        for name in sorted(self.away):
            writer = writers.get(name)
            if writer is not None and writer.replaced():
                self.replaced(name, writer.root, [])  # the reason again, after a take()
                continue
            self.away.discard(name)
            if writer is not None and self.error == _away(name, writer.root):
                self.error, self.error_of, self.local = "", None, False
            missed = name in self.deletions_missed
            self.deletions_missed.discard(name)
            log.info("folder %s is the folder this node opened again%s", name,
                     ": asking for a snapshot for the deletions that came meanwhile"
                     if missed else "")
            if missed:
                found.append(name)
        return found

    def superseded(self, name: str, path: str) -> None:
        """A newer entry for the path has come: the pending one is dropped, and what went
        wrong with it is over (a file the primary replaced by a folder before it could serve
        it would otherwise keep the status' error, and "not synced", until a snapshot)."""
        self.files.pop((name, path), None)
        self.no_room.discard((name, path))
        if self.error_of == (name, path):
            self.error, self.error_of, self.local = "", None, False

    def _say(self, name: str, path: str, error: str, *, local: bool = False) -> None:
        """`error` about the pending file name/path is the status' error, unless one is;
        ``local``: a write here failed (see `local`)."""
        if not self.error:
            self.error, self.error_of, self.local = error, (name, path), local

    def pend(self, name: str, e: dict, *, no_room: bool = False) -> None:
        """Keep e to apply later, remembering whether it failed for lack of room (stuck)."""
        key = (name, e["path"])
        self.files[key] = e
        if no_room:
            self.no_room.add(key)
        else:
            self.no_room.discard(key)

    def unservable(self, name: str, path: str, why: str) -> None:
        """The primary has the file (pending) but could not serve it: an error in the status
        until it arrives, asked for again as after other errors (RETRY_ERROR), logged once."""
        if (name, path) not in self.unserved:
            self.unserved.add((name, path))
            log.warning("the primary cannot serve %s/%s: %s (asked again every %.0f s)", name,
                        path[:200], why[:200], RETRY_ERROR)
        self._say(name, path, f"{name}/{path[:200]}: the primary cannot serve it: {why[:200]}")

    def failed(self, name: str, e: dict, exc: BaseException, root: Path) -> None:
        """Applying e to folder name (at root) failed: pending, refused, or waiting behind the
        folder above it, by what went wrong."""
        self.pend(name, e, no_room=_enospc(exc))
        if _enospc(exc):
            if name not in self.disk_full:
                self.disk_full.add(name)
                log.error("disk full in folder %s writing %s: keeping the old copy; will retry",
                          name, e["path"])
            self.error, self.error_of = f"disk full in folder {name} ({root})", None
            self.local = True
            self.emit("disk_full", folder=name, path=e["path"], error=self.error)
        elif isinstance(exc, PathError) and folder_above_pending(self.files, name, e["path"]):
            # what is in the way (an old file where the primary now has a folder) is itself
            # still to be replaced here (its move to the trash failed, say on a full disk):
            # retried after it, not given up for good
            log.info("%s/%s waits for the folder above it: %s", name, e["path"][:200], exc)
        elif isinstance(exc, PathError):
            self.files.pop((name, e["path"]), None)  # hostile or impossible: never retry
            log.warning("refused %s/%s: %s", name, e["path"][:200], exc)
            self.emit("refused", folder=name, path=e["path"][:200], reason=str(exc))
        elif isinstance(exc, HashMismatch):
            self._missed(name, e)
        else:
            kind = (name, getattr(exc, "errno", None) or type(exc).__name__)
            if kind not in self.failing:
                self.failing.add(kind)
                log.warning("could not apply %s/%s: %s (other files of %s failing alike are "
                            "not logged again while it has files pending)", name, e["path"],
                            exc, name)
            self._say(name, e["path"], f"{name}/{e['path']}: {exc}", local=True)

    def settle(self) -> None:
        """Before a report: a full disk no longer in the way is said to be over, and what
        was logged once may be logged again once its folder or file has nothing pending."""
        if self.error.startswith("disk full") and not self.files:
            # what did not fit is no longer wanted (deleted or replaced)
            self.error, self.error_of, self.local = "", None, False
        if not self.error.startswith("disk full"):
            if self.disk_full:
                log.info("space is back in %s", sorted(self.disk_full))
            self.disk_full.clear()
        if self.failing:
            waiting = {name for name, _ in self.files} | self.away
            self.failing = {f for f in self.failing if f[0] in waiting}
        self.unserved &= self.files.keys()
        if self.mismatched:
            self.mismatched = {k: v for k, v in self.mismatched.items() if k in self.files}

    def _missed(self, name: str, e: dict) -> None:
        """The content fetched for e did not have e's hash. Once is a change in flight; again
        and again for the same entry, the primary's hash is wrong: said, and asked less often."""
        key, want = (name, e["path"]), e.get("hash", "")
        was, times = self.mismatched.get(key, (want, 0))
        times = times + 1 if was == want else 1
        self.mismatched[key] = (want, times)
        if times == MISMATCHES:
            log.warning("%s/%s: the content the primary sends never has the hash its manifest "
                        "gives (%s, %d fetches): it keeps its copy as it was and asks again "
                        "every %.0f s (is the primary's hash cache, state_dir/hashes, damaged?)",
                        name, e["path"][:200], want, times, RETRY_ERROR)
        if times >= MISMATCHES:
            self._say(name, e["path"], f"{name}/{e['path'][:200]}: the content the primary "
                      f"sends does not match its hash {want}")

    def _local_error(self, error: str) -> None:
        """A write here failed, about no one file: the status's error, unless it has one."""
        if not self.error:
            self.error, self.error_of, self.local = error, None, True

    def stuck(self, roots: Mapping[str, Any]) -> str:
        """Why nothing pending can be applied by waiting, or "" (stuck_on_room). A primary's
        final sync stops waiting for them. roots: folder -> its path here."""
        if self.error and not self.error.startswith("disk full"):
            return ""
        return stuck_on_room(self.files, self.no_room, roots)


def stuck_on_room(pending: dict[Key, dict], no_room: set[Key], roots: Mapping[str, Any]) -> str:
    """Why the pending files cannot be applied by waiting, or "": every one found no room on
    its last try and is still bigger than the space free now in its folder (a deletion since
    may have made room: the next retry tells)."""
    if not pending:
        return ""
    free: dict[str, int | None] = {}
    for key, e in pending.items():
        name = key[0]
        if key not in no_room or name not in roots:
            return ""
        if name not in free:
            free[name] = free_bytes(roots[name])
        room = free[name]
        if room is None or int(e.get("size", 0)) <= room:
            return ""
    return (f"{len(pending)} file(s) do not fit: disk full in "
            + ", ".join(f"{n} ({roots[n]})" for n in sorted(free)))[:1000]


def folder_above_pending(pending: Mapping[Key, Any], name: str, path: str) -> bool:
    """Is a folder above path still pending (to be made, or what is in its way)?"""
    at = path.rfind("/")
    while at > 0:
        path = path[:at]
        if (name, path) in pending:
            return True
        at = path.rfind("/")
    return False


def _away(name: str, root: Path) -> str:
    return f"folder {name} ({root}) is no longer the folder this node opened (a disk unmounted?)"


def _enospc(exc: BaseException) -> bool:
    return isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)
