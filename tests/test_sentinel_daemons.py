"""Sentinels whose process moves out of their process group (setsid), with real child
processes in this test process (tests/test_e2e_sentinel_daemons.py has them under real nodes,
which are child subreapers). Every wait polls a condition under a deadline; every process a
test started is killed in a `finally`, whether it passed or not."""
from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from sbs.node.guard import Guard
from sbs.node.sentinelpids import start_ticks
from sbs.node.sentinels import PIDS_FILE, Sentinels

from tests.test_sentinels import PY, alive, by_name, wait_for

# The main process stays; its child leaves the group with setsid(), ignores SIGTERM and
# writes its pid to the file named by argv[1].
_ESCAPER = """\
import os, signal, sys, time
if os.fork() == 0:
    os.setsid()
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    with open(sys.argv[1] + ".tmp", "w") as f:
        f.write(str(os.getpid()))
    os.rename(sys.argv[1] + ".tmp", sys.argv[1])
    while True:
        time.sleep(60)
while True:
    time.sleep(60)
"""


@pytest.fixture
def escaper(tmp_path):
    """(command, escaped_pid()): the escaped processes still alive are killed at the end."""
    script, pid_file = tmp_path / "escaper.py", tmp_path / "escaped.pid"
    script.write_text(_ESCAPER)
    seen: list[int] = []

    def escaped() -> int | None:
        try:
            pid = int(pid_file.read_text())
        except (OSError, ValueError):
            return None
        if pid not in seen:
            seen.append(pid)
        return pid

    try:
        yield f"{PY} {script} {pid_file}", escaped
    finally:
        for pid in seen:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        wait_for(lambda: not any(alive(pid) for pid in seen), 5)


def _running(sentinels: Sentinels, command: str, escaped) -> tuple[int, int]:
    sentinels.configure({"svc": command})
    sentinels.set_active(["svc"])
    sentinels.run()
    main = by_name(sentinels)["svc"]["pid"]
    pid = wait_for(escaped, 5)
    assert _pgid(pid) == pid != main
    return main, pid


def _pgid(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[2])


def test_a_stop_waits_for_a_process_that_left_the_group_and_kills_it_after_the_grace(
        tmp_path, escaper):
    command, escaped = escaper
    sentinels = Sentinels(tmp_path / "state", grace=0.5)
    try:
        main, pid = _running(sentinels, command, escaped)
        started = time.monotonic()
        sentinels.begin_stop_all()
        wait_for(lambda: not alive(main), 5)  # the main process obeys SIGTERM at once
        assert alive(pid) and sentinels.stop_done() is False, "the stop ended with it running"
        wait_for(sentinels.stop_done, 5)
        assert time.monotonic() - started >= 0.5  # it ignores SIGTERM: SIGKILL after the grace
        assert not alive(pid)
    finally:
        sentinels.stop_all(grace=0.5)


def test_the_pid_file_records_it_and_the_next_run_kills_it(tmp_path, escaper):
    """A node and its guard both gone (killed together): the next run kills the leftovers,
    the process outside the group too."""
    command, escaped = escaper
    state = tmp_path / "state"
    sentinels = Sentinels(state, grace=0.5)
    try:
        main, pid = _running(sentinels, command, escaped)
        sentinels.confirm(time.monotonic() + 60)  # each confirmation looks for such processes

        def recorded() -> list[dict]:
            sentinels.poll()
            return json.loads((state / PIDS_FILE).read_text())["children"]

        wait_for(lambda: any(c["pid"] == pid for c in recorded()), 5)
        assert {(c["pid"], c["group"]) for c in recorded()} == {(main, True), (pid, False)}
        assert sorted(Sentinels(state).cleanup_leftovers()) == sorted([main, pid])
        wait_for(lambda: not alive(pid) and not alive(main), 5)
    finally:
        sentinels.stop_all(grace=0.5)


def test_the_guard_signals_a_listed_process_only_while_it_is_the_same_process():
    sleeper = [PY, "-c", "import time; time.sleep(60)"]
    listed = subprocess.Popen(sleeper, start_new_session=True)
    other = subprocess.Popen(sleeper, start_new_session=True)
    try:
        guard = Guard(kill_after=0.2)
        guard.line(f"*{listed.pid} {start_ticks(listed.pid)}")
        guard.line(f"*{other.pid} {start_ticks(other.pid) - 1}")  # its pid, reused since
        guard.line(f"D{time.monotonic() - 0.01:.6f}")
        guard.tick(time.monotonic())
        assert guard.fired and listed.wait(5) == -signal.SIGTERM
        guard.eof()
        assert other.poll() is None
    finally:
        for p in (listed, other):
            if p.poll() is None:
                p.kill()
            p.wait()


