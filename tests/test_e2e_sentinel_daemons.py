"""Sentinels whose command daemonises (real nodes, real processes): a process that leaves the
sentinel's process group with setsid(), or is reparented away from it by a double fork, must
still stop when its node stops being primary, and when the sentinel's main process exits.

Each daemon writes its pid to a file and carries the test's marker in its command line; every
test kills whatever of its own is left in a `finally`, whether it passed or not.
"""
from __future__ import annotations

import contextlib
import os
import secrets
import signal
import sys
from pathlib import Path

import pytest

from tests.pair import wait_for
from tests.test_e2e_sentinels import alive, marked, running_pid, sbs_tools, sentinel, start_pair

# argv: PID_FILE MODE MARKER. MODE "escape": the main process stays and its child leaves the
# group with setsid(); "classic": the main process exits 0 at once and a double-forked
# grandchild in a session of its own is the service (what `daemon(3)` does).
_DAEMON = """\
import os, sys, time
pid_file, mode = sys.argv[1], sys.argv[2]
if os.fork() == 0:
    os.setsid()
    if mode == "classic" and os.fork() != 0:
        os._exit(0)
    with open(pid_file, "a") as f:
        f.write(f"{os.getpid()}\\n")
    while True:
        time.sleep(60)
if mode == "classic":
    os._exit(0)
while True:
    time.sleep(60)
"""


class Daemons:
    """Pairs whose sentinel `svc` runs _DAEMON, and the pids its daemons wrote."""

    def __init__(self, make_pair, tmp_path: Path):
        self.token = f"sbs-e2e-daemon-{secrets.token_hex(4)}"
        self.script, self.pid_file = tmp_path / "daemon.py", tmp_path / "daemon.pids"
        self.script.write_text(_DAEMON)
        self._make_pair = make_pair
        self.pairs: list = []

    def pair(self, mode: str):
        command = f"{sys.executable} {self.script} {self.pid_file} {mode} {self.token}"
        pair = self._make_pair(sentinels={"svc": command})
        self.pairs.append(pair)
        return pair

    def pids(self) -> list[int]:
        try:
            return [int(line) for line in self.pid_file.read_text().split()]
        except (OSError, ValueError):
            return []


@pytest.fixture
def daemons(make_pair, tmp_path):
    """The nodes stop first (a node still running would start its sentinel again), then what
    is left of the test's daemons is killed, whether the test passed or not."""
    harness = Daemons(make_pair, tmp_path)
    try:
        yield harness
    finally:
        try:
            for pair in harness.pairs:
                pair.stop()
        finally:
            for pid in marked(harness.token):
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)
            wait_for(lambda: not marked(harness.token), 10, "the test's daemons to be gone")


def _one_daemon(pair, pids) -> int:
    wait_for(lambda: running_pid(pair.alpha, "svc"), 15, "svc running on alpha")
    daemon = wait_for(lambda: pids() and alive(pids()[0]) and pids()[0], 10, "the daemon")
    assert _session(daemon) == daemon != _session(running_pid(pair.alpha, "svc"))
    return daemon


def _guarded_daemon(pair, pids) -> int:
    """_one_daemon, once alpha's status shows it: the look that found it told the guard."""
    daemon = _one_daemon(pair, pids)
    wait_for(lambda: sentinel(pair.alpha.status(), "svc")["outside_group"] == [daemon], 5,
             "alpha's status to show the daemon")
    return daemon


def _session(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[3])


@pytest.mark.parametrize("how", ["sigterm", "promote"])
def test_a_process_a_sentinel_moved_to_a_session_of_its_own_stops_with_it(daemons, how):
    pids = daemons.pids
    pair = daemons.pair("escape")
    start_pair(pair, ("svc",))
    daemon = _one_daemon(pair, pids)
    if how == "promote":
        res = sbs_tools("promote", "--config", str(pair.beta.config))
        assert res.returncode == 0, res
        # the old primary stops its sentinels before it hands over: gone by now
        assert not alive(daemon), f"the daemon {daemon} outlived the hand-over"
        wait_for(lambda: len(pids()) == 2, 10, "beta's svc to start its daemon")
    else:
        pair.alpha.signal(signal.SIGTERM)
        assert pair.alpha.wait_exit(15) == 0
        assert not alive(daemon), f"the daemon {daemon} outlived its stopped node"
    log = pair.alpha.log.read_text()
    assert f"{daemon} " in log.split("stopping sentinel svc", 1)[1], log


