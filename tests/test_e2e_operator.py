"""The operator's pair with real nodes: maintenance mode, reload and the pair's lists, alerts
by a real SMTP server, health-driven hand-over (issue 15)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from sbs.node import protocol
from sbs.tools.cli import describe
from sbs.tools.client import request, subscribe

from tests.pair import Pair, wait_for
from tests.test_e2e_replication import TmpfsNodeProc, _unshare_works, crash_with_unsent

_SCRIPT = Path(sys.executable).with_name("sbs-tools")
SBS_TOOLS = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "sbs.tools.cli"]


def sbs_tools(*args: str, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run([*SBS_TOOLS, *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "COLUMNS": "200"})


def logged(node, text: str) -> bool:
    return text in node.log.read_text(errors="replace")


def email_to(port: int) -> dict:
    return {"enabled": "true", "smtp_server": "127.0.0.1", "smtp_port": port,
            "sender": "sbs@example.com", "receiver": "ops@example.com"}


def subjects(collector) -> list[str]:
    return [m["subject"] for m in collector.messages]


# ---------------------------------------------------------------------------- maintenance
def test_maintenance_is_pair_wide_holds_takeover_and_survives_restarts(make_pair):
    pair: Pair = make_pair()
    pair.start_both()
    a, b = pair.alpha, pair.beta

    done = sbs_tools("maintenance", "on", "--config", str(a.config))
    assert done.returncode == 0, done.stderr
    assert "maintenance ON" in done.stdout
    # pair-wide: the peer adopts it within a heartbeat, and says so
    wait_for(lambda: (st := b.status()) and st["maintenance"], 10, "beta in maintenance")
    assert b.status()["maintenance_switch"]["by"] == "alpha"
    shown = sbs_tools("status", "--config", str(b.config))
    lines = [line for line in shown.stdout.splitlines() if line.strip()]
    assert len(lines) >= 3 and all("MAINTENANCE" in line for line in lines), shown.stdout
    # tail: the heartbeat says it
    hb = next(m for m in subscribe(a.cfg) if m and m.command == "HB")
    assert hb.body["maintenance"] is True and "MAINTENANCE" in describe("HB", hb.body)

    # replication goes on
    (pair.folder("alpha") / "during.txt").write_text("kept in step")
    wait_for(lambda: (pair.folder("beta") / "during.txt").exists(), 15, "the file on beta")

    # a restart of the secondary keeps it (on disk), and it rejoins as secondary
    b.stop()
    b.start()
    st = b.wait_state("secondary")
    assert st["maintenance"] is True

    # the primary dies: no takeover
    a.kill()
    wait_for(lambda: logged(b, "maintenance mode: peer_silent held back"), 15,
             "beta to hold back its takeover")
    assert b.state() == "secondary"

    # the primary comes back: primary again, still in maintenance
    a.start()
    st = a.wait_state("primary")
    assert st["maintenance"] is True
    wait_for(lambda: (st := a.status()) and st["peer_state"] == "secondary", 15,
             "alpha to see beta as secondary")

    # a stopped primary does not hand over either: the peer waits
    a.stop()
    assert logged(a, "maintenance mode: stop held back")
    wait_for(lambda: logged(b, "maintenance mode: peer_silent held back"), 15,
             "beta to hold back again")
    assert b.state() == "secondary"

    # both stopped, the primary started alone: still in maintenance, from its own disk (no
    # peer to adopt it from)
    b.stop()
    a.start()
    st = a.wait_state("primary")
    assert st["maintenance"] is True and st["maintenance_switch"]["by"] == "alpha", st
    assert st["peer_state"] == "unreachable", st
    assert logged(a, "MAINTENANCE mode is on")
    b.start()
    b.wait_state("secondary")
    wait_for(lambda: (st := a.status()) and st["peer_state"] == "secondary", 15,
             "alpha to see beta as secondary")
    assert a.status()["maintenance"] is True

    # switched off on the other node: armed again, pair-wide
    done = sbs_tools("maintenance", "off", "--config", str(b.config))
    assert done.returncode == 0 and "maintenance off" in done.stdout, done.stderr
    wait_for(lambda: (st := a.status()) and not st["maintenance"], 10, "alpha out of it")
    a.kill()
    b.wait_state("primary", 15)


def test_promote_still_works_in_maintenance(make_pair):
    pair: Pair = make_pair()
    pair.start_both()
    assert request(pair.beta.cfg, "MAINTENANCE", {"on": True})["maintenance"]["on"]
    wait_for(lambda: (st := pair.alpha.status()) and st["maintenance"], 10, "alpha adopts it")
    done = sbs_tools("promote", "--config", str(pair.beta.config))
    assert done.returncode == 0, done.stderr
    assert pair.beta.state() == "primary"
    wait_for(lambda: pair.alpha.state() == "secondary", 15, "alpha secondary")
    assert pair.alpha.status()["maintenance"] is True


def test_maintenance_refuses_a_bad_word():
    done = sbs_tools("maintenance", "maybe", "--config", "/nonexistent/sbs.ini")
    assert done.returncode == 2 and "on or off" in done.stderr


# ---------------------------------------------------------------------------- the pair's lists
def add_line(config: Path, section: str, line: str) -> None:
    """Add `line` at the end of [section] in an ini written by tests.pair.write_config."""
    text = config.read_text()
    head = f"[{section}]\n"
    start = text.index(head) + len(head)
    end = text.find("\n[", start)
    end = len(text) if end < 0 else end + 1
    config.write_text(text[:end].rstrip("\n") + f"\n{line}\n\n" + text[end:].lstrip("\n"))


def add_folder(pair: Pair, folder: str, *names: str) -> None:
    """The operator adds `folder` to these nodes' sbs.ini, each with its own path."""
    for name in names:
        pair.folder(name, folder)
        add_line(pair.nodes[name].config, "folders", f"{folder} = data/{name}/{folder}")


