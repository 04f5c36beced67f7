"""The pair with real node processes: roles, takeover, hand-over, promote, split brain, CURVE,
hostile input. Nodes run on 127.0.0.1 (alpha) and 127.0.0.2 (beta) on random ports."""
from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time

import pytest
import zmq
import zmq.auth
from sbs.node import protocol
from sbs.tools.client import request

from tests.pair import wait_for


def sbs_tools(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sbs.tools.cli", *args], capture_output=True,
                          text=True, timeout=timeout)


def settled(pair):
    """Both answer, one primary and one secondary that sees it."""
    a, b = pair.alpha.status(0.5), pair.beta.status(0.5)
    if not (a and b):
        return None
    states = sorted([a["state"], b["state"]])
    if states == ["primary", "secondary"] and a["peer_state"] == b["state"]:
        return a, b
    return None


def test_alone_primary_then_second_secondary_and_status_json(make_pair):
    pair = make_pair()
    pair.alpha.start()
    st = pair.alpha.wait_state("primary")
    assert st["epoch"] == 1 and st["restricted"] is False and st["peer_state"] == "unreachable"
    pair.beta.start()
    st = pair.beta.wait_state("secondary")
    assert st["peer"]["name"] == "alpha" and st["peer_state"] == "primary"
    wait_for(lambda: pair.alpha.status()["peer_state"] == "secondary", 15, "alpha sees beta")

    res = sbs_tools("status", "--config", str(pair.alpha.config), "--json")
    assert res.returncode == 0, res.stderr
    js = json.loads(res.stdout)
    for key in ("state", "epoch", "peer_state", "restricted", "sentinels"):
        assert key in js
    assert js["state"] == "primary"
    res = sbs_tools("status", "--config", str(pair.beta.config))
    assert res.returncode == 0 and "secondary" in res.stdout
    # the primary's view of replication: the secondary's lag, what it has pending, and when
    # it last had everything
    wait_for(lambda: pair.alpha.status()["replication"]["peer_last_sync"], 5,
             "alpha to see beta in sync")
    res = sbs_tools("status", "--config", str(pair.alpha.config))
    shown = " ".join(res.stdout.split())  # rich wraps at 80 columns without a terminal
    assert res.returncode == 0 and "secondary applied 0 (lag 0 manifests)" in shown, shown
    assert "pending 0 files / 0 bytes, last in sync " in shown and "in sync never" not in shown


def test_sbs_node_start_is_a_lean_node_process_with_the_same_pid(make_pair):
    """`sbs-node start` reads its command line without typer (node/cli.py) and runs the node in
    the same process: the pid a supervisor started answers STATUS, has no typer or pydantic
    mapped (typer loads pydantic to coerce arguments: ~15 MB a node does not carry); -v
    reaches it; SIGTERM still ends it with 0."""
    pair = make_pair()
    pair.alpha.start("--verbose")
    st = pair.alpha.wait_state("primary")
    pid = pair.alpha.pid
    assert st["pid"] == pid
    with open(f"/proc/{pid}/maps") as f:
        maps = f.read()
    assert "pydantic" not in maps and "/typer/" not in maps
    wait_for(lambda: " DEBUG " in pair.alpha.log.read_text(errors="replace"), 10,
             "a debug line from the node started with --verbose")
    pair.alpha.signal(signal.SIGTERM)
    assert pair.alpha.wait_exit() == 0


def test_sigusr1_writes_every_threads_stack_to_the_log_and_the_node_goes_on(make_pair):
    """`kill -USR1` on a node that seems stuck: where each of its threads is, in its log."""
    pair = make_pair()
    pair.alpha.start()
    pair.alpha.wait_state("primary")
    pair.alpha.signal(signal.SIGUSR1)
    text = wait_for(lambda: "Current thread" in (t := pair.alpha.log.read_text(
        errors="replace")) and t, 10, "the stacks in alpha's log")
    dump = text[text.index("most recent call first"):]
    assert "node.py" in dump and "Thread 0x" in dump, dump  # the loop's, and the others'
    st = pair.alpha.status(2.0)
    assert st and st["state"] == "primary"
    pair.alpha.signal(signal.SIGTERM)
    assert pair.alpha.wait_exit() == 0


