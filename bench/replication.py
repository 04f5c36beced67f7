"""Replication against rsync and the transport limit, in the same run on the same data.

Every SBS figure comes from a real pair (tests/pair.py: two sbs-node processes on 127.0.0.1
and 127.0.0.2, CURVE on, product defaults for period, heartbeat and dead_after). Its peers are
an rsync daemon on 127.0.0.1 serving the very folder alpha replicates (`rsync -a` pulls it into
a fresh target, as the secondary pulls from the primary) and, for the big file, rsync over ssh
(an sshd of its own on 127.0.0.1: the fair peer of an encrypted link). The transport limit is
bench/transport.py measured in the same run. Both copiers are timed from the same start on the
same state (see METHOD, stored in the JSON):

  small   initial sync of 10,000 x 4 KiB files (100 folders of 100): the clock starts as the
          primary's process is started (its first scan and hashing inside, as rsync's clock
          holds its daemon walking the tree) and stops when the secondary, started as soon as
          the primary says primary, reports synced; rsync and rsync --fsync beside it
  big     one 1 GiB file: the same initial sync, and the file appearing in a running pair
          (live), CURVE and plain TCP; rsync's daemon, --fsync and over ssh beside them
  latency change-to-replica for single small files (a create or an overwrite on alpha, beta's
          folder polled every 1 ms for the new content), in a near-empty tree and in a
          100,000-file tree; rsync's figure is a fresh whole-tree `rsync -a` run started right
          after the write: a cron job's or an lsyncd-style trigger's, not a connected watcher's
  tree    the 100,000 x 1 KiB initial sync (as small), then latency and the idle CPU of both
          nodes over 30 s of an idle, synced pair watching it

Every rep runs each copier once, each warmed the same way right before its clock (the source
read, then scratch files or pages written and freed); the order rotates from rep to rep. Every
figure is reported as median and range with the per-rep ratios.

    python bench/replication.py            # full: about 11-15 minutes
    python bench/replication.py --quick    # small sizes, a smoke run of a minute or two
    python bench/replication.py --profile  # SBS only, under py-spy: where the time goes

Figures go to bench/out/replication[-quick].json (--result NAME keeps a copy in
bench/results/); data lives under /tmp (--data) and is removed afterwards unless --keep.
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import itertools
import os
import platform
import pwd
import random
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import psutil
import xxhash
import zmq

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from sbs.node import protocol  # noqa: E402
from sbs.node.security import client, load_keys  # noqa: E402

from bench.common import (  # noqa: E402
    OUT,
    FilesystemError,
    add_common_args,
    filesystem_of,
    fresh_ext4,
    fs_record,
    provenance,
    spread,
    write_report,
)
from bench.transport import cipher_floor, round_trip, throughput  # noqa: E402
from tests.pair import NodeProc, Pair, wait_for  # noqa: E402

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30
# product defaults (node/config.py), not the fast test settings of tests/pair.py
NODE = {"period": 5, "heartbeat": 0.5, "dead_after": 1.5}
TARGETS = {
    "small_vs_rsync": "SBS initial sync of the small files no slower than the rsync daemon",
    "big_vs_rsync": "SBS 1 GiB faster than the rsync daemon",
    "big_memory_mb": 150,
    "latency_p50_ms": 25,
    "latency_p99_ms": 100,
}


@dataclass(frozen=True)
class Sizes:
    small_files: int
    small_size: int
    big_bytes: int
    tree_files: int
    latency_samples: int
    rsync_latency_samples: int
    idle_seconds: float
    reps_small: int
    reps_big: int
    reps_tree: int


FULL = Sizes(small_files=10_000, small_size=4 * KiB, big_bytes=GiB, tree_files=100_000,
             latency_samples=200, rsync_latency_samples=5, idle_seconds=30, reps_small=5,
             reps_big=3, reps_tree=3)
QUICK = Sizes(small_files=500, small_size=4 * KiB, big_bytes=64 * MiB, tree_files=5_000,
              latency_samples=30, rsync_latency_samples=3, idle_seconds=5, reps_small=1,
              reps_big=1, reps_tree=1)


def say(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, round(q * (len(s) - 1)))]


def ms(seconds: float) -> float:
    return round(seconds * 1e3, 2)


# ------------------------------------------------------------------------------ data


def make_files(root: Path, count: int, size: int, per_dir: int = 100) -> None:
    """`count` files of `size` random bytes, `per_dir` to a folder."""
    root.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        d = root / f"d{i // per_dir:04d}"
        if i % per_dir == 0:
            d.mkdir(exist_ok=True)
        (d / f"f{i:06d}.bin").write_bytes(os.urandom(size))


def kept_tree(data: Path, files: int) -> Path:
    """data/tree with `files` x 1 KiB (100 to a folder), made once and kept for the next run
    with the same --data (a marker says it is complete)."""
    src = data / "tree"
    if not data_ready(data, "tree", files, KiB):
        t0 = time.perf_counter()
        make_files(src, files, KiB)
        mark_ready(data, "tree", files, KiB)
        say(f"data: {files} x 1 KiB ({time.perf_counter() - t0:.1f} s)")
    return src


def data_ready(data: Path, name: str, count: int, size: int) -> bool:
    """Whether data/name holds `count` x `size` B from an earlier run (its marker says so).
    When not, the folder and every marker of it are removed: a marker left by a run of
    another size (a --quick run between two full ones) must not vouch for what is there."""
    if (data / f"{name}.{count}x{size}.done").exists():
        return True
    for stale in data.glob(f"{name}.*.done"):
        stale.unlink()
    shutil.rmtree(data / name, ignore_errors=True)
    return False


def mark_ready(data: Path, name: str, count: int, size: int) -> None:
    os.sync()
    (data / f"{name}.{count}x{size}.done").touch()


def make_big(root: Path, size: int) -> None:
    root.mkdir(parents=True, exist_ok=True)
    with open(root / "one.bin", "wb") as f:
        left = size
        while left:
            n = min(left, 16 * MiB)
            f.write(os.urandom(n))
            left -= n


def tree_digest(root: Path) -> dict[str, tuple]:
    """relpath -> (kind, size, mtime_ns, xxh3_128) for every file and folder under root."""
    out: dict[str, tuple] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        rel = os.path.relpath(dirpath, root)
        for d in dirnames:
            out[os.path.normpath(os.path.join(rel, d))] = ("dir",)
        for f in filenames:
            p = os.path.join(dirpath, f)
            st = os.lstat(p)
            h = xxhash.xxh3_128()
            with open(p, "rb") as fh:
                while chunk := fh.read(4 * MiB):
                    h.update(chunk)
            out[os.path.normpath(os.path.join(rel, f))] = ("file", st.st_size, st.st_mtime_ns,
                                                           h.hexdigest())
    return out


def same_tree(src: Path, dst: Path) -> str:
    """'' when dst is an exact copy of src (content, size, mtime), else what differs."""
    a, b = tree_digest(src), tree_digest(dst)
    missing = sorted(set(a) - set(b))
    extra = sorted(set(b) - set(a))
    wrong = sorted(p for p in set(a) & set(b) if a[p] != b[p])
    if not (missing or extra or wrong):
        return ""
    return (f"{len(missing)} missing {missing[:3]}, {len(extra)} extra {extra[:3]}, "
            f"{len(wrong)} differ {wrong[:3]}")


def check_exact(src: Path, dst: Path) -> bool:
    if diff := same_tree(src, dst):
        say(f"  REPLICA DIFFERS: {diff}")
        return False
    return True


def drop_dirty() -> None:
    """Flush what the previous run left dirty, so no run pays for another's writeback."""
    os.sync()


# ------------------------------------------------------------------------------ rsync


