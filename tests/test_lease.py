"""The leader lease's two sides (node/lease.py) against a real etcd, without nodes: a loop-side
Lease per contender, each with its keeper thread, fed by polling their inproc pipes."""
from __future__ import annotations

import time

import pytest
import zmq
from sbs.node.config import ClusterConfig
from sbs.node.lease import LEASE_SHARE, Lease

from tests.etcd import Etcd, Proxy
from tests.pair import wait_for


@pytest.fixture
def etcd(tmp_path):
    server = Etcd(tmp_path).start()
    yield server
    server.stop()


@pytest.fixture
def contenders(etcd):
    ctx = zmq.Context()
    made: list[Lease] = []

    def make(name: str, endpoint: str | None = None, **kw) -> Lease:
        host, port = (endpoint or etcd.endpoint).split(":")
        cluster = ClusterConfig(dcs=((host, int(port)),), **{
            "ttl": 2, "loop_wait": 0.2, "retry_timeout": 0.5, "key": "/t/leader", **kw})
        made.append(Lease(ctx, cluster, name, run_id=f"{name}-{len(made)}"))
        return made[-1]

    yield make
    for lease in made:
        lease.close()
    ctx.term()


def pump(*leases: Lease) -> None:
    """What the node loop does: take every report that is waiting."""
    for lease in leases:
        while lease.pipe.poll(0):
            lease.on_report([lease.pipe.recv()])


def until(cond, leases, timeout, what):
    return wait_for(lambda: (pump(*leases), cond())[1], timeout, what)


def test_one_of_two_contenders_takes_the_key_and_the_other_gets_it_when_it_resigns(contenders):
    a, b = contenders("a"), contenders("b")
    a.want(True)
    b.want(True)
    until(lambda: a.mine or b.mine, (a, b), 10, "one holder")
    until(lambda: a.holder == b.holder and a.term == b.term, (a, b), 10, "both agree")
    holder, other = (a, b) if a.mine else (b, a)
    assert not other.mine and other.holder == holder.name
    assert holder.ok(time.monotonic()) and not other.ok(time.monotonic())
    assert holder.valid_until() <= holder.renewed_at + 2 * LEASE_SHARE
    first_term = holder.term
    holder.resign(hold_off=60)  # revokes: the key goes at once, not after ttl
    until(lambda: other.mine, (a, b), 5, "the other to take the key")
    assert other.term > first_term  # the term only grows
    holder.want(True)  # held off: it does not ask meanwhile
    until(lambda: holder.holder == other.name, (a, b), 5, "the resigned side to see it")
    assert not holder.mine


def test_a_holder_cut_off_from_etcd_loses_validity_before_the_key_expires(contenders, etcd):
    proxy = Proxy([(("127.0.0.5", etcd.port), ("127.0.0.1", etcd.port))])
    try:
        a = contenders("a", f"127.0.0.5:{etcd.port}")
        b = contenders("b")
        a.want(True)
        until(lambda: a.mine, (a,), 10, "a to hold the key")
        b.want(True)
        until(lambda: b.holder == "a", (b,), 5, "b to see a")
        proxy.cut()
        until(lambda: not a.reachable, (a,), 5, "a to miss etcd")
        a_until = a.valid_until()  # from a's last renewal: no later one got through
        until(lambda: not a.ok(time.monotonic()), (a,), 5, "a's lease to run out")
        until(lambda: b.mine, (b,), 10, "b to take the key once it expired")
        # b asked for its lease only once the key was gone, after a stopped trusting its own
        assert b.renewed_at > a_until
        assert a.error
    finally:
        proxy.close()


def test_a_term_older_than_the_key_s_is_stale(contenders):
    a = contenders("a")
    a.want(True)
    until(lambda: a.mine, (a,), 10, "a to hold the key")
    assert a.stale("MANIFEST", {"name": "old", "epoch": a.term - 1})
    assert not a.stale("MANIFEST", {"name": "new", "epoch": a.term})
