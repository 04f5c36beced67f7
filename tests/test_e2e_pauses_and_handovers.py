"""Roles under pauses and hand-overs that the other end-to-end tests do not cover (real nodes,
real sockets, a recording sentinel: tests/recorder.py)."""
from __future__ import annotations

import secrets
import signal
import time
from pathlib import Path

import pytest
from sbs.tools.client import request

from tests.pair import wait_for
from tests.recorder import lives, overlaps, recorder_command
from tests.test_e2e_sentinels import alive, marked, running_pid


def _alpha_never_primary(pair, seconds: float) -> None:
    """For `seconds` after a resume (longer than alpha's wait for beta's news): alpha is never
    primary, beta always is."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        assert pair.alpha.state() != "primary", pair.alpha.tail_log()
        assert pair.beta.state() == "primary", pair.beta.tail_log()


def _beta_primary(make_pair, tmp_path, *, proxy: bool = False):
    """beta primary (epoch 1) with its recording sentinel, alpha secondary; `proxy`: the link
    through tests/netproxy.py, so that it can be cut."""
    record = tmp_path / "record.txt"
    token = f"sbs-e2e-review-{secrets.token_hex(4)}"
    pair = make_pair(proxy=proxy, node={"heartbeat": 0.2, "dead_after": 1.0},
                     sentinels={"svc": recorder_command(tmp_path, record, token)})
    pair.beta.start()
    pair.beta.wait_state("primary")
    pair.alpha.start()
    pair.alpha.wait_state("secondary")
    # alpha has applied beta's last manifest (beta knows it): a hand-over then needs no wait
    # for alpha, which a test may pause right after
    wait_for(lambda: (st := pair.beta.status(0.5)) and st["peer_state"] == "secondary"
             and st["replication"].get("peer_following")
             and st["replication"].get("lag_manifests") == 0, 10,
             "beta to see alpha following, up to date")
    wait_for(lambda: running_pid(pair.beta, "svc") and lives(record), 5, "svc on beta")
    return pair, record, token


def test_a_hand_over_to_a_paused_secondary_is_not_obeyed_after_the_old_primary_took_back(
        make_pair, tmp_path):
    """beta hands over to alpha just as alpha is paused; alpha never hears it, so beta, a
    secondary with a silent peer, takes the role back after dead_after, runs the service and
    finishes writing a file. When alpha resumes, the HANDOVER that waited in its socket for
    seconds describes a world long gone: alpha must follow beta, not take over (it took epoch
    2, as beta did, won the tie by name and set beta's file aside)."""
    pair, record, token = _beta_primary(make_pair, tmp_path)
    pair.alpha.signal(signal.SIGSTOP)
    try:
        reply = request(pair.beta.cfg, "PROMOTE", {"force": False}, timeout=5)
        assert reply and reply["status"] == "ok", reply
        wait_for(lambda: "handed over to" in pair.beta.log.read_text(), 5,
                 "beta to hand over")
        st = wait_for(lambda: (st := pair.beta.status(0.5)) and st["state"] == "primary"
                      and st["epoch"] >= 2 and st, 10,
                      "beta to take the role back on alpha's silence")
        wait_for(lambda: running_pid(pair.beta, "svc"), 5, "svc on beta again")
        before = st["replication"]["seq"]
        (pair.folder("beta") / "finished.txt").write_text("written on the primary\n")
        wait_for(lambda: (pair.beta.status(0.5) or {}).get("replication", {}).get("seq", 0)
                 > before, 10, "beta to publish the file")
    finally:
        pair.alpha.signal(signal.SIGCONT)
    _alpha_never_primary(pair, 3.0)
    alpha_log = pair.alpha.log.read_text()
    assert "PRIMARY now" not in alpha_log, (
        "alpha took over on a stale hand-over:\n" + "\n".join(
            line for line in alpha_log.splitlines()
            if "->" in line or "PRIMARY" in line or "handover" in line.lower()))
    wait_for(lambda: (pair.folder("alpha") / "finished.txt").exists(), 10,
             "beta's file on alpha")
    assert (pair.folder("beta") / "finished.txt").read_text() == "written on the primary\n"
    assert overlaps(record) == [], f"the service ran on both nodes at once: {lives(record)}"
    pair.stop()
    wait_for(lambda: not marked(token), 10, "every svc to end")


def test_a_secondary_paused_longer_than_dead_after_follows_again_and_takes_nothing(
        make_pair, tmp_path):
    """The primary is fine; its secondary is paused (SIGSTOP) for several dead_after. Back, the
    secondary must follow the primary again, not take over on a silence that was its own."""
    pair, record, token = _beta_primary(make_pair, tmp_path)
    pair.alpha.signal(signal.SIGSTOP)
    try:
        (pair.folder("beta") / "during.txt").write_text("written while alpha slept\n")
        wait_for(lambda: "peer alpha silent" in pair.beta.log.read_text(), 10,
                 "beta to find alpha silent")
        # paused for more than 3 x dead_after in all (beta's status answers meanwhile)
        end = time.monotonic() + 2.5
        wait_for(lambda: time.monotonic() >= end and pair.beta.state() == "primary", 10,
                 "the pause to last")
    finally:
        pair.alpha.signal(signal.SIGCONT)
    _alpha_never_primary(pair, 3.0)
    wait_for(lambda: (pair.folder("alpha") / "during.txt").exists(), 15,
             "alpha to follow again")
    alpha_log = pair.alpha.log.read_text()
    assert "PRIMARY now" not in alpha_log, "\n".join(
        line for line in alpha_log.splitlines() if "->" in line or "PRIMARY" in line)
    assert pair.beta.state() == "primary" and pair.alpha.state() == "secondary"
    assert overlaps(record) == [], f"the service ran on both nodes at once: {lives(record)}"
    pair.stop()
    wait_for(lambda: not marked(token), 10, "every svc to end")


def test_a_hand_over_followed_by_a_one_way_cut_leaves_one_primary(make_pair, tmp_path):
    """beta (primary) hands over to alpha just as what alpha sends stops reaching beta (a one-way
    cut). alpha takes over; beta, deaf to it, takes the role back on silence. alpha hears beta
    primary: the rule must make one of them yield, and it must be alpha, the one that can hear
    (beta cannot hear alpha's verdict). With equal epochs the smaller name, alpha, won the tie
    and both ran the service until the link healed."""
    pair, record, token = _beta_primary(make_pair, tmp_path, proxy=True)
    for name, proxy in pair.proxies.items():
        wait_for(lambda p=proxy: min(p.passed(pair.port)) > 2000, 10, f"pings via {name}")
    pair.cut("alpha", "beta")
    reply = request(pair.beta.cfg, "PROMOTE", {"force": False}, timeout=5)
    assert reply and reply["status"] == "ok", reply
    wait_for(lambda: "handed over to" in pair.beta.log.read_text(), 5,
             "beta to hand over")
    wait_for(lambda: "PRIMARY now" in pair.alpha.log.read_text(), 5,
             "alpha to take over")
    wait_for(lambda: pair.beta.log.read_text().count("PRIMARY now") >= 2, 10,
             "beta to take the role back on alpha's silence")
    # alpha hears beta: within a few seconds one of them yields, and stays so
    wait_for(lambda: len(pair.primaries()) == 1, 10,
             "one primary")
    end = time.monotonic() + 2.0
    while time.monotonic() < end:
        assert len(pair.primaries()) == 1, f"{pair.alpha.tail_log()}{pair.beta.tail_log()}"
    assert pair.beta.state() == "primary"
    assert wait_for(lambda: (pid := running_pid(pair.beta, "svc")) and pid, 5, "svc on beta")
    assert running_pid(pair.alpha, "svc") is None
    pair.heal()
    wait_for(lambda: sorted([pair.alpha.state(), pair.beta.state()]) == ["primary", "secondary"],
             15, "one primary after the heal")
    pair.stop()
    wait_for(lambda: not marked(token), 10, "every svc to end")


def test_a_secondary_paused_while_its_primary_stops_takes_over_when_it_resumes(
        make_pair, tmp_path):
    """The other side of the two tests above: what a resumed secondary holds back it still
    does when the primary is really gone (it stopped while the secondary was paused)."""
    pair, record, token = _beta_primary(make_pair, tmp_path)
    pair.alpha.signal(signal.SIGSTOP)
    try:
        pair.beta.signal(signal.SIGTERM)
        assert pair.beta.wait_exit(20) == 0
    finally:
        pair.alpha.signal(signal.SIGCONT)
    resumed = time.monotonic()
    st = pair.alpha.wait_state("primary", timeout=10)
    assert time.monotonic() - resumed < 5, "the takeover took too long after the resume"
    assert st["epoch"] == 2
    wait_for(lambda: running_pid(pair.alpha, "svc"), 5, "svc on alpha")
    assert overlaps(record) == [], f"the service ran on both nodes at once: {lives(record)}"
    pair.stop()
    wait_for(lambda: not marked(token), 10, "every svc to end")


def test_a_primary_restarted_while_its_secondary_is_paused_stays_primary(make_pair, tmp_path):
    """beta (primary) is restarted (SIGTERM, start) while alpha is paused: the old run hands
    over to the paused alpha and ends, the new run finds nobody and is primary again. alpha,
    resumed, must follow the new run: the HANDOVER of a run that is gone is not obeyed."""
    pair, record, token = _beta_primary(make_pair, tmp_path)
    pair.alpha.signal(signal.SIGSTOP)
    try:
        pair.beta.signal(signal.SIGTERM)
        assert pair.beta.wait_exit(20) == 0
        assert "handed over to alpha" in pair.beta.log.read_text()
        pair.beta.start()
        pair.beta.wait_state("primary", timeout=15)
        wait_for(lambda: running_pid(pair.beta, "svc"), 5, "svc on the new beta")
        (pair.folder("beta") / "after-restart.txt").write_text("written by the new run\n")
    finally:
        pair.alpha.signal(signal.SIGCONT)
    _alpha_never_primary(pair, 3.0)
    alpha_log = pair.alpha.log.read_text()
    assert "PRIMARY now" not in alpha_log, "\n".join(
        line for line in alpha_log.splitlines() if "->" in line or "PRIMARY" in line)
    wait_for(lambda: (pair.folder("alpha") / "after-restart.txt").exists(), 15,
             "the new run's file on alpha")
    assert (pair.folder("beta") / "after-restart.txt").exists()
    assert overlaps(record) == [], f"the service ran on both nodes at once: {lives(record)}"
    pair.stop()
    wait_for(lambda: not marked(token), 10, "every svc to end")


def test_sentinels_stopped_by_the_guard_come_back_after_an_aborted_hand_over(make_pair,
                                                                              tmp_path):
    """alpha (primary) is paused past the guard's deadline but not past dead_after: the guard
    stops svc and alpha holds it for dead_after + heartbeat. Meanwhile a promote starts a
    hand-over whose final sync outlasts that hold (a file beta cannot apply: beta is paused
    too), and ends aborted on beta's silence. alpha is primary again, alone: svc must run."""
    record = tmp_path / "record.txt"
    token = f"sbs-e2e-review-{secrets.token_hex(4)}"
    pair = make_pair(node={"heartbeat": 0.2, "dead_after": 3.0},
                     sentinels={"svc": recorder_command(tmp_path, record, token)})
    pair.start_both()
    first = wait_for(lambda: running_pid(pair.alpha, "svc"), 5, "svc on alpha")
    pair.alpha.signal(signal.SIGSTOP)
    try:
        # the guard stops svc 2 s (2/3 of dead_after) after alpha's last heartbeat
        wait_for(lambda: not alive(first), 5, "the guard to stop svc")
    finally:
        pair.alpha.signal(signal.SIGCONT)
    wait_for(lambda: "sentinels stopped" in pair.alpha.log.read_text(), 5, "alpha to see it")
    end = time.monotonic() + 0.8  # past a heartbeat of beta's after alpha's resume
    wait_for(lambda: time.monotonic() >= end, 2, "beta's next heartbeats")
    assert pair.alpha.state() == "primary" and pair.beta.state() == "secondary"
    pair.beta.signal(signal.SIGSTOP)
    try:
        (pair.folder("alpha") / "late.txt").write_text("beta cannot apply this now\n")
        reply = request(pair.alpha.cfg, "PROMOTE", {"force": False}, timeout=5)
        assert reply and reply["status"] == "ok", reply
        wait_for(lambda: "hand-over aborted" in pair.alpha.log.read_text(), 10,
                 "the hand-over to end aborted")
        assert pair.alpha.state() == "primary"
        wait_for(lambda: running_pid(pair.alpha, "svc"), 10,
                 "svc to run again on alpha, the only primary")
    finally:
        pair.beta.signal(signal.SIGCONT)
    pair.stop()
    wait_for(lambda: not marked(token), 10, "every svc to end")


def test_a_peer_silent_only_for_a_while_during_a_slow_hand_over_is_not_taken_over_from(
        make_pair, tmp_path):
    """alpha hands over; its svc ignores SIGTERM, so the stop takes the 5 s grace. Meanwhile
    beta is paused past dead_after and resumed: alpha, stopping, holds that silence back. Once
    svc is gone alpha hands over and beta takes over; the silence, long over by then, must not
    make alpha take the role straight back (the service on both, the hand-over undone)."""
    record = tmp_path / "record.txt"
    token = f"sbs-e2e-review-{secrets.token_hex(4)}"
    # dead_after 2 s: beta's link must come back after its resume within it, on a loaded
    # machine too (at 1 s a loaded run saw beta take over from a live alpha); alpha still finds
    # beta silent well within svc's 5 s grace
    pair = make_pair(node={"heartbeat": 0.25, "dead_after": 2.0},
                     sentinels={"svc": recorder_command(tmp_path, record, token,
                                                        stubborn=True)})
    pair.start_both()
    wait_for(lambda: running_pid(pair.alpha, "svc") and lives(record), 5, "svc on alpha")
    reply = request(pair.alpha.cfg, "PROMOTE", {"force": False}, timeout=5)
    assert reply and reply["status"] == "ok", reply
    wait_for(lambda: "stopping sentinels; then" in pair.alpha.log.read_text(), 10,
             "alpha to stop svc")
    pair.beta.signal(signal.SIGSTOP)
    try:
        wait_for(lambda: "peer beta silent" in pair.alpha.log.read_text(), 6,
                 "alpha to find beta silent")
    finally:
        pair.beta.signal(signal.SIGCONT)
    assert "handed over to beta" not in pair.alpha.log.read_text()  # still stopping svc
    pair.beta.wait_state("primary", timeout=15)
    end = time.monotonic() + 3.0
    while time.monotonic() < end:
        assert pair.alpha.state() != "primary", pair.alpha.tail_log()
    alpha_log = pair.alpha.log.read_text()
    assert alpha_log.count("PRIMARY now") == 1, "\n".join(
        line for line in alpha_log.splitlines() if "->" in line or "PRIMARY" in line)
    assert pair.beta.state() == "primary"
    assert overlaps(record) == [], f"the service ran on both nodes at once: {lives(record)}"
    pair.stop()
    wait_for(lambda: not marked(token), 10, "every svc to end")


def test_a_node_starting_next_to_a_primary_still_stopping_its_service_waits_for_it(
        make_pair, tmp_path):
    """alpha, alone, is stopped (SIGTERM) and its svc ignores SIGTERM: it stops for the 5 s
    grace, alpha answering as "stopping" all along. beta starts meanwhile. A stopping peer
    hands over or falls silent, and a secondary waits for that; a starting node must too, not
    become primary at the end of its probe and run svc beside alpha's."""
    record = tmp_path / "record.txt"
    token = f"sbs-e2e-review-{secrets.token_hex(4)}"
    pair = make_pair(node={"heartbeat": 0.2, "dead_after": 1.0},
                     sentinels={"svc": recorder_command(tmp_path, record, token,
                                                        stubborn=True)})
    pair.alpha.start()
    pair.alpha.wait_state("primary")
    wait_for(lambda: running_pid(pair.alpha, "svc") and lives(record), 5, "svc on alpha")
    pair.alpha.signal(signal.SIGTERM)
    wait_for(lambda: "stopping sentinels; then" in pair.alpha.log.read_text(), 10,
             "alpha to stop svc")
    pair.beta.start()
    wait_for(lambda: len(lives(record)) == 2, 20, "svc on beta")
    assert pair.alpha.wait_exit(20) == 0
    assert overlaps(record) == [], f"the service ran on both nodes at once: {lives(record)}"
    pair.stop()
    wait_for(lambda: not marked(token), 10, "every svc to end")


def stopped(pid: int) -> bool:
    """Is the process stopped (SIGSTOP taken: state T in /proc/<pid>/stat)?"""
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat[stat.rindex(")") + 2] in "Tt"


def test_a_node_paused_while_it_probes_follows_the_peer_that_started_meanwhile(make_pair):
    """alpha starts and is paused while it probes; beta starts, finds nobody, is primary and
    gets a file. alpha, resumed past its probe window, must follow beta, not become primary
    on a probe that went unanswered only because alpha itself was paused (both at epoch 1, it
    would win by name and set beta's file aside)."""
    # the pause must land inside alpha's probe window (dead_after): 3 s, not 1 (a loaded
    # fresh-clone run had alpha answer "starting" late and decide probe_timeout as it was
    # paused, the log line written only after it resumed)
    for _ in range(3):
        pair = make_pair(node={"heartbeat": 0.2, "dead_after": 3.0})
        pair.alpha.start()
        wait_for(lambda p=pair: (st := p.alpha.status(0.5)) and st["state"] == "starting", 10,
                 "alpha to answer while it probes")
        pair.alpha.signal(signal.SIGSTOP)
        # kill() returns before a process running on the other core has stopped: the log
        # is read once it has (it could still write probe_timeout meanwhile)
        wait_for(lambda p=pair: stopped(p.alpha.pid), 5, "alpha to be stopped")
        if "probe_timeout" not in pair.alpha.log.read_text():
            break
        pair.alpha.signal(signal.SIGCONT)  # too late: its probe had ended; again
        pair.stop()
    else:
        pytest.fail("alpha's probe ended before the test could pause it, three times")
    try:
        pair.beta.start()
        pair.beta.wait_state("primary", timeout=15)
        (pair.folder("beta") / "beta.txt").write_text("written on the only primary\n")
        wait_for(lambda: (pair.beta.status(0.5) or {}).get("replication", {}).get("seq", 0) > 0,
                 10, "beta to publish the file")
    finally:
        pair.alpha.signal(signal.SIGCONT)
    wait_for(lambda: pair.alpha.state() in ("primary", "secondary"), 15, "alpha to decide")
    end = time.monotonic() + 2.0
    while time.monotonic() < end:
        assert pair.alpha.state() != "primary", pair.alpha.tail_log()
    assert "PRIMARY now" not in pair.alpha.log.read_text(), pair.alpha.tail_log()
    wait_for(lambda: (pair.folder("alpha") / "beta.txt").exists(), 15,
             "beta's file on alpha")
    assert pair.beta.state() == "primary"
    assert (pair.folder("beta") / "beta.txt").exists()
