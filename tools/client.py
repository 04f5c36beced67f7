"""A thin client of a node's control socket (and bus), used by sbs-tools and the tests."""
from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import zmq
from sbs.node import protocol
from sbs.node.config import Config
from sbs.node.protocol import Bad
from sbs.node.security import client, load_keys


def _socket(cfg: Config, kind: int, maxmsg: int, port: int, *, peer: bool) -> zmq.Socket:
    """A socket connected to the local node (or the peer) with the node's own key pair: our own
    node presents our own public key, the peer presents the peer's."""
    keys = load_keys(cfg)
    sock = zmq.Context.instance().socket(kind)
    sock.linger = 0
    sock.setsockopt(zmq.MAXMSGSIZE, maxmsg)
    client(sock, keys, None if keys is None or peer else keys.public)
    if kind == zmq.SUB:
        sock.setsockopt(zmq.SUBSCRIBE, b"")
    sock.connect(f"tcp://{cfg.peer if peer else cfg.local}:{port}")
    return sock


def request(cfg: Config, command: str, body: dict[str, Any] | None = None, *,
            timeout: float = 2.0, peer: bool = False) -> dict[str, Any] | None:
    """Send one command to the local node (or the peer) and return its REPLY body, or None
    when nobody answers within `timeout`."""
    sock = _socket(cfg, zmq.DEALER, protocol.MAX_REPLY_IN, cfg.control_port, peer=peer)
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
    sock = _socket(cfg, zmq.SUB, protocol.MAX_BUS_IN, cfg.bus_port, peer=peer)
    try:
        while True:
            if sock.poll(500):
                yield protocol.decode_bus(sock.recv_multipart())
    finally:
        sock.close()
