"""node.liveness.Watch and node.persist.Guarded: the decisions, on a clock the test sets."""
from __future__ import annotations

from node.liveness import Watch
from node.persist import Guarded, load


def check(w: Watch, now: float, **kw):
    args = {"pings_arrive": True, "pinged_at": now, "primary_seq": 5, "applied": 5,
            "progress": (5,)}
    args.update(kw)
    return w.check(now, **args)


def test_a_bus_that_falls_silent_while_pings_arrive_is_a_stall():
    w = Watch(dead_after=1.0)
    w.reset(0.0)
    assert check(w, 0.9) == ("", "")
    w.heard_bus(0.9)
    assert check(w, 1.8) == ("", "")
    kind, why = check(w, 2.0)
    assert kind == "bus" and "no bus heartbeat" in why


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
