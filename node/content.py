"""File content over request/reply on port+2: the server thread and the pipelined client.

The server is a REP socket in a thread of its own: serving is nothing but disk reads, and a
slow disk must not delay the node loop's heartbeats. The client is a DEALER talking to that
REP (a DEALER may, with an empty delimiter frame), so several requests are in flight at once
while staying plain request/reply; a lost reply is handled the Lazy Pirate way: after a
timeout the socket is closed with LINGER 0, a fresh one is opened and the outstanding
requests are sent again.

GET  {"id", "items": [{"f": folder, "p": path, "o": offset, "n": bytes}], "pack": true}
DATA {"id", "items": [{"size": file size now (-1 on error), "err": reason}]} + one raw frame
     per item with the bytes read (empty on error); with "pack" asked and more than one item,
     {"id", "items": [{"size", "err", "n": bytes of this item}], "packed": true} + ONE frame
     holding the items' bytes one after the other (an older server ignores "pack")
"""
from __future__ import annotations

import collections
import errno
import logging
import os
import stat
import threading
import time
from collections.abc import Iterable, Iterator
from typing import Any

import zmq

from . import protocol
from .config import FolderConfig
from .filters import Filter
from .protocol import Bad
from .security import Keys, client, serve
from .tree import DIR_FLAGS, PathError, check_relpath

log = logging.getLogger("sbs.blobs")


# at most this many parent folders stay open while one request is answered
_DIRS_KEPT = 16
_READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NOCTTY | os.O_NONBLOCK | os.O_CLOEXEC


def _open_parent(root: str, parts: list[str]) -> int:
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for name in parts:
            nxt = os.open(name, DIR_FLAGS, dir_fd=fd)
            os.close(fd)
            fd = nxt
    except BaseException:
        os.close(fd)
        raise
    return fd


def open_nofollow(root: str, relpath: str, dirs: dict[tuple, int] | None = None) -> int:
    """Open a regular file for reading inside `root` without following any symlink on the way.

    O_NONBLOCK: opening a FIFO must not wait for a writer (it would stall the file server for
    good); what is not a regular file once open (FIFO, device, socket, folder) is refused.
    `dirs`: the caller's cache of opened parent folders, (root, *parts) -> fd, for a request
    of many files in a few folders (the caller closes them); without it each call walks from
    `root` and closes what it opened."""
    parts = check_relpath(relpath)
    key = (root, *parts[:-1])
    fd = dirs.get(key) if dirs is not None else None
    keep = fd is not None
    if fd is None:
        fd = _open_parent(root, parts[:-1])
        if dirs is not None and len(dirs) < _DIRS_KEPT:
            dirs[key] = fd
            keep = True
    try:
        file_fd = os.open(parts[-1], _READ_FLAGS, dir_fd=fd)
    except OSError as exc:
        if exc.errno == errno.ELOOP:  # a link now (its manifest follows), not a disk error
            raise PathError("a symbolic link, not a regular file") from None
        raise
    finally:
        if not keep:
            os.close(fd)
    if not stat.S_ISREG(os.fstat(file_fd).st_mode):
        os.close(file_fd)
        raise PathError("not a regular file")
    return file_fd


