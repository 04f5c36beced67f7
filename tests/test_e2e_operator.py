"""The operator's pair with real nodes: maintenance mode, reload and the pair's lists, alerts
by a real SMTP server, health-driven hand-over (issue 15)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.pair import Pair, wait_for
from tools.cli import describe
from tools.client import request, subscribe

_SCRIPT = Path(sys.executable).with_name("sbs-tools")
SBS_TOOLS = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "tools.cli"]


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
    a.start()
    a.wait_state("primary")
    wait_for(lambda: (st := a.status()) and st["peer_state"] == "secondary", 15,
             "alpha to see beta as secondary")

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