def test_the_log_names_the_processes_outside_the_group_and_only_when_there_are(tmp_path,
                                                                                escaper, caplog):
    command, escaped = escaper
    sentinels = Sentinels(tmp_path / "state", grace=0.5)
    try:
        sentinels.configure({"svc": command, "plain": f"{PY} -c 'import time; time.sleep(60)'"})
        sentinels.set_active(["svc", "plain"])
        sentinels.run()
        pid = wait_for(escaped, 5)
        main, plain = by_name(sentinels)["svc"]["pid"], by_name(sentinels)["plain"]["pid"]
        with caplog.at_level("INFO", logger="sbs.node.sentinels"):
            sentinels.stop_all()
        said = [r.getMessage() for r in caplog.records if r.getMessage().startswith("stopping")]
        assert f"stopping sentinel plain (pid {plain})" in said, said
        escaper_line = next(line for line in said if line.startswith("stopping sentinel svc"))
        assert escaper_line.startswith(f"stopping sentinel svc (pid {main}) and what it started "
                                       f"outside its group: pid {pid} ("), said
        assert escaper_line.endswith(f", session {pid})"), said
    finally:
        sentinels.stop_all(grace=0.5)


def test_a_heartbeat_looks_at_every_process_only_when_one_has_started_since(
        tmp_path, escaper, monkeypatch):
    """A look at every process costs ~10 us each, on the node's loop at each heartbeat: it is
    skipped while no process or thread has started on the machine since the last one (no
    daemon can have appeared). The test's own threads and the machine's other processes start
    pids too, so a skipped look is shown with last_pid held still, and a new one with it
    moved on."""
    from sbs.node import proctree

    command, escaped = escaper
    sentinels = Sentinels(tmp_path / "state", grace=0.5)
    looks = []
    real_snapshot = proctree.snapshot
    monkeypatch.setattr(proctree, "snapshot", lambda: looks.append(1) or real_snapshot())
    pid_now = [1000]
    monkeypatch.setattr(proctree, "last_pid", lambda: pid_now[0])
    try:
        _running(sentinels, command, escaped)
        sentinels.confirm(time.monotonic() + 60)
        before = len(looks)
        for _ in range(5):
            sentinels.confirm(time.monotonic() + 60)
        assert len(looks) == before, "a heartbeat looked at every process, none having started"
        pid_now[0] += 1
        sentinels.confirm(time.monotonic() + 60)
        assert len(looks) == before + 1
    finally:
        sentinels.stop_all(grace=0.5)


# The main process stays; its child writes its pid to argv[1], waits for the file argv[2],
# then leaves the group with setsid() (no new process) and says so in argv[1] + ".moved".
_LATE_MOVER = """\
import os, sys, time
if os.fork() == 0:
    with open(sys.argv[1] + ".tmp", "w") as f:
        f.write(str(os.getpid()))
    os.rename(sys.argv[1] + ".tmp", sys.argv[1])
    while not os.path.exists(sys.argv[2]):
        time.sleep(0.01)
    os.setsid()
    open(sys.argv[1] + ".moved", "w").close()
    while True:
        time.sleep(60)
while True:
    time.sleep(60)
"""


def test_a_heartbeat_looks_again_when_a_known_process_leaves_the_group(tmp_path, monkeypatch):
    """A process seen in the sentinel's group that calls setsid() later starts no process, so
    last_pid does not move: the heartbeat must still see it leave (or the guard never hears
    of it, and a paused primary's daemon outlives the guard's stop)."""
    from sbs.node import proctree

    script, pid_file, go = tmp_path / "mover.py", tmp_path / "child.pid", tmp_path / "go"
    script.write_text(_LATE_MOVER)
    sentinels = Sentinels(tmp_path / "state", grace=0.5)
    monkeypatch.setattr(proctree, "last_pid", lambda: 1000)  # no process starts from here on
    child = None
    try:
        sentinels.configure({"svc": f"{PY} {script} {pid_file} {go}"})
        sentinels.set_active(["svc"])
        sentinels.run()
        child = int(wait_for(lambda: pid_file.exists() and pid_file.read_text(), 5))
        sentinels.confirm(time.monotonic() + 60)  # it is seen in the group
        assert by_name(sentinels)["svc"]["outside_group"] == []
        go.touch()
        wait_for(lambda: (tmp_path / "child.pid.moved").exists(), 5)
        sentinels.confirm(time.monotonic() + 60)
        assert by_name(sentinels)["svc"]["outside_group"] == [child]
    finally:
        sentinels.stop_all(grace=0.5)
        if child is not None:
            with contextlib.suppress(OSError):
                os.kill(child, signal.SIGKILL)
