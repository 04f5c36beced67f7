"""Sentinels and notifications with real node processes and a real SMTP server (SPEC 8-10).

Every sentinel command carries a per-test marker in its argv, so a test can tell its own
processes apart in /proc and the teardown can prove that none of them outlived the test.
A process counts as gone when /proc has no entry for it or shows it as a zombie: a sentinel
orphaned by a `kill -9` of its node is reaped by whoever inherits it, not by the test.
"""
from __future__ import annotations

import email
import json
import os
import secrets
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from sbs.tools.client import request

from tests.conftest import free_port
from tests.pair import Pair, wait_for

_SCRIPT = Path(sys.executable).with_name("sbs-tools")
SBS_TOOLS = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "sbs.tools.cli"]


def sbs_tools(*args: str, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run([*SBS_TOOLS, *args], capture_output=True, text=True, timeout=timeout)


# ---------------------------------------------------------------------------- processes
def proc_state(pid: int) -> str | None:
    """The state letter of /proc/<pid>/stat, or None when there is no such process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[-1].split()[0]


def alive(pid: int | None) -> bool:
    return pid is not None and proc_state(pid) not in (None, "Z", "X")


def marked(token: str) -> list[int]:
    """Live processes whose command line holds `token` (zombies have an empty one)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
            except OSError:
                continue
            if token.encode() in cmdline and alive(int(entry)):
                found.append(int(entry))
    return found


def wait_dead(pid: int, timeout: float = 3.0) -> None:
    wait_for(lambda: not alive(pid), timeout, f"process {pid} to die")


class Sentinelled:
    """Pairs whose sentinels are `sleep`-like Python processes tagged with a unique marker."""

    def __init__(self, make_pair):
        self.token = f"sbs-e2e-{secrets.token_hex(6)}"
        self._make_pair = make_pair
        self.pairs: list[Pair] = []

    def command(self, name: str) -> str:
        return f"{sys.executable} -c 'import time; time.sleep(600)' {self.token}-{name}"

    def forking_command(self, name: str) -> str:
        """A sentinel that starts a worker of its own (as a shell script or a pre-forking server
        would): PDEATHSIG does not reach the worker."""
        worker = f"[sys.executable, '-c', 'import time; time.sleep(600)', '{self.token}-{name}-w']"
        return f'{sys.executable} -c "import subprocess, sys; subprocess.run({worker})" ' + (
            f"{self.token}-{name}")

    def pair(self, *names: str, forking: tuple[str, ...] = (), **config) -> Pair:
        commands = {n: self.command(n) for n in names}
        commands.update({n: self.forking_command(n) for n in forking})
        pair = self._make_pair(sentinels=commands, **config)
        self.pairs.append(pair)
        return pair

    def running(self, name: str) -> list[int]:
        """Live processes of sentinel `name`, wherever they run."""
        return marked(f"{self.token}-{name}")


@pytest.fixture
def sentinelled(make_pair):
    harness = Sentinelled(make_pair)
    yield harness
    for pair in harness.pairs:
        pair.stop()  # before make_pair's own stop, so the check below sees the nodes gone
    wait_for(lambda: not marked(harness.token), 15, "every sentinel process of the test to end")


def sentinel(status: dict, name: str) -> dict:
    return next(s for s in status["sentinels"] if s["name"] == name)


def running_pid(node, name: str) -> int | None:
    """The pid of `name` when the node's status says it runs and that process is alive."""
    st = node.status(0.5)
    if not st:
        return None
    s = next((s for s in st["sentinels"] if s["name"] == name), None)
    if s and s["state"] == "running" and alive(s["pid"]):
        return s["pid"]
    return None


def start_pair(pair: Pair, names: tuple[str, ...]) -> None:
    """alpha primary, beta secondary holding alpha's sentinel list."""
    pair.start_both()
    wait_for(lambda: {s["name"] for s in pair.beta.status(0.5)["sentinels"]} == set(names), 5,
             "the sentinel list on beta")


class Tail:
    """`sbs-tools tail --json` as a subprocess, read with deadlines."""

    def __init__(self, config: Path):
        self.proc = subprocess.Popen([*SBS_TOOLS, "tail", "--json", "--config", str(config)],
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        self.messages: list[dict] = []
        self._buf = b""

    def wait(self, pred, timeout: float, what: str) -> dict:
        deadline = time.monotonic() + timeout
        seen = 0
        while True:
            for msg in self.messages[seen:]:
                if pred(msg):
                    return msg
            seen = len(self.messages)
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"timed out after {timeout}s waiting on the bus for {what}")
            ready, _, _ = select.select([self.proc.stdout], [], [], left)
            if ready:
                chunk = os.read(self.proc.stdout.fileno(), 65536)
                if not chunk:
                    raise AssertionError(f"tail ended (exit {self.proc.wait(5)}) before {what}")
                self._buf += chunk
                *lines, self._buf = self._buf.split(b"\n")
                self.messages += [json.loads(line) for line in lines if line.strip()]

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc.stdout.close()


@pytest.fixture
def tails():
    opened: list[Tail] = []

    def open_tail(config: Path) -> Tail:
        tail = Tail(config)
        opened.append(tail)
        return tail

    yield open_tail
    for tail in opened:
        tail.close()


# ---------------------------------------------------------------------------- SMTP
def email_to(port: int) -> dict:
    return {"enabled": "true", "smtp_server": "127.0.0.1", "smtp_port": port,
            "sender": "sbs@example.com", "receiver": "ops@example.com"}


def text_of(message: email.message.EmailMessage) -> str:
    body = message.get_body(("plain", "html"))
    return f"{message['subject']}\n{body.get_content() if body else message.get_content()}"


# ---------------------------------------------------------------------------- tests
def test_sentinel_runs_on_the_primary_only_and_moves_on_kill_9(sentinelled, tails):
    pair = sentinelled.pair("web")
    start_pair(pair, ("web",))

    # 1. on the primary only
    pid = wait_for(lambda: running_pid(pair.alpha, "web"), 15, "web running on alpha")
    assert sentinelled.running("web") == [pid]
    assert Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1].split()[1] == str(
        pair.alpha.pid), "the sentinel is a child of the alpha node process"
    on_beta = sentinel(pair.beta.status(), "web")
    assert on_beta["state"] == "stopped" and on_beta["pid"] is None and on_beta["active"]
    res = sbs_tools("status", "--config", str(pair.beta.config), "--json")
    assert res.returncode == 0, res.stderr
    assert all(s["pid"] is None for s in json.loads(res.stdout)["sentinels"])

    # 2. kill -9 of the node alone: PDEATHSIG takes its sentinel along; beta runs it
    tail = tails(pair.beta.config)
    tail.wait(lambda m: m["type"] == "hb", 15, "a heartbeat (tail connected)")
    pair.alpha.kill()
    wait_dead(pid)
    new_pid = wait_for(lambda: running_pid(pair.beta, "web"), pair.beta.cfg.dead_after + 3,
                       "web running on beta")
    assert sentinelled.running("web") == [new_pid]
    st = pair.beta.status()
    assert st["state"] == "primary" and st["epoch"] == 2 and st["restricted"] is False

    # 9. the bus carries the takeover and the sentinel start with its pid
    tail.wait(lambda m: m.get("event") == "takeover" and m["old_primary"] == "alpha", 5,
              "the takeover event")
    started = tail.wait(lambda m: m.get("event") == "sentinel" and m["action"] == "started", 5,
                        "the sentinel started event")
    assert started["name"] == "beta" and started["sentinel"] == "web"
    assert started["pid"] == new_pid

    # the old primary rejoins as secondary and does not start it again
    pair.alpha.start()
    pair.alpha.wait_state("secondary")
    wait_for(lambda: {s["name"] for s in pair.alpha.status(0.5)["sentinels"]} == {"web"}, 5,
             "the sentinel list on alpha")
    assert sentinel(pair.alpha.status(), "web")["pid"] is None
    assert sentinelled.running("web") == [new_pid]