def lists(node) -> dict:
    return node.status()["lists"]


def test_a_folder_added_on_the_primary_then_reload(make_pair):
    pair: Pair = make_pair()
    pair.start_both()
    (pair.folder("alpha", "extra") / "new.txt").write_text("from the new folder")
    add_folder(pair, "extra", "alpha", "beta")

    done = sbs_tools("reload", "--config", str(pair.alpha.config))
    assert done.returncode == 0, done.stderr
    assert "lists generation 1" in done.stdout and "folders +extra" in done.stdout
    wait_for(lambda: (pair.folder("beta", "extra") / "new.txt").exists(), 20,
             "the new folder's file on beta")
    assert lists(pair.alpha)["gen"] == 1 and lists(pair.alpha)["by"] == "alpha"
    wait_for(lambda: lists(pair.beta)["gen"] == 1, 10, "beta to hold generation 1")
    assert lists(pair.beta)["by"] == "alpha"
    saved = (pair.root / "state" / "beta" / "pair.json").read_text()
    assert '"extra"' in saved and '"gen": 1' in saved
    shown = sbs_tools("status", "--config", str(pair.beta.config))
    assert "lists: generation 1, edited on alpha" in shown.stdout


def test_a_folder_added_on_the_secondary_then_sighup(make_pair):
    pair: Pair = make_pair()
    pair.start_both()
    (pair.folder("alpha", "extra") / "new.txt").write_text("on the primary")
    add_folder(pair, "extra", "alpha", "beta")

    pair.beta.signal(signal.SIGHUP)  # it used to end the node without a word
    wait_for(lambda: logged(pair.alpha, "adopted from beta: folders +extra"), 15,
             "alpha to adopt beta's edit")
    assert pair.beta.proc.poll() is None and pair.beta.state() == "secondary"
    assert lists(pair.alpha) == lists(pair.beta)
    assert lists(pair.alpha)["by"] == "beta" and lists(pair.alpha)["gen"] == 1
    wait_for(lambda: (pair.folder("beta", "extra") / "new.txt").exists(), 20,
             "the new folder replicated")
    # the adopting node re-read its own sbs.ini for its path: no edit when it reloads later
    assert request(pair.alpha.cfg, "RELOAD")["lists"]["gen"] == 1