class BlobServer:
    def __init__(self, ctx: zmq.Context, endpoint: str, keys: Keys | None):
        self.ctx, self.endpoint, self.keys = ctx, endpoint, keys
        self._folders: dict[str, tuple[str, Filter]] = {}
        self._thread: threading.Thread | None = None
        self._control = f"inproc://blobs-stop-{id(self)}"
        # what was logged of the secondary's requests, once each: a file that could not be
        # read here (a file whose hash is cached is not read by the scans, and without this
        # line a bad sector left the secondary asking for it for ever with no word of why),
        # and one refused (each chunk of a big file would say it again)
        self._said = Once()

    def set_folders(self, folders: dict[str, FolderConfig]) -> None:
        """Serve these folders, and in each only what its filters replicate."""
        # one reference swap: the thread reads it lock-free
        self._folders = {n: (str(f.path), Filter(f.filters)) for n, f in folders.items()}

    def start_and_wait(self) -> None:
        rep = self.ctx.socket(zmq.REP)
        rep.linger = 0
        rep.setsockopt(zmq.MAXMSGSIZE, protocol.MAX_BLOB_REQUEST_IN)
        # replies a client has not read yet wait in its pipe, each at most MAX_GET_BYTES. Not
        # lower: an HWM of the fetch window itself drops replies after a client reconnects
        # (its resent requests meet the old ones' replies) and the fetch crawls on timeouts
        rep.sndhwm = 64
        serve(rep, self.keys)
        try:
            rep.bind(self.endpoint)  # here, so a taken port is an error of the caller
        except zmq.ZMQError:
            rep.close()
            raise
        self._stop = self.ctx.socket(zmq.PAIR)
        self._stop.bind(self._control)
        self._thread = threading.Thread(target=self._run, args=(rep,), name="sbs-blobs",
                                        daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if self._thread is None:
            return
        self._stop.send(b"stop")
        self._thread.join(5)
        self._stop.close()
        self._thread = None

    def _run(self, rep: zmq.Socket) -> None:
        control = self.ctx.socket(zmq.PAIR)
        control.connect(self._control)
        poller = zmq.Poller()
        poller.register(rep, zmq.POLLIN)
        poller.register(control, zmq.POLLIN)
        try:
            while True:
                ready = dict(poller.poll())
                if control in ready:
                    return
                if rep in ready:
                    frames = rep.recv_multipart(copy=True)
                    rep.send_multipart(self.answer(frames), copy=False)
        finally:
            rep.close()
            control.close()

    def answer(self, frames: list[bytes]) -> list[Any]:
        msg = protocol.decode(frames, expect=("GET",))
        if isinstance(msg, Bad):
            log.warning("dropped a bad fetch request: %s", msg.reason)
            return protocol.reply_error(msg.reason)
        metas, blobs = [], []
        folders = self._folders
        dirs: dict[tuple, int] = {}  # parent folders opened for this request
        try:
            self._read_items(msg.body["items"], folders, dirs, metas, blobs, self._said)
        finally:
            for fd in dirs.values():
                os.close(fd)
        if msg.body.get("pack") is True and len(blobs) > 1:
            # many small files: one frame for all (a frame each cost a send each, ~1/5 of the
            # primary's busy time serving 100,000 files); big chunks come one to a request
            for meta, blob in zip(metas, blobs, strict=True):
                meta["n"] = len(blob)
            return protocol.encode("DATA", {"id": msg.body["id"], "items": metas,
                                            "packed": True}, b"".join(blobs))
        return protocol.encode("DATA", {"id": msg.body["id"], "items": metas}, *blobs)

    @staticmethod
    def _read_items(items: list[dict[str, Any]], folders: dict[str, tuple[str, Filter]],
                    dirs: dict[tuple, int], metas: list[dict[str, Any]],
                    blobs: list[Any], said: Once) -> None:
        for item in items:
            folder = folders.get(item["f"])
            if folder is None:
                metas.append({"size": -1, "err": f"unknown folder {item['f'][:64]!r}"})
                blobs.append(b"")
                continue
            root, filt = folder
            try:
                if not filt.match(item["p"]):
                    raise PathError("not replicated by the folder's filters")
                fd = open_nofollow(root, item["p"], dirs)
                try:
                    size = os.fstat(fd).st_size
                    data = os.pread(fd, item["n"], item["o"])
                finally:
                    os.close(fd)
                metas.append({"size": size})
                blobs.append(data)
            except PathError as exc:
                if said.first(("refused", item["f"], item["p"])):
                    log.warning("refused fetch of %r in %s: %s", item["p"][:200], item["f"],
                                exc)
                metas.append({"size": -1, "err": f"refused: {exc}"})
                blobs.append(b"")
            except OSError as exc:
                # (gone since its manifest is not news)
                if exc.errno not in (errno.ENOENT, errno.ENOTDIR) and said.first(
                        ("unreadable", item["f"], item["p"])):
                    log.error("cannot serve %s/%s to the secondary: %s", item["f"],
                              item["p"][:200], exc)
                metas.append({"size": -1, "err": exc.strerror or str(exc)})
                blobs.append(b"")


class Once:
    """Keys seen, for what is said once each; forgotten past MAX (a secondary asking for
    paths without end must not grow it without end: the worst is a line said again)."""

    MAX = 10_000

    def __init__(self) -> None:
        self._seen: set[tuple] = set()

    def first(self, key: tuple) -> bool:
        if key in self._seen:
            return False
        if len(self._seen) >= self.MAX:
            self._seen.clear()
        self._seen.add(key)
        return True


class FetchError(RuntimeError):
    pass


class Fetcher:
    """Pipelined GETs over one DEALER; replies come back in request order (one connection)."""

    def __init__(self, ctx: zmq.Context, endpoint: str, keys: Keys | None, *,
                 window: int = protocol.FETCH_WINDOW,
                 timeout: float = 5.0, retries: int = 3):
        self.ctx, self.endpoint, self.keys = ctx, endpoint, keys
        self.window, self.timeout, self.retries = window, timeout, retries
        self.sock: zmq.Socket | None = None
        self.next_id = 1
        self.cancelled = threading.Event()  # set by another thread: give up at once
        self.answers = 0  # replies received: the node's link watch reads it as progress

    def _open(self) -> zmq.Socket:
        sock = self.ctx.socket(zmq.DEALER)
        sock.linger = 0
        sock.setsockopt(zmq.MAXMSGSIZE, protocol.MAX_BLOB_REPLY_IN)
        sock.rcvhwm = sock.sndhwm = 0
        client(sock, self.keys)
        sock.connect(self.endpoint)
        return sock

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close(linger=0)
            self.sock = None

    def _wait_reply(self) -> bool:
        """Wait up to `timeout` for a reply, in short slices so a cancel is seen quickly
        (a takeover must not wait for a dead primary's fetch to time out)."""
        deadline = time.monotonic() + self.timeout
        while not self.cancelled.is_set():
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            if self.sock.poll(min(left, 0.05) * 1000):
                return True
        return False

    def fetch(
        self, batches: Iterable[list[dict[str, Any]]]
    ) -> Iterator[tuple[list[dict[str, Any]], list[dict[str, Any]], list[memoryview]]]:
        """For each batch of items {f, p, o, n} yield (items, metas, blobs), in order; the
        blobs are read-only memoryviews of the received frames."""
        if self.sock is None:
            self.sock = self._open()
        source = iter(batches)
        inflight: collections.deque[tuple[int, list[dict], list[bytes]]] = collections.deque()
        exhausted = False
        misses = 0
        while True:
            while not exhausted and len(inflight) < self.window:
                try:
                    items = next(source)
                except StopIteration:
                    exhausted = True
                    break
                rid = self.next_id
                self.next_id += 1
                frames = [b"", *protocol.encode("GET", {"id": rid, "items": items,
                                                        "pack": True})]
                self.sock.send_multipart(frames)
                inflight.append((rid, items, frames))
            if not inflight:
                return
            if not self._wait_reply():
                if self.cancelled.is_set():
                    raise FetchError("cancelled")
                misses += 1
                if misses > self.retries:
                    raise FetchError(f"no answer from {self.endpoint} after {misses} tries")
                log.warning("fetch timed out; reconnecting and resending %d requests",
                            len(inflight))
                self.close()
                self.sock = self._open()
                for _, _, frames in inflight:
                    self.sock.send_multipart(frames)
                continue
            # copy=False: the chunks stay in libzmq's buffers and are handed on as memoryviews
            # (a 1 MiB chunk is not copied into a bytes object first); the header frames are
            # small and are decoded as bytes, the blob frames only counted by decode
            reply = self.sock.recv_multipart(copy=False)
            if reply and len(reply[0]) == 0:
                reply = reply[1:]
            head, data = reply[:3], reply[3:]
            msg = protocol.decode([f.bytes for f in head] + [b""] * len(data),
                                  expect=("DATA", "REPLY"))
            if isinstance(msg, Bad) or msg.command == "REPLY":
                reason = msg.reason if isinstance(msg, Bad) else msg.body.get("reason")
                raise FetchError(f"bad answer from {self.endpoint}: {reason}")
            rid, items, _ = inflight[0]
            if msg.body["id"] != rid:
                continue  # a late answer to a request resent after a timeout
            if len(msg.body["items"]) != len(items):  # the caller pairs them one to one
                raise FetchError(f"bad answer from {self.endpoint}: {len(msg.body['items'])}"
                                 f" items for {len(items)} asked")
            blobs = [f.buffer for f in data]
            if msg.body.get("packed"):
                blobs = unpack(blobs[0], msg.body["items"])
                if blobs is None:
                    raise FetchError(f"bad answer from {self.endpoint}: packed lengths do "
                                     f"not add up to its frame")
            inflight.popleft()
            misses = 0
            self.answers += 1
            yield items, msg.body["items"], blobs


def unpack(frame: memoryview, metas: list[dict[str, Any]]) -> list[memoryview] | None:
    """A packed DATA frame cut into its items' bytes (views, not copies); None when the
    items' lengths do not add up to the frame exactly."""
    views, at = [], 0
    for meta in metas:
        n = meta["n"]
        views.append(frame[at:at + n])
        at += n
    return views if at == len(frame) else None