def test_a_sentinel_that_daemonises_and_exits_leaves_no_daemon_behind(daemons):
    """The main process of a classic daemon exits 0 at once: the node treats that as any exit of
    a sentinel (restart with backoff) and kills what it left behind, so there is never more than
    one copy of the service, even on one node, and none once the node has stopped."""
    pids = daemons.pids
    pair = daemons.pair("classic")
    pair.alpha.start()  # alone: no peer to take the service over when alpha stops
    pair.alpha.wait_state("primary")
    first = wait_for(lambda: pids() and pids()[0], 15, "the first daemon")
    wait_for(lambda: len(pids()) >= 2, 15, "the sentinel's restart and its second daemon")
    assert not alive(first), f"the first daemon {first} still runs beside the second"
    assert sum(alive(pid) for pid in pids()) <= 1, pids()
    assert f"{first} " in pair.alpha.log.read_text()
    pair.alpha.signal(signal.SIGTERM)
    assert pair.alpha.wait_exit(15) == 0
    assert not any(alive(pid) for pid in pids()), pids()


def test_the_guard_stops_a_paused_primary_s_daemon_before_the_peer_starts_its_own(daemons):
    """The guard stops a paused node's sentinels (node/guard.py): the process that left the
    sentinel's group too, before the peer takes over and starts its own."""
    pids = daemons.pids
    pair = daemons.pair("escape")
    start_pair(pair, ("svc",))
    daemon = _guarded_daemon(pair, pids)
    pair.alpha.signal(signal.SIGSTOP)
    try:
        wait_for(lambda: running_pid(pair.beta, "svc"), 10, f"svc on beta{pair.beta.tail_log()}")
        wait_for(lambda: len(pids()) == 2, 10, "beta's svc to start its daemon")
        assert not alive(daemon), f"the paused primary's daemon {daemon} still runs"
    finally:
        pair.alpha.signal(signal.SIGCONT)
    pair.alpha.wait_state("secondary")


def test_a_daemon_of_a_sentinel_dies_with_its_node_killed_9(daemons):
    """kill -9 of the node: PDEATHSIG ends the sentinel's main process, the guard (on EOF of
    its pipe) its group and the processes outside it that the node told it of."""
    pids = daemons.pids
    pair = daemons.pair("escape")
    start_pair(pair, ("svc",))
    daemon = _guarded_daemon(pair, pids)
    pair.alpha.kill()
    wait_for(lambda: not alive(daemon), 5, f"the daemon {daemon} of the killed node to die")
    wait_for(lambda: len(pids()) == 2, 10, "beta's svc to start its daemon")


# A [checks] command that leaves a child behind, which writes its pid into the folder
# argv[1] and exits 50 ms later.
_LEAVER = """\
import os, sys, time
if os.fork() == 0:
    open(os.path.join(sys.argv[1], str(os.getpid())), "w").close()
    time.sleep(0.05)
    os._exit(0)
"""


def test_what_a_check_leaves_behind_is_reaped_when_it_exits(make_pair, tmp_path):
    """The node is a child subreaper: a process a [checks] command leaves running becomes the
    node's child when the check exits. Once it exits too it must be reaped, not kept as a
    zombie of the node until the node stops (one more per check, every check_interval)."""
    script, left = tmp_path / "leaver.py", tmp_path / "left"
    script.write_text(_LEAVER)
    left.mkdir()
    pair = make_pair(sentinels={"svc": f"{sys.executable} -c 'import time; time.sleep(600)'"})
    alpha = pair.alpha
    alpha.config.write_text(alpha.config.read_text()
                            + "\n[health]\nrestarts = 2\ncheck_interval = 0.2\n"
                            f"\n[checks]\nsvc = {sys.executable} {script} {left}\n")
    alpha.start()
    alpha.wait_state("primary")
    node = alpha.proc.pid
    wait_for(lambda: len(list(left.iterdir())) >= 5, 20, "five checks to leave a child each")

    def zombies() -> list[int]:
        out = []
        for p in left.iterdir():
            try:
                fields = Path(f"/proc/{p.name}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue  # reaped: gone
            if fields[0] == "Z" and int(fields[1]) == node:
                out.append(int(p.name))
        return out

    # the leftovers of the checks so far exit 50 ms after they start: each is reaped by a
    # later check (before, every one stayed a zombie of the node)
    seen = {p.name for p in left.iterdir()}
    wait_for(lambda: not [pid for pid in zombies() if str(pid) in seen], 15,
             f"the node to reap its checks' leftovers {sorted(seen)}")
