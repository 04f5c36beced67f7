"""The secondary's file transfer: fetch files from the primary, write and commit them.

Small files travel many to a request and are written and committed on lane threads (each with
its own temp directory) while the next replies arrive; big files come in chunks, written by a
thread of their own (_ChunkWriter) so receiving overlaps with writing and hashing. What becomes
of each file is handed back to the Syncer that runs the transfer: applied (for the journal),
pending (to retry) or failed.
"""
from __future__ import annotations

import collections
import concurrent.futures
import errno
import itertools
import logging
import os
import queue
import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from .content import FetchError
from .journal import Agreed
from .writer import FolderWriter, HashMismatch, PathError

if TYPE_CHECKING:
    from .syncer import Syncer

log = logging.getLogger("sbs.syncer")

SMALL = 256 << 10  # files up to this size travel many to a request
BATCH_BYTES = 1 << 20
BATCH_ITEMS = 256
# the JSON of one GET's paths, at most (the file server takes a request of 1 MiB at most,
# protocol.MAX_BLOB_REQUEST_IN): 256 paths of 4,096 bytes, or of names that are not UTF-8
# (4/3 in JSON, node/names.py), would not fit in one
REQUEST_PATH_BYTES = 512 << 10
CHUNK = 1 << 20
# what the file server says of a file gone since its manifest (the next one says more); any
# other reason (it cannot read it, a refused path) does not pass by waiting for a manifest
GONE = frozenset(os.strerror(n) for n in (errno.ENOENT, errno.ENOTDIR))
LANES = 2  # threads writing small files, each with its own temp directory


