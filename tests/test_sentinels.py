"""Sentinels with real child processes. Every wait polls a condition under a deadline."""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from sbs.node.sentinels import PIDS_FILE, Sentinels

REPO = Path(__file__).resolve().parents[1]
PY = shlex.quote(sys.executable)
SLEEPER = f"{PY} -c 'import time; time.sleep(60)'"
# Prints "ready" only once SIGTERM is ignored, so the test knows escalation is really tested.
STUBBORN = (
    f"{PY} -c 'import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
    "print(\"ready\", flush=True); time.sleep(60)'"
)
CRASHER = f"{PY} -c 'import sys; sys.exit(3)'"


def wait_for(condition, timeout: float = 5.0, interval: float = 0.02):
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        time.sleep(interval)


def alive(pid: int) -> bool:
    """True while `pid` exists and is not a zombie (pid 1 here may not reap orphans)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[-1].split()[0] != "Z"


def by_name(sentinels: Sentinels) -> dict[str, dict]:
    return {entry["name"]: entry for entry in sentinels.status()}


@pytest.fixture
def make(tmp_path):
    """Builds Sentinels on tmp_path and stops all of them after the test: no leaked process."""
    created: list[Sentinels] = []

    def factory(state_dir: Path | None = None, **kwargs) -> tuple[Sentinels, list[dict]]:
        events: list[dict] = []
        kwargs.setdefault("grace", 2.0)
        sentinels = Sentinels(state_dir or tmp_path / "state", on_event=events.append, **kwargs)
        created.append(sentinels)
        return sentinels, events

    yield factory
    for sentinels in created:
        pids = [e["pid"] for e in sentinels.status() if e["pid"]]
        sentinels.stop_all(grace=1.0)
        assert not [pid for pid in pids if alive(pid)]


def test_run_starts_active_only_and_stop_all_stops(make, tmp_path):
    sentinels, events = make()
    sentinels.configure({"one": SLEEPER, "two": SLEEPER, "off": SLEEPER})
    sentinels.set_active(["one", "two"])
    assert sentinels.active == ["one", "two"]
    assert all(e["state"] == "stopped" for e in sentinels.status())  # not in running mode yet

    sentinels.run()
    status = by_name(sentinels)
    assert status["one"]["state"] == status["two"]["state"] == "running"
    assert status["off"] == {
        "name": "off", "command": SLEEPER, "active": False, "state": "stopped",
        "pid": None, "outside_group": [], "restarts": 0, "last_exit": None,
    }
    pids = {status["one"]["pid"], status["two"]["pid"]}
    assert all(alive(pid) for pid in pids)
    recorded = json.loads((tmp_path / "state" / PIDS_FILE).read_text())
    assert {c["pid"] for c in recorded["children"]} == pids
    assert {e["event"] for e in events} == {"started"}

    sentinels.stop_all()
    assert not any(alive(pid) for pid in pids)
    assert all(e["state"] == "stopped" for e in sentinels.status())
    assert [e["code"] for e in events if e["event"] == "stopped"] == [-signal.SIGTERM] * 2
    assert json.loads((tmp_path / "state" / PIDS_FILE).read_text())["children"] == []


def test_start_and_stop_one(make):
    sentinels, events = make()
    sentinels.configure({"web": SLEEPER})
    sentinels.set_active([])
    sentinels.start("web")  # not in running mode: only activates
    assert sentinels.active == ["web"]
    assert by_name(sentinels)["web"]["pid"] is None

    sentinels.run()
    pid = by_name(sentinels)["web"]["pid"]
    assert alive(pid)
    sentinels.stop("web")  # does not wait: the loop reaps it on a later poll()
    assert sentinels.active == []

    def reaped():
        sentinels.poll()
        return events[-1]["event"] == "stopped"

    wait_for(reaped)
    assert not alive(pid)
    assert by_name(sentinels)["web"]["state"] == "stopped"

    sentinels.start("web")  # running mode: starts now
    assert alive(by_name(sentinels)["web"]["pid"])
    with pytest.raises(ValueError, match="unknown sentinel 'nope'"):
        sentinels.start("nope")
    with pytest.raises(ValueError, match="defined: web"):
        sentinels.stop("nope")


def run_stubborn(sentinels, tmp_path) -> int:
    """Run a sentinel that ignores SIGTERM; return its pid once its handler is in place."""
    sentinels.configure({"stubborn": STUBBORN})
    sentinels.set_active(["stubborn"])
    sentinels.run()
    log_file = tmp_path / "state" / "logs" / "stubborn.log"
    wait_for(lambda: log_file.exists() and "ready" in log_file.read_text().splitlines())
    return by_name(sentinels)["stubborn"]["pid"]


def test_sigterm_then_sigkill_bounded_by_grace(make, tmp_path):
    sentinels, events = make()
    pid = run_stubborn(sentinels, tmp_path)

    started = time.monotonic()
    sentinels.stop_all(grace=0.5)
    elapsed = time.monotonic() - started
    assert 0.5 <= elapsed < 2.5
    assert not alive(pid)
    assert by_name(sentinels)["stubborn"]["last_exit"] == -signal.SIGKILL
    assert events[-1] == {"event": "stopped", "name": "stubborn", "pid": pid,
                          "code": -signal.SIGKILL, "delay": None}


def test_begin_stop_all_returns_at_once_and_stop_done_finishes_the_job(make, tmp_path):
    """The node's loop stops sentinels without waiting: begin_stop_all() only sends SIGTERM,
    stop_done() polls, escalates to SIGKILL after the grace, and says when all are gone."""
    sentinels, events = make()
    pid = run_stubborn(sentinels, tmp_path)
    started = time.monotonic()
    sentinels.begin_stop_all(grace=0.5)
    # it returned without waiting for the grace: the sentinel ignores SIGTERM, so a call that
    # waited would have had to kill it
    assert sentinels.stop_done() is False and alive(pid)
    wait_for(sentinels.stop_done, 5)
    assert time.monotonic() - started >= 0.5
    assert not alive(pid)
    assert events[-1]["event"] == "stopped" and events[-1]["code"] == -signal.SIGKILL
    assert json.loads((tmp_path / "state" / PIDS_FILE).read_text())["children"] == []


def test_a_pid_file_that_cannot_be_written_is_reported_and_written_later(make, tmp_path):
    """A full state disk for the pid file: a sentinel still starts (its log header cannot be
    written either), the error is kept, and poll() writes the file once it can."""
    state = tmp_path / "state"
    state.write_text("a file where the state folder should be: every write below fails")
    sentinels, _ = make(state_dir=state)
    sentinels.configure({"sleeper": SLEEPER})
    sentinels.set_active(["sleeper"])
    sentinels.run()
    pid = by_name(sentinels)["sleeper"]["pid"]
    assert alive(pid) and sentinels.pids_error
    state.unlink()
    state.mkdir()
    sentinels.poll()
    assert sentinels.pids_error == ""
    assert [c["pid"] for c in json.loads((state / PIDS_FILE).read_text())["children"]] == [pid]


def test_stop_escalates_to_sigkill_from_poll(make, tmp_path):
    sentinels, events = make(grace=0.3)
    pid = run_stubborn(sentinels, tmp_path)

    started = time.monotonic()
    sentinels.stop("stubborn")
    returned = time.monotonic()
    # the loop is never held up: the sentinel ignores SIGTERM and is still there, and the
    # loop is asked back when the grace ends
    assert alive(pid) and events[-1]["event"] != "stopped"
    wakeup = sentinels.next_wakeup()
    assert wakeup is not None and wakeup <= returned + 0.3

    def reaped():
        sentinels.poll()
        return events[-1]["event"] == "stopped"

    wait_for(reaped)
    assert time.monotonic() - started >= 0.3
    assert not alive(pid)
    assert by_name(sentinels)["stubborn"]["last_exit"] == -signal.SIGKILL
    assert sentinels.next_wakeup() is None


def test_crash_is_restarted_with_backoff_and_reported_failing(make):
    sentinels, events = make(backoff_start=0.05, backoff_max=0.2, fail_report_after=3)
    sentinels.configure({"crash": CRASHER})
    sentinels.set_active(["crash"])
    sentinels.run()

    def restarted(times):
        def check():
            sentinels.poll()
            return by_name(sentinels)["crash"]["restarts"] >= times
        return check

    wait_for(restarted(1))
    entry = by_name(sentinels)["crash"]
    assert entry["last_exit"] == 3
    assert entry["state"] in ("backoff", "running")
    wakeup = sentinels.next_wakeup()
    assert entry["state"] == "running" or wakeup is not None

    wait_for(restarted(4))
    delays = [e["delay"] for e in events if e["event"] == "restarting"]
    assert delays[:4] == [0.05, 0.1, 0.2, 0.2]  # doubling, capped at backoff_max
    exited = [e for e in events if e["event"] == "exited"]
    assert all(e["code"] == 3 for e in exited)
    failing = [e for e in events if e["event"] == "failing"]
    assert len(failing) == 1 and failing[0]["name"] == "crash"
    wait_for(lambda: sentinels.poll() or by_name(sentinels)["crash"]["state"] == "failing")


def test_backoff_resets_after_a_stable_run(make, tmp_path):
    flag = tmp_path / "crash-now"
    # Runs until the flag file appears, then exits 1.
    command = (
        f"{PY} -c 'import os, sys, time\n"
        f"while not os.path.exists({str(flag)!r}): time.sleep(0.01)\nsys.exit(1)'"
    )
    sentinels, events = make(backoff_start=0.05, backoff_max=1.0, stable_after=0.3)
    sentinels.configure({"s": command})
    sentinels.set_active(["s"])
    sentinels.run()
    flag.touch()
    wait_for(lambda: sentinels.poll() or by_name(sentinels)["s"]["restarts"] >= 2)
    flag.unlink()
    wait_for(lambda: sentinels.poll() or by_name(sentinels)["s"]["state"] == "running")
    time.sleep(0.4)  # the run must last longer than stable_after: that is what is tested
    flag.touch()
    wait_for(lambda: sentinels.poll() or by_name(sentinels)["s"]["restarts"] >= 3)
    delays = [e["delay"] for e in events if e["event"] == "restarting"]
    assert delays[:3] == [0.05, 0.1, 0.05]


def test_missing_executable_is_a_failed_start_not_an_exception(make):
    sentinels, events = make(backoff_start=0.05, backoff_max=0.1)
    sentinels.configure({"ghost": "/nonexistent/bin/ghost --serve", "empty": ""})
    sentinels.set_active(["ghost", "empty"])
    sentinels.run()
    status = by_name(sentinels)
    assert status["ghost"]["state"] == status["empty"]["state"] == "backoff"
    assert any("No such file" in e.get("error", "") for e in events)
    wait_for(lambda: sentinels.poll() or by_name(sentinels)["ghost"]["restarts"] >= 3)
    assert by_name(sentinels)["ghost"]["pid"] is None


def test_output_goes_to_the_log_file(make, tmp_path):
    sentinels, _ = make()
    sentinels.configure({"talker": f"{PY} -c 'import sys; print(\"out\"); print(\"err\", "
                                   "file=sys.stderr); import time; time.sleep(60)'"})
    sentinels.set_active(["talker"])
    sentinels.run()
    log_file = tmp_path / "state" / "logs" / "talker.log"
    wait_for(lambda: {"out", "err"} <= set(log_file.read_text().splitlines()))
    assert "sbs starts:" in log_file.read_text()


def test_configure_removes_and_replaces(make):
    sentinels, _ = make()
    sentinels.configure({"a": SLEEPER, "b": SLEEPER})
    sentinels.set_active(["a", "b"])
    sentinels.run()
    old_a, old_b = by_name(sentinels)["a"]["pid"], by_name(sentinels)["b"]["pid"]

    changed = f"{PY} -c 'import time; time.sleep(61)'"
    sentinels.configure({"a": changed})  # b removed, a changed
    assert list(by_name(sentinels)) == ["a"]

    def replaced():
        sentinels.poll()
        entry = by_name(sentinels)["a"]
        return entry["state"] == "running" and not alive(old_a) and not alive(old_b)

    wait_for(replaced)
    assert by_name(sentinels)["a"]["command"] == changed
    with pytest.raises(ValueError, match="invalid sentinel name"):
        sentinels.configure({"../evil": SLEEPER})


def test_sentinel_dies_with_its_node(tmp_path):
    """PDEATHSIG: kill -9 the process that owns the Sentinels; its sentinel must die too."""
    state = tmp_path / "state"
    parent_code = (
        "import sys, time\n"
        "from pathlib import Path\n"
        "from sbs.node.sentinels import Sentinels\n"
        "s = Sentinels(Path(sys.argv[1]))\n"
        "s.configure({'sleeper': sys.argv[2]})\n"
        "s.set_active(['sleeper'])\n"
        "s.run()\n"
        "time.sleep(60)\n"
    )
    env = dict(os.environ, PYTHONPATH=str(REPO))
    parent = subprocess.Popen([sys.executable, "-c", parent_code, str(state), SLEEPER], env=env)
    try:
        pids_file = state / PIDS_FILE

        def recorded_pid():
            if not pids_file.exists():
                return None
            children = json.loads(pids_file.read_text())["children"]
            return children[0]["pid"] if children else None

        child = wait_for(recorded_pid, timeout=10)
        assert alive(child)
    finally:
        parent.kill()
        parent.wait(timeout=5)
    try:
        wait_for(lambda: not alive(child))
    finally:
        if alive(child):  # the property failed: do not leak the orphan
            os.kill(child, signal.SIGKILL)


def test_cleanup_leftovers_kills_only_the_recorded_process(make, tmp_path):
    state = tmp_path / "state"
    crashed, _ = make(state)  # plays a node that died without stopping its sentinels
    crashed.configure({"left": SLEEPER})
    crashed.set_active(["left"])
    crashed.run()
    leftover = by_name(crashed)["left"]["pid"]

    unrelated = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        record = json.loads((state / PIDS_FILE).read_text())
        ticks = record["children"][0]["start_ticks"]
        # Same pid as a live process but another start time: a reused pid, not ours to kill.
        record["children"].append({"name": "reused", "pid": unrelated.pid,
                                   "start_ticks": ticks - 1})
        record["children"].append({"name": "gone", "pid": 2**22 + 1, "start_ticks": ticks})
        (state / PIDS_FILE).write_text(json.dumps(record))

        restarted, _ = make(state)
        assert restarted.cleanup_leftovers() == [leftover]
        wait_for(lambda: crashed.poll() or not alive(leftover))
        assert unrelated.poll() is None
        assert json.loads((state / PIDS_FILE).read_text())["children"] == []
        assert restarted.cleanup_leftovers() == []
    finally:
        unrelated.kill()
        unrelated.wait(timeout=5)


def test_cleanup_leftovers_tolerates_missing_or_bad_file(make, tmp_path):
    sentinels, _ = make()
    assert sentinels.cleanup_leftovers() == []
    (tmp_path / "state").mkdir(exist_ok=True)
    (tmp_path / "state" / PIDS_FILE).write_text("{not json")
    assert sentinels.cleanup_leftovers() == []


def test_the_guard_stops_a_stubborn_sentinel_when_the_deadline_passes_unconfirmed(make, tmp_path):
    """The node is not called at all meanwhile (as if paused): the guard alone sends SIGTERM at
    the deadline and SIGKILL guard_kill_after later; the next poll() starts nothing again."""
    sentinels, events = make(guard_kill_after=0.3)
    sentinels.confirm(time.monotonic() + 60)
    pid = run_stubborn(sentinels, tmp_path)
    deadline = time.monotonic() + 0.5
    assert sentinels.confirm(deadline)
    wait_for(lambda: not alive(pid), timeout=5)
    gone = time.monotonic()
    assert deadline + 0.3 <= gone < deadline + 2.0  # SIGTERM ignored: SIGKILL at the bound
    sentinels.poll()
    assert sentinels.lapses == 1 and events[-1]["event"] in ("lapsed", "stopped")
    wait_for(lambda: (sentinels.poll(), by_name(sentinels)["stubborn"]["state"] == "stopped")[1])
    assert by_name(sentinels)["stubborn"]["pid"] is None  # held: not restarted
    # the node confirms again and runs them: back
    assert sentinels.confirm(time.monotonic() + 60)
    sentinels.run()
    assert alive(by_name(sentinels)["stubborn"]["pid"])


def test_a_confirmation_in_time_keeps_the_sentinel(make, tmp_path):
    sentinels, _ = make(guard_kill_after=0.1)
    sentinels.confirm(time.monotonic() + 0.4)
    sentinels.configure({"s": SLEEPER})
    sentinels.set_active(["s"])
    sentinels.run()
    pid = by_name(sentinels)["s"]["pid"]
    end = time.monotonic() + 1.5
    while time.monotonic() < end:  # confirmed every 0.1 s, 0.4 s ahead
        assert sentinels.confirm(time.monotonic() + 0.4)
        sentinels.poll()
        time.sleep(0.1)  # the node's heartbeat
    assert alive(pid) and sentinels.lapses == 0


def test_the_guard_kills_a_group_started_after_it_fired_until_a_new_deadline():
    """node/guard.py's state machine with real process groups: a sentinel started after the
    deadline passed (the node did not know yet) dies at once; a new deadline ends that."""
    from sbs.node.guard import Guard

    def group() -> subprocess.Popen:
        return subprocess.Popen([PY, "-c", "import time; time.sleep(60)"],
                                start_new_session=True)

    guard = Guard(kill_after=0.2)
    first = group()
    procs = [first]
    try:
        guard.line(f"+{first.pid}")
        guard.line(f"D{time.monotonic() - 0.01:.6f}")
        guard.tick(time.monotonic())
        assert guard.fired and first.wait(5) == -signal.SIGTERM
        guard.line(f"-{first.pid}")
        late = group()
        procs.append(late)
        guard.line(f"+{late.pid}")
        assert late.wait(5) == -signal.SIGKILL  # no confirmation since: killed at once
        guard.line(f"-{late.pid}")
        guard.line(f"D{time.monotonic() + 60:.6f}")
        fresh = group()
        procs.append(fresh)
        guard.line(f"+{fresh.pid}")
        guard.tick(time.monotonic())
        assert fresh.poll() is None and not guard.fired
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