def test_the_primary_restarted_with_an_edited_list(make_pair):
    pair: Pair = make_pair()
    pair.start_both()
    add_folder(pair, "extra", "alpha", "beta")
    pair.alpha.stop()  # hands over to beta, which runs the lists it has (generation 0)
    pair.beta.wait_state("primary")
    (pair.folder("beta", "extra") / "made-on-beta.txt").write_text("beta is primary now")

    pair.alpha.start()  # the edit counts from now; alpha rejoins as secondary
    pair.alpha.wait_state("secondary")
    wait_for(lambda: logged(pair.beta, "adopted from alpha: folders +extra"), 15,
             "beta to adopt alpha's edit once the pair settles")
    wait_for(lambda: (pair.folder("alpha", "extra") / "made-on-beta.txt").exists(), 20,
             "the new folder followed by alpha")
    assert lists(pair.beta)["by"] == "alpha" and lists(pair.alpha)["gen"] == 1


def test_two_edits_the_newest_wins_and_is_logged(make_pair):
    pair: Pair = make_pair()
    pair.start_both()
    pair.beta.stop()
    add_folder(pair, "one", "alpha")
    assert request(pair.alpha.cfg, "RELOAD")["lists"]["gen"] == 1
    # meanwhile beta's sbs.ini gets another edit; beta starts later: its edit is the newer
    add_folder(pair, "two", "alpha", "beta")
    (pair.folder("alpha", "two") / "t.txt").write_text("two")

    pair.beta.start()
    pair.beta.wait_state("secondary")
    wait_for(lambda: logged(pair.alpha, "adopted from beta: folders +two -one"), 15,
             "alpha to adopt the newer edit")
    assert lists(pair.alpha)["by"] == "beta"
    wait_for(lambda: lists(pair.beta) == lists(pair.alpha), 10, "one generation on both")
    wait_for(lambda: (pair.folder("beta", "two") / "t.txt").exists(), 20, "folder two followed")
    assert "one" not in pair.alpha.status()["replication"]["folders"]


def test_a_bad_edit_is_refused_and_changes_nothing(make_pair):
    pair: Pair = make_pair()
    pair.start_both()
    a = pair.alpha
    good = a.config.read_text()

    add_line(a.config, "folders", "bad/name = data/alpha/extra")  # not a folder name
    a.signal(signal.SIGHUP)
    wait_for(lambda: logged(a, "reload (SIGHUP) refused, nothing changed"), 10, "the refusal")
    assert a.proc.poll() is None and a.state() == "primary"
    assert lists(a)["gen"] == 0 and "extra" not in a.status()["replication"]["folders"]

    # a key that needs a restart is named, and the folder added beside it is not taken
    a.config.write_text(good.replace("heartbeat = 0.2", "heartbeat = 0.3"))
    add_folder(pair, "extra", "alpha")
    done = sbs_tools("reload", "--config", str(a.config))
    assert done.returncode == 1
    assert "[node] heartbeat" in done.stderr and "need a restart" in done.stderr
    assert lists(a)["gen"] == 0 and "extra" not in a.status()["replication"]["folders"]
    assert a.state() == "primary" and pair.beta.state() == "secondary"


