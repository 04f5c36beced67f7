"""Replication against rsync and the transport limit, in the same run on the same data.

Every SBS figure comes from a real pair (tests/pair.py: two sbs-node processes on 127.0.0.1
and 127.0.0.2, CURVE on, product defaults for period, heartbeat and dead_after). Its peer is
an rsync daemon on 127.0.0.1 serving the very folder alpha replicates; `rsync -a` pulls it into
a fresh target, just as the secondary pulls from the primary. The transport limit is
bench/transport.py measured in the same run.

  small   initial sync of 10,000 x 4 KiB files (100 folders of 100): alpha starts alone, is
          primary with its first scan done, then beta starts; the clock runs from starting beta
          until beta reports synced with applied == alpha's seq (status polled every 20 ms)
  big     the same with one 1 GiB file: MB/s, and peak memory (VmHWM) of both nodes
  latency change-to-replica for single small files (a create or an overwrite on alpha, beta's
          folder polled every 1 ms for the new content), in a near-empty tree and in a
          100,000-file tree; rsync's figure is one `rsync -a` run started right after the
          write (what a watcher that triggers rsync at once, lsyncd with no delay, would get)
  idle    CPU of both nodes over 30 s of an idle, synced pair watching 100,000 files

    python bench/replication.py            # full: about 6-9 minutes
    python bench/replication.py --quick    # small sizes, a smoke run of about a minute
    python bench/replication.py --profile  # SBS only, under py-spy: where the time goes

Figures go to bench/out/replication[-quick].json; data lives under /tmp (--data) and is
removed afterwards unless --keep.
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import platform
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import psutil
import xxhash
import zmq

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.transport import cipher_floor, round_trip, throughput  # noqa: E402
from node import protocol  # noqa: E402
from node.security import client, load_keys  # noqa: E402
from tests.pair import NodeProc, Pair, wait_for  # noqa: E402

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30
OUT = REPO / "bench" / "out"
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


FULL = Sizes(small_files=10_000, small_size=4 * KiB, big_bytes=GiB, tree_files=100_000,
             latency_samples=200, rsync_latency_samples=5, idle_seconds=30, reps_small=5,
             reps_big=3)
QUICK = Sizes(small_files=500, small_size=4 * KiB, big_bytes=64 * MiB, tree_files=5_000,
              latency_samples=30, rsync_latency_samples=3, idle_seconds=5, reps_small=1,
              reps_big=1)


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
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)

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
    (TCP, CURVE); the Python threads all carry the interpreter's name."""
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

    def __init__(self, pid: int, out: Path):
        self.out = out
        out.unlink(missing_ok=True)
        spy = Path(sys.executable).with_name("py-spy")
        if not spy.exists():
            spy = Path(shutil.which("py-spy") or "py-spy")
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


