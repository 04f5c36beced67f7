"""The etcd leader lease under partial failures of the path to etcd: slow, one way, one request
lost (real nodes, a real etcd, tests/etcd.py's proxy in front of each node's etcd; the set-up
is tests/test_e2e_lease.py's Cluster)."""
from __future__ import annotations

import base64

import pytest
from sbs.tools.client import request

from tests.pair import wait_for
from tests.recorder import lives, overlaps
from tests.test_e2e_lease import LOOP_WAIT, RETRY, TTL, Cluster
from tests.test_e2e_sentinels import running_pid


@pytest.fixture
def cluster(make_pair, tmp_path):
    made = []
    yield lambda: made.append(Cluster(make_pair, tmp_path)) or made[-1]
    for c in made:
        c.close()


def _primary_runs(c) -> None:
    """alpha holds the key and renews it, beta follows it, svc runs on alpha only."""
    wait_for(lambda: (st := c.alpha.status(0.5)) and st["lease"]["mine"]
             and (st["lease"]["time_left"] or 0) > 0, 10, "alpha to renew its lease")
    assert c.running_on() == ["alpha"]


def test_a_hand_over_while_etcd_is_slow_is_not_undone_by_a_late_report(cluster):
    """alpha hands over to beta (promote) while each of its etcd exchanges takes ~0.3 s, so its
    lease thread is always in the middle of a cycle: the report of the cycle that ran when it
    resigned still says "the key is mine". alpha, secondary by then, must not take that for a
    key it just took (it did: TAKE_OVER, its sentinel started again beside beta's)."""
    c = cluster().start()
    closed = c.replicated_file()
    proxy = c.to_etcd["alpha"]
    proxy.delay = 0.2  # each way: a keep-alive and a read take ~0.8 s > loop_wait
    before = proxy.sent
    wait_for(lambda: proxy.sent > before + 12, 10, "alpha's etcd exchanges to be slow")
    _primary_runs(c)
    reply = request(c.alpha.cfg, "PROMOTE", {"force": False}, timeout=5)
    assert reply and reply["status"] == "ok", reply
    wait_for(lambda: running_pid(c.beta, "svc"), TTL + 10, "svc on beta after the hand-over")
    # alpha's lease thread has been through a whole cycle after its resignation: what it
    # reports now is etcd's word, so a late report of the old lease is behind us
    wait_for(lambda: (st := c.alpha.status(0.5)) and st["lease"]["holder"] == "beta", 10,
             "alpha to see beta hold the key")
    assert overlaps(c.record) == [], f"svc ran on both nodes at once: {lives(c.record)}"
    log = c.alpha.log.read_text()
    assert log.count("PRIMARY now") == 1, "alpha took the role back after handing it over:\n" + (
        "\n".join(line for line in log.splitlines() if "->" in line or "lease" in line))
    c.check(closed)


def test_etcd_answers_lost_on_the_way_to_the_primary_hand_the_key_over(cluster):
    """What alpha (primary) sends etcd arrives, etcd's answers to it are lost: its keep-alives
    renew the lease in etcd, but alpha never learns it, so its guard stops svc at 3/4 of ttl.
    The key must not stay on a lease alpha cannot use (it did: the service was down on both
    nodes for as long as the cut lasted): beta takes it and runs svc, alpha follows beta."""
    c = cluster().start()
    closed = c.replicated_file()
    _primary_runs(c)
    c.to_etcd["alpha"].cut(up=False, down=True)
    try:
        wait_for(lambda: running_pid(c.beta, "svc"), TTL * 2 + LOOP_WAIT + RETRY * 2 + 5,
                 "svc on beta while alpha cannot hear etcd")
        c.alpha.wait_state("secondary", timeout=10)
        assert c.running_on() == ["beta"]
    finally:
        c.to_etcd["alpha"].heal()
    c.check(closed)


def _key_in_etcd(c) -> bool:
    key = base64.b64encode(b"/sbs/leader").decode()
    return bool(c.etcd.call("kv/range", {"key": key}).get("kvs"))


def test_a_lease_granted_for_a_key_never_written_runs_nothing(cluster):
    """Both nodes lose etcd for longer than ttl: alpha's guard stops svc, its lease expires.
    etcd comes back for alpha, but its transactions are lost: alpha is granted a new lease and
    its create of the key never lands. A lease without the key is no licence to run svc (alpha
    took it for one: its status said "mine" from before the cut, and svc started again with no
    key in etcd, then beside beta's once beta took the key)."""
    c = cluster().start()
    closed = c.replicated_file()
    _primary_runs(c)
    for name in ("alpha", "beta"):
        c.cut_etcd(name)
    try:
        wait_for(lambda: not c.running_on() and not _key_in_etcd(c), TTL * 2 + 5,
                 "svc stopped on alpha and its key expired in etcd")
        proxy = c.to_etcd["alpha"]
        proxy.lose = (b"/v3/kv/txn",)
        proxy.heal()
        # three creates lost: alpha's loop has had the reports of the first two, the second
        # well after the hold that follows the guard's stop
        wait_for(lambda: proxy.lost_count >= 3, (RETRY + LOOP_WAIT) * 3 + 5,
                 "alpha to try to take the key three times")
        c.to_etcd["beta"].heal()
        wait_for(lambda: running_pid(c.beta, "svc"), TTL + 10, "svc on beta")
        wait_for(lambda: (st := c.alpha.status(0.5)) and st["lease"]["holder"] == "beta", 10,
                 "alpha to see beta hold the key")
    finally:
        for proxy in c.to_etcd.values():
            proxy.lose = ()
            proxy.heal()
    assert overlaps(c.record) == [], f"svc ran on both nodes at once: {lives(c.record)}"
    log = c.alpha.log.read_text()  # a svc killed at once leaves no record, but a log line
    assert log.count("sentinel svc started") == 1, "svc ran on alpha without the key:\n" + (
        "\n".join(line for line in log.splitlines() if "->" in line or "svc" in line))
    c.check(closed)