def end_process(proc: subprocess.Popen) -> None:
    """SIGTERM, then SIGKILL after 10 s: a server the bench started is gone when it returns."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


class RsyncDaemon:
    """`rsync --daemon` on 127.0.0.1 serving each dataset as a read-only module."""

    def __init__(self, workdir: Path, modules: dict[str, Path]):
        workdir.mkdir(parents=True, exist_ok=True)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        conf = ["use chroot = no", "uid = 0", "gid = 0", "numeric ids = yes",
                f"pid file = {workdir / 'rsyncd.pid'}", f"log file = {workdir / 'rsyncd.log'}",
                ""]
        for name, path in modules.items():
            conf += [f"[{name}]", f"path = {path}", "read only = yes", ""]
        (workdir / "rsyncd.conf").write_text("\n".join(conf))
        self.proc = subprocess.Popen(
            ["rsync", "--daemon", "--no-detach", f"--config={workdir / 'rsyncd.conf'}",
             f"--port={self.port}", "--address=127.0.0.1"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for(self._listening, 10, "the rsync daemon to listen")

    def _listening(self) -> bool:
        with socket.socket() as s:
            return s.connect_ex(("127.0.0.1", self.port)) == 0

    def url(self, module: str) -> str:
        return f"rsync://127.0.0.1:{self.port}/{module}/"

    def stop(self) -> None:
        end_process(self.proc)

    def pull(self, module: str, dest: Path, *extra: str) -> dict[str, Any]:
        """`rsync -a` from the daemon into dest; seconds, and peak RSS of both rsync ends."""
        dest.mkdir(parents=True, exist_ok=True)
        daemon = psutil.Process(self.proc.pid)
        sampler = RssSampler(lambda: [c.pid for c in daemon.children()])
        reaped0 = daemon.cpu_times()
        load1 = os.getloadavg()[0]
        t0 = time.perf_counter()
        proc = subprocess.Popen(["rsync", "-a", *extra, self.url(module), f"{dest}/"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        _, status, usage = os.wait4(proc.pid, 0)
        dt = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        sampler.stop()
        if proc.returncode != 0:
            raise RuntimeError(f"rsync failed ({proc.returncode}): {proc.stderr.read()[:500]!r}")
        proc.stderr.close()
        # the daemon's side ran in a child it forked for this connection: its CPU is in the
        # daemon's reaped-children times once the daemon has waited for it
        wait_for(lambda: not daemon.children(), 10, "the rsync daemon to reap its child")
        reaped = daemon.cpu_times()
        daemon_cpu = (reaped.children_user + reaped.children_system
                      - reaped0.children_user - reaped0.children_system)
        return {"seconds": round(dt, 4), "load1_before": load1,
                "client_cpu_s": round(usage.ru_utime + usage.ru_stime, 2),
                "daemon_cpu_s": round(daemon_cpu, 2),
                "client_sys_s": round(usage.ru_stime, 2),
                "client_peak_mb": round(usage.ru_maxrss / 1024, 1),
                "daemon_peak_mb_sampled": round(sampler.peak / MiB, 1)}


class RssSampler:
    """The largest RSS seen among `pids()` (sampled every 10 ms, summed per sample)."""

    def __init__(self, pids: Callable[[], list[int]]):
        self.pids, self.peak = pids, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.01):
            total = 0
            with contextlib.suppress(psutil.Error):
                for pid in self.pids():
                    with contextlib.suppress(psutil.Error):
                        total += psutil.Process(pid).memory_info().rss
            self.peak = max(self.peak, total)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


class SshPeer:
    """rsync over ssh, the fair peer of an encrypted link: an sshd of the system's
    openssh-server on 127.0.0.1 (a port of its own, a temporary host key, one authorized key,
    run as the current user), and `rsync -a -e ssh` pulling from it as the secondary pulls
    from the primary."""

    @staticmethod
    def missing() -> str:
        """Why this peer cannot run here ('' when it can)."""
        if shutil.which("rsync") is None:
            return "rsync is not installed (Debian: apt-get install rsync)"
        if SshPeer.sshd() is None:
            return "sshd is not installed (Debian: apt-get install openssh-server)"
        for tool in ("ssh", "ssh-keygen"):
            if shutil.which(tool) is None:
                return f"{tool} is not installed (Debian: apt-get install openssh-client)"
        return ""

    @staticmethod
    def sshd() -> str | None:
        return shutil.which("sshd") or next(
            (p for p in ("/usr/sbin/sshd", "/usr/local/sbin/sshd") if os.access(p, os.X_OK)),
            None)

    def __init__(self, workdir: Path):
        workdir.mkdir(parents=True, exist_ok=True)
        self.workdir = workdir
        for key in ("host_key", "client_key"):
            (workdir / key).unlink(missing_ok=True)
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f",
                            str(workdir / key)], check=True, stdout=subprocess.DEVNULL)
        (workdir / "authorized_keys").write_text((workdir / "client_key.pub").read_text())
        if os.geteuid() == 0:
            # sshd run by root insists on its privilege separation folder (Debian's service
            # creates it at boot; a machine that never started sshd has none)
            Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        conf = [f"Port {self.port}", "ListenAddress 127.0.0.1",
                f"HostKey {workdir / 'host_key'}", f"PidFile {workdir / 'sshd.pid'}",
                f"AuthorizedKeysFile {workdir / 'authorized_keys'}",
                "PasswordAuthentication no", "KbdInteractiveAuthentication no", "UsePAM no",
                "PermitRootLogin prohibit-password", "StrictModes no", "PrintMotd no",
                "LogLevel ERROR"]
        (workdir / "sshd_config").write_text("\n".join(conf) + "\n")
        self.log = workdir / "sshd.log"
        with open(self.log, "wb") as log:  # the child keeps its own copy of the descriptor
            self.proc = subprocess.Popen(
                [str(self.sshd()), "-D", "-e", "-f", str(workdir / "sshd_config")],
                stdout=subprocess.DEVNULL, stderr=log)
        wait_for(self._listening, 10, f"sshd to listen ({self.log})")
        self.user = pwd.getpwuid(os.getuid()).pw_name

    def _listening(self) -> bool:
        if self.proc.poll() is not None:
            raise RuntimeError(f"sshd exited: {self.log.read_text(errors='replace')[-500:]}")
        with socket.socket() as s:
            return s.connect_ex(("127.0.0.1", self.port)) == 0

    def stop(self) -> None:
        end_process(self.proc)

    def pull(self, src: Path, dest: Path, cipher: str) -> dict[str, Any]:
        """`rsync -a -e 'ssh -c cipher'` from src into dest; seconds and CPU of both ends (the
        client's includes its ssh; the server's is sshd's reaped children: its per-connection
        processes and the rsync they ran)."""
        dest.mkdir(parents=True, exist_ok=True)
        ssh = shlex.join([
            "ssh", "-F", "/dev/null", "-i", str(self.workdir / "client_key"),
            "-p", str(self.port), "-c", cipher, "-o", "BatchMode=yes",
            "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
            "-o", "Compression=no", "-o", "LogLevel=ERROR"])
        server = psutil.Process(self.proc.pid)
        reaped0 = server.cpu_times()
        load1 = os.getloadavg()[0]
        t0 = time.perf_counter()
        proc = subprocess.Popen(["rsync", "-a", "-e", ssh, f"{self.user}@127.0.0.1:{src}/",
                                 f"{dest}/"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        _, status, usage = os.wait4(proc.pid, 0)
        dt = time.perf_counter() - t0
        if os.waitstatus_to_exitcode(status) != 0:
            raise RuntimeError(f"rsync over ssh failed: {proc.stderr.read()[:500]!r}")
        proc.stderr.close()
        wait_for(lambda: not server.children(), 10, "sshd to reap its session")
        reaped = server.cpu_times()
        return {"seconds": round(dt, 4), "load1_before": load1, "cipher": cipher,
                "client_cpu_s": round(usage.ru_utime + usage.ru_stime, 2),
                "daemon_cpu_s": round(reaped.children_user + reaped.children_system
                                      - reaped0.children_user - reaped0.children_system, 2),
                "client_peak_mb": round(usage.ru_maxrss / 1024, 1)}


# ------------------------------------------------------------------------------ SBS


def proc_status(pid: int) -> dict[str, float]:
    """VmHWM (peak RSS) and VmRSS of a live process, in MB."""
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmHWM", "VmRSS"):
                out[key] = round(int(value.split()[0]) / 1024, 1)
    return out


def thread_cpu(pid: int) -> dict[str, float]:
    """User and system CPU seconds per thread name: libzmq names its I/O thread ZMQbg/IO/0
    (TCP, CURVE), the node its own threads (sbs-syncer, sbs-lane_0, sbs-blobs, ...: node/run.py);
    threads named by neither, and a node before 771a36e, carry the interpreter's name."""
    out: dict[str, float] = collections.defaultdict(float)
    tick = os.sysconf("SC_CLK_TCK")
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):
            comm = (task / "comm").read_text().strip()
            fields = (task / "stat").read_text().rpartition(")")[2].split()
            out[f"{comm} user"] += int(fields[11]) / tick
            out[f"{comm} sys"] += int(fields[12]) / tick
    # the whole process, threads that have exited meanwhile included (a fetch's writer thread)
    with contextlib.suppress(OSError):
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
        out["process user"], out["process sys"] = int(fields[11]) / tick, int(fields[12]) / tick
    return dict(out)


def cpu_delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """Per-thread-name deltas; `total` is the whole process's (exited threads included) when
    known, else the sum over the threads alive at the end."""
    d = {k: round(v - before.get(k, 0.0), 2) for k, v in after.items()}
    d = {k: v for k, v in d.items() if v}
    proc = [v for k, v in d.items() if k.startswith("process ")]
    threads = sum(v for k, v in d.items() if not k.startswith("process "))
    d["total"] = round(sum(proc), 2) if proc else round(threads, 2)
    return d