def test_a_node_starting_next_to_a_primary_follows_it_within_milliseconds(make_pair):
    """A first ping that finds no connection yet (the DEALER is still connecting) is retried
    within milliseconds, not at the next heartbeat: a long heartbeat on both sides makes any
    wait for one show (a whole heartbeat, 3 s here, against well under a second; 1.5 s leaves
    room for a start-up slowed by a loaded machine)."""
    pair = make_pair(node={"heartbeat": 3.0, "dead_after": 6.0})
    pair.alpha.start()
    pair.alpha.wait_state("primary", timeout=20)
    pair.beta.start()
    st = pair.beta.wait_state("secondary")
    to_secondary = st["uptime"] - st["in_state_for"]  # the node's own clock, not the poll's
    assert to_secondary < 1.5, f"beta followed the primary after {to_secondary:.3f}s"


def test_a_lone_node_waits_dead_after_but_two_started_together_do_not(make_pair):
    """The start-up wait is only for silence: a node whose peer answers (starting) decides by
    the rule at once, while a node that hears nobody waits the whole probe window (dead_after)
    before it says primary. A long dead_after makes the difference plain on a loaded machine."""
    def to_primary(node):
        st = node.wait_state("primary", timeout=30)
        return st["uptime"] - st["in_state_for"]  # the node's own clock, not the poll's

    pair = make_pair(node={"heartbeat": 1.0, "dead_after": 6.0})
    pair.alpha.start()
    pair.beta.start()
    a, b = wait_for(lambda: settled(pair), 30, "the pair to settle")
    assert (a["state"], b["state"]) == ("primary", "secondary")  # the rule: the smaller name
    waited = to_primary(pair.alpha)
    assert waited < 3.0, f"alpha waited {waited:.3f}s although beta answered"
    assert len(pair.primaries()) == 1
    pair.stop()

    lone = make_pair(node={"heartbeat": 1.0, "dead_after": 3.0})
    lone.alpha.start()
    waited = to_primary(lone.alpha)
    assert waited >= 3.0, f"alpha said primary after {waited:.3f}s, inside the probe window"


@pytest.mark.parametrize("offset", [0, 1, 2])
def test_a_taken_port_ends_the_node_with_exit_1_and_names_it(make_pair, offset):
    """A runtime failure, not a config error: exit 1 and one line naming the address."""
    pair = make_pair()
    port = pair.alpha.cfg.port + offset
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", port))
        squatter.listen()
        pair.alpha.start()
        code = pair.alpha.wait_exit(20)
    log = pair.alpha.log.read_text()
    assert code == 1, log
    assert "cannot bind 127.0.0.1:" in log and str(port) in log, log
    assert "Traceback" not in log


def test_status_of_a_stopped_node_exits_3(make_pair):
    pair = make_pair()
    res = sbs_tools("status", "--config", str(pair.alpha.config))
    assert res.returncode == 3 and "stopped" in res.stdout


def test_kill_9_of_the_primary_means_takeover_within_dead_after(make_pair):
    """The survivor is primary about dead_after after the last heartbeat it heard: not twice
    that. dead_after 2.5 s leaves room for a loaded machine (1.5 s over it) while a takeover
    that waited one probe window too many (5 s and more) still fails."""
    pair = make_pair(node={"heartbeat": 0.25, "dead_after": 2.5})
    pair.start_both()
    dead_after = pair.beta.cfg.dead_after
    killed = time.monotonic()
    pair.alpha.kill()
    st = pair.beta.wait_state("primary", timeout=dead_after + 5)
    took = time.monotonic() - killed
    assert took < dead_after + 1.5, f"takeover took {took:.2f}s"
    assert st["epoch"] == 2
    # the old primary rejoins as secondary
    pair.alpha.start()
    pair.alpha.wait_state("secondary")
    assert pair.beta.state() == "primary"


def test_sigterm_hands_over_well_before_dead_after(make_pair):
    pair = make_pair(node={"dead_after": 4.0, "heartbeat": 0.2})
    pair.start_both()
    stopped = time.monotonic()
    pair.alpha.signal(signal.SIGTERM)
    pair.beta.wait_state("primary", timeout=4.0)
    took = time.monotonic() - stopped
    # a hand-over takes milliseconds; a takeover by silence would take dead_after (4 s)
    assert took < 2.5, f"hand-over took {took:.2f}s (dead_after is 4s)"
    assert pair.alpha.wait_exit() == 0


