"""What the pair last agreed on, per (folder, relpath): the journal behind conflict detection.

A node that rejoins compares each local file it is about to overwrite or delete with the token
recorded here: equal means the peer already had this content (safe to replace); different means
a local change that never reached the peer, which must be kept as a conflict copy first.

File format (state_dir/agreed.jsonl): one orjson array per line, ``[folder, relpath, token]``,
token null for "deleted". Later lines win.

Appends are flushed, not fsynced: a crash of the node loses none of them (they are in the
kernel's page cache), but a crash of the machine may lose the last ones, and an older journal
does not only err toward more conflict copies: a file changed here back to a version the pair
agreed on before (its newer agreement lost with the tail) would look agreed and be replaced
without a copy. So the journal holds a marker, agreed.jsonl.open, from its opening to its
clean close (which fsyncs it first), naming the boot it was opened in. A journal found with
the marker of another boot was open when the machine went down: it is not trusted, and the
node starts with an empty one (every local file that differs from the primary's is kept as a
conflict copy: more copies, never fewer). A node killed in the same boot keeps its journal,
unless an append had failed (a full state disk) and rewrite() had not caught up yet: then the
file lags what memory holds, so the marker is emptied at the failure and set again once the
journal is written whole; an empty marker is not trusted either.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import orjson

from . import names
from .fdio import removed
from .proctree import boot_id

log = logging.getLogger(__name__)

COMPACT_SLACK = 10_000


class Agreed:
    """Thread-safe: the primary journals from a background thread (a 100k-entry snapshot
    acknowledgement must not stall the node loop's heartbeats), the secondary from its syncer."""

    def __init__(self, path: Path | str):
        self.path = Path(path)
        self._lock = threading.RLock()
        self._tokens: dict[str, dict[str, str]] = {}
        self._lines = 0
        # why the file lags what is in memory ("" when it does not): a failed append (a full
        # state disk) is not raised to the writer, whose work is done; rewrite() catches up
        self.write_error = ""
        self.marker = self.path.with_name(self.path.name + ".open")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file: Any = None  # held open for appends; None while it cannot be opened
        trusted = not self._was_open_in_another_boot() and self._load()
        # a journal that cannot be opened or emptied (a folder stands there, a full disk) is a
        # failed write: memory holds it, status shows it, rewrite() tries again
        try:
            self._file = open(self.path, "ab")
            if not trusted:
                self._compact()  # the file says what memory says: nothing
        except OSError as exc:
            self._write_failed(exc)
        if not self.write_error:
            self._mark_open()

    def _write_failed(self, exc: OSError) -> None:
        self.write_error = f"{self.path}: {exc}"
        log.error("cannot write %s: %s (kept in memory, written again when it can be)",
                  self.path, exc)
        self._distrust()

    def _was_open_in_another_boot(self) -> bool:
        try:
            boot = self.marker.read_text().strip()
        except FileNotFoundError:
            return False  # closed cleanly (or never opened)
        except (OSError, UnicodeDecodeError):
            boot = "?"
        if boot and boot == boot_id():
            return False  # the node was killed, not the machine: every append is there
        why = ("it was open when the machine went down (opened in another boot)" if boot
               else "it could not be written whole before the node stopped")
        log.warning("%s: %s: its last lines may be lost, so it is not trusted and starts "
                    "empty; files here that differ from the primary's will be kept as conflict "
                    "copies", self.path, why)
        return True

    def _mark_open(self) -> None:
        """The marker, durable before any append of this boot (temp, fsync, rename)."""
        tmp = self.marker.with_name(self.marker.name + ".tmp")
        try:
            with open(tmp, "w") as f:
                f.write(boot_id() + "\n")
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.marker)
            _fsync_dir(self.path.parent)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            log.error("cannot write %s (%s): a machine crash before this node stops would go "
                      "unnoticed by the journal", self.marker, exc)

    def _distrust(self) -> None:
        """The file lags what memory holds: a node killed before rewrite() catches up must not
        read it as the last word at its next start (an empty marker, as after a stop that could
        not write it whole; emptying a file takes no room on a full disk)."""
        try:
            open(self.marker, "w").close()
        except OSError as exc:
            log.error("cannot update %s: %s", self.marker, exc)

    def _load(self) -> bool:
        """Read the file in; False when it cannot be read (not trusted: it starts empty)."""
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return True
        except OSError as exc:
            log.error("%s: cannot read it (%s), so it is not trusted and starts empty; files "
                      "here that differ from the primary's will be kept as conflict copies",
                      self.path, exc)
            return False
        complete = data.rfind(b"\n") + 1
        for line in data[:complete].split(b"\n")[:-1]:
            if line:
                self._apply_line(line)
        if complete < len(data):
            # A torn last line (a crash mid-append): cut it, so the next append starts clean.
            log.warning("%s: ignoring a torn last line (%d bytes)", self.path, len(data) - complete)
            with open(self.path, "r+b") as f:
                f.truncate(complete)
        return True

    def _apply_line(self, line: bytes) -> bool:
        try:
            folder, relpath, token = names.loads(line)
            if not (isinstance(folder, str) and isinstance(relpath, str)
                    and (token is None or isinstance(token, str))):
                raise ValueError("bad field types")
        except (orjson.JSONDecodeError, ValueError, TypeError):
            log.warning("%s: skipping a bad line %r", self.path, line[:80])
            return False
        self._set(folder, relpath, token)
        self._lines += 1
        return True

    def _set(self, folder: str, relpath: str, token: str | None) -> None:
        if token is None:
            tokens = self._tokens.get(folder)
            if tokens is not None:
                tokens.pop(relpath, None)
        else:
            self._tokens.setdefault(folder, {})[relpath] = token

    def __len__(self) -> int:
        return sum(len(t) for t in self._tokens.values())

    def get(self, folder: str, relpath: str) -> str | None:
        """The token last agreed for this path ("dir", "link:<target>" or the content hash), or
        None if the pair never agreed on anything there."""
        with self._lock:
            tokens = self._tokens.get(folder)
            return None if tokens is None else tokens.get(relpath)

    def update(self, items: Iterable[tuple[str, str, str | None]]) -> None:
        """Record (folder, relpath, token or None for deleted); appends and flushes what is new.

        An item equal to what is recorded already is not appended again: a node rejoining with
        an unchanged tree agrees on every path once more, and 100,000 repeated lines cost it
        their serialising and writing, then a compaction. Skipping them is safe because the
        file holds what memory holds whenever write_error is empty (otherwise rewrite() writes
        memory out whole)."""
        with self._lock:
            fresh = []
            for item in items:
                folder, relpath, token = item
                tokens = self._tokens.get(folder)
                if (None if tokens is None else tokens.get(relpath)) == token:
                    continue
                self._set(folder, relpath, token)
                fresh.append(item)
            items = fresh
            if not items:
                return
            if self.write_error:
                return  # the file lags already: rewrite() writes it all out, these included
            try:
                _write_lines(self._file, items)
                self._file.flush()
                self._lines += len(items)
                if removed(self._file.fileno()):
                    # deleted under the running node (by hand): the appends went to a file
                    # that is gone at close, and the next start would trust an empty journal
                    log.warning("%s was deleted while the node runs: written again whole",
                                self.path)
                    self._compact()
                elif self._lines > 2 * len(self) + COMPACT_SLACK:
                    self._compact()
            except OSError as exc:
                self._write_failed(exc)

    def rewrite(self) -> bool:
        """After a failed write: write the whole journal out again. True when it is whole."""
        with self._lock:
            if not self.write_error:
                return True
            try:
                self._compact()
            except OSError as exc:
                self.write_error = f"{self.path}: {exc}"
                return False
            log.warning("%s written again", self.path)
            self.write_error = ""
            self._mark_open()  # the file holds what memory holds: trusted after a kill again
            return True

    def compact(self) -> None:
        """Rewrite the journal with live entries only (temp file + os.replace: never torn)."""
        with self._lock:
            self._compact()

    def _compact(self) -> None:
        tmp = self.path.with_name(self.path.name + ".tmp")
        live = 0
        try:
            with open(tmp, "wb") as f:
                for folder, tokens in self._tokens.items():
                    live += _write_lines(f, ((folder, rel, tok) for rel, tok in tokens.items()))
                f.flush()
                os.fsync(f.fileno())
        except OSError:
            tmp.unlink(missing_ok=True)  # a full disk: give the room back, the caller retries
            raise
        try:
            if self._file is not None:
                self._file.close()
        except OSError:
            pass  # what a failed append left in its buffer: the rewrite replaces it all
        try:
            os.replace(tmp, self.path)
            _fsync_dir(self.path.parent)
        except OSError:
            tmp.unlink(missing_ok=True)
            raise
        finally:
            try:
                self._file = open(self.path, "ab")  # appends go on whatever happened
            except OSError:
                self._file = None
        if self._file is None:
            raise OSError(f"cannot open {self.path} for appends")
        log.debug("%s: compacted %d lines to %d", self.path, self._lines, live)
        self._lines = live

    @staticmethod
    def token(entry: dict[str, Any]) -> str | None:
        """The agreed token of an Entry: "dir", "link:"+target, the hash; None when deleted."""
        if entry.get("deleted"):
            return None
        kind = entry.get("kind")
        if kind == "dir":
            return "dir"
        if kind == "link":
            return "link:" + entry.get("target", "")
        return entry.get("hash")

    def close(self) -> None:
        """Flush and fsync the journal, then drop the marker: a clean close."""
        with self._lock:
            if self._file is not None and self._file.closed:
                return
            try:
                if self._file is not None:
                    self._file.flush()
                    os.fsync(self._file.fileno())
                clean = self.rewrite()  # a failed append (a full disk): one more try
            except OSError as exc:
                log.error("cannot write %s on closing: %s", self.path, exc)
                clean = False
            finally:
                try:
                    if self._file is not None:
                        self._file.close()
                except OSError:
                    clean = False
            try:
                if clean:
                    self.marker.unlink(missing_ok=True)
                else:  # the file lags what was agreed: an empty marker, not trusted next time
                    open(self.marker, "w").close()
            except OSError as exc:
                log.error("cannot update %s: %s", self.marker, exc)

    def __enter__(self) -> Agreed:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _write_lines(f: Any, items: Iterable[Any], per_write: int = 2048) -> int:
    """Write one orjson line per item, a bounded batch at a time: joining 100,000 serialised
    lines at once cost the secondary ~380 MB at the end of a 100,000-file snapshot."""
    n = 0
    batch: list[bytes] = []
    for x in items:
        batch.append(names.dumps(x))
        if len(batch) >= per_write:
            f.write(b"\n".join(batch) + b"\n")
            n += len(batch)
            batch.clear()
    if batch:
        f.write(b"\n".join(batch) + b"\n")
        n += len(batch)
    return n


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