class Profiler:
    """py-spy record on a live pid (raw collapsed stacks), stopped with SIGINT."""

    native = False
    MISSING = "replication.py --profile: py-spy is not installed (pip install py-spy)"

    @staticmethod
    def binary() -> Path | None:
        spy = Path(sys.executable).with_name("py-spy")
        if spy.exists():
            return spy
        found = shutil.which("py-spy")
        return Path(found) if found else None

    def __init__(self, pid: int, out: Path):
        self.out = out
        out.parent.mkdir(parents=True, exist_ok=True)  # a fresh clone has no bench/out/
        out.unlink(missing_ok=True)
        spy = self.binary()
        if spy is None:
            raise SystemExit(self.MISSING)
        self.proc = subprocess.Popen(
            [str(spy), "record", "--pid", str(pid), "--rate", "250", "--format", "raw",
             *(["--native"] if self.native else ["--nonblocking"]), "--output", str(out)],
            stdout=subprocess.DEVNULL, stderr=open(out.with_suffix(".log"), "wb"))

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


def summarize_profile(path: Path, top: int = 18) -> dict[str, Any]:
    """Self and inclusive sample shares per function (file:line dropped) from raw stacks."""
    self_t: collections.Counter[str] = collections.Counter()
    incl: collections.Counter[str] = collections.Counter()
    total = 0
    if not path.exists():
        return {"samples": 0}
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = stack.split(";")
        names = []
        for fr in frames:
            func, _, where = fr.partition(" (")
            file = where.rsplit(":", 1)[0].rstrip(")")
            file = file.split("site-packages/")[-1].split(f"{REPO}/")[-1]
            names.append(f"{func} ({file})")
        total += n
        if names:
            self_t[names[-1]] += n
            for name in set(names):
                incl[name] += n

    def share(c: collections.Counter[str]) -> list[tuple[str, float]]:
        return [(k, round(100 * v / total, 1)) for k, v in c.most_common(top)]

    return {"samples": total, "self_pct": share(self_t),
            "inclusive_pct": share(incl)}


def caught_up(repl: dict[str, Any], seq: int | None) -> bool:
    """The secondary's status says it applied manifest `seq` and has nothing pending."""
    return seq is not None and repl["synced"] and repl["applied"] >= seq


def tell_error(repl: dict[str, Any], last: str) -> str:
    """Print the secondary's replication error once each time it changes; the error now."""
    if repl.get("error") and repl["error"] != last:
        say(f"  beta reports: {repl['error']}")
        return repl["error"]
    return last


class StatusPoller:
    """STATUS over one long-lived DEALER per node. sbs.tools.client.request opens a fresh CURVE
    socket per call: polled every 20 ms, that handshake plus the node's ZAP check would steal
    CPU from the node under test on a 2-core machine."""

    def __init__(self, node: NodeProc):
        self.node, self.sock = node, None

    def _open(self) -> zmq.Socket:
        cfg = self.node.cfg
        keys = load_keys(cfg)
        sock = zmq.Context.instance().socket(zmq.DEALER)
        sock.linger = 0
        sock.setsockopt(zmq.MAXMSGSIZE, protocol.MAX_REPLY_IN)
        client(sock, keys, None if keys is None else keys.public)
        sock.connect(f"tcp://{cfg.local}:{cfg.control_port}")
        return sock

    def status(self, timeout: float = 0.5) -> dict | None:
        if self.sock is None:
            self.sock = self._open()
        self.sock.send_multipart(protocol.encode("STATUS", {}))
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            if not self.sock.poll(left * 1000):
                break
            msg = protocol.decode(self.sock.recv_multipart(), expect=("REPLY",))
            if not isinstance(msg, protocol.Bad) and msg.body.get("status") == "ok":
                return msg.body
        self.close()  # Lazy Pirate: a lost reply leaves the socket out of step
        return None

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close(linger=0)
            self.sock = None


class SbsRun:
    """A fresh pair: alpha replicating `src`, beta's copy in a fresh folder under `root`."""

    def __init__(self, root: Path, src: Path, *, curve: bool = True,
                 profile_dir: Path | None = None, tag: str = ""):
        self.root, self.src, self.dst = root, src, root / "replica"
        root.mkdir(parents=True, exist_ok=True)
        self.dst.mkdir()
        self.pair = Pair(root, node=dict(NODE),
                         security={"curve": "true" if curve else "false"},
                         alpha={"folders": {"docs": str(src)}},
                         beta={"folders": {"docs": str(self.dst)}})
        self.profile_dir, self.tag = profile_dir, tag
        self.profilers: dict[str, Profiler] = {}
        self.polls = {n: StatusPoller(node) for n, node in self.pair.nodes.items()}

    def __enter__(self) -> SbsRun:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_profilers()
        for poll in self.polls.values():
            poll.close()
        self.pair.stop()
        shutil.rmtree(self.root, ignore_errors=True)

    def _profile(self, name: str) -> None:
        if self.profile_dir is not None:
            node = self.pair.nodes[name]
            wait_for(lambda: node.status(0.5), 20, f"{name} to answer before profiling")
            self.profilers[name] = Profiler(
                node.pid, self.profile_dir / f"profile-{self.tag}-{name}.txt")

    def stop_profilers(self) -> dict[str, Any]:
        out = {}
        for name, p in self.profilers.items():
            p.stop()
            out[name] = summarize_profile(p.out)
        self.profilers = {}
        return out

    def start_alpha(self) -> dict[str, Any]:
        t0 = time.perf_counter()
        self.pair.alpha.start()
        st = wait_for(lambda: (s := self.polls["alpha"].status()) and s["state"] == "primary"
                      and s["replication"]["ready"] and s, 600,
                      f"alpha primary with its first scan done{self.pair.alpha.tail_log()}",
                      interval=0.05)
        return {"alpha_ready_s": round(time.perf_counter() - t0, 3),
                "seq": st["replication"]["seq"]}

    def _look_at_beta(self, seq: int | None, last_error: str) -> tuple[bool, str, bool]:
        """One look at beta: (caught up with `seq`, its last error, secondary yet); raises
        when beta has exited."""
        st = self.polls["beta"].status()
        secondary = bool(st) and st["state"] == "secondary"
        if secondary:
            if caught_up(st["replication"], seq):
                return True, last_error, True
            last_error = tell_error(st["replication"], last_error)
        if self.pair.beta.proc.poll() is not None:
            raise RuntimeError(f"beta exited{self.pair.beta.tail_log()}")
        return False, last_error, secondary

    def sync_beta(self, seq: int, timeout: float = 900,
                  warm: Callable[[], None] | None = None) -> dict[str, Any]:
        """Start beta and time it to synced (applied >= seq); peak memory of both nodes.
        `warm` runs right before the clock starts (see warm_page_cache)."""
        if warm is not None:
            warm()  # before the profiler starts: its 2 GiB are not the pair's work
        self._profile("alpha")
        beta = self.pair.beta
        load1 = os.getloadavg()[0]
        alpha_cpu = thread_cpu(self.pair.alpha.pid)
        t0 = time.perf_counter()
        beta.start()
        t_secondary = None
        last_error = ""
        deadline = t0 + timeout
        while True:
            done, last_error, seen = self._look_at_beta(seq, last_error)
            now = time.perf_counter()
            if seen and t_secondary is None:
                t_secondary = now - t0
                if self.profile_dir is not None and "beta" not in self.profilers:
                    self._profile("beta")
            if done:
                break
            if now > deadline:
                raise RuntimeError(f"beta not synced after {timeout}s{beta.tail_log()}")
            time.sleep(0.02)
        seconds = time.perf_counter() - t0
        mem = {n: proc_status(node.pid) for n, node in self.pair.nodes.items()}
        cpu = {"alpha": cpu_delta(alpha_cpu, thread_cpu(self.pair.alpha.pid)),
               "beta": cpu_delta({}, thread_cpu(beta.pid))}
        return {"seconds": round(seconds, 4), "load1_before": load1, "cpu_s": cpu,
                "to_secondary_s": round(t_secondary or 0, 3),
                "after_secondary_s": round(seconds - (t_secondary or 0), 4),
                "alpha_mem_mb": mem["alpha"], "beta_mem_mb": mem["beta"]}

    def timed_initial_sync(self, timeout: float = 900, together: bool = False,
                           rewarm: Callable[[], None] | None = None) -> dict[str, Any]:
        """An initial sync timed as rsync's is: the clock starts as alpha's process is started,
        so alpha's first scan and hashing are inside it (rsync's includes its daemon walking
        the tree). beta is started as soon as alpha says primary, as an operator starting the
        pair would (a secondary asking before the first scan is done is told to retry), and
        the clock stops when beta reports synced with applied >= alpha's seq after that scan.
        `together`: beta is started right after alpha, as two services started at once (a
        node that hears its peer decides by the rule without waiting out dead_after).
        `rewarm` (not with `together`): run right before beta is started, with the clock
        stopped while it runs (its time is kept as `rewarm_paused_s`, outside every figure
        after it). beta's copy then writes into memory as warm as the peers' copies, which
        start right after their warm-up: on this VM pages freed more than a second or so
        earlier are back with the host (warm_page_cache), and 1 GiB written into them costs
        ~0.5 s more system time than right after a warm-up, which the 1.5 s that alpha waits
        alone put on beta's copy alone.
        The breakdown (alpha primary, alpha's scan done, beta started, beta secondary) is kept
        beside the total."""
        alpha, beta = self.pair.alpha, self.pair.beta
        load1 = os.getloadavg()[0]
        marks: dict[str, float] = {}
        seq: int | None = None
        last_error = ""
        t0 = time.perf_counter()
        alpha.start()
        if together:
            marks["beta_started_s"] = time.perf_counter() - t0
            beta.start()
        next_alpha = t0
        while True:
            now = time.perf_counter()
            if seq is None and now >= next_alpha:
                next_alpha = now + 0.05  # alpha is scanning: ask it less often than beta
                st = self.polls["alpha"].status()
                now = time.perf_counter()
                if st and st["state"] == "primary":
                    marks.setdefault("alpha_primary_s", now - t0)
                    if st["replication"]["ready"]:
                        marks["alpha_ready_s"], seq = now - t0, st["replication"]["seq"]
            if "alpha_primary_s" in marks and "beta_started_s" not in marks:
                self._profile("alpha")
                if rewarm is not None:
                    paused = time.perf_counter()
                    rewarm()
                    marks["rewarm_paused_s"] = time.perf_counter() - paused
                    t0 += marks["rewarm_paused_s"]
                marks["beta_started_s"] = time.perf_counter() - t0
                beta.start()
            if "beta_started_s" in marks:
                done, last_error, seen = self._look_at_beta(seq, last_error)
                now = time.perf_counter()
                if seen and "beta_secondary_s" not in marks:
                    marks["beta_secondary_s"] = now - t0
                    if self.profile_dir is not None:
                        self._profile("beta")
                if done:
                    break
            if alpha.proc.poll() is not None:
                raise RuntimeError(f"alpha exited{alpha.tail_log()}")
            if now - t0 > timeout:
                raise RuntimeError(f"beta not synced after {timeout}s{beta.tail_log()}")
            time.sleep(0.02)
        seconds = time.perf_counter() - t0
        mem = {n: proc_status(node.pid) for n, node in self.pair.nodes.items()}
        cpu = {n: cpu_delta({}, thread_cpu(node.pid)) for n, node in self.pair.nodes.items()}
        out = {"seconds": round(seconds, 4), "load1_before": load1, "cpu_s": cpu,
               "alpha_mem_mb": mem["alpha"], "beta_mem_mb": mem["beta"],
               **{k: round(v, 3) for k, v in marks.items()}}
        out["from_beta_start_s"] = round(seconds - marks["beta_started_s"], 4)
        out["after_beta_secondary_s"] = round(seconds - marks["beta_secondary_s"], 4)
        return out

    def settle(self, hold: float = 2.0, timeout: float = 60) -> dict[str, Any]:
        """Wait until one node is primary and the other a synced secondary, unchanged for
        `hold` seconds. Returns the roles and whether they differ from the start (a takeover
        or a split brain happened: a finding in itself)."""
        deadline = time.monotonic() + timeout
        stable_since, last = None, None
        while time.monotonic() < deadline:
            st = {n: poll.status() for n, poll in self.polls.items()}
            roles = None
            if all(st.values()):
                prim = [n for n, s in st.items() if s["state"] == "primary"]
                sec = [n for n, s in st.items() if s["state"] == "secondary"]
                if len(prim) == 1 and len(sec) == 1:
                    r = st[sec[0]]["replication"]
                    if r["synced"] and r["applied"] >= st[prim[0]]["replication"]["seq"]:
                        roles = (prim[0], sec[0])
            if roles is not None and roles == last:
                if time.monotonic() - stable_since >= hold:
                    epochs = {n: s["epoch"] for n, s in st.items()}
                    return {"primary": roles[0], "secondary": roles[1], "epochs": epochs,
                            "roles_changed": roles[0] != "alpha" or max(epochs.values()) > 1}
            else:
                stable_since, last = time.monotonic(), roles
            time.sleep(0.1)
        raise RuntimeError(f"the pair did not settle in {timeout}s{self.pair.alpha.tail_log()}"
                           f"{self.pair.beta.tail_log()}")

    def folder_of(self, name: str) -> Path:
        return self.src if name == "alpha" else self.dst

    def cpu_seconds(self) -> dict[str, float]:
        out = {}
        for name, node in self.pair.nodes.items():
            t = psutil.Process(node.pid).cpu_times()
            out[name] = t.user + t.system
        return out