def test_promote_swaps_roles_and_the_bus_direction(make_pair):
    pair = make_pair()
    pair.start_both()

    res = sbs_tools("promote", "--config", str(pair.beta.config))
    assert res.returncode == 0, res.stdout + res.stderr
    assert "beta: primary" in res.stdout
    wait_for(lambda: settled(pair), 10, "settled after promote")
    assert pair.beta.state() == "primary" and pair.alpha.state() == "secondary"
    # replication now flows from beta to alpha
    (pair.folder("beta") / "after-promote.txt").write_text("from beta")
    wait_for(lambda: (pair.folder("alpha") / "after-promote.txt").exists(), 10,
             "file from the new primary on the new secondary")

    # and back, this time asked on the primary
    res = sbs_tools("promote", "--config", str(pair.beta.config))
    assert res.returncode == 0, res.stdout + res.stderr
    wait_for(lambda: settled(pair) and pair.alpha.state() == "primary", 10, "swapped back")


def test_ten_simultaneous_starts_give_exactly_one_primary(make_pair):
    for trial in range(10):
        pair = make_pair()
        pair.alpha.start()
        pair.beta.start()
        a, b = wait_for(lambda: settled(pair), 10, f"trial {trial} to settle")  # noqa: B023
        assert sorted([a["state"], b["state"]]) == ["primary", "secondary"]
        # and it stays that way
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline:
            assert len(pair.primaries()) <= 1
        pair.stop()


def test_paused_primary_resumes_and_one_primary_remains_by_the_rule(make_pair):
    pair = make_pair()
    pair.start_both()
    pair.alpha.signal(signal.SIGSTOP)
    try:
        st = pair.beta.wait_state("primary", timeout=15)
        assert st["epoch"] == 2  # beta was primary most recently: it wins by the rule
    finally:
        pair.alpha.signal(signal.SIGCONT)
    resumed = time.monotonic()
    a, b = wait_for(lambda: settled(pair), 15, "one primary after SIGCONT")
    assert a["state"] == "secondary" and b["state"] == "primary"
    assert time.monotonic() - resumed < 15


# --- security and hostile input ---------------------------------------------------------------

def _client(kind: int, pair, key: str | None, server: str = "alpha") -> zmq.Socket:
    ctx = zmq.Context.instance()
    sock = ctx.socket(kind)
    sock.linger = 0
    if key is not None:
        pub, sec = zmq.auth.load_certificate(str(pair.root / "keys" / f"{key}.key_secret"))
        server_pub, _ = zmq.auth.load_certificate(str(pair.root / "keys" / f"{server}.key"))
        sock.curve_publickey, sock.curve_secretkey, sock.curve_serverkey = pub, sec, server_pub
    return sock


@pytest.mark.parametrize("key", ["stranger", None])
def test_a_client_without_the_right_key_gets_nothing(make_pair, key):
    pair = make_pair()
    pair.alpha.start()
    pair.alpha.wait_state("primary")
    host, port = "127.0.0.1", pair.port
    dealer = _client(zmq.DEALER, pair, key)
    dealer.connect(f"tcp://{host}:{port}")
    dealer.send_multipart(protocol.encode("STATUS"))
    sub = _client(zmq.SUB, pair, key)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.connect(f"tcp://{host}:{port + 1}")
    req = _client(zmq.DEALER, pair, key)
    req.connect(f"tcp://{host}:{port + 2}")
    req.send_multipart([b"", *protocol.encode("GET", {"id": 1, "items": [
        {"f": "docs", "p": "x", "o": 0, "n": 10}]})])
    try:
        # heartbeats go out every 0.2 s: 1.5 s of silence on all three is a refusal
        poller = zmq.Poller()
        for s in (dealer, sub, req):
            poller.register(s, zmq.POLLIN)
        assert dict(poller.poll(1500)) == {}
        # while the rightful key gets answers on the same ports
        assert request(pair.alpha.cfg, "STATUS")["state"] == "primary"
    finally:
        for s in (dealer, sub, req):
            s.close()