class StatusPoller:
    """STATUS over one long-lived DEALER per node. tools.client.request opens a fresh CURVE
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
            st = self.polls["beta"].status()
            now = time.perf_counter()
            if st and st["state"] == "secondary":
                if t_secondary is None:
                    t_secondary = now - t0
                    if self.profile_dir is not None and "beta" not in self.profilers:
                        self._profile("beta")
                r = st["replication"]
                if r["synced"] and r["applied"] >= seq:
                    break
                if r.get("error") and r["error"] != last_error:
                    last_error = r["error"]
                    say(f"  beta reports: {last_error}")
            if beta.proc.poll() is not None:
                raise RuntimeError(f"beta exited{beta.tail_log()}")
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
                 tag: str = "", warm: Callable[[], None] | None = None) -> dict[str, Any]:
    drop_dirty()
    with SbsRun(root, src, curve=curve, profile_dir=profile_dir, tag=tag) as run:
        ready = run.start_alpha()
        result = run.sync_beta(ready["seq"], warm=warm)
        result["alpha_ready_s"] = ready["alpha_ready_s"]
        result["roles"] = roles = run.settle()
        if profile := run.stop_profilers():
            result["profile"] = profile
        if roles["roles_changed"]:
            say(f"  ROLES CHANGED after the initial sync: {roles} (see {run.root}/*.log)")
        result["exact"] = check_exact(src, run.dst)
    return result


# ------------------------------------------------------------------------------ latency


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


def rsync_latency(daemon: RsyncDaemon, module: str, src: Path, dest: Path,
                  n: int) -> dict[str, Any]:
    """One small write on the source, then one `rsync -a` pull: the best a trigger-rsync-on-
    change replicator can do (it must walk both trees every time)."""
    daemon.pull(module, dest)  # bring the target up to date first
    (src / "_rsync_latency").mkdir(exist_ok=True)
    vals = []
    for i in range(n):
        (src / "_rsync_latency" / f"r{i}.txt").write_bytes(os.urandom(40))
        vals.append(daemon.pull(module, dest)["seconds"])
    shutil.rmtree(src / "_rsync_latency")
    return {"samples": n, "p50_ms": ms(statistics.median(vals)), "max_ms": ms(max(vals))}


# ------------------------------------------------------------------------------ scenarios


def ratio(a: float, b: float) -> float:
    return round(a / b, 3) if b else float("nan")


def alternate(rep: int, first: Callable[[], None], second: Callable[[], None]) -> None:
    """Run both, rsync first on even reps and SBS first on odd ones: a machine that drifts
    (this VM does) then favours neither."""
    for step in ((first, second) if rep % 2 == 0 else (second, first)):
        step()


def scenario_small(data: Path, runs: Path, daemon: RsyncDaemon, sz: Sizes,
                   with_fsync: bool) -> dict[str, Any]:
    src = data / "small"
    sbs: list[dict] = []
    rs: list[dict] = []

    def rsync_once(rep: int) -> None:
        dest = runs / f"rsync-small-{rep}"
        warm_files(runs / "warm", sz.small_files, sz.small_size)
        r = daemon.pull("small", dest)
        if diff := same_tree(src, dest):
            raise RuntimeError(f"rsync copy differs: {diff}")
        shutil.rmtree(dest)
        rs.append(r)
        say(f"  rsync -a          {r['seconds']:.3f} s")

    def sbs_once(rep: int) -> None:
        # right before the clock, after alpha's start-up, as rsync's (see warm_page_cache)
        s = initial_sync(runs / f"sbs-small-{rep}", src,
                         warm=lambda: warm_files(runs / "warm", sz.small_files, sz.small_size))
        sbs.append(s)
        say(f"  SBS               {s['seconds']:.3f} s  (beta secondary after "
            f"{s['to_secondary_s']:.2f} s, then {s['after_secondary_s']:.3f} s)")

    for rep in range(sz.reps_small):
        alternate(rep, lambda: rsync_once(rep), lambda: sbs_once(rep))  # noqa: B023
    out: dict[str, Any] = {"files": sz.small_files, "file_bytes": sz.small_size,
                           "sbs": sbs, "rsync": rs}
    if with_fsync:
        dest = runs / "rsync-small-fsync"
        drop_dirty()
        r = daemon.pull("small", dest, "--fsync")
        shutil.rmtree(dest)
        out["rsync_fsync"] = r
        say(f"  rsync -a --fsync  {r['seconds']:.3f} s  (durable, as SBS is)")
    sbs_med = statistics.median(x["seconds"] for x in sbs)
    after_med = statistics.median(x["after_secondary_s"] for x in sbs)
    rs_med = statistics.median(x["seconds"] for x in rs)
    pairwise = [ratio(x["seconds"], y["seconds"]) for x, y in zip(sbs, rs, strict=True)]
    out["summary"] = {
        "sbs_median_s": round(sbs_med, 3), "rsync_median_s": round(rs_med, 3),
        "sbs_after_secondary_median_s": round(after_med, 3),
        "ratio_sbs_over_rsync": ratio(sbs_med, rs_med),
        "ratio_sbs_after_secondary_over_rsync": ratio(after_med, rs_med),
        "ratio_per_rep": pairwise,
        "sbs_files_per_s": round(sz.small_files / sbs_med),
        "rsync_files_per_s": round(sz.small_files / rs_med),
        "target_met": sbs_med <= rs_med,
        "runs_with_a_takeover": sum(x["roles"]["roles_changed"] for x in sbs),
    }
    if "rsync_fsync" in out:
        out["summary"]["ratio_sbs_over_rsync_fsync"] = ratio(sbs_med,
                                                             out["rsync_fsync"]["seconds"])
    return out


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


def scenario_big(data: Path, runs: Path, daemon: RsyncDaemon, sz: Sizes,
                 with_fsync: bool, with_plain: bool) -> dict[str, Any]:
    src = data / "big"
    size_mb = sz.big_bytes / 1e6
    sbs: list[dict] = []
    live: list[dict] = []
    live_plain: list[dict] = []
    rs: list[dict] = []

    # every run, rsync's and SBS's, starts right after writing and deleting 2 GiB: on this VM
    # a copy into page cache that nothing touched lately runs at half speed or less, and the
    # freed pages go back to the host within seconds (see warm_page_cache), so the warm-up
    # comes right before each clock starts, after the pair's own start-up
    def warm() -> None:
        warm_page_cache(runs / "warm.bin", 2 * sz.big_bytes)

    def rsync_once(rep: int) -> None:
        dest = runs / f"rsync-big-{rep}"
        drop_dirty()
        warm()
        r = daemon.pull("big", dest)
        shutil.rmtree(dest)
        r["MBps"] = round(size_mb / r["seconds"], 1)
        rs.append(r)
        say(f"  rsync -a          {r['seconds']:.3f} s  {r['MBps']:.0f} MB/s  "
            f"{r['client_cpu_s'] + r['daemon_cpu_s']:.2f} CPU-s, client peak "
            f"{r['client_peak_mb']} MB, daemon peak ~{r['daemon_peak_mb_sampled']} MB")

    def sbs_once(rep: int) -> None:
        s = initial_sync(runs / f"sbs-big-{rep}", src, warm=warm)
        s["MBps"] = round(size_mb / s["seconds"], 1)
        s["MBps_after_secondary"] = round(size_mb / s["after_secondary_s"], 1)
        sbs.append(s)
        say(f"  SBS (CURVE)       {s['seconds']:.3f} s  {s['MBps']:.0f} MB/s "
            f"({s['MBps_after_secondary']:.0f} MB/s once secondary)  peak alpha "
            f"{s['alpha_mem_mb']['VmHWM']} MB, beta {s['beta_mem_mb']['VmHWM']} MB")

    def live_once(rep: int, curve: bool = True) -> None:
        s = live_big(runs / f"sbs-live-{rep}-{curve}", next(src.iterdir()), curve=curve,
                     warm=warm)
        s["MBps"] = round(size_mb / s["seconds"], 1)
        (live if curve else live_plain).append(s)
        say(f"  SBS live, {'CURVE' if curve else 'plain'}{' ' if curve else ''}  "
            f"{s['seconds']:.3f} s  {s['MBps']:.0f} MB/s  "
            f"{sum(c['total'] for c in s['cpu_s'].values()):.2f} CPU-s, "
            f"{s['cores_busy']} cores busy, peak alpha "
            f"{s['alpha_mem_mb']['VmHWM']} MB, beta {s['beta_mem_mb']['VmHWM']} MB")

    def sbs_both(rep: int) -> None:
        sbs_once(rep)
        live_once(rep)
        if with_plain:
            live_once(rep, curve=False)

    for rep in range(sz.reps_big):
        alternate(rep, lambda: rsync_once(rep), lambda: sbs_both(rep))  # noqa: B023
    out: dict[str, Any] = {"bytes": sz.big_bytes, "sbs": sbs, "sbs_live": live,
                           "sbs_live_plain": live_plain, "rsync": rs}
    if with_plain:
        s = initial_sync(runs / "sbs-big-plain", src, curve=False, warm=warm)
        s["MBps"] = round(size_mb / s["seconds"], 1)
        s["MBps_after_secondary"] = round(size_mb / s["after_secondary_s"], 1)
        out["sbs_plain"] = s
        say(f"  SBS (plain TCP)   {s['seconds']:.3f} s  {s['MBps']:.0f} MB/s "
            f"({s['MBps_after_secondary']:.0f} MB/s once secondary)")
    if with_fsync:
        dest = runs / "rsync-big-fsync"
        drop_dirty()
        warm()
        r = daemon.pull("big", dest, "--fsync")
        shutil.rmtree(dest)
        r["MBps"] = round(size_mb / r["seconds"], 1)
        out["rsync_fsync"] = r
        say(f"  rsync -a --fsync  {r['seconds']:.3f} s  {r['MBps']:.0f} MB/s")
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
    live_cpu = statistics.median(sum(c["total"] for c in x["cpu_s"].values()) for x in live)
    rs_cpu = statistics.median(x["client_cpu_s"] + x["daemon_cpu_s"] for x in rs)
    cipher = (floor["encrypt_cpu_s_per_GiB"] + floor["decrypt_cpu_s_per_GiB"]
              if "error" not in floor else None)
    plain_cpu = (statistics.median(sum(c["total"] for c in x["cpu_s"].values())
                                   for x in live_plain) if live_plain else None)
    out["cpu_s_per_GiB"] = {
        "sbs_live_both_nodes": round(live_cpu * per_gib, 2),
        # the same transfer over plain TCP: what CURVE adds is the difference (the cipher
        # itself, and the copies libzmq makes around it)
        "sbs_live_plain_both_nodes": round(plain_cpu * per_gib, 2) if plain_cpu else None,
        "curve_adds": round((live_cpu - plain_cpu) * per_gib, 2) if plain_cpu else None,
        "rsync_client_and_daemon": round(rs_cpu * per_gib, 2),
        "curve_cipher_both_sides": cipher,
        "sbs_live_without_cipher": round(live_cpu * per_gib - cipher, 2) if cipher else None,
        # the shortest a GiB can take when every core works for the pair and nothing else
        "sbs_live_min_seconds_on_all_cores": round(live_cpu * per_gib / (os.cpu_count() or 1), 3),
    }
    say(f"  CPU-s per GiB: {out['cpu_s_per_GiB']}")
    sbs_mbps = statistics.median(x["MBps"] for x in sbs)
    live_mbps = statistics.median(x["MBps"] for x in live)
    rs_mbps = statistics.median(x["MBps"] for x in rs)
    peak = max(max(x["alpha_mem_mb"]["VmHWM"], x["beta_mem_mb"]["VmHWM"])
               for x in sbs + live + live_plain)
    out["summary"] = {
        "sbs_median_MBps": sbs_mbps, "rsync_median_MBps": rs_mbps,
        "sbs_live_median_MBps": live_mbps,
        "sbs_live_plain_median_MBps": (statistics.median(x["MBps"] for x in live_plain)
                                       if live_plain else None),
        "ratio_live_over_rsync_MBps": ratio(live_mbps, rs_mbps),
        "ratio_live_per_rep": [ratio(x["MBps"], y["MBps"])
                               for x, y in zip(live, rs, strict=True)],
        "sbs_median_MBps_after_secondary": statistics.median(
            x["MBps_after_secondary"] for x in sbs),
        "ratio_sbs_over_rsync_MBps": ratio(sbs_mbps, rs_mbps),
        "ratio_per_rep": [ratio(x["MBps"], y["MBps"]) for x, y in zip(sbs, rs, strict=True)],
        "ratio_sbs_over_curve_limit": ratio(sbs_mbps, limit["curve_MBps"]),
        "peak_node_mb": peak,
        "target_met": {"initial_sync": sbs_mbps > rs_mbps and peak < TARGETS["big_memory_mb"],
                       "live": live_mbps > rs_mbps and peak < TARGETS["big_memory_mb"]},
        "runs_with_a_takeover": sum(x["roles"]["roles_changed"] for x in sbs + live + live_plain),
    }
    return out


def scenario_latency_small(runs: Path, daemon: RsyncDaemon, data: Path,
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
    rs = rsync_latency(daemon, "lat", src, runs / "rsync-lat", sz.rsync_latency_samples * 4)
    shutil.rmtree(runs / "rsync-lat")
    say(f"  rsync  p50 {rs['p50_ms']} ms (one `rsync -a` run right after the write)")
    return {"tree_files": 1, "sbs": res, "rsync_per_change": rs,
            "ratio_sbs_p50_over_rsync_p50": ratio(res["p50_ms"], rs["p50_ms"]),
            "target_met": res["p50_ms"] < TARGETS["latency_p50_ms"]
            and res["p99_ms"] < TARGETS["latency_p99_ms"] and not res["timed_out"]}


def scenario_tree(data: Path, runs: Path, daemon: RsyncDaemon, sz: Sizes,
                  profile_dir: Path | None) -> dict[str, Any]:
    """The 100,000-file tree: initial sync (both), latency in it, idle CPU, rsync per change."""
    src = data / "tree"
    out: dict[str, Any] = {"files": sz.tree_files}
    dest = runs / "rsync-tree"
    if profile_dir is None:
        drop_dirty()
        r = daemon.pull("tree", dest)
        out["rsync_initial"] = r
        say(f"  rsync -a initial       {r['seconds']:.2f} s")
    drop_dirty()
    (src / "_latency").mkdir(exist_ok=True)
    with SbsRun(runs / "sbs-tree", src, profile_dir=profile_dir, tag="tree") as run:
        ready = run.start_alpha()
        s = run.sync_beta(ready["seq"])
        s["alpha_ready_s"] = ready["alpha_ready_s"]
        out["sbs_initial"] = s
        say(f"  SBS initial            {s['seconds']:.2f} s (alpha's first scan "
            f"{ready['alpha_ready_s']:.1f} s before)  peak alpha {s['alpha_mem_mb']['VmHWM']} "
            f"MB, beta {s['beta_mem_mb']['VmHWM']} MB")
        if "rsync_initial" in out:
            out["ratio_initial_sbs_over_rsync"] = ratio(s["seconds"],
                                                        out["rsync_initial"]["seconds"])
        roles = run.settle()
        prof_sync = run.stop_profilers()  # after settle: it covers what follows the sync too
        out["roles_after_initial_sync"] = roles
        if roles["roles_changed"]:
            say(f"  ROLES CHANGED after the initial sync: {roles} (a takeover happened; "
                f"see {run.root}/*.log); measuring from the current primary")
        lat = latency_samples(run.folder_of(roles["primary"]),
                              run.folder_of(roles["secondary"]), sz.latency_samples)
        out["sbs_latency"] = lat
        say(f"  SBS latency  p50 {lat['p50_ms']} ms  p99 {lat['p99_ms']} ms  max "
            f"{lat['max_ms']} ms ({lat['samples']} samples, {lat['timed_out']} timed out)")
        # idle: let the last writes settle, then only watch
        idle_roles = run.settle()
        if profile_dir is not None:
            run.tag = "tree-idle"
            run._profile("alpha")
            run._profile("beta")
        c0, t0 = run.cpu_seconds(), time.perf_counter()
        time.sleep(sz.idle_seconds)
        c1, dt = run.cpu_seconds(), time.perf_counter() - t0
        idle = {n: round(100 * (c1[n] - c0[n]) / dt, 2) for n in c0}
        idle["pair"] = round(idle["alpha"] + idle["beta"], 2)
        out["idle_cpu_pct_of_one_core"] = {**idle, "seconds": round(dt, 1),
                                           "period_s": NODE["period"],
                                           "primary": idle_roles["primary"]}
        say(f"  idle CPU over {dt:.0f} s: alpha {idle['alpha']} %, beta {idle['beta']} % "
            f"of one core ({idle_roles['primary']} is primary; rescan every "
            f"{NODE['period']} s)")
        if profile_dir is not None:
            out["profile_initial"] = prof_sync
            out["profile_idle"] = run.stop_profilers()
        out["exact"] = check_exact(src, run.dst)
    shutil.rmtree(src / "_latency", ignore_errors=True)
    if profile_dir is None:
        rs = rsync_latency(daemon, "tree", src, dest, sz.rsync_latency_samples)
        out["rsync_per_change"] = rs
        out["ratio_latency_sbs_p50_over_rsync_p50"] = ratio(lat["p50_ms"], rs["p50_ms"])
        say(f"  rsync per change  p50 {rs['p50_ms']} ms (walks {sz.tree_files} files each time)")
        shutil.rmtree(dest, ignore_errors=True)
    out["latency_target_met"] = lat["p50_ms"] < TARGETS["latency_p50_ms"] and \
        lat["p99_ms"] < TARGETS["latency_p99_ms"] and not lat["timed_out"]
    return out


# ------------------------------------------------------------------------------ main


def host() -> dict[str, Any]:
    return {"cpus": os.cpu_count(), "python": platform.python_version(),
            "pyzmq": zmq.__version__, "libzmq": zmq.zmq_version(),
            "rsync": subprocess.run(["rsync", "--version"], capture_output=True,
                                    text=True).stdout.splitlines()[0],
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
        marker = data / f"{name}.{count}x{size}.done"
        if marker.exists():
            shutil.rmtree(data / name / "_latency", ignore_errors=True)
            continue
        shutil.rmtree(data / name, ignore_errors=True)
        t0 = time.perf_counter()
        if name == "big":
            make_big(data / name, size)
        else:
            make_files(data / name, count, size)
        os.sync()
        marker.touch()
        say(f"data: {count} x {size} B in {data / name} ({time.perf_counter() - t0:.1f} s)")


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
    ap.add_argument("--no-extras", action="store_true",
                    help="skip rsync --fsync and SBS over plain TCP (reference figures)")
    ap.add_argument("--native", action="store_true",
                    help="with --profile: C frames too (py-spy --native)")
    ap.add_argument("--data", type=Path, default=Path(f"/tmp/sbs-bench-{os.getuid()}"))
    ap.add_argument("--keep", action="store_true",
                    help="keep the data afterwards (and reuse it next time)")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    sz = QUICK if args.quick else FULL
    only = set(args.only.split(","))
    name = "replication" + ("-profile" if args.profile else "") + ("-quick" if args.quick else "")
    out_path = args.out or OUT / f"{name}.json"
    out_path.parent.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"bench": "replication", "quick": args.quick,
                              "profile": args.profile, "sizes": asdict(sz), "node": NODE,
                              "targets": TARGETS, "host": host(),
                              "when": time.strftime("%Y-%m-%dT%H:%M:%S")}
    profile_dir = OUT if args.profile else None
    extras = not args.no_extras and not args.quick
    t_start = time.perf_counter()
    data, runs = args.data / ("data-quick" if args.quick else "data"), args.data / "runs"
    shutil.rmtree(runs, ignore_errors=True)
    runs.mkdir(parents=True)
    Profiler.native = args.native
    try:
        ensure_data(data, sz, only)
        daemon = RsyncDaemon(args.data / "rsyncd", {m: data / m for m in
                                                     ("small", "big", "tree", "lat")})
        try:
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
                    report["tree"] = scenario_tree(data, runs, daemon, sz, profile_dir)
            else:
                if "small" in only:
                    say(f"small: initial sync of {sz.small_files} x {sz.small_size} B")
                    report["small"] = scenario_small(data, runs, daemon, sz, extras)
                if "big" in only:
                    say(f"big: one {sz.big_bytes >> 20} MiB file")
                    report["big"] = scenario_big(data, runs, daemon, sz, extras, extras)
                if "latency" in only:
                    say("latency: single small files, near-empty tree")
                    report["latency"] = scenario_latency_small(runs, daemon, data, sz)
                    rt = {c: round_trip(curve=c, n=1000) for c in (False, True)}
                    report["latency"]["transport_round_trip_ms"] = {
                        ("curve" if c else "plain"): {"p50": r["p50_ms"], "p99": r["p99_ms"]}
                        for c, r in rt.items()}
                if "tree" in only:
                    say(f"tree: {sz.tree_files} files")
                    report["tree"] = scenario_tree(data, runs, daemon, sz, None)
        finally:
            daemon.stop()
    finally:
        shutil.rmtree(runs, ignore_errors=True)
        if not args.keep:
            shutil.rmtree(args.data, ignore_errors=True)
    report["host"]["loadavg_at_end"] = os.getloadavg()
    report["total_seconds"] = round(time.perf_counter() - t_start, 1)
    out_path.write_text(json.dumps(report, indent=2) + "\n")
    say(f"done in {report['total_seconds']} s -> {out_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
