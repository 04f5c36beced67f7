"""A userspace TCP proxy on loopback, to cut the link between two test nodes.

One Proxy listens on `listen_host` at each of `ports` and forwards each connection to
`target_host` at the same port. Traffic is steered per direction: `up` is what the connecting
side sends, `down` what the target answers. A direction can

    pass     forward the bytes
    swallow  read and drop them, the connections staying open (a pulled cable: no error,
             no reset, nothing arrives)
    hold     read and keep them, to be sent on when the direction passes again: a pulled
             cable as TCP lives it, whose open connections lose no byte (retransmitted once
             the cable is back). A connection that swallowed bytes and then passes carries a
             stream with a hole in it, which no real link makes: a ZeroMQ peer that meets it
             mid-greeting may take the rest for an old protocol's (see test_heartbeats.py).
    reset    reset every connection at once (RST), and every new one as soon as it is accepted

One thread runs a selector over every socket; close() ends it and closes them all (bounded).
"""
from __future__ import annotations

import selectors
import socket
import struct
import threading

MODES = ("pass", "swallow", "hold", "reset")
_CHUNK = 65536


class _Conn:
    """One proxied connection: the client side (accepted) and the target side (connecting)."""

    def __init__(self, client: socket.socket, target: socket.socket, port: int):
        self.client, self.target, self.port = client, target, port
        self.passed = {"up": 0, "down": 0}  # bytes forwarded (sent on) each way
        self.out = {client: bytearray(), target: bytearray()}  # bytes waiting to go to that socket
        self.connected = False

    def other(self, sock: socket.socket) -> socket.socket:
        return self.target if sock is self.client else self.client


