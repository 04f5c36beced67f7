"""The secondary's mending: what waits is tried again, and its copy is looked at.

The Syncer applies what the primary sends; what could not be applied, and what went wrong here
since, is mended from its loop when it has time: a refused folder that opens now, pending files,
a folder whose disk is back (node/pending.py), strict deletions that failed (node/deletions.py),
and the rolling check of the copy (node/drift.py).
"""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from .drift import DriftCheck
from .journal import Agreed
from .names import readable
from .writer import utc_stamp

if TYPE_CHECKING:
    from .syncer import Syncer

log = logging.getLogger("sbs.syncer")


class Mending:
    def __init__(self, syncer: Syncer):
        self.syncer = syncer
        self.drift = DriftCheck()

    def reopen_refused(self) -> None:
        """A refused folder that opens now (mounted, its permissions mended) has the node ask
        for a snapshot, which replicates it: until then it stays refused in the status."""
        from .syncer import open_writer  # (syncer imports this module)

        s = self.syncer
        for name, path in list(s.reopen.items()):
            try:
                open_writer(name, path, s.cfg.state_dir)[0].close()
            except (OSError, ValueError):
                continue
            del s.reopen[name]
            log.info("folder %s (%s) can be replicated here now: asking for a snapshot", name,
                     str(path)[:200])
            s.emit("folder_ready", folder=name)

    def retries(self) -> None:
        """What waits to be tried again: refused folders, pending files, folders away, failed
        strict deletions."""
        s = self.syncer
        self.reopen_refused()
        if s.pending:
            self.retry_pending()
        self.folders_back()
        if s.deletions.failed:
            s.deletions.retry()
            s.report(snapshot=False)

    def look_at_copy(self) -> None:
        """What was changed or deleted here by hand is applied again (drift.py)."""
        s = self.syncer
        roots = {n: str(w.root) for n, w in s.writers.items()
                 if n not in s.pending.away and n not in s.refused}
        found = self.drift.look(s.known, roots, s.agreed.get, Agreed.token,
                                pending=s.pending.files)
        if not found:
            return
        stamp = utc_stamp()
        s.progress.begin(0)
        for name, entries in found.items():
            entries = self._under_drifted_dirs(name, entries)
            said = ", ".join(readable(f"{name}/{e['path']}") for e in entries[:5])
            log.warning("%d object(s) of %s here are not what the primary has (changed or "
                        "deleted here, by hand?): applied again, a changed file kept under "
                        "conflicts first: %s%s", len(entries), name, said,
                        ", ..." if len(entries) > 5 else "")
            s.emit("drift", folder=name, count=len(entries),
                   paths=[e["path"] for e in entries[:100]])
            if name in s.writers and not s.writers[name].replaced():
                local = s.local(name, [e["path"] for e in entries])
                s.apply(name, [dict(e) for e in entries], [], local, stamp, s.applied)
        s.report(snapshot=False)

    def _under_drifted_dirs(self, name: str, entries: list) -> list:
        """entries, and what the primary has under a folder among them that is not one here
        (a link, a file or nothing in its place): what was refused or lost there while it
        was not comes again with the folder (it was never agreed on, so never checked)."""
        s = self.syncer
        dirs = [e["path"] + "/" for e in entries if e["kind"] == "dir"]
        if not dirs:
            return entries
        have = {e["path"] for e in entries}
        more = [e for p, e in s.known.get(name, {}).items() if p not in have
                and p.startswith(tuple(dirs)) and (name, p) not in s.pending.files]
        return entries + more

    def folders_back(self) -> None:
        """A folder whose disk was away is back: its reason leaves the status, and when
        deletions came meanwhile, a snapshot applies them (the live manifests that brought
        them are gone)."""
        s = self.syncer
        if not s.pending.away:
            return
        for name in s.pending.back(s.writers):
            s.emit("folder_ready", folder=name)
        s.report(snapshot=False)

    def retry_pending(self) -> None:
        """The pending files, applied again (not fetched while their folder still fails)."""
        s = self.syncer
        by_folder = s.pending.take()
        stamp = utc_stamp()
        s.progress.begin(0)
        for name, entries in by_folder.items():
            if name in s.writers and not s.pending.still_failing(
                    name, s.writers[name], entries):
                local = s.local(name, [e["path"] for e in entries])
                s.apply(name, entries, [], local, stamp, s.applied)
        if not s.pending:
            s.pending.since_seq = None
            log.info("pending files applied; in sync at manifest %d", s.applied)
        s.report(snapshot=False)
