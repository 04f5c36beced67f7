"""A folder whose path changes on a running secondary (its sbs.ini edited, then a reload):
the secondary follows the new path and lets go of what it held for the old one.

Every wait polls a condition with a deadline.
"""
from __future__ import annotations

import os
from pathlib import Path

from sbs.tools.client import request

from tests.pair import wait_for
from tests.test_e2e_replication import replication, started, write

MOVES = 5


def temp_area_fds(pid: int, state_dir: Path) -> list[str]:
    """The node's open fds on its folders' temp areas (state_dir/tmp/<folder>[/laneN])."""
    area = str(state_dir.resolve() / "tmp")
    found = []
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue  # closed since the listing
        if target == area or target.startswith(area + "/"):
            found.append(target)
    return found


def test_a_secondary_whose_folder_path_changes_closes_the_old_writer(make_pair):
    """beta's docs folder moves to a new, empty path five times (its sbs.ini edited, then
    RELOAD): each time a new snapshot fills the new path. The writer of the old path (its
    temp directory and lane directories, open as fds) must be closed, not left open for the
    life of the process."""
    pair = make_pair()
    a = pair.folder("alpha")
    write(a / "f.txt", "in the folder that moves on beta\n")
    started(pair)
    beta = pair.beta
    state = pair.root / "state" / "beta"
    before = temp_area_fds(beta.pid, state)
    total = len(os.listdir(f"/proc/{beta.pid}/fd"))
    assert before, "beta holds its temp area open while it follows"
    line = "docs = data/beta/docs\n"
    for move in range(1, MOVES + 1):
        text = beta.config.read_text()
        assert line in text
        line_now = f"docs = data/beta/moved{move}\n"
        beta.config.write_text(text.replace(line, line_now))
        line = line_now
        reply = request(beta.cfg, "RELOAD", timeout=5)
        assert reply and reply["status"] == "ok", reply
        new = pair.root / "data" / "beta" / f"moved{move}"
        wait_for(lambda new=new: (new / "f.txt").exists(), 20, f"f.txt in {new.name}")
        wait_for(lambda: replication(beta).get("synced"), 20, f"beta in sync in {new.name}")
    after = temp_area_fds(beta.pid, state)
    assert len(after) <= len(before), (
        f"fds on the temp area: {len(before)} before, {len(after)} after {MOVES} moves "
        f"(all fds: {total} before, {len(os.listdir(f'/proc/{beta.pid}/fd'))} after): {after}")
