"""A full state disk (state_dir on a small tmpfs of the node's own mount namespace): every
state write is logged, shown in status and retried; the node keeps its role and replicates."""
from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import pytest
from sbs.tools.client import request

from tests.pair import wait_for
from tests.test_e2e_replication import (
    TmpfsNodeProc,
    _unshare_works,
    replication,
    sbs_tools,
    started,
    wait_equal,
    write,
)


class FullTmpfsNodeProc(TmpfsNodeProc):
    """A TmpfsNodeProc whose tmpfs is full from before the node starts."""

    fill = True


def on_tmpfs(pair, name: str) -> tuple[TmpfsNodeProc, Path]:
    """Node `name` of `pair` with its state_dir on a 2 MiB tmpfs of its own; (node, state_dir)."""
    state = pair.root / "state" / name
    state.mkdir(parents=True)
    node = TmpfsNodeProc(getattr(pair, name).config, state, "2m")
    pair.nodes[name] = node
    setattr(pair, name, node)
    return node, state


def fill(folder: Path) -> Path:
    """Write into `folder` until its filesystem is full; the filler, to delete later."""
    filler = folder / "filler"
    with open(filler, "wb") as fh:
        try:
            while True:
                fh.write(b"\0" * 65536)
                fh.flush()
        except OSError as exc:
            assert exc.errno == errno.ENOSPC, exc
    return filler


@pytest.mark.skipif(not _unshare_works(), reason="needs unshare -m and mount (root)")
def test_a_full_state_disk_is_reported_and_retried_and_the_secondary_goes_on(make_pair):
    pair = make_pair(sentinels={"idle": "sleep 600"})
    beta, state = on_tmpfs(pair, "beta")
    a, b = pair.folder("alpha"), pair.folder("beta")
    write(a / "before.txt", "before")
    started(pair)
    wait_equal(a, b)
    inside = beta.inside(state)
    filler = fill(inside)
    # the primary changes its sentinel list: the secondary must record it in pair.json
    reply = request(pair.alpha.cfg, "SENTINEL", {"action": "stop", "name": "idle"}, timeout=5)
    assert reply and reply["status"] == "ok", reply
    st = wait_for(lambda: (s := beta.status(1.0)) and "pair.json" in " ".join(s["state_writes"])
                  and s, 10, "the failed pair.json write in beta's status")
    failed = next(v for k, v in st["state_writes"].items() if k.endswith("pair.json"))
    assert "No space left" in failed["error"], failed
    assert "cannot write" in beta.log.read_text() and "pair.json" in beta.log.read_text()
    shown = " ".join(sbs_tools("status", "--config", str(beta.config)).stdout.split())
    # a long path may be wrapped anywhere at the terminal's width: look for it unwrapped
    assert "cannot write" in shown and "pair.json" in "".join(shown.split()), shown
    # still secondary, still replicating
    write(a / "during.txt", "written while beta's state disk is full")
    wait_equal(a, b, 20, "replication with a full state disk")
    assert beta.state() == "secondary" and beta.proc.poll() is None
    assert replication(beta)["synced"] is True
    # room again: the write is retried and the status clears
    os.unlink(filler)
    wait_for(lambda: (s := beta.status(1.0)) and not s["state_writes"], 10,
             "the state writes to succeed again")
    saved = json.loads((inside / "pair.json").read_text())
    assert "idle" in saved["sentinels"] and saved["active"] == [], saved


@pytest.mark.skipif(not _unshare_works(), reason="needs unshare -m and mount (root)")
def test_a_full_state_disk_on_the_primary_keeps_its_role_and_its_sentinels(make_pair):
    pair = make_pair(sentinels={"idle": "sleep 600"})
    alpha, state = on_tmpfs(pair, "alpha")
    a, b = pair.folder("alpha"), pair.folder("beta")
    started(pair)
    reply = request(alpha.cfg, "SENTINEL", {"action": "stop", "name": "idle"}, timeout=5)
    assert reply and reply["status"] == "ok", reply
    filler = fill(alpha.inside(state))
    # a sentinel started now: its pid file, its log header and pair.json find no room
    reply = request(alpha.cfg, "SENTINEL", {"action": "start", "name": "idle"}, timeout=5)
    assert reply and reply["status"] == "ok", reply
    # and the operator's maintenance switch finds no room for maintenance.json either
    reply = request(alpha.cfg, "MAINTENANCE", {"on": True}, timeout=5)
    assert reply and reply["maintenance"]["on"], reply

    def failing() -> set[str]:
        st = alpha.status(1.0)
        return {Path(k).name for k in st["state_writes"]} if st else set()

    wait_for(lambda: {"pair.json", "sentinels.pids.json", "maintenance.json"} <= failing(), 10,
             "the failed writes in alpha's status")
    st = alpha.status(1.0)
    assert st["state"] == "primary" and st["maintenance"] is True
    assert next(s for s in st["sentinels"] if s["name"] == "idle")["state"] == "running"
    write(a / "during.txt", "written while alpha's state disk is full")
    wait_equal(a, b, 20, "replication from a primary with a full state disk")
    os.unlink(filler)
    wait_for(lambda: not failing() and alpha.status(1.0), 10,
             "the state writes to succeed again")
    pids = json.loads((alpha.inside(state) / "sentinels.pids.json").read_text())
    assert [c["name"] for c in pids["children"]] == ["idle"], pids
    maint = json.loads((alpha.inside(state) / "maintenance.json").read_text())
    assert maint["on"] is True and maint["by"] == "alpha", maint


@pytest.mark.skipif(not _unshare_works(), reason="needs unshare -m and mount (root)")
def test_a_conflict_copy_with_no_room_does_not_end_the_snapshot(make_pair):
    """Strict: a secondary starts with its state disk full and a file of its own that the
    primary lacks and the pair never agreed on. Before deleting it, it keeps a conflict copy,
    which finds no room: the file stays (the deletion is logged as not done) and the rest of
    the snapshot, the next folder included, is applied. The snapshot used to end there, and
    what it had not reached never came: not pending, so not retried, room or not."""
    folders = {n: {"folders": {"docs": f"data/{n}/docs", "more": f"data/{n}/more"}}
               for n in ("alpha", "beta")}
    pair = make_pair(node={"strict": "true"}, **folders)
    state = pair.root / "state" / "beta"
    state.mkdir(parents=True)
    beta = pair.nodes["beta"] = pair.beta = FullTmpfsNodeProc(pair.beta.config, state, "2m")
    a, b = pair.folder("alpha"), pair.folder("beta")
    more_a, more_b = pair.folder("alpha", "more"), pair.folder("beta", "more")
    write(a / "shared.txt", "on both\n")
    write(more_a / "m.txt", "in the next folder\n")
    write(b / "mine.txt", "made on beta, never agreed on\n")
    pair.start_both()
    wait_equal(more_a, more_b, 20, "the next folder on beta")
    assert (b / "shared.txt").read_text() == "on both\n"
    assert (b / "mine.txt").read_text() == "made on beta, never agreed on\n"
    log = beta.log.read_text()
    assert "could not delete docs/mine.txt" in log and "No space left" in log, beta.tail_log()
    assert "sync job snapshot failed" not in log
    assert beta.state() == "secondary"