def initial_sync(root: Path, src: Path, *, curve: bool = True, profile_dir: Path | None = None,
                 tag: str = "", warm: Callable[[], None] | None = None,
                 then: Callable[[SbsRun, dict[str, Any]], dict[str, Any]] | None = None,
                 together: bool = False, rewarm: Callable[[], None] | None = None
                 ) -> dict[str, Any]:
    """A fresh pair's initial sync of `src`, timed from alpha's start (timed_initial_sync).
    `warm` runs right before the clock starts, as it does before rsync's, and `rewarm` (the
    scratch part of it, never touching `src`) right before beta is started, with the clock
    stopped; `then` runs on the settled pair afterwards (latency and idle in the tree
    scenario) and adds to the result."""
    drop_dirty()
    with SbsRun(root, src, curve=curve, profile_dir=profile_dir, tag=tag) as run:
        if warm is not None:
            warm()
        result = run.timed_initial_sync(together=together,
                                        rewarm=None if together else rewarm)
        result["roles"] = roles = run.settle()
        # the peak read again once the pair has settled: the primary records the snapshot's
        # acknowledgement in its journal after the copy is done, and that memory counts too
        for n, node in run.pair.nodes.items():
            result[f"{n}_mem_mb"]["VmHWM_settled"] = proc_status(node.pid)["VmHWM"]
        if then is None and (profile := run.stop_profilers()):
            result["profile"] = profile
        if roles["roles_changed"]:
            say(f"  ROLES CHANGED after the initial sync: {roles} (see {run.root}/*.log)")
        if then is not None:
            result.update(then(run, roles))
        result["exact"] = check_exact(src, run.dst)
    return result


# ------------------------------------------------------------------------------ latency


def peak_mb(result: dict[str, Any], node: str) -> float:
    """A node's peak memory in one SBS run: VmHWM once the pair had settled (runs before that
    reading was added have only the one taken when the copy was done)."""
    mem = result[f"{node}_mem_mb"]
    return mem.get("VmHWM_settled", mem["VmHWM"])


def latency_samples(src: Path, dst: Path, n: int) -> dict[str, Any]:
    """Write one small file on alpha (alternately a new file and an overwrite), poll beta's
    copy every 1 ms until it has the new content."""
    lat_src, lat_dst = src / "_latency", dst / "_latency"
    wait_for(lat_dst.is_dir, 30, "the latency folder on beta")
    samples: dict[str, list[float]] = {"create": [], "overwrite": []}
    lost = in_a_row = 0
    for i in range(n):
        if in_a_row >= 3:
            say("  3 samples in a row never arrived: giving up on this series")
            break
        kind = "create" if i % 2 == 0 or i < 2 else "overwrite"
        name = f"s{i:04d}.txt" if kind == "create" else f"s{random.randrange(0, i, 2):04d}.txt"
        content = f"sample {i} {os.urandom(12).hex()}\n".encode()
        target = lat_dst / name
        t0 = time.perf_counter()
        with open(lat_src / name, "wb") as f:
            f.write(content)
        deadline = t0 + 10
        while True:
            try:
                if target.read_bytes() == content:
                    samples[kind].append(time.perf_counter() - t0)
                    in_a_row = 0
                    break
            except FileNotFoundError:
                pass
            if time.perf_counter() > deadline:
                lost += 1
                in_a_row += 1
                break
            time.sleep(0.001)
        time.sleep(random.uniform(0.005, 0.02))  # separate samples; no batching across them
    every = samples["create"] + samples["overwrite"] or [float("nan")]
    out = {"samples": len(every), "timed_out": lost,
           "p50_ms": ms(statistics.median(every)), "p90_ms": ms(pct(every, 0.90)),
           "p99_ms": ms(pct(every, 0.99)), "max_ms": ms(max(every)),
           "min_ms": ms(min(every))}
    for kind, vals in samples.items():
        if vals:
            out[f"{kind}_p50_ms"] = ms(statistics.median(vals))
    return out


