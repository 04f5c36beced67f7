"""node.liveness.Watch and node.persist.Guarded: the decisions, on a clock the test sets."""
from __future__ import annotations

from sbs.node.liveness import Watch
from sbs.node.persist import Guarded, load


def check(w: Watch, now: float, **kw):
    args = {"pings_arrive": True, "pinged_at": now, "primary_seq": 5, "applied": 5,
            "progress": (5,)}
    args.update(kw)
    return w.check(now, **args)


def test_a_bus_that_falls_silent_while_pings_arrive_is_a_stall():
    w = Watch(dead_after=1.0, grace=0.5)
    w.reset(0.0)
    assert check(w, 0.9) == ("", "")
    w.heard_bus(0.9)
    assert check(w, 1.8) == ("", "")
    # a ping shows the bus silent: its heartbeat may be right behind it, on the other socket
    assert check(w, 2.0) == ("", "")
    assert check(w, 2.4) == ("", "")
    kind, why = check(w, 2.5)  # still silent a heartbeat after that ping
    assert kind == "bus" and "no bus heartbeat from the primary for 1.6s" in why


def test_a_bus_heartbeat_read_just_after_the_ping_is_no_stall():
    """A primary whose loop was held up for 2 s (a first scan of 100,000 files on a loaded
    machine) sends its ping and its bus heartbeat together; the secondary read the ping first
    and reported a stall, reconnected and asked for a second snapshot."""
    w = Watch(dead_after=1.5, grace=0.5)
    w.reset(0.0)
    w.heard_bus(0.5)
    assert check(w, 2.6) == ("", "")  # the ping after the held-up loop
    w.heard_bus(2.6)  # its heartbeat, read a moment later
    for t in (2.7, 3.0, 3.5, 4.0):
        assert check(w, t) == ("", "")


def test_a_primary_that_dies_is_silence_not_a_stall():
    w = Watch(dead_after=1.0)
    w.reset(0.0)
    # its pings and its bus stopped at 0.5: the last ping is what counts, not now
    assert check(w, 1.4, pinged_at=0.5) == ("", "")
    assert check(w, 3.0, pings_arrive=False) == ("", "")


def test_behind_with_nothing_moving_is_a_stall_and_progress_is_not():
    w = Watch(dead_after=1.0)
    w.reset(0.0)
    for t in (0.5, 1.0, 1.5, 2.0, 2.5):  # behind, but a file arrives every half second
        w.heard_bus(t)
        assert check(w, t, applied=1, progress=(1, t)) == ("", "")
    w.heard_bus(3.6)
    kind, why = check(w, 3.6, applied=1, progress=(1, 2.5))
    assert kind == "apply" and "applied 1 of the primary's 5" in why
    # a longer window (a snapshot still scanning): not yet
    assert check(w, 3.6, applied=1, progress=(1, 2.5), apply_window=30.0) == ("", "")
    # caught up: nothing to say however long nothing moved
    w.heard_bus(10.0)
    assert check(w, 10.0, applied=5, progress=(1, 2.5)) == ("", "")


def test_a_failed_state_write_is_kept_shown_and_retried(tmp_path):
    blocker = tmp_path / "state"
    blocker.write_text("a file where the state folder should be")
    path = blocker / "pair.json"
    writes = Guarded(retry_every=2.0)
    assert writes.save(path, {"sv": 1}) is False
    shown = writes.status()
    assert list(shown) == [str(path)] and shown[str(path)]["error"]
    value = {"sv": 2}  # the latest content is what gets written
    writes.save(path, value)
    writes.retry(now=100.0)  # still failing: kept
    assert str(path) in writes.status()
    blocker.unlink()
    writes.retry(now=101.0)  # too soon after the last try
    assert str(path) in writes.status()
    writes.retry(now=102.0)
    assert writes.status() == {} and load(path, None) == {"sv": 2}