def test_what_a_sentinel_starts_dies_with_its_node_too(sentinelled):
    pair = sentinelled.pair(forking=("svc",))
    start_pair(pair, ("svc",))
    wait_for(lambda: running_pid(pair.alpha, "svc"), 15, "svc running on alpha")
    old = wait_for(lambda: len(p := sentinelled.running("svc")) == 2 and p, 5,
                   "svc and its worker")
    pair.alpha.kill()
    for pid in old:
        wait_dead(pid)
    wait_for(lambda: running_pid(pair.beta, "svc"), pair.beta.cfg.dead_after + 3,
             "svc running on beta")
    new = wait_for(lambda: len(p := sentinelled.running("svc")) == 2 and p, 5,
                   "svc and its worker on beta")
    assert not set(new) & set(old)


def test_a_stopped_sentinel_is_not_started_on_takeover(sentinelled):
    pair = sentinelled.pair("web", "cron")
    start_pair(pair, ("web", "cron"))
    cron = wait_for(lambda: running_pid(pair.alpha, "cron"), 15, "cron running on alpha")

    # sentinels are managed on the primary: the secondary refuses
    res = sbs_tools("sentinel", "stop", "cron", "--config", str(pair.beta.config))
    assert res.returncode == 1 and "primary" in res.stderr, res

    res = sbs_tools("sentinel", "stop", "cron", "--config", str(pair.alpha.config), "--json")
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["active"] == ["web"]
    wait_dead(cron)
    assert sentinel(pair.alpha.status(), "cron")["state"] == "stopped"

    # the active list replicates to the secondary, which keeps it in its state_dir
    wait_for(lambda: pair.beta.status(0.5)["active_sentinels"] == ["web"], 5,
             "beta to learn that cron is inactive")
    pushed = json.loads((pair.beta.cfg.state_dir / "pair.json").read_text())
    assert pushed["active"] == ["web"] and set(pushed["sentinels"]) == {"web", "cron"}
    res = sbs_tools("sentinel", "list", "--config", str(pair.beta.config), "--json")
    assert res.returncode == 0 and json.loads(res.stdout)["active"] == ["web"]

    pair.alpha.kill()
    web = wait_for(lambda: running_pid(pair.beta, "web"), pair.beta.cfg.dead_after + 3,
                   "web running on beta")
    # active sentinels start together, in one pass: cron would be running by now
    st = pair.beta.status()
    assert sentinel(st, "cron")["state"] == "stopped" and sentinel(st, "cron")["pid"] is None
    assert st["active_sentinels"] == ["web"]
    assert sentinelled.running("cron") == [] and sentinelled.running("web") == [web]

    # and the operator can still start it on the new primary
    res = sbs_tools("sentinel", "start", "cron", "--config", str(pair.beta.config))
    assert res.returncode == 0, res.stderr
    wait_for(lambda: running_pid(pair.beta, "cron"), 15, "cron running on beta")


