"""Real pairs for tests and benchmarks: two sbs-node processes on 127.0.0.1 and 127.0.0.2.

Every wait polls a condition with a deadline; nothing sleeps for synchronisation.
"""
from __future__ import annotations

import fcntl
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sbs.node.config import load
from sbs.node.security import keygen
from sbs.tools.client import request

from tests.netproxy import Proxy

HOSTS = {"alpha": "127.0.0.1", "beta": "127.0.0.2"}
# with proxy=True each node's `peer` is a proxy in front of the other node, on an address of
# its own (the peer port must be the node's own port): alpha reaches beta via 127.0.0.4
PROXIES = {"alpha": "127.0.0.3", "beta": "127.0.0.4"}
_KEYS_CACHE: dict[str, Path] = {}


def wait_for(cond: Callable[[], Any], timeout: float, what: str, interval: float = 0.02) -> Any:
    """Poll `cond` until it returns something truthy; fail naming `what` at the deadline, with
    the logs of the nodes this process runs as they are then (a message built before the wait
    shows them as they were when it began)."""
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() >= deadline:
            logs = "".join(f"\n--- {n.name}'s log now:{n.tail_log(20)}" for n in _RUNNING)
            raise AssertionError(f"timed out after {timeout}s waiting for {what}{logs}")
        time.sleep(interval)


def _port_pool() -> range:
    """Ports below the kernel's ephemeral range: it never gives one of them to the local end
    of an outgoing connection. A port picked in that range could be taken by any process's
    connect (the tests' own STATUS requests, a node's DEALER, another test run) between the
    pick and the node's bind, and the node would stop with "cannot bind"."""
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    if low < 11024:
        return range(1024, 65000)  # no room below it: anywhere (the old way)
    return range(low - 10000, low - 3)


def _bindable(hosts: tuple[str, ...] | list[str], ports: range) -> bool:
    socks = []
    try:
        for host in hosts:
            for p in ports:
                t = socket.socket()
                socks.append(t)
                t.bind((host, p))
        return True
    except OSError:
        return False
    finally:
        for t in socks:
            t.close()


# A port free now may be taken before it is bound, or while a node that has it restarts, by
# a port another test process picks (the other xdist worker, another run on the machine): a
# node then stops with "cannot bind". So each pick is claimed for CLAIM_FOR seconds in a file
# every test process of this user shares (under an flock), and a claimed port is not picked.
CLAIM_FOR = 600.0
_CLAIMS = Path(tempfile.gettempdir()) / f"sbs-test-ports-{os.getuid()}.json"