# ---------------------------------------------------------------------------- alerts by mail
def test_standby_lost_and_back_and_hand_over_told_from_failover(make_pair, smtp):
    port, inbox = smtp
    pair: Pair = make_pair(email=email_to(port))
    pair.start_both()

    pair.beta.kill()
    wait_for(lambda: "SBS ALERT alpha: no standby" in subjects(inbox), 15, "standby lost")
    pair.beta.start()
    pair.beta.wait_state("secondary")
    wait_for(lambda: "SBS resolved alpha: no standby" in subjects(inbox), 15, "standby back")

    done = sbs_tools("promote", "--config", str(pair.beta.config))
    assert done.returncode == 0, done.stderr
    wait_for(lambda: "SBS hand-over (promote): beta is now primary" in subjects(inbox), 15,
             "the planned hand-over's mail")
    pair.alpha.wait_state("secondary")
    pair.beta.kill()
    wait_for(lambda: "SBS failover: alpha is now primary" in subjects(inbox), 15,
             "the failover mail")
    assert subjects(inbox).count("SBS ALERT alpha: no standby") == 1
    assert not [s for s in subjects(inbox) if "failover: beta" in s]

    # a stopped primary (SIGTERM) hands over: planned, and its mail says so
    pair.beta.start()
    pair.beta.wait_state("secondary")
    pair.alpha.stop()
    pair.beta.wait_state("primary", 20)
    wait_for(lambda: "SBS hand-over (stop): beta is now primary" in subjects(inbox), 15,
             "the stop's hand-over mail")
    assert not [s for s in subjects(inbox) if "failover: beta" in s], subjects(inbox)


def test_a_configuration_adopted_is_mailed(make_pair, smtp):
    port, inbox = smtp
    pair: Pair = make_pair(beta={"email": email_to(port)})
    pair.start_both()
    add_folder(pair, "extra", "alpha", "beta")
    assert request(pair.alpha.cfg, "RELOAD")["status"] == "ok"
    wait_for(lambda: "SBS configuration adopted by beta" in subjects(inbox), 15, "the mail")
    body = inbox.messages[-1].get_body(("plain",)).get_content()
    assert "folders +extra" in body and "edited on alpha" in body


def test_the_strict_guard_is_an_alert_until_confirmed(make_pair, smtp):
    port, inbox = smtp
    pair: Pair = make_pair(node={"strict": "true"}, beta={"email": email_to(port)})
    a = pair.folder("alpha")
    (a / "mount").mkdir()
    for n in range(24):
        (a / ("mount" if n < 14 else ".") / f"f{n:02}.txt").write_text(f"file {n}")
    pair.start_both()
    b = pair.folder("beta")
    wait_for(lambda: len([p for p in b.rglob("*") if p.is_file()]) == 24, 15, "the copy")
    # 14 of 24 files vanish in one go, as when a disk is unmounted on the primary
    os.rename(a / "mount", pair.root / "unmounted")
    wait_for(lambda: "SBS ALERT beta: strict guard holds deletions in docs" in subjects(inbox),
             15, "the guard's alert")
    body = inbox.messages[-1].get_body(("plain",)).get_content()
    assert "sbs-tools confirm-deletions docs" in body
    assert sbs_tools("confirm-deletions", "--config", str(pair.beta.config)).returncode == 0
    wait_for(lambda: "SBS resolved beta: strict guard holds deletions in docs"
             in subjects(inbox), 15, "the guard resolved")


def test_a_restricted_backup_running_no_sentinel_is_an_alert(make_pair, smtp):
    port, inbox = smtp
    pair: Pair = make_pair(beta={"node": {"role": "backup"}, "email": email_to(port)},
                           sentinels={"web": f"{sys.executable} -c 'import time; time.sleep(60)'"})
    pair.beta.start()
    st = pair.beta.wait_state("primary")
    assert st["restricted"]
    subject = "SBS ALERT beta: beta is a restricted backup: no sentinel runs"
    wait_for(lambda: subject in subjects(inbox), 15, "the restricted alert")
    assert "web are down" in inbox.messages[0].get_body(("plain",)).get_content()
    pair.alpha.start()  # the main node joins; the backup gives way once it has caught up
    pair.alpha.wait_state("primary", 20)
    wait_for(lambda: subject.replace("ALERT", "resolved") in subjects(inbox), 15, "resolved")


# ---------------------------------------------------------------------------- health
# A sentinel (or its check) that fails on the nodes named in a flag file: it tells which node
# runs it by its parent's command line (the node's --config NAME.ini).
FLAKY = """
import os, sys, time
me = open(f"/proc/{os.getppid()}/cmdline", "rb").read()
try:
    broken = open(sys.argv[1]).read().split()
except FileNotFoundError:
    broken = []
if any(f"{name}.ini".encode() in me for name in broken):
    sys.exit(1)
if sys.argv[2:] != ["check"]:
    time.sleep(600)
"""