def test_a_crashed_sentinel_is_restarted_and_counted(sentinelled, tails):
    pair = sentinelled.pair("web")
    pair.alpha.start()
    pair.alpha.wait_state("primary")
    pid = wait_for(lambda: running_pid(pair.alpha, "web"), 15, "web running")
    tail = tails(pair.alpha.config)
    tail.wait(lambda m: m["type"] == "hb", 15, "a heartbeat (tail connected)")
    for restarts in (1, 2):
        os.kill(pid, signal.SIGKILL)
        wait_dead(pid)
        tail.wait(lambda m, p=pid: m.get("event") == "sentinel" and m["action"] == "exited"
                  and m["pid"] == p, 15, f"the exit of {pid}")
        # backoff 0.5 s, then 1 s: a quick exit doubles the wait
        new = wait_for(lambda p=pid: (q := running_pid(pair.alpha, "web")) and q != p and q, 5,
                       f"restart #{restarts}")
        s = sentinel(pair.alpha.status(), "web")
        assert s["restarts"] == restarts and s["last_exit"] == -signal.SIGKILL
        assert sentinelled.running("web") == [new]
        pid = new
    res = sbs_tools("status", "--config", str(pair.alpha.config), "--json")
    assert res.returncode == 0, res.stderr
    shown = sentinel(json.loads(res.stdout), "web")
    assert shown["pid"] == pid and shown["restarts"] == 2 and shown["state"] == "running"


def test_backup_role_started_alone_is_restricted(sentinelled):
    pair = sentinelled.pair("web", alpha={"node": {"role": "backup"}})
    pair.alpha.start()
    st = pair.alpha.wait_state("primary")
    assert st["restricted"] is True and st["role"] == "backup"
    s = sentinel(st, "web")
    assert s["active"] and s["state"] == "stopped" and s["pid"] is None
    res = sbs_tools("status", "--config", str(pair.alpha.config))
    assert res.returncode == 0 and "restricted" in res.stdout
    # a sentinel start would have happened with the role change; the loop has turned since
    wait_for(lambda: pair.alpha.status(0.5)["in_state_for"] > 1.0, 15, "a second as primary")
    assert sentinelled.running("web") == []
    assert sentinel(pair.alpha.status(), "web")["pid"] is None