# What the rsync latency figure is, said wherever it is printed or stored: SBS's figure is a
# connected watcher's, rsync has none; a fresh whole-tree run per change is what a cron job or
# an lsyncd-style trigger (with no delay; lsyncd waits 15 s by default) gets.
RSYNC_TRIGGER_PEER = ("a fresh whole-tree `rsync -a` started right after each change, as a "
                      "cron job or an lsyncd-style trigger with no delay would run it; not a "
                      "connected watcher like SBS, so not like for like")
# stored in every JSON, so a figure carries how it was taken
METHOD = {
    "sbs_initial_sync_clock": "from starting the primary's process (its first scan and hashing "
                              "included) until the secondary reports synced with every change "
                              "of that scan applied; the secondary is started as soon as the "
                              "primary says primary, after the scratch part of the warm-up "
                              "is run again with the clock stopped (rewarm_paused_s: pages "
                              "freed a second or more before are slow to write into again on "
                              "this VM, and the primary waits dead_after alone first)",
    "sbs_initial_together_clock": "the same, with both nodes started at once (the primary "
                                  "hears its peer and does not wait out dead_after alone)",
    "rsync_clock": "from starting the rsync client until it exits; the daemon (or sshd) is "
                   "already running and walks the source inside that time",
    "warm_up": "right before every clock, for every copier alike: the source read once, then "
               "as many scratch files as the source created and deleted (small, tree) or 2 x "
               "its size written and deleted (big)",
    "order": "each rep runs every copier once; the order rotates by one from rep to rep",
    "ratios": "SBS / peer, of the medians and rep by rep (seconds: below 1 is SBS faster; "
              "MB/s: above 1 is)",
    "latency_peer": RSYNC_TRIGGER_PEER,
}


def rsync_latency(daemon: RsyncDaemon, module: str, src: Path, dest: Path,
                  n: int) -> dict[str, Any]:
    """One small write on the source, then one `rsync -a` pull of the whole tree (it must
    walk both trees every time)."""
    daemon.pull(module, dest)  # bring the target up to date first
    (src / "_rsync_latency").mkdir(exist_ok=True)
    vals = []
    for i in range(n):
        (src / "_rsync_latency" / f"r{i}.txt").write_bytes(os.urandom(40))
        vals.append(daemon.pull(module, dest)["seconds"])
    shutil.rmtree(src / "_rsync_latency")
    return {"peer": RSYNC_TRIGGER_PEER, "samples": n, "p50_ms": ms(statistics.median(vals)),
            "min_ms": ms(min(vals)), "max_ms": ms(max(vals))}


# ------------------------------------------------------------------------------ scenarios


def ratio(a: float, b: float) -> float:
    return round(a / b, 3) if b else float("nan")


def run_reps(reps: int, copiers: dict[str, Callable[[int], dict[str, Any]]]
             ) -> dict[str, list[dict[str, Any]]]:
    """Every rep runs each copier once, each warmed the same way right before its clock. The
    order rotates by one each rep (two copiers: A B, B A, A B, ...), so no copier always goes
    first or always follows the same other: this VM drifts within a run."""
    results: dict[str, list[dict[str, Any]]] = {name: [] for name in copiers}
    names = list(copiers)
    for rep in range(reps):
        k = rep % len(names)
        order = names[k:] + names[:k]
        say(f" rep {rep + 1}/{reps}: {', '.join(order)}")
        for position, name in enumerate(order):
            r = copiers[name](rep)
            r["rep"], r["position"] = rep, position
            results[name].append(r)
    return results


def compare(ours: list[dict[str, Any]], peer: list[dict[str, Any]], key: str) -> dict[str, Any]:
    """SBS / peer of `key` (seconds: below 1 is SBS faster; MB/s: above 1 is), as the ratio of
    the medians and rep by rep (the two ran in the same rep, one after the other)."""
    if not ours or not peer:
        return {}
    per_rep = [ratio(x[key], y[key]) for x, y in zip(ours, peer, strict=False)]
    return {"of": key,
            "ratio_of_medians": ratio(statistics.median(x[key] for x in ours),
                                      statistics.median(y[key] for y in peer)),
            "per_rep": per_rep, "per_rep_spread": spread(per_rep)}


def tell(name: str, r: dict[str, Any]) -> None:
    """One line per timed copy."""
    extra = ""
    if "alpha_ready_s" in r:
        extra = (f"  (alpha's scan done at {r['alpha_ready_s']:.2f} s, beta started at "
                 f"{r['beta_started_s']:.2f} s, secondary at {r['beta_secondary_s']:.2f} s)")
    mbps = f"  {r['MBps']:.0f} MB/s" if "MBps" in r else ""
    say(f"  {name:22} {r['seconds']:.3f} s{mbps}{extra}")


def rsync_copier(daemon: RsyncDaemon, module: str, src: Path, dest: Path,
                 warm: Callable[[], None], *extra: str, check: bool = True,
                 size_mb: float | None = None) -> Callable[[int], dict[str, Any]]:
    def once(rep: int) -> dict[str, Any]:
        target = dest.with_name(f"{dest.name}-{rep}")
        drop_dirty()
        warm()
        r = daemon.pull(module, target, *extra)
        if check and (diff := same_tree(src, target)):
            raise RuntimeError(f"rsync copy differs: {diff}")
        shutil.rmtree(target)
        if size_mb is not None:
            r["MBps"] = round(size_mb / r["seconds"], 1)
        return r
    return once


def ssh_copier(ssh: SshPeer, src: Path, dest: Path, warm: Callable[[], None], cipher: str,
               size_mb: float) -> Callable[[int], dict[str, Any]]:
    def once(rep: int) -> dict[str, Any]:
        target = dest.with_name(f"{dest.name}-{rep}")
        drop_dirty()
        warm()
        r = ssh.pull(src, target, cipher)
        if diff := same_tree(src, target):
            raise RuntimeError(f"rsync over ssh copy differs: {diff}")
        shutil.rmtree(target)
        r["MBps"] = round(size_mb / r["seconds"], 1)
        return r
    return once


def sbs_copier(runs: Path, tag: str, src: Path, warm: Callable[[], None], *, curve: bool = True,
               size_mb: float | None = None, last_rep: int = -1,
               then: Callable[[SbsRun, dict[str, Any]], dict[str, Any]] | None = None,
               profile_dir: Path | None = None, together: bool = False,
               rewarm: Callable[[], None] | None = None
               ) -> Callable[[int], dict[str, Any]]:
    def once(rep: int) -> dict[str, Any]:
        s = initial_sync(runs / f"{tag}-{rep}", src, curve=curve, warm=warm,
                         then=then if rep == last_rep else None, profile_dir=profile_dir,
                         tag=tag, together=together, rewarm=rewarm)
        if not s["exact"]:
            raise RuntimeError(f"SBS replica differs ({tag}, rep {rep})")
        if size_mb is not None:
            s["MBps"] = round(size_mb / s["seconds"], 1)
            s["MBps_from_beta_start"] = round(size_mb / s["from_beta_start_s"], 1)
        return s
    return once


def timing_summary(res: dict[str, list[dict[str, Any]]], key: str) -> dict[str, Any]:
    out: dict[str, Any] = {name: spread([x[key] for x in lst]) for name, lst in res.items()}
    for name, lst in res.items():
        if lst and "alpha_ready_s" in lst[0]:
            out[f"{name}_breakdown_s"] = {
                k: spread([x[k] for x in lst]) for k in
                ("alpha_primary_s", "alpha_ready_s", "beta_started_s", "beta_secondary_s",
                 "from_beta_start_s", "after_beta_secondary_s")}
    return out


def print_comparisons(vs: dict[str, dict[str, Any]]) -> None:
    for label, c in vs.items():
        if c:
            s = c["per_rep_spread"]
            say(f"  {label:32} ratio of medians {c['ratio_of_medians']}, per rep "
                f"{s['min']}-{s['max']} ({', '.join(map(str, c['per_rep']))})")


def scenario_small(data: Path, runs: Path, daemon: RsyncDaemon | None, sz: Sizes,
                   with_fsync: bool) -> dict[str, Any]:
    src = data / "small"

    def rewarm() -> None:
        warm_files(runs / "warm", sz.small_files, sz.small_size)

    def warm() -> None:
        read_source(src)
        rewarm()

    copiers = {"sbs": sbs_copier(runs, "sbs-small", src, warm, rewarm=rewarm)}
    if daemon is not None:
        copiers["rsync"] = rsync_copier(daemon, "small", src, runs / "rsync-small", warm)
        if with_fsync:
            copiers["rsync_fsync"] = rsync_copier(daemon, "small", src, runs / "rsync-small-f",
                                                  warm, "--fsync")
    res = run_reps(sz.reps_small, {k: _told(k, f) for k, f in copiers.items()})
    out: dict[str, Any] = {"files": sz.small_files, "file_bytes": sz.small_size,
                           "order": "rotating", **res}
    vs = {f"sbs / {peer} (seconds)": compare(res["sbs"], res[peer], "seconds")
          for peer in ("rsync", "rsync_fsync") if peer in res}
    print_comparisons(vs)
    seconds = timing_summary(res, "seconds")
    main = vs.get("sbs / rsync (seconds)", {})
    out["summary"] = {
        "seconds": seconds, "vs": vs,
        "target_met": (main["ratio_of_medians"] <= 1) if main else None,
        "reps_sbs_not_slower": (sum(r <= 1 for r in main["per_rep"]) if main else None),
        "runs_with_a_takeover": sum(x["roles"]["roles_changed"] for x in res["sbs"]
                                    + res.get("sbs_together", [])),
    }
    return out