class Proxy:
    def __init__(self, listen_host: str, target_host: str, ports: list[int]):
        self.listen_host, self.target_host = listen_host, target_host
        self.modes = {"up": "pass", "down": "pass"}
        self.sel = selectors.DefaultSelector()
        self.listeners: list[socket.socket] = []
        self.conns: set[_Conn] = set()
        self.lock = threading.Lock()
        self.wake_r, self.wake_w = socket.socketpair()
        self.wake_r.setblocking(False)
        self.sel.register(self.wake_r, selectors.EVENT_READ, ("wake", None))
        self.stopping = False
        self.accepted = 0
        try:
            for port in ports:
                lst = socket.socket()
                self.listeners.append(lst)
                lst.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                lst.bind((listen_host, port))
                lst.listen(64)
                lst.setblocking(False)
                self.sel.register(lst, selectors.EVENT_READ, ("listen", port))
        except OSError:
            self._close_all()
            raise
        self.thread = threading.Thread(target=self._run, name="netproxy", daemon=True)
        self.thread.start()

    # -- control ------------------------------------------------------------------------------
    def set(self, *, up: str | None = None, down: str | None = None) -> None:
        """Change what happens to each direction, from now on and on open connections too."""
        for mode in (up, down):
            if mode is not None and mode not in MODES:
                raise ValueError(f"mode {mode!r} is not one of {MODES}")
        with self.lock:
            if up is not None:
                self.modes["up"] = up
            if down is not None:
                self.modes["down"] = down
        self._wake()

    def passed(self, port: int) -> tuple[int, int]:
        """Bytes forwarded (up, down) by the busiest open connection to `port`."""
        counts = [(c.passed["up"], c.passed["down"]) for c in list(self.conns) if c.port == port]
        return max(counts, default=(0, 0))

    def heal(self) -> None:
        self.set(up="pass", down="pass")

    def close(self) -> None:
        self.stopping = True
        self._wake()
        self.thread.join(5)
        if self.thread.is_alive():
            raise RuntimeError("proxy thread did not stop")

    def _wake(self) -> None:
        try:
            self.wake_w.send(b"x")
        except OSError:
            pass

    # -- the thread ---------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            while not self.stopping:
                with self.lock:
                    modes = dict(self.modes)
                if "reset" in modes.values():
                    for conn in list(self.conns):
                        self._drop(conn, reset=True)
                self._update_interest(modes)
                for key, events in self.sel.select(timeout=0.5):
                    kind, data = key.data
                    if kind == "wake":
                        try:
                            while self.wake_r.recv(512):
                                pass
                        except BlockingIOError:
                            pass
                    elif kind == "listen":
                        self._accept(key.fileobj, data, modes)
                    elif data in self.conns:
                        self._on_io(data, key.fileobj, events, modes)
        finally:
            self._close_all()

    def _accept(self, lst: socket.socket, port: int, modes: dict[str, str]) -> None:
        try:
            client, _ = lst.accept()
        except (BlockingIOError, OSError):
            return
        self.accepted += 1
        if "reset" in self.modes.values():  # as of now (see _on_io)
            _reset(client)
            return
        client.setblocking(False)
        target = socket.socket()
        target.setblocking(False)
        try:
            target.connect((self.target_host, port))
        except BlockingIOError:
            pass
        except OSError:
            _reset(client)
            target.close()
            return
        conn = _Conn(client, target, port)
        self.conns.add(conn)
        self.sel.register(client, selectors.EVENT_READ, ("conn", conn))
        self.sel.register(target, selectors.EVENT_WRITE, ("conn", conn))

    def _direction(self, conn: _Conn, src: socket.socket) -> str:
        return "up" if src is conn.client else "down"

    def _on_io(self, conn: _Conn, sock: socket.socket, events: int,
               modes: dict[str, str]) -> None:
        if sock is conn.target and not conn.connected:
            if not events & selectors.EVENT_WRITE:
                return
            if sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR):
                self._drop(conn, reset=True)  # target refused: the client sees a reset
                return
            conn.connected = True
        if events & selectors.EVENT_READ:
            try:
                data = sock.recv(_CHUNK)
            except BlockingIOError:
                data = None
            except OSError:
                self._drop(conn, reset=True)
                return
            if data == b"":
                self._drop(conn, reset=False)
                return
            # the mode as of now, not of the loop's turn: bytes sent after set() returned
            # must meet the new mode
            direction = self._direction(conn, sock)
            if data and self.modes[direction] in ("pass", "hold"):
                conn.out[conn.other(sock)] += data  # "hold": sent once the direction passes
            # "swallow": read and dropped, the sender sees its bytes leave as on a live link
        # towards the target is "up", towards the client "down"
        into = "up" if sock is conn.target else "down"
        if events & selectors.EVENT_WRITE and self.modes[into] == "pass":
            buf = conn.out[sock]
            if buf:
                try:
                    sent = sock.send(buf)
                except BlockingIOError:
                    sent = 0
                except OSError:
                    self._drop(conn, reset=True)
                    return
                del buf[:sent]
                conn.passed[into] += sent

    def _update_interest(self, modes: dict[str, str]) -> None:
        for conn in list(self.conns):
            for sock in (conn.client, conn.target):
                if sock is conn.target and not conn.connected:
                    continue
                want = selectors.EVENT_READ
                # a full buffer stops reading from the other side (back-pressure) while passing
                if len(conn.out[conn.other(sock)]) > 4 * _CHUNK:
                    want = 0
                if conn.out[sock] and modes["up" if sock is conn.target else "down"] == "pass":
                    want |= selectors.EVENT_WRITE
                if not want:
                    want = selectors.EVENT_WRITE  # selectors needs some interest; writes are no-ops
                try:
                    self.sel.modify(sock, want, ("conn", conn))
                except (KeyError, ValueError, OSError):
                    pass

    def _drop(self, conn: _Conn, *, reset: bool) -> None:
        self.conns.discard(conn)
        for sock in (conn.client, conn.target):
            try:
                self.sel.unregister(sock)
            except (KeyError, ValueError):
                pass
            if reset:
                _reset(sock)
            else:
                sock.close()

    def _close_all(self) -> None:
        for conn in list(self.conns):
            self._drop(conn, reset=True)
        for lst in self.listeners:
            try:
                self.sel.unregister(lst)
            except (KeyError, ValueError):
                pass
            lst.close()
        self.listeners = []
        try:
            self.sel.unregister(self.wake_r)
        except (KeyError, ValueError):
            pass
        self.sel.close()
        self.wake_r.close()
        self.wake_w.close()


def _reset(sock: socket.socket) -> None:
    """Close with an RST rather than a FIN (linger on, zero seconds)."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    sock.close()