def test_a_restricted_backup_gives_way_when_the_main_joins(sentinelled):
    pair = sentinelled.pair("web", alpha={"node": {"role": "backup"}})
    pair.alpha.start()
    assert pair.alpha.wait_state("primary")["restricted"] is True
    (pair.folder("alpha") / "written-on-backup.txt").write_text("keep me")
    pair.beta.start()  # the main: it joins as secondary, catches up, then gets the services
    st = pair.beta.wait_state("primary", timeout=15)
    assert st["restricted"] is False
    pid = wait_for(lambda: running_pid(pair.beta, "web"), 15, "web running on the main")
    assert sentinelled.running("web") == [pid]
    assert pair.alpha.wait_state("secondary")["restricted"] is False
    assert (pair.folder("beta") / "written-on-backup.txt").read_text() == "keep me"


def test_backup_takes_over_unrestricted_and_the_failover_email_names_both(sentinelled, smtp):
    port, collector = smtp
    pair = sentinelled.pair("web", email=email_to(port), beta={"node": {"role": "backup"}})
    start_pair(pair, ("web",))
    assert pair.beta.status()["restricted"] is False
    assert sentinel(pair.beta.status(), "web")["pid"] is None
    old = wait_for(lambda: running_pid(pair.alpha, "web"), 15, "web running on alpha")

    pair.alpha.kill()
    wait_dead(old)
    new = wait_for(lambda: running_pid(pair.beta, "web"), pair.beta.cfg.dead_after + 3,
                   "web running on the backup")
    st = pair.beta.status()
    assert st["state"] == "primary" and st["restricted"] is False and st["role"] == "backup"
    assert sentinelled.running("web") == [new]

    wait_for(lambda: collector.messages, 10, "the failover email")
    assert len(collector.messages) == 1
    text = text_of(collector.messages[0])
    assert "beta is now primary" in collector.messages[0]["subject"]
    assert "Old primary: alpha" in text and "New primary: beta" in text, text
    assert f"Epoch: {st['epoch']}" in text and "web" in text
    assert collector.messages[0]["to"] == "ops@example.com"
    wait_for(lambda: pair.beta.status(0.5)["email"]["sent"] == 1, 15, "email counted as sent")


@pytest.mark.parametrize("server", ["closed", "mute"])
def test_an_unreachable_smtp_server_does_not_slow_the_takeover(sentinelled, server, mute_port):
    port = free_port() if server == "closed" else mute_port
    pair = sentinelled.pair("web", email=email_to(port))
    start_pair(pair, ("web",))
    wait_for(lambda: running_pid(pair.alpha, "web"), 15, "web running on alpha")
    dead_after = pair.beta.cfg.dead_after

    killed = time.monotonic()
    pair.alpha.kill()
    wait_for(lambda: running_pid(pair.beta, "web"), dead_after + 3, "web running on beta")
    took = time.monotonic() - killed
    # a takeover that waited for the email would take its retries (1 s, then 2 s: closed) or
    # its 10 s timeout (mute); the margin is for a loaded machine
    assert took < dead_after + 2.0, f"takeover with sentinel took {took:.2f}s"

    # the loop stays responsive while the email is being retried (or hangs on a mute server)
    st = wait_for(lambda: (s := pair.beta.status(0.5)) and (
        s["email"]["pending"] or s["email"]["failed"]) and s, 15, "the email in flight")
    asked = time.monotonic()
    assert pair.beta.status(3.0) is not None and time.monotonic() - asked < 3.0
    assert st["email"]["sent"] == 0 and st["state"] == "primary"


def test_test_email_says_whether_it_was_delivered(make_pair, smtp):
    port, collector = smtp
    good = make_pair(email=email_to(port)).alpha.config
    res = sbs_tools("test-email", "--config", str(good))
    assert res.returncode == 0, res.stderr
    assert "delivered" in res.stdout.lower() and "not" not in res.stdout.lower()
    assert len(collector.messages) == 1 and "test" in collector.messages[0]["subject"].lower()

    bad = make_pair(email=email_to(free_port())).alpha.config
    started = time.monotonic()
    res = sbs_tools("test-email", "--config", str(bad))
    assert res.returncode == 1
    said = (res.stdout + res.stderr).lower()
    assert "not delivered" in said and "connect" in said, said
    assert time.monotonic() - started < 15
    assert len(collector.messages) == 1