def _claim(ports: range) -> bool:
    with open(os.open(_CLAIMS, os.O_RDWR | os.O_CREAT, 0o600), "r+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        now = time.time()
        try:
            claims = {int(k): t for k, t in json.loads(f.read() or "{}").items() if t > now}
        except (ValueError, AttributeError):
            claims = {}  # a torn or foreign file: start again
        if any(p in claims for p in ports):
            return False
        claims.update((p, now + CLAIM_FOR) for p in ports)
        f.seek(0)
        f.truncate()
        f.write(json.dumps(claims))
        return True


def free_port(host: str = "127.0.0.1") -> int:
    """A free port on `host`, outside the ephemeral range (see _port_pool), claimed."""
    pool = _port_pool()
    for _ in range(200):
        p = random.randrange(pool.start, pool.stop)
        if _bindable([host], range(p, p + 1)) and _claim(range(p, p + 1)):
            return p
    raise RuntimeError("no free port")


def free_port_triplet() -> int:
    """A port p such that p, p+1, p+2 are free on both loopback addresses and the proxies'
    (outside the ephemeral range, see _port_pool), claimed."""
    pool = _port_pool()
    for _ in range(200):
        base = random.randrange(pool.start, pool.stop - 2)
        if (_bindable([*HOSTS.values(), *PROXIES.values()], range(base, base + 3))
                and _claim(range(base, base + 3))):
            return base
    raise RuntimeError("no free port triplet")


def plain_config(root: Path) -> Any:
    """alpha's Config (CURVE off, its docs folder made) under `root`, on ports of its own: for
    a Node or a Syncer built in the test's process."""
    (root / "data/alpha/docs").mkdir(parents=True)
    return load(write_config(root, "alpha", free_port_triplet(), security={"curve": "false"}))


def make_keys(keydir: Path) -> None:
    keydir.mkdir(parents=True, exist_ok=True)
    for name in ("alpha", "beta", "stranger"):
        if name not in _KEYS_CACHE:
            cache = Path(tempfile.gettempdir()) / f"sbs-test-keys-{os.getuid()}"
            if not (cache / f"{name}.key_secret").exists():
                keygen(cache, name)
            _KEYS_CACHE[name] = cache
        for suffix in (".key", ".key_secret"):
            shutil.copy(_KEYS_CACHE[name] / f"{name}{suffix}", keydir / f"{name}{suffix}")


def write_config(root: Path, name: str, port: int, *, node: dict | None = None,
                 security: dict | None = None, email: dict | None = None,
                 folders: dict | None = None, sentinels: dict | None = None,
                 cluster: dict | None = None) -> Path:
    other = "beta" if name == "alpha" else "alpha"
    sections: dict[str, dict[str, Any]] = {
        "node": {"name": name, "local": HOSTS[name], "peer": HOSTS[other], "port": port,
                 "state_dir": f"state/{name}", "heartbeat": 0.2, "dead_after": 1.0,
                 "period": 2, "handover_timeout": 10, **(node or {})},
        "security": {"curve": "true", "secret_key": f"keys/{name}.key_secret",
                     "peer_public_key": f"keys/{other}.key", **(security or {})},
        "email": email or {},
        "folders": folders if folders is not None else {"docs": f"data/{name}/docs"},
        "sentinels": sentinels or {},
    }
    if cluster:
        sections["cluster"] = cluster
    lines = []
    for sec, kv in sections.items():
        lines.append(f"[{sec}]")
        lines += [f"{k} = {v}" for k, v in kv.items()]
        lines.append("")
    path = root / f"{name}.ini"
    path.write_text("\n".join(lines))
    return path


_RUNNING: list[NodeProc] = []  # nodes started by this process and not stopped since


class NodeProc:
    def __init__(self, config: Path):
        self.config = config
        self.cfg = load(config)
        self.name = self.cfg.name
        self.proc: subprocess.Popen | None = None
        self.log = config.parent / f"{self.name}.log"

    def start(self, *extra: str) -> NodeProc:
        self.logfh = open(self.log, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "sbs.node.cli", "start", "--config", str(self.config), *extra],
            stdout=self.logfh, stderr=subprocess.STDOUT,
        )
        self.running()
        return self

    def running(self) -> None:
        """Counted among the nodes whose logs a failed wait shows (start() says it)."""
        if self not in _RUNNING:
            _RUNNING.append(self)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def status(self, timeout: float = 1.0) -> dict | None:
        reply = request(self.cfg, "STATUS", timeout=timeout)
        return reply if reply and reply.get("status") == "ok" else None

    def state(self) -> str:
        """The node's state, or "stopped" when it does not answer within 2 s (a busy machine
        can hold a fresh CURVE handshake and the answer for a good part of a second)."""
        st = self.status(timeout=2.0)
        return st["state"] if st else "stopped"

    def wait_state(self, state: str, timeout: float = 15.0) -> dict:
        try:
            return wait_for(lambda: (st := self.status(0.5)) and st["state"] == state and st,
                            timeout, f"{self.name} to be {state}")
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{self.diagnosis()}") from None

    def diagnosis(self) -> str:
        """For a wait that failed: the log's tail, whether the process still runs, and if it
        does, where each of its threads is (the kernel's view, and Python's when the node has
        set up its SIGUSR1 stack dump: it writes the stacks to its log and goes on)."""
        if self.proc is None:
            return "never started"
        if (code := self.proc.poll()) is not None:
            return f"exited with {code}; log:{self.tail_log()}"
        lines = [f"pid {self.pid} still runs; its threads (state, kernel wait channel):"]
        for task in sorted(Path(f"/proc/{self.pid}/task").glob("*")):
            try:
                comm = (task / "comm").read_text().strip()
                st = (task / "stat").read_text().rsplit(")", 1)[1].split()[0]
                wchan = (task / "wchan").read_text().strip()
            except OSError:
                continue
            lines.append(f"  {task.name} {comm}: {st} {wchan}")
        size = self.log.stat().st_size if self.log.exists() else 0
        if _catches(self.pid, signal.SIGUSR1):
            os.kill(self.pid, signal.SIGUSR1)
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline and "most recent call first" not in (
                    _read_from(self.log, size)):
                time.sleep(0.05)
        return "\n".join(lines) + f"\nlog:{self.tail_log(80)}"

    def signal(self, sig: int) -> None:
        if self.proc and self.proc.poll() is None:
            os.kill(self.proc.pid, sig)

    def kill(self) -> None:
        self.signal(signal.SIGKILL)
        self.wait_exit(10)

    def wait_exit(self, timeout: float = 20.0) -> int:
        assert self.proc is not None
        code = self.proc.wait(timeout)
        self.logfh.close()
        return code

    def stop(self) -> None:
        if self in _RUNNING:
            _RUNNING.remove(self)
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        if self.proc and not self.logfh.closed:
            self.logfh.close()

    def tail_log(self, n: int = 15) -> str:
        try:
            return "\n" + "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""


