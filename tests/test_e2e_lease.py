"""The etcd leader lease ([cluster] dcs) against a real etcd on loopback started here.

Each node reaches etcd through its own userspace proxy (tests/etcd.py: alpha at 127.0.0.5, beta
at 127.0.0.6), and the other node through the pair's proxies (Pair(proxy=True)), so a
test can cut any link. The sentinel records its own start, ticks and stop (tests/recorder.py):
in every case its lives on the two nodes never overlap, and a file closed and replicated before
the fault is on the node that ends up primary.
"""
from __future__ import annotations

import base64
import os
import secrets
import signal
import time

import pytest
from sbs.tools.cli import describe

from tests.etcd import Etcd, Proxy
from tests.pair import wait_for
from tests.recorder import lives, overlaps, recorder_command
from tests.test_e2e_sentinels import Tail, marked, running_pid, sbs_tools

TTL, LOOP_WAIT, RETRY = 3, 0.5, 1.0
ETCD_VIA = {"alpha": "127.0.0.5", "beta": "127.0.0.6"}  # where each node finds etcd


class Cluster:
    def __init__(self, make_pair, root, *, stubborn: bool = False):
        self.etcd = Etcd(root).start()
        self.to_etcd = {name: Proxy([((host, self.etcd.port), ("127.0.0.1", self.etcd.port))])
                        for name, host in ETCD_VIA.items()}
        self.record = root / "record.txt"
        self.token = f"sbs-e2e-lease-{secrets.token_hex(4)}"
        cluster = {"ttl": TTL, "loop_wait": LOOP_WAIT, "retry_timeout": RETRY}
        self.pair = make_pair(
            proxy=True,
            node={"heartbeat": 0.2, "dead_after": 1.0},
            sentinels={"svc": recorder_command(root, self.record, self.token, stubborn=stubborn)},
            alpha={"cluster": {**cluster, "dcs": f"etcd://{ETCD_VIA['alpha']}:{self.etcd.port}"}},
            beta={"cluster": {**cluster, "dcs": f"etcd://{ETCD_VIA['beta']}:{self.etcd.port}"}},
        )
        self.alpha, self.beta = self.pair.alpha, self.pair.beta

    def start(self) -> Cluster:
        self.pair.start_both()
        wait_for(lambda: running_pid(self.alpha, "svc") and lives(self.record), 10, "svc on alpha")
        return self

    def cut_link(self) -> None:
        self.pair.cut("alpha", "beta")
        self.pair.cut("beta", "alpha")

    def heal_link(self) -> None:
        self.pair.heal()

    def cut_etcd(self, name: str) -> None:
        self.to_etcd[name].cut()

    def replicated_file(self) -> str:
        """A file closed on the primary and seen on the secondary before the fault."""
        name = f"closed-{secrets.token_hex(3)}.txt"
        (self.pair.folder("alpha") / name).write_text(name)
        wait_for(lambda: (self.pair.folder("beta") / name).exists(), 10, f"{name} on beta")
        return name

    def running_on(self) -> list[str]:
        return [n for n, node in self.pair.nodes.items() if running_pid(node, "svc")]

    def check(self, closed: str | None = None) -> None:
        assert overlaps(self.record) == [], f"svc ran on both nodes at once: {lives(self.record)}"
        if closed:
            primary = wait_for(lambda: (p := self.pair.primaries()) and len(p) == 1 and p, 20,
                               "one primary")[0]
            assert (self.pair.folder(primary) / closed).read_text() == closed

    def close(self) -> None:
        self.pair.stop()
        for proxy in self.to_etcd.values():
            proxy.close()
        self.etcd.stop()
        wait_for(lambda: not marked(self.token), 10, "every svc to end")


@pytest.fixture
def cluster(make_pair, tmp_path):
    made = []

    def make(**kw) -> Cluster:
        made.append(Cluster(make_pair, tmp_path, **kw))
        return made[-1]

    yield make
    for c in made:
        c.close()


