"""The sentinel guard in the two-node mode: a paused node's sentinels stop before the peer takes
over, and come back only if the node is still primary (real nodes, real sentinels that record
their own start, ticks and stop; see tests/recorder.py)."""
from __future__ import annotations

import secrets
import signal

import pytest

from tests.pair import wait_for
from tests.recorder import lives, overlaps, recorder_command
from tests.test_e2e_sentinels import alive, marked, running_pid


def _pair(make_pair, tmp_path, stubborn=False, **node):
    record = tmp_path / "record.txt"
    token = f"sbs-e2e-guard-{secrets.token_hex(4)}"
    pair = make_pair(node={"heartbeat": 0.2, "dead_after": 1.0, **node},
                     sentinels={"svc": recorder_command(tmp_path, record, token,
                                                        stubborn=stubborn)})
    pair.start_both()
    wait_for(lambda: running_pid(pair.alpha, "svc") and lives(record), 5, "svc on alpha")
    return pair, record, token


@pytest.mark.parametrize("stubborn", [False, True], ids=["polite", "ignores-sigterm"])
def test_a_paused_primary_s_sentinel_stops_before_the_peer_starts_its_own(make_pair, tmp_path,
                                                                          stubborn):
    pair, record, token = _pair(make_pair, tmp_path, stubborn=stubborn)
    (pair.folder("alpha") / "closed.txt").write_text("before the pause\n")
    wait_for(lambda: (pair.folder("beta") / "closed.txt").exists(), 10, "the file on beta")
    old = running_pid(pair.alpha, "svc")
    pair.alpha.signal(signal.SIGSTOP)
    try:
        new = wait_for(lambda: running_pid(pair.beta, "svc"), 10,
                       "svc on beta")
        wait_for(lambda: len(lives(record)) == 2, 5, "beta's svc to record its start")
    finally:
        pair.alpha.signal(signal.SIGCONT)
    assert old != new
    assert overlaps(record) == [], f"the service ran on both nodes at once: {lives(record)}"
    assert pair.alpha.wait_state("secondary")["epoch"] < pair.beta.status()["epoch"]
    # back from its pause, alpha started nothing again: it is secondary
    assert running_pid(pair.beta, "svc") == new
    assert len(lives(record)) == 2 and overlaps(record) == []
    assert "sentinels stopped" in pair.alpha.log.read_text()
    assert (pair.folder("beta") / "closed.txt").read_text() == "before the pause\n"
    pair.stop()
    wait_for(lambda: not marked(token), 10, "every svc to end")


def test_a_short_pause_stops_the_sentinel_and_a_node_still_primary_runs_it_again(make_pair,
                                                                                 tmp_path):
    """Paused past the guard's deadline but not past dead_after: the peer never took over, so
    once the node has waited dead_after for news it runs its sentinel again."""
    pair, record, token = _pair(make_pair, tmp_path, dead_after=3.0, heartbeat=0.2)
    first = running_pid(pair.alpha, "svc")
    pair.alpha.signal(signal.SIGSTOP)
    try:
        # the guard stops it 2 s (2/3 of dead_after) after alpha's last heartbeat
        wait_for(lambda: not alive(first), 5, "the guard to stop svc")
        assert pair.beta.state() == "secondary"
    finally:
        pair.alpha.signal(signal.SIGCONT)
    again = wait_for(lambda: (pid := running_pid(pair.alpha, "svc")) and pid != first and pid,
                     10, "svc running again on alpha")
    assert pair.alpha.state() == "primary" and pair.beta.state() == "secondary"
    assert running_pid(pair.beta, "svc") is None
    assert again != first and overlaps(record) == []
    pair.stop()
    wait_for(lambda: not marked(token), 10, "every svc to end")