def _told(name: str, f: Callable[[int], dict[str, Any]]) -> Callable[[int], dict[str, Any]]:
    def once(rep: int) -> dict[str, Any]:
        r = f(rep)
        tell(name, r)
        return r
    return once


def live_big(root: Path, big_file: Path, *, curve: bool = True,
             warm: Callable[[], None] | None = None) -> dict[str, Any]:
    """A running, synced pair with an empty folder; the big file appears in alpha's folder at
    once (a hard link: complete from its first instant, as a file renamed into place), and
    the clock runs until beta's copy is at its final name with its full size. This includes
    alpha noticing it and hashing all of it, the transfer, and beta's verify + fsync + rename
    (the final name never shows a partial file, so its arrival is the end)."""
    src = root / "live-src"
    src.mkdir(parents=True)
    drop_dirty()
    with SbsRun(root / "pair", src, curve=curve) as run:
        ready = run.start_alpha()
        run.sync_beta(ready["seq"])
        run.settle(hold=0.5)
        size = big_file.stat().st_size
        target = run.dst / big_file.name
        if warm is not None:
            warm()
        cpu0 = {n: thread_cpu(node.pid) for n, node in run.pair.nodes.items()}
        t0 = time.perf_counter()
        os.link(big_file, src / big_file.name)
        while True:
            try:
                if target.stat().st_size == size:
                    break
            except FileNotFoundError:
                pass
            if time.perf_counter() - t0 > 300:
                raise RuntimeError(f"the big file never reached beta{run.pair.beta.tail_log()}")
            time.sleep(0.002)
        seconds = time.perf_counter() - t0
        mem = {n: proc_status(node.pid) for n, node in run.pair.nodes.items()}
        cpu = {n: cpu_delta(cpu0[n], thread_cpu(node.pid)) for n, node in run.pair.nodes.items()}
        roles = run.settle()
        exact = check_exact(src, run.dst)
    shutil.rmtree(src, ignore_errors=True)
    # both nodes' CPU over the wall time: how busy the 2 cores were (kernel threads not counted)
    busy = round(sum(c["total"] for c in cpu.values()) / seconds, 2)
    return {"seconds": round(seconds, 4), "cpu_s": cpu, "cores_busy": busy,
            "alpha_mem_mb": mem["alpha"],
            "beta_mem_mb": mem["beta"], "roles": roles, "exact": exact}


def scenario_big(data: Path, runs: Path, daemon: RsyncDaemon | None, ssh: SshPeer | None,
                 sz: Sizes, extras: bool, ciphers: list[str]) -> dict[str, Any]:
    src = data / "big"
    big_file = next(src.iterdir())
    size_mb = sz.big_bytes / 1e6

    # every run, rsync's and SBS's, starts right after reading the source and writing and
    # deleting 2 GiB: on this VM a copy into page cache that nothing touched lately runs at
    # half speed or less, and freed pages go back to the host within seconds (see
    # warm_page_cache), so the warm-up comes right before each clock starts
    def rewarm() -> None:
        warm_page_cache(runs / "warm.bin", 2 * sz.big_bytes)

    def warm() -> None:
        read_source(src)
        rewarm()

    def live(curve: bool) -> Callable[[int], dict[str, Any]]:
        def once(rep: int) -> dict[str, Any]:
            s = live_big(runs / f"sbs-live-{rep}-{curve}", big_file, curve=curve, warm=warm)
            s["MBps"] = round(size_mb / s["seconds"], 1)
            if not s["exact"]:
                raise RuntimeError(f"SBS live replica differs (rep {rep})")
            return s
        return once

    ours = {"sbs_initial": sbs_copier(runs, "sbs-big", src, warm, rewarm=rewarm,
                                      size_mb=size_mb),
            "sbs_live": live(True),
            # the fixed cost of a lone start (the primary waits dead_after for an answer)
            # against two services started together
            "sbs_initial_together": sbs_copier(runs, "sbs-big-together", src, warm,
                                               size_mb=size_mb, together=True)}
    if extras:
        ours["sbs_live_plain"] = live(False)
        ours["sbs_initial_plain"] = sbs_copier(runs, "sbs-big-plain", src, warm,
                                               rewarm=rewarm, curve=False, size_mb=size_mb)
    theirs = {}
    if daemon is not None:
        theirs["rsync"] = rsync_copier(daemon, "big", src, runs / "rsync-big", warm,
                                       size_mb=size_mb)
    if ssh is not None:
        for cipher in ciphers:
            theirs[f"rsync_ssh_{cipher.split('@')[0]}"] = ssh_copier(
                ssh, src, runs / "rsync-ssh", warm, cipher, size_mb)
    if daemon is not None and extras:
        theirs["rsync_fsync"] = rsync_copier(daemon, "big", src, runs / "rsync-big-f", warm,
                                             "--fsync", size_mb=size_mb)
    # SBS, rsync, SBS, rsync, ...: each SBS copy has an rsync copy beside it in every rep
    names = [n for pair in itertools.zip_longest(ours, theirs) for n in pair if n]
    copiers = {n: ours.get(n) or theirs[n] for n in names}
    res = run_reps(sz.reps_big, {k: _told(k, f) for k, f in copiers.items()})
    out: dict[str, Any] = {"bytes": sz.big_bytes, "order": "rotating", **res}
    peers = [k for k in res if k.startswith("rsync")]
    vs = {f"{ours} / {peer} (MB/s)": compare(res[ours], res[peer], "MBps")
          for ours in ("sbs_live", "sbs_initial", "sbs_initial_together", "sbs_live_plain",
                       "sbs_initial_plain")
          if ours in res for peer in peers}
    print_comparisons(vs)
    # the transport limit, measured now, between the runs above and the next scenario
    limit = {}
    for curve in (True, False):
        for copy in (False, True):
            t = throughput(chunk=MiB, window=8, curve=curve, total=min(sz.big_bytes, GiB),
                           copy=copy)
            limit[f"{'curve' if curve else 'plain'}{'_copying' if copy else ''}_MBps"] = t["MBps"]
    out["transport_limit"] = limit
    say(f"  transport limit (DEALER/REP, 8 x 1 MiB in flight): {limit}")
    floor = out["cipher_floor"] = cipher_floor(min(sz.big_bytes, GiB))
    say(f"  CURVE's cipher alone (libsodium, 1 MiB messages): {floor}")
    # CPU per GiB: what each copier makes the machine do, whatever the cores are busy with
    per_gib = GiB / sz.big_bytes

    def sbs_cpu(name: str) -> dict[str, Any]:
        return spread([sum(c["total"] for c in x["cpu_s"].values()) * per_gib
                       for x in res.get(name, [])], 2)

    cpu: dict[str, Any] = {name: sbs_cpu(name) for name in res if name.startswith("sbs")}
    for peer in peers:
        cpu[peer] = spread([(x["client_cpu_s"] + x["daemon_cpu_s"]) * per_gib
                            for x in res[peer]], 2)
    if "error" not in floor:
        cpu["curve_cipher_both_sides"] = round(
            floor["encrypt_cpu_s_per_GiB"] + floor["decrypt_cpu_s_per_GiB"], 2)
    out["cpu_s_per_GiB"] = cpu
    say(f"  CPU-s per GiB (median): "
        f"{ {k: v['median'] if isinstance(v, dict) else v for k, v in cpu.items()} }")
    peak = max(max(peak_mb(x, "alpha"), peak_mb(x, "beta"))
               for name, lst in res.items() if name.startswith("sbs") for x in lst)
    live_vs = vs.get("sbs_live / rsync (MB/s)", {})
    init_vs = vs.get("sbs_initial / rsync (MB/s)", {})
    out["summary"] = {
        "MBps": timing_summary(res, "MBps"), "vs": vs,
        "ratio_sbs_live_over_curve_limit": ratio(
            statistics.median(x["MBps"] for x in res["sbs_live"]), limit["curve_MBps"]),
        # the goal: the initial sync including the secondary's start no slower than live
        "ratio_initial_from_beta_start_over_live": ratio(
            statistics.median(x["MBps_from_beta_start"] for x in res["sbs_initial"]),
            statistics.median(x["MBps"] for x in res["sbs_live"])),
        "peak_node_mb": peak,
        "target_met": {
            "initial_sync": (init_vs["ratio_of_medians"] > 1
                             and peak < TARGETS["big_memory_mb"]) if init_vs else None,
            "live": (live_vs["ratio_of_medians"] > 1
                     and peak < TARGETS["big_memory_mb"]) if live_vs else None},
        "runs_with_a_takeover": sum(x["roles"]["roles_changed"] for name, lst in res.items()
                                    if name.startswith("sbs") for x in lst),
    }
    return out


