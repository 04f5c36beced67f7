"""Promises of the README proven with real node processes on 127.0.0.1/127.0.0.2: the strict
guard's boundary, a forced promotion, handover_timeout bounding a stop and a promote, a lost
hand-over, the failover email, an inotify overflow, and the demo.

Every wait polls a condition with a deadline; the deadlines hold with both cores busy.
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from sbs.tools.client import request

from tests.conftest import free_port
from tests.pair import free_port_triplet, wait_for
from tests.test_e2e_pair import settled
from tests.test_e2e_replication import files_under, replication, started, wait_equal, write


def batch(folder: Path, name: str, count: int) -> None:
    for n in range(count):
        write(folder / name / f"{name}{n:02}.txt", f"{name} file {n}")


def gone(pair, folder: Path, name: str) -> None:
    """Delete a whole subfolder in one event (renamed out of the tree), so one manifest holds
    all its deletions, as when a disk is unmounted."""
    os.rename(folder / name, pair.root / f"{name}-removed")


def test_strict_guard_boundary_19_files_and_exactly_half(make_pair):
    """The guard refuses a cycle that deletes more than half of a folder's files once it holds
    at least 20 (syncer.GUARD_MIN_FILES): all of 19 files go, exactly 10 of 20 go, 11 of 20
    are held."""
    pair = make_pair(node={"strict": "true", "period": 60})
    a = pair.folder("alpha")
    batch(a, "nineteen", 19)
    started(pair)
    b = pair.folder("beta")
    wait_equal(a, b, 20, "19 files")
    gone(pair, a, "nineteen")
    wait_equal(a, b, 20, "all of 19 files deleted: below the guard's minimum")
    assert files_under(b) == [] and not replication(pair.beta).get("error")

    batch(a, "keep", 10)
    batch(a, "half", 10)
    wait_equal(a, b, 20, "20 files")
    gone(pair, a, "half")
    wait_equal(a, b, 20, "exactly half of 20 files deleted: not more than half")
    assert len(files_under(b)) == 10 and not replication(pair.beta).get("error")

    gone(pair, a, "keep")
    wait_equal(a, b, 20, "the last 10 files deleted")
    batch(a, "rest", 9)
    batch(a, "eleven", 11)
    wait_equal(a, b, 20, "20 files again")
    gone(pair, a, "eleven")
    wait_for(lambda: "strict guard" in replication(pair.beta).get("error", ""), 20,
             "the guard to hold 11 of 20 deletions")
    assert "refusing to delete 11 of 20 files" in replication(pair.beta)["error"]
    assert len(files_under(b)) == 20  # nothing deleted


def sbs_tools(*args: str, timeout: float = 90) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sbs.tools.cli", *args], capture_output=True,
                          text=True, timeout=timeout)


def test_promote_of_a_secondary_whose_primary_is_silent_needs_force(make_pair):
    """A paused primary, a long dead_after (beta does not take over by itself for 20 s): once
    beta has not heard alpha for half of it, promote is refused and promote --force takes
    over at once."""
    # alpha's own dead_after is short only so that it starts as primary at once (its probe)
    pair = make_pair(alpha={"node": {"dead_after": 1.0}}, beta={"node": {"dead_after": 20.0}})
    pair.start_both()
    pair.alpha.signal(signal.SIGSTOP)
    try:
        wait_for(lambda: (st := pair.beta.status(1.0)) and st["peer"]["last_heard"] > 10.5, 40,
                 "beta to have heard nothing from alpha for half of dead_after")
        res = sbs_tools("promote", "--config", str(pair.beta.config), "--timeout", "10")
        said = res.stdout + res.stderr
        assert res.returncode == 1 and "peer unreachable" in said and "--force" in said, said
        assert pair.beta.state() == "secondary"

        res = sbs_tools("promote", "--config", str(pair.beta.config), "--force")
        assert res.returncode == 0, res.stdout + res.stderr
        st = pair.beta.status(1.0)
        assert st["state"] == "primary" and st["epoch"] == 2
        # the operator did it, not the silence
        assert "PRIMARY now (epoch 2, operator forced promotion)" in pair.beta.log.read_text()
    finally:
        pair.alpha.signal(signal.SIGCONT)
    a, b = wait_for(lambda: settled(pair), 30, "one primary after alpha resumed")
    assert (a["state"], b["state"]) == ("secondary", "primary")  # epoch 2 wins by the rule


@pytest.mark.parametrize("how", ["stop", "promote"])
def test_handover_timeout_bounds_a_stop_or_promote_when_the_secondary_hangs(make_pair, how):
    """The primary's last sync waits for the secondary at most handover_timeout (3 s here),
    even when the secondary still counts as alive (its dead_after, 30 s, is far off): a hung
    secondary delays a stop or a promote by that much, not more."""
    pair = make_pair(node={"handover_timeout": 3}, beta={"node": {"dead_after": 30.0}})
    pair.start_both()  # alpha first: beta's 30 s probe window would hold a lone start
    res = sbs_tools("promote", "--config", str(pair.beta.config))  # beta primary, alpha follows
    assert res.returncode == 0, res.stdout + res.stderr
    wait_for(lambda: settled(pair) and pair.beta.state() == "primary", 30, "beta primary")
    pair.alpha.signal(signal.SIGSTOP)
    try:
        write(pair.folder("beta") / "late.txt", "written while the secondary hangs")
        asked = time.monotonic()
        if how == "stop":
            pair.beta.signal(signal.SIGTERM)
            assert pair.beta.wait_exit(60) == 0
        else:
            reply = request(pair.beta.cfg, "PROMOTE", {"force": False}, timeout=10)
            assert reply and reply["status"] == "ok", reply
            pair.beta.wait_state("secondary", timeout=60)
        took = time.monotonic() - asked
        assert 2.9 <= took < 15, f"the {how} took {took:.1f}s (handover_timeout 3, dead_after 30)"
        assert "final sync incomplete: timed out" in pair.beta.log.read_text(), \
            pair.beta.tail_log()
    finally:
        pair.alpha.signal(signal.SIGCONT)
    # alpha resumes, hears the hand-over (or the silence) and takes over
    pair.alpha.wait_state("primary", timeout=30)
    if how == "promote":
        wait_for(lambda: settled(pair), 30, "beta to follow alpha again")


def test_a_main_nodes_takeover_sends_the_failover_email(make_pair, smtp):
    """Both nodes role = main: when the primary dies the secondary's takeover is mailed, once,
    through a real SMTP server, naming both nodes, the epoch and why."""
    port, collector = smtp
    pair = make_pair(email={"enabled": "true", "smtp_server": "127.0.0.1", "smtp_port": port,
                            "sender": "sbs@example.com", "receiver": "ops@example.com"})
    pair.start_both()
    assert pair.beta.status()["role"] == "main"
    pair.alpha.kill()
    st = pair.beta.wait_state("primary", timeout=30)
    wait_for(lambda: collector.messages, 30, "the failover email")
    message = collector.messages[0]
    body = message.get_body(("plain",)).get_content()
    assert message["subject"] == "SBS failover: beta is now primary"
    assert message["to"] == "ops@example.com"
    assert "Old primary: alpha" in body and "New primary: beta" in body, body
    assert f"Epoch: {st['epoch']}" in body and "Why: no heartbeat from alpha" in body, body
    wait_for(lambda: pair.beta.status(1.0)["email"]["sent"] == 1, 30, "the email counted as sent")
    assert len(collector.messages) == 1


MAX_QUEUED = Path("/proc/sys/fs/inotify/max_queued_events")


def test_an_inotify_overflow_on_the_primary_is_rescanned_and_published(make_pair):
    """The primary is paused while another process makes more events than its inotify queue
    holds (fs.inotify.max_queued_events, the kernel drops the rest and says so); once resumed
    it rescans and publishes every file, long before the periodic rescan (10 minutes). beta's
    dead_after (60 s) keeps it from taking over meanwhile."""
    limit = int(MAX_QUEUED.read_text())
    files = limit // 2 + 2000  # >= 3 events each (create, modify, close)
    pair = make_pair(node={"period": 600}, alpha={"node": {"dead_after": 1.0}},
                     beta={"node": {"dead_after": 60.0}})
    started(pair)
    a, b = pair.folder("alpha"), pair.folder("beta")
    script = ("import sys\nfor i in range(int(sys.argv[2])):\n"
              "    open(f'{sys.argv[1]}/o{i:05}', 'wb').write(b'x')\n")
    pair.alpha.signal(signal.SIGSTOP)
    try:
        subprocess.run([sys.executable, "-c", script, str(a), str(files)], check=True,
                       timeout=60)
    finally:
        pair.alpha.signal(signal.SIGCONT)
    wait_for(lambda: "watcher lost events; full rescan" in pair.alpha.log.read_text(), 30,
             "alpha to report the overflow")
    wait_for(lambda: len(files_under(b)) == files, 90,
             f"all {files} files on beta")
    assert pair.beta.state() == "secondary"


def processes_mentioning(text: str) -> list[str]:
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue  # ended meanwhile
        if text in cmdline and int(pid) != os.getpid():
            found.append(f"{pid}: {cmdline}")
    return found


def test_just_demo_runs_to_the_end_and_leaves_no_process(tmp_path):
    """The README's `just demo`, run by just from its recipe, in a scratch folder with the
    shipped sbs.ini (on free ports, so a demo running in the checkout is not disturbed)."""
    repo = Path(__file__).resolve().parents[1]
    just = shutil.which("just", path=f"{Path(sys.executable).parent}{os.pathsep}"
                                     f"{os.environ.get('PATH', '')}")
    if just is None:
        pytest.skip("no `just` (pip install -e '.[dev]' brings it)")
    port, web = free_port_triplet(), free_port()
    ini = (repo / "sbs.ini").read_text()
    ini = re.sub(r"(?m)^port = 4445\b", f"port = {port}", ini)
    ini = ini.replace("http.server 8081", f"http.server {web}")
    assert f"port = {port}" in ini and f"http.server {web}" in ini, "sbs.ini changed shape"
    (tmp_path / "sbs.ini").write_text(ini)
    env = {**os.environ, "PYTHON": sys.executable}
    try:
        proc = subprocess.run([just, "--justfile", str(repo / "Justfile"),
                               "--working-directory", str(tmp_path), "demo"],
                              capture_output=True, text=True, timeout=180, env=env)
        out = proc.stdout + proc.stderr
        assert proc.returncode == 0, out
        assert "beta is primary" in out and "alpha caught up" in out, out
        assert "alpha: primary" in out and "Done. Stopping both nodes" in out, out
        # every node and the sentinel are gone once the demo returns
        assert processes_mentioning(str(tmp_path)) == []
        assert processes_mentioning(f"http.server {web}") == []
    finally:
        for line in processes_mentioning(str(tmp_path)) + processes_mentioning(
                f"http.server {web}"):
            os.kill(int(line.split(":")[0]), signal.SIGKILL)


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("ss") is None,
                    reason="needs root and ss -K to cut the pair's connections")
def test_a_lost_hand_over_leaves_two_secondaries_and_the_rule_picks_one(make_pair):
    """alpha hands over while beta is paused and their control connections are cut, so the
    HANDOVER is lost (sends to an unconnected peer are dropped). beta resumes before anyone's
    dead_after: both are secondary, and once both have been so for dead_after the rule picks
    alpha (the higher epoch), which takes over."""
    pair = make_pair(node={"handover_timeout": 1}, alpha={"node": {"dead_after": 6.0}},
                     beta={"node": {"dead_after": 10.0}})
    pair.start_both()
    pair.beta.signal(signal.SIGSTOP)
    try:
        cut = subprocess.run(["ss", "-K", "-tn", "state", "established", "(", "sport",
                              f"= :{pair.port}", "or", "dport", f"= :{pair.port}", ")"],
                             capture_output=True, text=True, timeout=30)
        assert cut.returncode == 0, cut.stderr
        reply = request(pair.alpha.cfg, "PROMOTE", {"force": False}, timeout=10)
        assert reply and reply["status"] == "ok", reply
        pair.alpha.wait_state("secondary", timeout=30)  # after handover_timeout: 1 s
    finally:
        pair.beta.signal(signal.SIGCONT)
    wait_for(lambda: (st := pair.alpha.status(1.0)) and st["peer_state"] == "secondary", 30,
             "alpha to hear beta again, both secondary")
    st = pair.alpha.wait_state("primary", timeout=40)
    assert st["epoch"] == 3  # alpha handed over: beta's term would have been 2
    assert "two secondaries; the rule picked this node" in pair.alpha.log.read_text(), \
        pair.alpha.tail_log()
    assert "PRIMARY now" not in pair.beta.log.read_text()  # beta never heard the hand-over
    a, b = wait_for(lambda: settled(pair), 30, "beta to follow alpha")
    assert (a["state"], b["state"]) == ("primary", "secondary")