def health_pair(make_pair, tmp_path: Path, broken: str, *, check: bool = False,
                email: dict | None = None):
    script, flag = tmp_path / "flaky.py", tmp_path / "broken"
    script.write_text(FLAKY)
    flag.write_text(broken)
    command = f"{sys.executable} {script} {flag}"
    pair: Pair = make_pair(email=email or {},
                           sentinels={"web": f"{sys.executable} -c 'import time; time.sleep(600)'"
                                      if check else command})
    for node in pair.nodes.values():
        text = "\n[health]\nrestarts = 2\nwindow = 60\ncheck_interval = 0.3\n"
        if check:
            text += f"\n[checks]\nweb = {command} check\n"
        node.config.write_text(node.config.read_text() + text)
    pair.start_both()
    return pair


def sentinel(node, name: str) -> dict:
    return next(s for s in node.status()["sentinels"] if s["name"] == name)


def test_a_crash_looping_sentinel_moves_to_the_healthy_secondary(make_pair, tmp_path):
    pair = health_pair(make_pair, tmp_path, "alpha")
    pair.beta.wait_state("primary", 30)
    assert logged(pair.alpha, "sentinel web is unhealthy here")
    pair.alpha.wait_state("secondary")
    wait_for(lambda: sentinel(pair.beta, "web")["state"] == "running", 15, "web on beta")
    assert logged(pair.beta, "SBS hand-over (health: sentinel web crash-looping on alpha)")
    assert pair.alpha.status()["health"]["sick_here"] == ["web"]


def test_a_failing_check_moves_the_sentinel_too(make_pair, tmp_path):
    pair = health_pair(make_pair, tmp_path, "alpha", check=True)
    pair.beta.wait_state("primary", 30)
    pair.alpha.wait_state("secondary")
    assert logged(pair.alpha, "check of sentinel web failed: exit 1")
    assert sentinel(pair.beta, "web")["restarts"] == 0  # its check passes here


def test_a_sentinel_failing_on_both_nodes_is_not_moved_back(make_pair, tmp_path, smtp):
    port, inbox = smtp
    pair = health_pair(make_pair, tmp_path, "alpha beta", email=email_to(port))
    pair.beta.wait_state("primary", 30)
    wait_for(lambda: any(a["key"] == "sentinel_stuck:web" for a in pair.beta.status()["alerts"]),
             30, "beta's alert that web fails on both nodes")
    assert logged(pair.beta, "sentinel web fails on both nodes: not moved again")
    assert pair.beta.state() == "primary" and pair.alpha.state() == "secondary"
    assert not logged(pair.beta, "sentinel web is unhealthy here")
    wait_for(lambda: "SBS ALERT beta: sentinel web fails on both nodes: not moved again"
             in subjects(inbox), 15, "the mail")
    assert "SBS ALERT alpha: sentinel web is crash-looping" in subjects(inbox)


@pytest.mark.skipif(not _unshare_works(), reason="needs unshare -m and mount (root)")
def test_a_full_disk_on_the_secondary_is_an_alert_until_space_returns(make_pair, smtp):
    port, inbox = smtp
    pair: Pair = make_pair(email=email_to(port))
    pair.alpha.config.write_text(pair.alpha.config.read_text() + "\n[notify]\nlag_after = 2\n")
    a, b = pair.folder("alpha"), pair.folder("beta")
    beta = pair.nodes["beta"] = pair.beta = TmpfsNodeProc(pair.beta.config, b, "2m")
    (a / "big.bin").write_bytes(os.urandom(3 << 20))
    (a / "small.txt").write_text("fits")
    pair.start_both()
    wait_for(lambda: "SBS ALERT beta: disk full on beta" in subjects(inbox), 20, "the alert")
    assert any(x["key"] == "disk_full" for x in beta.status()["alerts"])
    # the primary sees its standby out of sync for longer than lag_after
    wait_for(lambda: "SBS ALERT alpha: standby beta lags behind" in subjects(inbox), 20, "lag")
    (a / "big.bin").unlink()  # the primary no longer has it: nothing left that does not fit
    wait_for(lambda: "SBS resolved beta: disk full on beta" in subjects(inbox), 20, "resolved")
    wait_for(lambda: "SBS resolved alpha: standby beta lags behind" in subjects(inbox), 20,
             "the standby in sync again")
    assert not beta.status()["replication"]["error"]
    assert (beta.inside(b) / "small.txt").read_text() == "fits"


