"""Strict deletions on the secondary, behind the guard against an unmounted disk.

With strict mode, what the primary no longer has goes to the trash here too. A cycle that
would delete more than half of a folder's files (of at least GUARD_MIN_FILES) looks like a
disk that is not mounted on the primary: those deletions are held, reported, and applied
only once an operator confirms them (`sbs-tools confirm-deletions`), or dropped when the
primary shows the paths again. A deletion that fails here (the trash cannot be written, the
file cannot be moved) is kept, named in the status (not in sync) and tried again every
RETRY_ERROR seconds (``retry``), logged once.
"""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from .pending import RETRY_ERROR
from .writer import PathError, utc_stamp

if TYPE_CHECKING:
    from .syncer import Syncer

log = logging.getLogger("sbs.syncer")

GUARD_MIN_FILES = 20


class StrictDeletions:
    def __init__(self, syncer: Syncer):
        self.syncer = syncer
        self.confirmed: set[str] = set()
        # deletions the guard refused, per folder: applied once an operator confirms,
        # dropped when the primary shows the path again (a disk that was only unmounted)
        self.held: dict[str, dict[str, dict]] = {}
        self.guard_errors: dict[str, str] = {}
        # deletions that failed here, per folder, and the last reason: tried again (retry)
        self.failed: dict[str, dict[str, dict]] = {}
        self.failed_why = ""
        self.said: set[tuple[str, object]] = set()  # (folder, errno) logged while failing

    def reset(self) -> None:
        """A snapshot works out what to delete afresh from the full index."""
        self.held.clear()
        self.guard_errors.clear()
        self.failed.clear()
        self.failed_why = ""
        self.said.clear()

    def error(self) -> str:
        return "; ".join([*self.guard_errors.values(), *([self.failed_why] if self.failed
                                                         else [])])

    def retry(self) -> None:
        """The deletions that failed, tried again (those the primary shows again are not)."""
        failed, self.failed = self.failed, {}
        self._delete_kept(failed)
        if not self.failed:
            if self.said:
                log.info("the deletions that failed are done")
            self.failed_why = ""
            self.said.clear()

    def seen(self, name: str, path: str) -> None:
        """The primary has path again: it is no longer held for deletion, nor failed."""
        if self.failed and (failed := self.failed.get(name)):
            failed.pop(path, None)
            if not failed:
                del self.failed[name]
        held = self.held.get(name, {})
        if held.pop(path, None) is not None and not held:
            del self.held[name]  # the primary has them all again: nothing to confirm
            self.guard_errors.pop(name, None)

    def confirm(self, folder: str | None) -> None:
        """The operator allows the deletions the guard refused: the held ones are applied
        now. Only what is held: a confirmation with nothing held (Secondary refuses it) is
        not kept for a later cycle, which could be the unmounted disk the guard is for."""
        s = self.syncer
        names = set(s.writers) if folder is None else {folder}
        held = {n: self.held.pop(n) for n in names if n in self.held}
        log.warning("operator confirmed the strict deletions held in %s", sorted(held))
        for name in held:
            self.guard_errors.pop(name, None)
        self._delete_kept(held, confirmed=True)

    def _delete_kept(self, by_folder: dict[str, dict[str, dict]], *,
                     confirmed: bool = False) -> None:
        """Deletions kept from an earlier cycle (held by the guard and now `confirmed`, or
        failed), done now; not those the primary shows again."""
        s = self.syncer
        stamp = utc_stamp()
        for name, doomed in by_folder.items():
            if name not in s.writers:
                continue
            known = s.known.get(name, {})
            deletions = [e for p, e in doomed.items() if p not in known]
            if confirmed:
                self.confirmed.add(name)
            done = self.delete(name, deletions, s.local(name, [e["path"] for e in deletions]),
                               stamp)
            if done:
                s.agreed.update(done)

    def delete(self, name: str, deletions: list[dict], local: dict[str, dict],
               stamp: str, files_here: int | None = None) -> list[tuple[str, str, None]]:
        """Strict deletions, into the trash. `files_here`: the folder's files before this
        cycle (a snapshot counts its scan); by default what the primary had before it."""
        s = self.syncer
        doomed = sum(1 for e in deletions if e["kind"] != "dir")
        if files_here is None:
            # `local` only holds the paths of this manifest: it says nothing of the folder
            files_here = doomed + sum(1 for e in s.known.get(name, {}).values()
                                      if e["kind"] != "dir")
        if files_here >= GUARD_MIN_FILES and doomed * 2 > files_here and (
            name not in self.confirmed
        ):
            msg = (f"strict guard: refusing to delete {doomed} of {files_here} files in folder "
                   f"{name} (an unmounted disk on the primary looks like this); run "
                   f"'sbs-tools confirm-deletions {name}' on this node to allow it")
            log.error(msg)
            self.held.setdefault(name, {}).update((e["path"], e) for e in deletions)
            self.guard_errors[name] = msg
            s.emit("strict_guard", folder=name, deletions=doomed, files=files_here,
                   error=msg)
            return []
        self.confirmed.discard(name)
        done = []
        # children before parents, so a deleted folder is empty when its turn comes; a folder
        # inside a folder deleted too goes to the trash with it, in one rename (a tree 2,000
        # levels deep is not walked down from the root once per level)
        doomed_dirs = {e["path"] for e in deletions if e["kind"] == "dir"}
        for e in sorted(deletions, key=lambda x: x["path"], reverse=True):
            if e["kind"] == "dir" and e["path"].rpartition("/")[0] in doomed_dirs:
                done.append((name, e["path"], None))
                continue
            have = local.get(e["path"])
            if have is None and e["path"] not in local:
                have = s.local(name, [e["path"]]).get(e["path"])
            if have is None:
                done.append((name, e["path"], None))
                continue
            try:
                # a conflict copy that cannot be made (a full state disk) leaves the file here,
                # as a failed move to the trash does (the next snapshot tries again); the rest
                # of the job goes on
                s.conflicts.keep_if_conflict(name, e["path"], have, None, stamp)
                s.writers[name].remove(e["path"], trash=True, stamp=stamp)
                done.append((name, e["path"], None))
                s.progress.event("deleted", name, e)
            except (PathError, OSError) as exc:
                self.failed.setdefault(name, {})[e["path"]] = e
                self.failed_why = f"could not delete {name}/{e['path'][:200]}: {exc}"
                kind = (name, getattr(exc, "errno", None) or type(exc).__name__)
                if kind not in self.said:
                    self.said.add(kind)
                    log.warning("could not delete %s/%s: %s (tried again every %.0f s; others "
                                "failing alike in %s are not logged again)", name, e["path"],
                                exc, RETRY_ERROR, name)
        return done