def _catches(pid: int, sig: int) -> bool:
    """The process has a handler for `sig` (its SigCgt mask in /proc)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("SigCgt:"):
                return bool(int(line.split()[1], 16) >> (sig - 1) & 1)
    except OSError:
        pass
    return False


def _read_from(path: Path, offset: int) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            return f.read().decode(errors="replace")
    except OSError:
        return ""


class Pair:
    def __init__(self, root: Path, *, proxy: bool = False, **config: Any):
        self.root = root
        make_keys(root / "keys")
        self.port = free_port_triplet()
        per = {n: config.pop(n, {}) for n in HOSTS}
        self.nodes = {}
        self.proxies: dict[str, Proxy] = {}  # by the node the proxy stands in front of
        if proxy:
            ports = [self.port, self.port + 1, self.port + 2]
            for name, host in HOSTS.items():
                self.proxies[name] = Proxy(PROXIES[name], host, ports)
        for name in HOSTS:
            merged = {k: dict(v) if isinstance(v, dict) else v for k, v in config.items()}
            for sec, kv in per[name].items():
                merged.setdefault(sec, {}).update(kv)
            if proxy:
                other = "beta" if name == "alpha" else "alpha"
                merged.setdefault("node", {})["peer"] = PROXIES[other]
            self.nodes[name] = NodeProc(write_config(root, name, self.port, **merged))
        self.alpha, self.beta = self.nodes["alpha"], self.nodes["beta"]
        for name in HOSTS:
            self.folder(name)

    def folder(self, name: str, folder: str = "docs") -> Path:
        p = self.root / "data" / name / folder
        p.mkdir(parents=True, exist_ok=True)
        return p

    def start_both(self) -> Pair:
        """alpha primary, then beta secondary, and each sees the other so."""
        self.alpha.start()
        self.alpha.wait_state("primary")
        self.beta.start()
        self.beta.wait_state("secondary")
        wait_for(lambda: (st := self.alpha.status(0.5)) and st["peer_state"] == "secondary", 10,
                 "alpha to see beta as secondary")
        for name, proxy in self.proxies.items():
            # each node's own control connection is up (its pings pass both ways): a cut
            # made before would find a handshake half done and say nothing of the link
            wait_for(lambda p=proxy: min(p.passed(self.port)) > 2000, 10,
                     f"pings through the proxy before {name}")
        return self

    def cut(self, src: str, dst: str, mode: str = "swallow") -> None:
        """What `src` sends to `dst` is swallowed (or reset), on every connection: those `src`
        opened (through the proxy before `dst`) and those `dst` opened (the other proxy)."""
        self.proxies[dst].set(up=mode)
        self.proxies[src].set(down=mode)

    def heal(self) -> None:
        for proxy in self.proxies.values():
            proxy.heal()

    def primaries(self) -> list[str]:
        return [n for n, node in self.nodes.items() if node.state() == "primary"]

    def stop(self) -> None:
        for node in self.nodes.values():
            node.stop()
        for proxy in self.proxies.values():
            proxy.close()