class Transfer:
    def __init__(self, syncer: Syncer):
        self.syncer = syncer
        # paths of the current fetch already applied, pending or refused: a failed fetch
        # pends the others only (a refusal or a no-room mark must outlive it)
        self.decided: set[str] = set()
        self._lanes: concurrent.futures.ThreadPoolExecutor | None = None  # small-file writers
        self._lane_id = threading.local()

    def close(self) -> None:
        if self._lanes is not None:
            self._lanes.shutdown(wait=True)

    def fetch(self, name: str, files: list[dict]) -> list[tuple[str, str, str]]:
        """Fetch, verify and commit files; return what got applied (for the journal)."""
        writer = self.syncer.writers[name]
        done: list[tuple[str, str, str]] = []
        self.decided = set()
        by_path = {e["path"]: e for e in files if e["size"] > 0}
        big = _BigFiles(writer)
        lanes: collections.deque[concurrent.futures.Future] = collections.deque()
        # Files that failed on our side (a full disk, a bad path): their remaining chunks are
        # not asked for. Other files go on: a file too big for the space left must not keep
        # the small ones behind it from arriving.
        skip: set[str] = set()
        free = free_bytes(writer.root)
        for e in by_path.values():
            if free is not None and e["size"] > free:
                # the temp file sits next to the old copy until the rename: it cannot fit, so
                # do not transfer it (a hostile or corrupt size of 2**62 ends here too)
                skip.add(e["path"])
                self._failed(name, e, OSError(errno.ENOSPC, f"{e['size']} bytes needed, "
                                                            f"{free} free"))
        try:
            for e in files:
                if e["size"] == 0:
                    try:
                        tmp = writer.new_temp(e["path"])
                    except (PathError, OSError) as exc:
                        self._failed(name, e, exc)
                        continue
                    self._commit(name, [(tmp, e)], done)
            batches = self._batches(name, by_path, skip)
            for items, metas, blobs in self.syncer.fetcher.fetch(batches):
                small: list[tuple[Any, dict]] = []
                for item, meta, blob in zip(items, metas, blobs, strict=True):
                    e = by_path[item["p"]]
                    if e["path"] in skip:
                        continue
                    if meta["size"] != e["size"] or "err" in meta or len(blob) != item["n"]:
                        # changed or gone since the manifest (a read shorter than asked: the
                        # file shrank under the server): the next one will say more
                        big.abandon(e["path"])
                        if e["path"] not in self.decided:
                            self.decided.add(e["path"])
                            self.syncer.pending.pend(name, e)
                            if meta.get("err") and meta["err"] not in GONE:
                                self.syncer.pending.unservable(name, e["path"], str(meta["err"]))
                        continue
                    if e["size"] <= SMALL:
                        small.append((e, blob))
                        continue
                    try:
                        whole = big.write(e, item["o"], blob)
                    except (PathError, OSError) as exc:
                        big.abandon(e["path"])
                        skip.add(e["path"])
                        self._failed(name, e, exc)
                        continue
                    if whole is not None:
                        self._commit(name, [(whole, e)], done)
                if small:
                    # written and committed on a lane thread while the next replies arrive
                    lanes.append(self._lane_pool().submit(self._write_small, writer, small))
                    while len(lanes) > 2 * LANES:
                        self._settle(name, lanes.popleft(), done)
        except FetchError as exc:
            log.error("fetching from the primary failed: %s", exc)
            pending = self.syncer.pending
            pending.error, pending.error_of, pending.local = str(exc), None, False
            self.syncer.fetcher.close()
            while lanes:
                self._settle(name, lanes.popleft(), done)
            for e in by_path.values():
                if e["path"] not in self.decided:
                    self.syncer.pending.pend(name, e)
        except BaseException:
            # an unexpected error: no lane may still be writing into the folder when it leaves
            concurrent.futures.wait(lanes)
            lanes.clear()
            raise
        finally:
            big.close()
        # every batch handed to a lane is finished and accounted for before we return
        while lanes:
            self._settle(name, lanes.popleft(), done)
        return done

    # --- small files on lane threads -------------------------------------------------
    def _lane_pool(self) -> concurrent.futures.ThreadPoolExecutor:
        if self._lanes is None:
            ids = itertools.count(1)

            def name_lane() -> None:
                self._lane_id.lane = next(ids)

            self._lanes = concurrent.futures.ThreadPoolExecutor(
                LANES, thread_name_prefix="sbs-lane", initializer=name_lane)
        return self._lanes

    def _write_small(self, writer: FolderWriter, pairs: list[tuple[dict, Any]]
                     ) -> tuple[list[tuple[dict, BaseException]], list, list]:
        """On a lane thread: write a batch of small files to temp files in the lane's own temp
        directory and commit them (one syncfs). Only disk work happens here; what it means
        for pending, events and the journal is settled on the syncer thread."""
        lane = self._lane_id.lane
        failed: list[tuple[dict, BaseException]] = []
        items: list[tuple[Any, dict]] = []
        for e, blob in pairs:
            try:
                tmp = writer.new_temp(e["path"], lane)
                tmp.write(blob)  # on error the temp file removes itself
            except (PathError, OSError) as exc:
                failed.append((e, exc))
                continue
            items.append((tmp, e))
        return failed, items, self._commit_files(writer, items)

    def _settle(self, name: str, fut: concurrent.futures.Future, done: list) -> None:
        failed, items, results = fut.result()
        for e, exc in failed:
            self._failed(name, e, exc)
        self._book(name, items, results, done)

    def _batches(self, name: str, by_path: dict[str, dict],
                 skip: set[str]) -> Iterator[list[dict]]:
        batch: list[dict] = []
        size = asked = 0
        for e in by_path.values():
            if e["path"] in skip:
                continue
            if e["size"] > SMALL:
                if batch:
                    yield batch
                    batch, size = [], 0
                for off in range(0, e["size"], CHUNK):
                    if e["path"] in skip:
                        break
                    yield [{"f": name, "p": e["path"], "o": off,
                            "n": min(CHUNK, e["size"] - off)}]
                continue
            # a bound of the item's JSON: a name not UTF-8 goes as base64 (4/3)
            path_bytes = 80 + len(e["path"].encode("utf-8", "surrogateescape")) * 4 // 3
            if batch and asked + path_bytes > REQUEST_PATH_BYTES:
                yield batch
                batch, size, asked = [], 0, 0
            batch.append({"f": name, "p": e["path"], "o": 0, "n": e["size"]})
            size += e["size"]
            asked += path_bytes
            if size >= BATCH_BYTES or len(batch) >= BATCH_ITEMS:
                yield batch
                batch, size, asked = [], 0, 0
        if batch:
            yield batch

    def _commit(self, name: str, items: list, done: list) -> None:
        self._book(name, items, self._commit_files(self.syncer.writers[name], items), done)

    @staticmethod
    def _commit_files(writer: FolderWriter, items: list) -> list[BaseException | None]:
        if not items:
            return []
        if len(items) == 1:
            tmp, e = items[0]
            try:
                writer.commit(tmp, e)
                return [None]
            except (HashMismatch, PathError, OSError) as exc:
                return [exc]
        return writer.commit_many(items)

    def _failed(self, name: str, e: dict, exc: BaseException) -> None:
        self.decided.add(e["path"])
        self.syncer.failed(name, e, exc)

    def _book(self, name: str, items: list, results: list, done: list) -> None:
        for (tmp, e), res in zip(items, results, strict=True):
            self.decided.add(e["path"])
            if res is None:
                done.append((name, e["path"], Agreed.token(e)))
                self.syncer.keeper.wrote(name, e["path"])
                self.syncer.progress.event("fetched", name, e)
            else:
                tmp.abort()
                self._failed(name, e, res)