def svc_stopped_everywhere(c: Cluster) -> bool:
    spans = lives(c.record)
    return bool(spans) and not c.running_on() and max(b for _, b in spans.values()) < (
        time.monotonic() - 0.2)


def test_status_and_tail_show_the_lease(cluster):
    c = cluster().start()
    st = c.alpha.status()
    lease = st["lease"]
    assert lease["holder"] == "alpha" and lease["mine"] and lease["reachable"]
    assert 0 < lease["time_left"] <= TTL and st["epoch"] == lease["term"]
    assert c.beta.status()["lease"]["holder"] == "alpha"
    res = sbs_tools("status", "--config", str(c.alpha.config))
    assert "lease /sbs/leader: holder alpha, term" in res.stdout, res.stdout
    tail = Tail(c.alpha.config)
    try:
        hb = tail.wait(lambda m: m["type"] == "hb", 10, "a heartbeat")
    finally:
        tail.close()
    assert hb["lease"]["holder"] == "alpha" and hb["lease"]["reachable"]
    line = describe("HB", hb)
    assert f"lease alpha term {lease['term']}" in line and "s left" in line, line


def test_etcd_killed_stops_the_service_and_nobody_takes_over_until_it_is_back(cluster):
    c = cluster().start()
    closed = c.replicated_file()
    c.etcd.kill()
    wait_for(lambda: svc_stopped_everywhere(c), TTL + 5, "svc stopped on alpha")
    assert c.beta.state() == "secondary"
    c.etcd.start()
    wait_for(lambda: len(c.running_on()) == 1, TTL * 3 + 10, "svc running again on one node")
    c.check(closed)


def test_etcd_paused_stops_the_service_in_time_and_it_comes_back(cluster):
    c = cluster().start()
    closed = c.replicated_file()
    c.etcd.signal(signal.SIGSTOP)
    try:
        wait_for(lambda: svc_stopped_everywhere(c), TTL + 5, "svc stopped on alpha")
        assert c.beta.state() == "secondary"
    finally:
        c.etcd.signal(signal.SIGCONT)
    wait_for(lambda: len(c.running_on()) == 1, TTL * 3 + 10, "svc running again on one node")
    c.check(closed)


def test_etcd_restarted_quickly_keeps_one_primary(cluster):
    c = cluster().start()
    closed = c.replicated_file()
    c.etcd.stop()
    c.etcd.start()
    wait_for(lambda: c.alpha.status()["lease"]["reachable"], 10, "alpha back in touch")
    wait_for(lambda: len(c.running_on()) == 1, TTL * 3 + 10, "svc on one node")
    c.check(closed)


def test_the_primary_paused_longer_than_ttl_loses_the_key(cluster):
    c = cluster().start()
    closed = c.replicated_file()
    c.alpha.signal(signal.SIGSTOP)
    try:
        wait_for(lambda: running_pid(c.beta, "svc"), TTL + 10, "svc on beta")
        wait_for(lambda: len(lives(c.record)) == 2, 5, "beta's svc recorded")
    finally:
        c.alpha.signal(signal.SIGCONT)
    st = c.alpha.wait_state("secondary")
    assert st["epoch"] < c.beta.status()["epoch"] == c.beta.status()["lease"]["term"]
    assert c.running_on() == ["beta"]
    c.check(closed)


def test_a_cut_link_with_both_seeing_etcd_is_no_takeover(cluster):
    c = cluster().start()
    closed = c.replicated_file()
    c.cut_link()
    try:
        wait_for(lambda: (st := c.beta.status()) and st["peer_state"] == "unreachable", 10,
                 "beta to miss alpha")
        deadline = time.monotonic() + TTL + 1
        while time.monotonic() < deadline:  # watched for longer than a lease
            assert c.beta.state() == "secondary"
            assert c.running_on() == ["alpha"]
        why = c.beta.status()["lease"]["why_no_takeover"]
        assert "alpha holds the leader key" in why, why
    finally:
        c.heal_link()
    c.check(closed)
    assert len(lives(c.record)) == 1  # the one life on alpha, never interrupted


