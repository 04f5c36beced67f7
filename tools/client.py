"""A thin client of a node's control socket (and bus), used by sbs-tools and the tests."""
from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import zmq

from node import protocol
from node.config import Config
from node.protocol import Bad
from node.security import client, load_keys


def request(cfg: Config, command: str, body: dict[str, Any] | None = None, *,
            timeout: float = 2.0, peer: bool = False) -> dict[str, Any] | None:
    """Send one command to the local node (or the peer) and return its REPLY body, or None
    when nobody answers within `timeout`."""
    keys = load_keys(cfg)
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    sock.linger = 0
    sock.setsockopt(zmq.MAXMSGSIZE, protocol.MAX_REPLY_IN)
    # our own node's ROUTER presents our own key; the peer's presents the peer's key
    client(sock, keys, None if keys is None or peer else keys.public)
    host = cfg.peer if peer else cfg.local
    sock.connect(f"tcp://{host}:{cfg.control_port}")
    try:
        sock.send_multipart(protocol.encode(command, body or {}))
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            if not sock.poll(left * 1000):
                return None
            msg = protocol.decode(sock.recv_multipart(), expect=("REPLY",))
            if not isinstance(msg, Bad):
                return msg.body
        return None
    finally:
        sock.close()


def subscribe(cfg: Config, *, peer: bool = False) -> Iterator[protocol.Message | Bad]:
    """Every message on a node's bus, forever (until the caller stops iterating)."""
    keys = load_keys(cfg)
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.SUB)
    sock.linger = 0
    sock.setsockopt(zmq.MAXMSGSIZE, protocol.MAX_BUS_IN)
    client(sock, keys, None if keys is None or peer else keys.public)
    sock.setsockopt(zmq.SUBSCRIBE, b"")
    sock.connect(f"tcp://{cfg.peer if peer else cfg.local}:{cfg.bus_port}")
    try:
        while True:
            if sock.poll(500):
                yield protocol.decode_bus(sock.recv_multipart())
    finally:
        sock.close()