def test_a_hand_over_whose_revoke_is_lost_waits_for_the_lease_not_for_the_old_primary(cluster):
    """alpha hands over (promote) just as etcd stops answering it: its revoke is lost, so the
    key stays on alpha's lease until it expires. beta takes it then, not before (svc never on
    both), and alpha, secondary, does not take it back when etcd answers it again."""
    c = cluster()
    c.start()
    closed = c.replicated_file()
    _primary_runs(c)
    c.cut_etcd("alpha")
    try:
        reply = request(c.alpha.cfg, "PROMOTE", {"force": False}, timeout=5)
        assert reply and reply["status"] == "ok", reply
        wait_for(lambda: running_pid(c.beta, "svc"), TTL * 2 + 10, "svc on beta")
        assert c.alpha.state() == "secondary"
    finally:
        c.to_etcd["alpha"].heal()
    wait_for(lambda: (st := c.alpha.status(0.5)) and st["lease"]["reachable"]
             and st["lease"]["holder"] == "beta", 10, "alpha to hear etcd again")
    assert c.running_on() == ["beta"] and c.alpha.state() == "secondary"
    assert overlaps(c.record) == [], f"svc ran on both nodes at once: {lives(c.record)}"
    c.check(closed)


def test_maintenance_holds_a_takeover_by_the_key_until_it_ends(cluster):
    """Maintenance mode: no takeover (README). With a lease, alpha cut from etcd lets the key
    expire, and beta used to take it and take over (as it would out of maintenance). Held back
    now: beta does not ask for the key; once maintenance ends it takes it."""
    from tests.test_e2e_sentinels import sbs_tools

    c = cluster().start()
    _primary_runs(c)
    done = sbs_tools("maintenance", "on", "--config", str(c.alpha.config))
    assert done.returncode == 0, done.stderr
    wait_for(lambda: (st := c.beta.status(0.5)) and st["maintenance"], 10, "beta in maintenance")
    wait_for(lambda: "does not ask etcd for the leader key" in c.beta.log.read_text(), 10,
             "beta to stop asking for the key")
    c.cut_etcd("alpha")
    try:
        st = wait_for(lambda: (st := c.beta.status(0.5)) and st["lease"]["reachable"]
                      and st["lease"]["holder"] != "alpha" and st,
                      TTL + LOOP_WAIT + RETRY * 2 + 5, "alpha's key to expire, as beta sees it")
        assert st["lease"]["holder"] is None, f"beta took the key in maintenance: {st['lease']}"
        # a beta that asks takes a free key at its next cycle (loop_wait): give it several
        with pytest.raises(AssertionError, match="timed out"):
            wait_for(lambda: running_pid(c.beta, "svc") or c.beta.state() == "primary",
                     4 * LOOP_WAIT + RETRY, "beta to take over in maintenance")
        assert c.running_on() == []  # alpha's guard stopped it: down, as the operator chose
        done = sbs_tools("maintenance", "off", "--config", str(c.beta.config))
        assert done.returncode == 0, done.stderr
        wait_for(lambda: running_pid(c.beta, "svc"), TTL + 10, "svc on beta, maintenance off")
    finally:
        c.to_etcd["alpha"].heal()
    c.alpha.wait_state("secondary", timeout=TTL + 10)
    c.check()


def test_in_maintenance_a_hand_over_the_operator_asks_for_still_moves_the_key(cluster):
    """Maintenance holds back what the pair would do by itself, not the operator's promote:
    beta, which does not ask for the key in maintenance, campaigns for it on alpha's
    HANDOVER and takes over."""
    from tests.test_e2e_sentinels import sbs_tools

    c = cluster().start()
    closed = c.replicated_file()
    _primary_runs(c)
    assert sbs_tools("maintenance", "on", "--config", str(c.alpha.config)).returncode == 0
    wait_for(lambda: "does not ask etcd for the leader key" in c.beta.log.read_text(), 10,
             "beta to stop asking for the key")
    reply = request(c.alpha.cfg, "PROMOTE", {"force": False}, timeout=5)
    assert reply and reply["status"] == "ok", reply
    wait_for(lambda: running_pid(c.beta, "svc"), TTL + 10, "svc on beta after the hand-over")
    assert c.beta.state() == "primary"
    c.alpha.wait_state("secondary", timeout=10)
    c.check(closed)