def test_garbage_and_oversized_frames_leave_the_node_healthy(make_pair):
    pair = make_pair()
    pair.start_both()
    port = pair.port
    # raw TCP garbage on every port of both nodes
    for host in ("127.0.0.1", "127.0.0.2"):
        for p in (port, port + 1, port + 2):
            with socket.create_connection((host, p), timeout=2) as s:
                s.sendall(b"\xff\x00GARBAGE" * 1000)
    # authenticated garbage: the node's own key passes CURVE, the frames do not pass decode
    router = _client(zmq.DEALER, pair, "alpha")
    router.connect(f"tcp://127.0.0.1:{port}")
    rep = _client(zmq.DEALER, pair, "alpha")
    rep.connect(f"tcp://127.0.0.1:{port + 2}")
    try:
        for frames in (
            [b"junk"], [b"SBS1", b"PING", b"{"], [b"SBS2", b"STATUS", b"{}"],
            [b"SBS1", b"HANDOVER", b'{"name":"x","run":"nobody","epoch":99,"seq":1}'],
            [b"SBS1", b"PING", b"{}", b"x" * 100],
            [b"SBS1", b"STATUS", b"x" * (protocol.MAX_CONTROL_IN + 10)],  # over MAXMSGSIZE
        ):
            router.send_multipart(frames)
            rep.send_multipart([b"", *frames])
        for _ in range(3):
            rep.send_multipart([b"", *protocol.encode("GET", {"id": 2, "items": [
                {"f": "docs", "p": "../../../etc/passwd", "o": 0, "n": 100}]})])
        # the node still answers, is still primary, and beta never took over
        time_limit = time.monotonic() + 3
        while time.monotonic() < time_limit:
            st = request(pair.alpha.cfg, "STATUS", timeout=2.0)
            assert st and st["state"] == "primary"
            st = pair.beta.status(2.0)
            assert st and st["state"] == "secondary"
    finally:
        router.close()
        rep.close()
    assert "dropped a bad control message" in pair.alpha.log.read_text()


def test_tail_prints_heartbeats_and_manifests(make_pair):
    pair = make_pair()
    pair.alpha.start()
    pair.alpha.wait_state("primary")
    proc = subprocess.Popen([sys.executable, "-m", "sbs.tools.cli", "tail", "--config",
                             str(pair.alpha.config), "--json"], stdout=subprocess.PIPE, text=True)
    try:
        seen = set()
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and not {"hb", "manifest"} <= seen:
            line = proc.stdout.readline()  # heartbeats every 0.2 s: never blocks for long
            if line:
                seen.add(json.loads(line)["type"])
            if "hb" in seen and not (pair.folder("alpha") / "new.txt").exists():
                (pair.folder("alpha") / "new.txt").write_text("x")
        assert {"hb", "manifest"} <= seen, seen
    finally:
        proc.terminate()
        proc.wait(5)


def test_plain_tcp_when_the_config_says_so(make_pair):
    pair = make_pair(security={"curve": "false"})
    pair.start_both()
    (pair.folder("alpha") / "plain.txt").write_text("no curve")
    wait_for(lambda: (pair.folder("beta") / "plain.txt").exists(), 10, "replication over TCP")
    # and a client without any key is answered, as configured
    dealer = _client(zmq.DEALER, pair, None)
    dealer.connect(f"tcp://127.0.0.1:{pair.port}")
    try:
        dealer.send_multipart(protocol.encode("STATUS"))
        assert dealer.poll(3000)
        assert protocol.decode(dealer.recv_multipart()).body["state"] == "primary"
    finally:
        dealer.close()


def test_keygen_writes_zmq_auth_certificates(tmp_path):
    res = sbs_tools("keygen", "--dir", str(tmp_path / "k"), "--name", "gamma")
    assert res.returncode == 0, res.stderr
    public, secret = zmq.auth.load_certificate(str(tmp_path / "k" / "gamma.key_secret"))
    assert len(public) == 40 and len(secret) == 40
    assert zmq.auth.load_certificate(str(tmp_path / "k" / "gamma.key"))[0] == public
    assert (tmp_path / "k" / "gamma.key_secret").stat().st_mode & 0o077 == 0