class _ChunkWriter:
    """Writes the chunks of big files in a thread of its own, so receiving the next chunks
    (which keeps the fetch window full) overlaps with writing and hashing this one.

    Bounded (QUEUE chunks, 1 MiB each), so memory stays flat. A failed write aborts its temp
    file (TempFile.write does) and is kept in `errors` for the syncer to pick up; the syncer
    touches a temp file handed to this thread again only after drain().
    """

    QUEUE = 16

    def __init__(self) -> None:
        self.q: queue.Queue[tuple[Any, Any] | None] = queue.Queue(self.QUEUE)
        self.errors: dict[int, BaseException] = {}  # id(temp file) -> what its write raised
        self.thread = threading.Thread(target=self._run, name="sbs-big-writer", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while True:
            job = self.q.get()
            try:
                if job is None:
                    return
                tmp, blob = job
                if id(tmp) not in self.errors:
                    try:
                        tmp.write(blob)
                    except BaseException as exc:  # noqa: BLE001 -- handed to the syncer
                        self.errors[id(tmp)] = exc
            finally:
                self.q.task_done()

    def write(self, tmp: Any, blob: Any) -> None:
        self.q.put((tmp, blob))

    def drain(self) -> None:
        self.q.join()

    def error(self, tmp: Any) -> BaseException | None:
        return self.errors.pop(id(tmp), None)

    def close(self) -> None:
        self.q.put(None)
        self.thread.join()



class _BigFiles:
    """The big files of one fetch arriving in chunks: their temp files, open until the last
    chunk, and the thread that writes the chunks (started with the first one)."""

    def __init__(self, writer: FolderWriter) -> None:
        self.writer = writer
        self.open: dict[str, Any] = {}  # path -> its temp file
        self.chunks: _ChunkWriter | None = None

    def write(self, e: dict, offset: int, blob: Any) -> Any | None:
        """Queue one chunk of `e` for writing; the temp file once the whole file is written
        (the caller commits it), else None. A chunk after an earlier one failed is dropped
        (that file is pending). Raises PathError or OSError (a bad path, a full disk)."""
        tmp = self.open.get(e["path"])
        if tmp is None:
            if offset != 0:
                return None
            tmp = self.open[e["path"]] = self.writer.new_temp(e["path"])
        if self.chunks is None:
            self.chunks = _ChunkWriter()
        if (exc := self.chunks.error(tmp)) is not None:
            raise exc  # an earlier chunk's write failed (a full disk)
        self.chunks.write(tmp, blob)
        if offset + len(blob) < e["size"]:
            return None
        self.chunks.drain()  # the whole file is written before it is sealed
        if (exc := self.chunks.error(tmp)) is not None:
            raise exc
        return self.open.pop(e["path"])

    def abandon(self, path: str) -> None:
        """Drop a big file's temp file once the chunk writer is done with it."""
        if (tmp := self.open.pop(path, None)) is not None:
            if self.chunks is not None:
                self.chunks.drain()
                self.chunks.error(tmp)
            tmp.abort()

    def close(self) -> None:
        if self.chunks is not None:
            self.chunks.close()  # after the chunks queued before it: no write is left running
        for tmp in self.open.values():
            tmp.abort()


def free_bytes(path: str) -> int | None:
    try:
        st = os.statvfs(path)
    except OSError:
        return None
    return (st.f_bfree if os.geteuid() == 0 else st.f_bavail) * st.f_frsize