@pytest.mark.parametrize("stubborn", [False, True], ids=["polite", "ignores-sigterm"])
def test_the_primary_cut_off_from_both_stops_before_the_peer_starts(cluster, stubborn):
    c = cluster(stubborn=stubborn).start()
    closed = c.replicated_file()
    c.cut_link()
    c.cut_etcd("alpha")
    try:
        wait_for(lambda: running_pid(c.beta, "svc"), TTL + 10, "svc on beta")
        wait_for(lambda: len(lives(c.record)) == 2, 5, "beta's svc recorded")
        assert c.alpha.status()["lease"]["reachable"] is False
    finally:
        c.heal_link()
        c.to_etcd["alpha"].heal()
    c.alpha.wait_state("secondary", timeout=TTL + 10)
    assert c.running_on() == ["beta"]
    c.check(closed)


def test_both_started_at_once_give_one_primary(cluster):
    c = cluster()
    c.alpha.start()
    c.beta.start()
    wait_for(lambda: sorted(n.state() for n in c.pair.nodes.values()) == ["primary",
                                                                           "secondary"],
             TTL * 2 + 10, "one primary and one secondary")
    wait_for(lambda: len(c.running_on()) == 1, 10, "svc on the primary")
    primary = c.pair.primaries()[0]
    assert c.pair.nodes[primary].status()["lease"]["holder"] == primary
    other = c.beta if primary == "alpha" else c.alpha
    c.pair.nodes[primary].kill()  # and the other still campaigns once the key is free
    wait_for(lambda: running_pid(other, "svc"), TTL + 10, "svc on the other node")
    c.check()


def test_kill_9_of_the_primary_and_a_sigterm_hand_over_by_the_key(cluster):
    c = cluster().start()
    closed = c.replicated_file()
    c.alpha.kill()
    wait_for(lambda: running_pid(c.beta, "svc"), TTL + 10, "svc on beta after kill -9")
    c.check(closed)
    # alpha back as secondary; a SIGTERM of beta (primary) resigns the key: alpha at once
    c.alpha.start()
    c.alpha.wait_state("secondary")
    stopped = time.monotonic()
    c.beta.signal(signal.SIGTERM)
    wait_for(lambda: running_pid(c.alpha, "svc"), TTL + 10, "svc on alpha after the hand-over")
    assert time.monotonic() - stopped < TTL, "the hand-over waited for the lease to expire"
    c.check()


def test_a_node_starting_alone_waits_for_a_key_held_elsewhere_without_spinning(cluster):
    """The key is held (by a lease of the test's own, under the name 'ghost'): a node starting
    alone neither becomes primary on its probe timeout nor burns CPU while it waits; it takes
    the key once it is free."""
    c = cluster()
    lease = c.etcd.call("lease/grant", {"TTL": 60})["ID"]
    key, ghost = base64.b64encode(b"/sbs/leader").decode(), base64.b64encode(b"ghost").decode()
    c.etcd.call("kv/put", {"key": key, "value": ghost, "lease": lease})
    c.beta.start()
    wait_for(lambda: (st := c.beta.status()) and st["lease"]["holder"] == "ghost", 10,
             "beta to see the key")
    cpu_before, wall_before = cpu_seconds(c.beta.pid), time.monotonic()
    time.sleep(2.0)  # measuring an interval of idle waiting, not synchronising
    cpu = cpu_seconds(c.beta.pid) - cpu_before
    assert c.beta.state() == "starting"
    assert cpu < 0.2 * (time.monotonic() - wall_before), f"{cpu:.2f} CPU-s in 2 s: spinning"
    c.etcd.call("lease/revoke", {"ID": lease})
    st = c.beta.wait_state("primary", timeout=10)
    assert st["lease"]["holder"] == "beta" and st["epoch"] == st["lease"]["term"]
    wait_for(lambda: running_pid(c.beta, "svc"), 10, "svc on beta")
    c.check()


def cpu_seconds(pid: int) -> float:
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[-1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
