"""ZeroMQ heartbeats on a real Node's sockets (node/liveness.py set_heartbeats): the options
each peer socket carries, and a connection whose peer stopped answering dropped and made
again while the ping connection, deliberately without heartbeats, stays.

The Node is built in-process as in test_sides.py (its loop is not running: ZeroMQ's own I/O
thread does the heartbeats). The test plays beta with a ROUTER and a PUB behind a proxy
(tests/netproxy.py) on beta's address, so the link can be cut without an error on any socket.
"""
from __future__ import annotations

import secrets

import pytest
import zmq
from sbs.node.node import Node
from zmq.utils.monitor import recv_monitor_message

from tests.netproxy import Proxy
from tests.pair import HOSTS, PROXIES, plain_config, wait_for
from tests.test_sides import following, received

BEHIND = PROXIES["beta"]  # where the test's beta really listens; the proxy is on beta's address


@pytest.fixture
def alpha(tmp_path):
    """alpha (heartbeat 0.2, dead_after 1.0, its loop not running) reaching beta via a proxy."""
    cfg = plain_config(tmp_path)
    port = cfg.control_port
    assert (cfg.heartbeat, cfg.dead_after) == (0.2, 1.0)
    ctx = zmq.Context()  # the test's: no heartbeats of its own, it only answers alpha's
    peer, bus = ctx.socket(zmq.ROUTER), ctx.socket(zmq.PUB)
    for sock in (peer, bus):
        sock.linger = 0
    peer.bind(f"tcp://{BEHIND}:{port}")
    bus.bind(f"tcp://{BEHIND}:{port + 1}")
    proxy = Proxy(HOSTS["beta"], BEHIND, [port, port + 1])
    node = Node(cfg)
    try:
        wait_for(lambda: node.link.send("STATUS", {}), 10, "alpha's dealer to connect")
        assert received(peer)[0] == "STATUS"
        node.peer_socket, node.bus_socket, node.proxy = peer, bus, proxy
        yield node
    finally:
        node.close()
        proxy.close()
        peer.close()
        bus.close()
        ctx.term()


def options(sock: zmq.Socket) -> tuple[int, int, int]:
    return tuple(sock.getsockopt(o) for o in (zmq.HEARTBEAT_IVL, zmq.HEARTBEAT_TIMEOUT,
                                              zmq.HEARTBEAT_TTL))


def test_the_peer_sockets_carry_heartbeats_sized_from_heartbeat_and_dead_after(alpha):
    following(alpha, secrets.token_hex(8), 0)  # the secondary's SUB on the primary's bus
    # heartbeat 0.2 s: a ZeroMQ ping every 200 ms; dead_after 1.0 s: dropped after 1000 ms
    # without an answer, and what the other side is told to wait
    assert options(alpha.pub) == (200, 1000, 1000)
    assert options(alpha.secondary.sub) == (200, 1000, 1000)
    worker = alpha.socket(zmq.DEALER, maxmsg=1024)  # as the worker threads make theirs
    assert options(worker) == (200, 1000, 1000)
    # the deliberate exceptions: the ping DEALER sends no ZeroMQ pings (silence is the pings'
    # business) and the ROUTER tells the peer's DEALER no TTL (its answers may stop arriving)
    assert alpha.link.dealer.getsockopt(zmq.HEARTBEAT_IVL) == 0
    assert options(alpha.router) == (200, 1000, 0)
    for sock in (alpha.pub, alpha.secondary.sub, alpha.link.dealer, alpha.router, worker):
        assert sock.getsockopt(zmq.HANDSHAKE_IVL) == 2000
        assert sock.getsockopt(zmq.TCP_KEEPALIVE) == 1
        assert sock.getsockopt(zmq.TCP_KEEPALIVE_IDLE) == 1
        assert sock.getsockopt(zmq.TCP_KEEPALIVE_CNT) == 3
    worker.close()


class Events:
    """The monitor events of one socket, gathered as they are polled."""

    def __init__(self, sock: zmq.Socket):
        self.mon = sock.get_monitor_socket(zmq.EVENT_DISCONNECTED | zmq.EVENT_HANDSHAKE_SUCCEEDED)
        self.seen: list[int] = []

    def poll(self) -> list[int]:
        while self.mon.poll(0):
            self.seen.append(recv_monitor_message(self.mon)["event"])
        return self.seen

    def count(self, event: int) -> int:
        return self.poll().count(event)


def test_a_bus_connection_whose_peer_went_silent_is_dropped_and_made_again(alpha):
    following(alpha, secrets.token_hex(8), 0)
    sub, bus, proxy = alpha.secondary.sub, alpha.bus_socket, alpha.proxy
    subs, pings = Events(sub), Events(alpha.link.dealer)

    def delivered(tag: bytes) -> bool:
        bus.send(tag)
        while sub.poll(20):
            if sub.recv() == tag:
                return True
        return False

    wait_for(lambda: delivered(b"before"), 15, "the bus to reach alpha's SUB")
    assert subs.count(zmq.EVENT_DISCONNECTED) == 0
    # a pulled cable: the connections stay open, nothing arrives either way, no error; what
    # was sent meanwhile arrives once it is back, as TCP retransmits it ("hold"). ("swallow"
    # loses those bytes: a connection made during the cut then carries the tail of beta's
    # greeting without its start, which libzmq without CURVE takes for ZMTP 1.0, a protocol
    # with no handshake timer and no heartbeats, and keeps until beta gives up on it: 30 s
    # here, the test's beta having libzmq's default HANDSHAKE_IVL. No real link does that.)
    proxy.set(up="hold", down="hold")
    wait_for(lambda: subs.count(zmq.EVENT_DISCONNECTED) >= 1, 20,
             "alpha's SUB to drop the connection that stopped answering its heartbeats")
    # kept cut a while longer: the SUB's new connections give up their handshakes
    # (HANDSHAKE_IVL, 2 s) and are made again, and the ping DEALER's has been silent for
    # more than twice dead_after
    made = proxy.accepted
    wait_for(lambda: proxy.accepted >= made + 2, 20, "alpha's SUB to try again, twice")
    proxy.heal()
    wait_for(lambda: subs.count(zmq.EVENT_HANDSHAKE_SUCCEEDED) >= 1, 20,
             "alpha's SUB to make its connection again")
    wait_for(lambda: delivered(b"after"), 15, "the bus to reach alpha's SUB again")
    # the ping DEALER (no ZeroMQ heartbeats) kept its connection through the cut
    assert pings.count(zmq.EVENT_DISCONNECTED) == 0, pings.seen
    assert alpha.link.send("STATUS", {}) and received(alpha.peer_socket)[0] == "STATUS"