# -------------------------------------------------------------------- slow stop, restart alone
def slow_to_stop(script: Path, record: Path, token: str, seconds: float = 2.5) -> str:
    """A sentinel that writes when it starts and when it has stopped, and takes `seconds` to
    stop on SIGTERM (a server draining its connections): longer than the pair's dead_after."""
    script.write_text(
        "import os, signal, sys, time\n"
        "def rec(what):\n"
        f"    with open({str(record)!r}, 'a') as f:\n"
        "        f.write(f'{what} {os.getpid()} {time.time()}\\n')\n"
        "def stop(*_):\n"
        f"    time.sleep({seconds})\n"
        "    rec('stop')\n"
        "    sys.exit(0)\n"
        "signal.signal(signal.SIGTERM, stop)\n"
        "rec('start')\n"
        "while True:\n"
        "    time.sleep(60)\n")
    return f"{sys.executable} {script} {token}"


@pytest.mark.parametrize("how", ["promote", "sigterm"])
def test_a_slow_stopping_sentinel_never_runs_twice_and_the_peer_waits_for_it(make_pair,
                                                                              tmp_path, how):
    """The old primary stops its sentinels before it hands over; while one takes longer than
    dead_after to stop, the peer must keep hearing it (as stopping), not take over on silence
    with the service still running on the old primary."""
    record = tmp_path / "record.txt"
    token = f"sbs-e2e-slow-{secrets.token_hex(4)}"
    pair = make_pair(node={"heartbeat": 0.2, "dead_after": 1.0},
                     sentinels={"slow": slow_to_stop(tmp_path / "slow.py", record, token)})
    start_pair(pair, ("slow",))
    wait_for(lambda: running_pid(pair.alpha, "slow") and record.exists(), 15, "slow on alpha")
    if how == "promote":
        res = sbs_tools("promote", "--config", str(pair.beta.config))
        assert res.returncode == 0, res
    else:
        pair.alpha.signal(signal.SIGTERM)

    def events() -> list[tuple[str, str, float]]:
        return [(what, pid, float(t)) for what, pid, t in
                (line.split() for line in record.read_text().splitlines())]

    wait_for(lambda: running_pid(pair.beta, "slow")
             and sum(what == "start" for what, _, _ in events()) == 2, 15,
             "slow started on beta")
    seen = events()
    first, second = [pid for what, pid, _ in seen if what == "start"][:2]
    stopped_at = next(t for what, pid, t in seen if what == "stop" and pid == first)
    started_at = next(t for what, pid, t in seen if what == "start" and pid == second)
    assert started_at >= stopped_at, f"the service ran on both nodes at once: {seen}"
    log = pair.beta.log.read_text()
    assert "no heartbeat" not in log, "beta took over on silence"
    assert "PRIMARY now" in log
    if how == "sigterm":
        assert pair.alpha.wait_exit(10) == 0
    pair.stop()
    wait_for(lambda: not marked(token), 10, "the slow sentinel to end")


def test_status_is_answered_throughout_a_slow_sentinel_stop(make_pair, tmp_path):
    """Stopping a sentinel that takes 4 s is a state of the node, not a wait in its loop: the
    old primary answers STATUS within 1 s all along (a loop waiting on the stop would be
    silent for 4 s; each answer takes milliseconds on an idle machine), showing "stopping"."""
    record = tmp_path / "record.txt"
    token = f"sbs-e2e-slow-{secrets.token_hex(4)}"
    pair = make_pair(sentinels={"slow": slow_to_stop(tmp_path / "slow.py", record, token, 4.0)})
    start_pair(pair, ("slow",))
    first = wait_for(lambda: running_pid(pair.alpha, "slow"), 5, "slow on alpha")
    reply = request(pair.beta.cfg, "PROMOTE", {"force": False}, timeout=5)
    assert reply and reply["status"] == "ok", reply

    def stopped() -> bool:
        return f"stop {first} " in record.read_text()

    states: list[str] = []
    deadline = time.monotonic() + 30
    while not stopped():
        assert time.monotonic() < deadline, "the slow sentinel did not stop"
        reply = request(pair.alpha.cfg, "STATUS", timeout=1.0)
        assert reply is not None and reply["status"] == "ok", (
            f"no STATUS answer within 1 s (states so far {states}){pair.alpha.tail_log()}")
        states.append(reply["state"])
    assert states.count("stopping") >= 10, states  # the stop took seconds, all answered
    wait_for(lambda: running_pid(pair.beta, "slow"), 15, "slow on beta")
    pair.alpha.wait_state("secondary", 10)
    pair.stop()
    wait_for(lambda: not marked(token), 10, "the slow sentinel to end")