def scenario_latency_small(runs: Path, daemon: RsyncDaemon | None, data: Path,
                           sz: Sizes) -> dict[str, Any]:
    src = data / "lat"
    (src / "_latency").mkdir(parents=True, exist_ok=True)
    (src / "hello.txt").write_text("a near-empty tree\n")
    with SbsRun(runs / "sbs-lat", src) as run:
        ready = run.start_alpha()
        run.sync_beta(ready["seq"])
        roles = run.settle()
        res = latency_samples(run.folder_of(roles["primary"]),
                              run.folder_of(roles["secondary"]), sz.latency_samples)
        res["roles"] = roles
    say(f"  SBS    p50 {res['p50_ms']} ms  p99 {res['p99_ms']} ms  max {res['max_ms']} ms "
        f"({res['samples']} samples, {res['timed_out']} timed out)")
    out: dict[str, Any] = {"tree_files": 1, "sbs": res,
                           "target_met": res["p50_ms"] < TARGETS["latency_p50_ms"]
                           and res["p99_ms"] < TARGETS["latency_p99_ms"]
                           and not res["timed_out"]}
    if daemon is not None:
        rs = rsync_latency(daemon, "lat", src, runs / "rsync-lat", sz.rsync_latency_samples * 4)
        shutil.rmtree(runs / "rsync-lat")
        say(f"  rsync triggered per change  p50 {rs['p50_ms']} ms (a whole-tree run per "
            f"change, as cron or lsyncd would start it: not like for like)")
        out["rsync_trigger_per_change"] = rs
        out["ratio_sbs_p50_over_rsync_trigger_p50"] = ratio(res["p50_ms"], rs["p50_ms"])
    return out


def scenario_tree(data: Path, runs: Path, daemon: RsyncDaemon | None, sz: Sizes,
                  profile_dir: Path | None, with_fsync: bool = False) -> dict[str, Any]:
    """The 100,000-file tree: initial sync (both, alternated and warmed alike), then on the
    last SBS pair the latency in it and its idle CPU; rsync triggered per change.
    `with_fsync`: rsync --fsync too (as durable as SBS's copy)."""
    src = data / "tree"
    out: dict[str, Any] = {"files": sz.tree_files}

    def rewarm() -> None:
        warm_files(runs / "warm", sz.tree_files, KiB)

    def warm() -> None:
        shutil.rmtree(src / "_latency", ignore_errors=True)
        read_source(src)
        rewarm()

    def then(run: SbsRun, roles: dict[str, Any]) -> dict[str, Any]:
        """Latency and idle CPU on the synced pair of the last SBS rep."""
        extra: dict[str, Any] = {}
        if profile_dir is not None:
            extra["profile_initial"] = run.stop_profilers()
        (src / "_latency").mkdir(exist_ok=True)
        lat = latency_samples(run.folder_of(roles["primary"]),
                              run.folder_of(roles["secondary"]), sz.latency_samples)
        extra["latency"] = lat
        say(f"  SBS latency  p50 {lat['p50_ms']} ms  p99 {lat['p99_ms']} ms  max "
            f"{lat['max_ms']} ms ({lat['samples']} samples, {lat['timed_out']} timed out)")
        idle_roles = run.settle()  # let the last writes settle, then only watch
        if profile_dir is not None:
            run.tag = "tree-idle"
            run._profile("alpha")
            run._profile("beta")
        c0, t0 = run.cpu_seconds(), time.perf_counter()
        time.sleep(sz.idle_seconds)
        c1, dt = run.cpu_seconds(), time.perf_counter() - t0
        idle = {n: round(100 * (c1[n] - c0[n]) / dt, 2) for n in c0}
        idle["pair"] = round(idle["alpha"] + idle["beta"], 2)
        extra["idle_cpu_pct_of_one_core"] = {**idle, "seconds": round(dt, 1),
                                             "period_s": NODE["period"],
                                             "primary": idle_roles["primary"]}
        say(f"  idle CPU over {dt:.0f} s: alpha {idle['alpha']} %, beta {idle['beta']} % "
            f"of one core ({idle_roles['primary']} is primary; rescan every "
            f"{NODE['period']} s)")
        if profile_dir is not None:
            extra["profile_idle"] = run.stop_profilers()
        return extra  # _latency stays until the pair is checked; the next warm() removes it

    reps = 1 if profile_dir is not None else sz.reps_tree
    copiers = {"sbs": sbs_copier(runs, "sbs-tree", src, warm, last_rep=reps - 1, then=then,
                                 profile_dir=profile_dir, rewarm=rewarm)}
    if daemon is not None and profile_dir is None:
        copiers["rsync"] = rsync_copier(daemon, "tree", src, runs / "rsync-tree", warm)
        if with_fsync:
            copiers["rsync_fsync"] = rsync_copier(daemon, "tree", src, runs / "rsync-tree-f",
                                                  warm, "--fsync")
    if profile_dir is None:
        # two services started at once: no lone dead_after wait before the first scan
        copiers["sbs_together"] = sbs_copier(runs, "sbs-tree-together", src, warm,
                                             together=True)
    res = run_reps(reps, {k: _told(k, f) for k, f in copiers.items()})
    out.update(order="rotating", **res)
    last = res["sbs"][-1]
    lat = last.pop("latency")
    out["sbs_latency"] = lat
    out["idle_cpu_pct_of_one_core"] = last.pop("idle_cpu_pct_of_one_core")
    for key in ("profile_initial", "profile_idle"):
        if key in last:
            out[key] = last.pop(key)
    vs = {f"{ours} / rsync (seconds)": compare(res[ours], res["rsync"], "seconds")
          for ours in ("sbs", "sbs_together") if ours in res and "rsync" in res}
    if "rsync_fsync" in res:
        vs["sbs / rsync_fsync (seconds)"] = compare(res["sbs"], res["rsync_fsync"], "seconds")
    print_comparisons(vs)
    out["summary"] = {
        "seconds": timing_summary(res, "seconds"), "vs": vs,
        "peak_mb": {n: spread([peak_mb(x, n) for x in res["sbs"]
                               + res.get("sbs_together", [])], 1)
                    for n in ("alpha", "beta")},
        "runs_with_a_takeover": sum(x["roles"]["roles_changed"] for x in res["sbs"]
                                    + res.get("sbs_together", [])),
        "latency_target_met": lat["p50_ms"] < TARGETS["latency_p50_ms"]
        and lat["p99_ms"] < TARGETS["latency_p99_ms"] and not lat["timed_out"],
    }
    if daemon is not None and profile_dir is None:
        dest = runs / "rsync-tree-lat"
        rs = rsync_latency(daemon, "tree", src, dest, sz.rsync_latency_samples)
        out["rsync_trigger_per_change"] = rs
        out["ratio_latency_sbs_p50_over_rsync_trigger_p50"] = ratio(lat["p50_ms"], rs["p50_ms"])
        say(f"  rsync triggered per change  p50 {rs['p50_ms']} ms (walks {sz.tree_files} "
            f"files each time, as cron or lsyncd would start it: not like for like)")
        shutil.rmtree(dest, ignore_errors=True)
    shutil.rmtree(src / "_latency", ignore_errors=True)
    return out


# ------------------------------------------------------------------------------ main


def host(rsync_ok: bool) -> dict[str, Any]:
    def version(*cmd: str) -> str | None:
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return (done.stdout or done.stderr).strip().splitlines()[0]

    sshd = SshPeer.sshd()
    return {"cpus": os.cpu_count(), "python": platform.python_version(),
            "pyzmq": zmq.__version__, "libzmq": zmq.zmq_version(),
            "rsync": version("rsync", "--version") if rsync_ok else None,
            "sshd": version(sshd, "-V") if sshd else None,
            "loadavg_at_start": os.getloadavg()}


def ensure_data(data: Path, sz: Sizes, only: set[str]) -> None:
    """Create what the chosen scenarios need, unless a previous --keep run left it there."""
    want = {"small": ("small", sz.small_files, sz.small_size),
            "big": ("big", 1, sz.big_bytes),
            "tree": ("tree", sz.tree_files, KiB)}
    data.mkdir(parents=True, exist_ok=True)
    (data / "lat").mkdir(exist_ok=True)
    for scenario, (name, count, size) in want.items():
        if scenario not in only:
            continue
        if data_ready(data, name, count, size):
            shutil.rmtree(data / name / "_latency", ignore_errors=True)
            continue
        t0 = time.perf_counter()
        if name == "big":
            make_big(data / name, size)
        else:
            make_files(data / name, count, size)
        mark_ready(data, name, count, size)
        say(f"data: {count} x {size} B as {name}/ in the data folder "
            f"({time.perf_counter() - t0:.1f} s)")


