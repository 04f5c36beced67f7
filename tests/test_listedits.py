"""The pair's list stamps, what a reload may change, and the maintenance record (real files)."""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from sbs.node.config import load
from sbs.node.listedits import (
    Stamp,
    changes,
    fingerprint,
    own_fingerprint,
    restart_keys,
    stamp_from,
)
from sbs.node.maintenance import Maintenance, Record, from_wire
from sbs.node.persist import Guarded
from sbs.node.persist import load as load_json

INI = """[node]
name = alpha
local = 127.0.0.1
peer = 127.0.0.2
[security]
curve = false
[folders]
docs = {root}/docs *.txt
[sentinels]
web = sleep 60
"""


def test_the_newest_stamp_wins_generation_then_time_then_node():
    assert Stamp(2, 1.0, "beta") > Stamp(1, 9.0, "alpha")
    assert Stamp(1, 9.0, "alpha") > Stamp(1, 8.0, "beta")
    assert Stamp(1, 9.0, "beta") > Stamp(1, 9.0, "alpha")
    assert Stamp() < Stamp(0, 0.0, "alpha")


def test_stamps_from_the_wire_are_checked():
    assert stamp_from({"gen": 3, "at": 5.5, "by": "beta"}) == Stamp(3, 5.5, "beta")
    for bad in (None, [], {"gen": -1, "at": 0, "by": ""}, {"gen": True, "at": 0, "by": ""},
                {"gen": 1, "at": "now", "by": ""}, {"gen": 1, "at": 1e12, "by": ""},
                {"gen": 1, "at": 0, "by": "x" * 65}, {"gen": 1, "at": 0}):
        assert stamp_from(bad) is None, bad


def test_the_fingerprint_ignores_paths_but_not_filters_or_commands(tmp_path: Path):
    ini = tmp_path / "sbs.ini"
    ini.write_text(INI.format(root=tmp_path / "a"))
    a = load(ini)
    ini.write_text(INI.format(root=tmp_path / "b"))
    assert own_fingerprint(load(ini)) == own_fingerprint(a)
    ini.write_text(INI.format(root=tmp_path / "a").replace("*.txt", "*.lab"))
    assert own_fingerprint(load(ini)) != own_fingerprint(a)
    assert fingerprint({"docs": ["*"]}, {"web": "a"}) != fingerprint({"docs": ["*"]}, {"web": "b"})


def test_only_lists_email_notify_and_health_change_without_a_restart(tmp_path: Path):
    ini = tmp_path / "sbs.ini"
    ini.write_text(INI.format(root=tmp_path))
    cfg = load(ini)
    ini.write_text(INI.format(root=tmp_path) + "[notify]\nkinds = failover\n[email]\nenabled = "
                   "true\n[health]\nrestarts = 4\n")
    assert restart_keys(cfg, load(ini)) == []
    assert restart_keys(cfg, replace(cfg, port=4446, curve=True, heartbeat=0.2)) == [
        "[node] port", "[node] heartbeat", "[security] curve"]


def test_changes_names_what_was_added_removed_and_changed():
    old = {"folders": {"docs": ["*"], "old": ["*"]}, "sentinels": {"web": "a"}}
    new = {"folders": {"docs": ["*.txt"], "extra": ["*"]}, "sentinels": {"web": "a", "db": "b"}}
    assert changes(old, new) == "folders +extra -old ~docs; sentinels +db"
    assert changes(old, old) == "no change in names, filters or commands"


def test_maintenance_is_kept_on_disk_and_the_newer_switch_wins(tmp_path: Path):
    m = Maintenance(tmp_path, "alpha", Guarded())
    assert not m.on
    rec = m.switch(True)
    assert rec.on and rec.by == "alpha"
    assert Maintenance(tmp_path, "alpha", Guarded()).on  # a restart keeps it
    assert not m.offer(Record(False, rec.at - 10, "beta"), "beta")  # older: ignored
    assert m.on
    assert m.offer(Record(False, rec.at + 10, "beta"), "beta")
    assert not Maintenance(tmp_path, "alpha", Guarded()).on
    later = m.switch(True)  # never older than what it holds, whatever this clock says
    assert later.at > rec.at + 10
    assert from_wire({"on": "yes", "at": 1, "by": "x"}) is None
    (tmp_path / "maintenance.json").write_text("not json")
    assert not Maintenance(tmp_path, "alpha", Guarded()).on  # unreadable: logged, off


def test_a_maintenance_switch_that_cannot_be_written_is_shown_and_retried(tmp_path: Path):
    state = tmp_path / "state"
    writes = Guarded(retry_every=2.0)
    m = Maintenance(state, "alpha", writes)
    state.write_text("a file where the state folder should be")  # as a full disk fails
    rec = m.switch(True)
    assert m.on  # kept in memory: it holds back takeovers all the same
    path = str(state / "maintenance.json")
    assert list(writes.status()) == [path] and writes.status()[path]["error"]
    state.unlink()
    writes.retry(now=100.0)  # the node's loop (Node._retry_writes)
    assert writes.status() == {}
    assert load_json(state / "maintenance.json", None) == rec.wire()
    assert Maintenance(state, "alpha", Guarded()).on