def test_a_secondary_restarted_alone_runs_what_its_primary_pushed_above_its_epoch(sentinelled):
    """SPEC: the secondary keeps the last pushed folder and sentinel lists in state_dir "so a
    restart or a takeover uses it", and its next epoch is above every one it has seen."""
    pair = sentinelled.pair("web", beta={"sentinels": {"own": sentinelled.command("own")}})
    start_pair(pair, ("web",))  # beta holds alpha's list: web only
    wait_for(lambda: running_pid(pair.alpha, "web"), 15, "web running on alpha")
    pair.beta.stop()  # a secondary, stopped
    pair.alpha.stop()
    pair.beta.start()
    st = pair.beta.wait_state("primary")
    assert {s["name"] for s in st["sentinels"]} == {"web"}, st["sentinels"]
    wait_for(lambda: running_pid(pair.beta, "web"), 15, "web running on beta")
    assert not sentinelled.running("own")
    assert st["epoch"] == 2, "a primary alone must number its term above the one it followed"
    assert "was secondary when it stopped" in pair.beta.log.read_text()


def test_the_loser_of_a_split_brain_stops_its_sentinels(sentinelled):
    """A paused primary (SIGSTOP) loses the split brain when it wakes up. Its sentinel, a
    separate process the pause does not reach, is stopped by the node's guard before the peer
    starts its own (tests/test_e2e_guard.py has the timings), and the node does not start it
    again: it yields and leaves the winner's running."""
    pair = sentinelled.pair("web")
    start_pair(pair, ("web",))
    old = wait_for(lambda: running_pid(pair.alpha, "web"), 15, "web running on alpha")
    pair.alpha.signal(signal.SIGSTOP)
    try:
        new = wait_for(lambda: running_pid(pair.beta, "web"), pair.beta.cfg.dead_after + 5,
                       "web running on beta")
        assert sentinelled.running("web") == [new]  # the guard stopped alpha's
    finally:
        pair.alpha.signal(signal.SIGCONT)
    wait_dead(old, timeout=10)
    assert pair.alpha.wait_state("secondary")["epoch"] < pair.beta.status()["epoch"]
    assert sentinelled.running("web") == [new]
    assert "SPLIT BRAIN" in pair.alpha.log.read_text()


def test_tail_prints_one_readable_line_per_bus_message(make_pair):
    pair = make_pair()
    pair.alpha.start()
    pair.alpha.wait_state("primary")
    proc = subprocess.Popen([*SBS_TOOLS, "tail", "--config", str(pair.alpha.config)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines: list[str] = []

    def read_until(pred, what: str, timeout: float = 10) -> str:
        deadline = time.monotonic() + timeout
        while True:
            hit = next((line for line in lines if pred(line)), None)
            if hit:
                return hit
            left = deadline - time.monotonic()
            assert left > 0, f"no {what} from tail within {timeout}s: {lines[-5:]}"
            if select.select([proc.stdout], [], [], left)[0]:
                line = proc.stdout.readline()
                assert line, f"tail ended: {proc.stderr.read()}"
                lines.append(line.rstrip("\n"))

    try:
        hb = read_until(lambda line: " hb " in line, "heartbeat")
        assert "alpha" in hb and "heartbeat primary epoch 1 manifest" in hb, hb
        (pair.folder("alpha") / "hello.txt").write_text("hello\n")
        manifest = read_until(lambda line: " manifest " in line and "'docs': 1" in line,
                              "manifest line")
        assert "(0 deleted)" in manifest, manifest
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(10) == 0
        proc.stdout.close()
        proc.stderr.close()