def read_source(root: Path) -> None:
    """Read every file under root once: both copiers then start with the source in the page
    cache and its dentries and inodes cached (the same state for both, whatever ran before
    or whether the data was just made or kept from an earlier run)."""
    for dirpath, _dirs, files in os.walk(root):
        for f in files:
            with open(os.path.join(dirpath, f), "rb") as fh:
                while fh.read(16 * MiB):
                    pass


def warm_files(scratch: Path, count: int, size: int) -> None:
    """Create and delete `count` files, then sync: every run then starts with the same
    freshly freed inodes, dentries and pages to reuse. On this VM, creating a 4 KiB file costs
    0.05 ms of kernel time right after such a cycle and up to 0.6 ms otherwise, which swamps
    the difference between the two copiers."""
    make_files(scratch, count, size)
    shutil.rmtree(scratch)
    os.sync()


def warm_page_cache(scratch: Path, size: int) -> None:
    """Write and delete `size` bytes. In a VM whose memory the host backs lazily, the first
    touch of a page is slow (here: 1 GiB into fresh page cache at ~0.36 GB/s, into reused
    pages at ~2.4 GB/s); without this, whichever copy runs first pays for it. The effect is
    short-lived: the guest reports free pages back to the host (virtio-balloon free page
    reporting), so pages freed a few seconds ago are fresh again (1 GiB written right after
    this: 4.9-5.2 GB/s; 3 s later 1.9 GB/s; 6 s later 0.45 GB/s). Call it right before a clock
    starts."""
    buf = os.urandom(4 * MiB)
    with open(scratch, "wb") as f:
        for _ in range(max(1, size // len(buf))):
            f.write(buf)
    scratch.unlink()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small sizes: a smoke run")
    ap.add_argument("--profile", action="store_true",
                    help="SBS only, both nodes under py-spy; summaries in the JSON")
    ap.add_argument("--only", default="small,big,latency,tree",
                    help="comma-separated scenarios (small, big, latency, tree)")
    ap.add_argument("--reps", type=int, help="repetitions of every scenario (default: "
                    f"{FULL.reps_small} small, {FULL.reps_big} big, {FULL.reps_tree} tree; "
                    "--quick 1)")
    ap.add_argument("--no-extras", action="store_true",
                    help="skip rsync --fsync and SBS over plain TCP (reference figures)")
    ap.add_argument("--ssh-ciphers", default="aes128-gcm@openssh.com,"
                    "chacha20-poly1305@openssh.com",
                    help="ciphers of the rsync-over-ssh peer in the big-file scenario, comma-"
                    "separated ('' to skip that peer)")
    ap.add_argument("--native", action="store_true",
                    help="with --profile: C frames too (py-spy --native)")
    ap.add_argument("--data", type=Path, default=Path(f"/tmp/sbs-bench-{os.getuid()}"))
    ap.add_argument("--keep", action="store_true",
                    help="keep the data afterwards (and reuse it next time)")
    ap.add_argument("--fresh-ext4", type=int, metavar="GIB",
                    help="write every copy (both sides') and the nodes' state to a fresh ext4 "
                    "of GIB GiB with its journal, on a loop device (root only; 8 is enough "
                    "for all scenarios); the sources stay in --data")
    ap.add_argument("--out", type=Path)
    add_common_args(ap)
    args = ap.parse_args(argv)
    sz = QUICK if args.quick else FULL
    if args.reps:
        sz = replace(sz, reps_small=args.reps, reps_big=args.reps, reps_tree=args.reps)
    only = set(args.only.split(","))
    name = "replication" + ("-profile" if args.profile else "") + ("-quick" if args.quick else "")
    out_path = args.out or OUT / f"{name}.json"
    prov = provenance(args.run_id)
    say(f"run {prov['run_id']}: {prov['command']}")
    skipped: dict[str, str] = {}
    rsync_ok = shutil.which("rsync") is not None
    if not rsync_ok and not args.profile:
        skipped["rsync"] = "rsync is not installed (Debian: apt-get install rsync)"
    ciphers = [c for c in args.ssh_ciphers.split(",") if c]
    if "big" in only and not args.profile:
        if not ciphers:
            skipped["rsync_ssh"] = "--ssh-ciphers ''"
        elif why := SshPeer.missing():
            skipped["rsync_ssh"] = why
    for peer, why in skipped.items():
        say(f"SKIPPED: the {peer} peer: {why}")
    report: dict[str, Any] = {"bench": "replication", "provenance": prov, "quick": args.quick,
                              "profile": args.profile, "sizes": asdict(sz), "node": NODE,
                              "targets": TARGETS, "host": host(rsync_ok),
                              "method": METHOD, "skipped_peers": skipped,
                              "when": time.strftime("%Y-%m-%dT%H:%M:%S")}
    if args.profile and Profiler.binary() is None:
        say(Profiler.MISSING)
        return 2
    profile_dir = OUT if args.profile else None
    extras = not args.no_extras and not args.quick
    t_start = time.perf_counter()
    data, runs = args.data / ("data-quick" if args.quick else "data"), args.data / "runs"
    fs_stack = contextlib.ExitStack()
    if args.fresh_ext4:
        try:
            fs = fs_stack.enter_context(fresh_ext4(args.data / "fresh-ext4.img",
                                                   args.data / "fresh-ext4", args.fresh_ext4))
        except FilesystemError as e:
            say(f"ERROR: {e}")
            return 2
        runs = Path(fs["mount_point"]) / "runs"
    shutil.rmtree(runs, ignore_errors=True)
    runs.mkdir(parents=True)
    report["copies_fs"] = fs_record(fs if args.fresh_ext4 else filesystem_of(runs))
    say(f"copies and node state on: {report['copies_fs']}")
    Profiler.native = args.native
    daemon: RsyncDaemon | None = None
    ssh: SshPeer | None = None
    try:
        ensure_data(data, sz, only)
        if rsync_ok and not args.profile:
            daemon = RsyncDaemon(args.data / "rsyncd", {m: data / m for m in
                                                         ("small", "big", "tree", "lat")})
        if "big" in only and "rsync_ssh" not in skipped and not args.profile:
            try:
                ssh = SshPeer(args.data / "sshd")
            except (RuntimeError, AssertionError, OSError, subprocess.CalledProcessError) as e:
                skipped["rsync_ssh"] = f"sshd did not start: {e}"
                say(f"SKIPPED: the rsync_ssh peer: {skipped['rsync_ssh']}")
        if args.profile:
            if "small" in only:
                say("profile: initial sync of the small files")
                report["small"] = initial_sync(runs / "p-small", data / "small",
                                               profile_dir=profile_dir, tag="small")
            if "big" in only:
                say("profile: initial sync of the big file")
                report["big"] = initial_sync(
                    runs / "p-big", data / "big", profile_dir=profile_dir, tag="big",
                    warm=lambda: warm_page_cache(runs / "warm.bin", 2 * sz.big_bytes))
            if "tree" in only:
                say("profile: the tree (initial sync, latency, idle)")
                report["tree"] = scenario_tree(data, runs, None, sz, profile_dir)
        else:
            if "small" in only:
                say(f"small: initial sync of {sz.small_files} x {sz.small_size} B")
                report["small"] = scenario_small(data, runs, daemon, sz, extras)
            if "big" in only:
                say(f"big: one {sz.big_bytes >> 20} MiB file")
                report["big"] = scenario_big(data, runs, daemon, ssh, sz, extras, ciphers)
            if "latency" in only:
                say("latency: single small files, near-empty tree")
                report["latency"] = scenario_latency_small(runs, daemon, data, sz)
                rt = {c: round_trip(curve=c, n=1000) for c in (False, True)}
                report["latency"]["transport_round_trip_ms"] = {
                    ("curve" if c else "plain"): {"p50": r["p50_ms"], "p99": r["p99_ms"]}
                    for c, r in rt.items()}
            if "tree" in only:
                say(f"tree: {sz.tree_files} files")
                report["tree"] = scenario_tree(data, runs, daemon, sz, None, extras)
    finally:
        for peer in (daemon, ssh):
            if peer is not None:
                peer.stop()
        shutil.rmtree(runs, ignore_errors=True)
        fs_stack.close()  # unmounts a --fresh-ext4 before its image's folder goes
        if not args.keep:
            shutil.rmtree(args.data, ignore_errors=True)
    report["host"]["loadavg_at_end"] = os.getloadavg()
    report["total_seconds"] = round(time.perf_counter() - t_start, 1)
    written = write_report(report, out_path, args.result)
    say(f"run {prov['run_id']} done in {report['total_seconds']} s -> "
        f"{', '.join(map(str, written))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