def test_conflicts_kept_by_a_rejoining_primary_are_one_rate_limited_notice(make_pair, smtp):
    port, inbox = smtp
    # strict: the file only alpha has is deleted on rejoin, so it is kept too: two conflicts
    pair: Pair = make_pair(node={"strict": "true"}, alpha={"email": email_to(port)})
    a, b = pair.folder("alpha"), pair.folder("beta")
    (a / "shared.txt").write_text("v1\n")
    pair.start_both()
    wait_for(lambda: (b / "shared.txt").exists(), 15, "the first copy")
    # alpha changes two files that never reach beta: beta is paused, then alpha crashes
    crash_with_unsent(pair, lambda: ((a / "shared.txt").write_text("v2 on alpha only\n"),
                                     (a / "alpha only.txt").write_text("created on alpha only\n")))
    pair.alpha.start()
    pair.alpha.wait_state("secondary")
    wait_for(lambda: (a / "shared.txt").read_text() == "v1\n", 15, "alpha catching up")
    mail = wait_for(lambda: [m for m in inbox.messages if "conflicts" in m["subject"]], 15,
                    "the conflicts mail")
    assert mail[0]["subject"] == "SBS conflicts: alpha kept 2 file(s) of its own"
    text = mail[0].get_body(("plain",)).get_content()
    assert "shared.txt" in text and "alpha only.txt" in text and "Kind: conflicts" in text


# ---------------------------------------------------------------------------- who may say it
def test_reload_and_maintenance_need_the_nodes_own_key_and_lists_the_peers(make_pair):
    from tests.test_e2e_hostile import _ask, _control, _heartbeat

    pair: Pair = make_pair()
    pair.start_both()
    sock = _control(pair, "alpha", "beta")  # the peer's key, speaking to beta
    try:
        for command, body in (("RELOAD", {}), ("MAINTENANCE", {"on": True})):
            reply = _ask(sock, command, body)
            assert reply["reason"] == f"refused: {command} needs this node's own key"
        hb = _heartbeat(pair, "alpha")
        lists = {"name": "alpha", "run": hb["run"], "epoch": hb["epoch"], "gen": 7, "at": 1.0,
                 "by": "alpha", "folders": {"planted": ["*"]}, "paths": {"planted": "/tmp"},
                 "sentinels": {"planted": "sleep 1"}}
        sock.send_multipart(protocol.encode("LISTS", {**lists, "run": "0" * 16}))
        wait_for(lambda: logged(pair.beta, "ignored LISTS from run 0000000000000000"), 10,
                 "a LISTS of another run dropped")
        sock.send_multipart(protocol.encode("LISTS", {**lists, "gen": "7"}))
        wait_for(lambda: logged(pair.beta, "dropped a bad control message: LISTS"), 10,
                 "a malformed LISTS dropped")
    finally:
        sock.close()
    own = _control(pair, "beta", "beta")  # the operator's key may not speak for the peer
    try:
        own.send_multipart(protocol.encode("LISTS", lists))
        wait_for(lambda: logged(pair.beta, "refused LISTS"), 10, "LISTS with beta's own key")
    finally:
        own.close()
    assert request(pair.beta.cfg, "MAINTENANCE")["maintenance"]["on"] is False
    assert pair.beta.status()["lists"]["gen"] == 0 and pair.beta.state() == "secondary"
