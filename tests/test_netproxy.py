"""The test proxy itself: pass, swallow (open but silent), hold (open, silent, nothing lost)
and reset, per direction."""
from __future__ import annotations

import socket
import threading

import pytest

from tests.conftest import free_port
from tests.netproxy import Proxy
from tests.pair import wait_for


@pytest.fixture
def echo():
    """An echo server on 127.0.0.1: (port, stop)."""
    port = free_port()
    srv = socket.create_server(("127.0.0.1", port))
    srv.settimeout(0.2)
    stop = threading.Event()
    conns = []

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = srv.accept()
            except TimeoutError:
                continue
            conns.append(conn)
            threading.Thread(target=lambda c=conn: _echo(c), daemon=True).start()

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    yield port
    stop.set()
    t.join(2)
    srv.close()
    for c in conns:
        c.close()


def _echo(conn: socket.socket) -> None:
    try:
        while data := conn.recv(4096):
            conn.sendall(data)
    except OSError:
        pass


def test_pass_swallow_and_reset(echo):
    proxy = Proxy("127.0.0.3", "127.0.0.1", [echo])
    try:
        c = socket.create_connection(("127.0.0.3", echo), timeout=2)
        c.sendall(b"hello")
        assert c.recv(10) == b"hello"
        proxy.set(up="swallow")  # a pulled cable: no error, nothing comes back
        c.sendall(b"lost")
        c.settimeout(0.3)
        with pytest.raises(TimeoutError):
            c.recv(10)
        proxy.heal()
        c.settimeout(2)
        c.sendall(b"again")
        assert c.recv(10) == b"again"
        proxy.set(down="reset")
        with pytest.raises((ConnectionResetError, ConnectionAbortedError)):
            c.sendall(b"x")
            c.recv(10)
            c.recv(10)
        c.close()
        proxy.heal()
        c = socket.create_connection(("127.0.0.3", echo), timeout=2)
        c.sendall(b"new")
        assert c.recv(10) == b"new"
        c.close()
    finally:
        proxy.close()


def _recv_exactly(c: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n and (chunk := c.recv(n - len(data))):
        data += chunk
    return data


@pytest.mark.parametrize("direction", ["up", "down"])
def test_hold_keeps_the_bytes_for_the_heal(echo, direction):
    """A pulled cable as TCP lives it: nothing arrives while it is out, and every byte sent
    meanwhile arrives once it is back, in order (swallow loses them)."""
    proxy = Proxy("127.0.0.3", "127.0.0.1", [echo])
    try:
        c = socket.create_connection(("127.0.0.3", echo), timeout=2)
        proxy.set(**{direction: "hold"})
        c.sendall(b"sent ")
        c.sendall(b"while out")
        c.settimeout(0.3)
        with pytest.raises(TimeoutError):
            c.recv(10)
        assert proxy.passed(echo)[1] == 0  # nothing came back through the proxy
        proxy.heal()
        c.settimeout(5)
        assert _recv_exactly(c, 14) == b"sent while out"
        # counted by the proxy's thread just after it sends them: the echo may be read first
        wait_for(lambda: proxy.passed(echo) == (14, 14), 5, "the proxy to count both ways")
        c.close()
    finally:
        proxy.close()
