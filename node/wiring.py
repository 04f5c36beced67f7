"""The node's sockets and threads: opened in order at the start, closed in order at the end.

open_sockets() binds the ROUTER (first: a probing peer must find us before we probe it), the
PUB and the content server and makes the peer link and the signal wake-up pair; close_all()
stops every part the node has so far (a bind that failed leaves some out) and ends the context.
"""
from __future__ import annotations

import socket
from typing import TYPE_CHECKING

import zmq

from . import protocol
from .content import BlobServer
from .security import serve

if TYPE_CHECKING:
    from .node import Node


class NodeError(RuntimeError):
    """A runtime failure that ends the node with exit 1 (e.g. the port is taken)."""


def open_sockets(node: Node) -> None:
    cfg = node.cfg
    node.router = node.socket(zmq.ROUTER, maxmsg=protocol.MAX_CONTROL_IN)
    # no TTL in its heartbeats: a TTL would make the peer's DEALER drop its connection
    # when our answers stop arriving, and so stop its pings (see PeerLink._open_dealer in
    # node/peerlink.py)
    node.router.setsockopt(zmq.HEARTBEAT_TTL, 0)
    serve(node.router, node.keys)
    node.pub = node.socket(zmq.PUB, maxmsg=protocol.MAX_CONTROL_IN)
    node.pub.sndhwm = 100_000
    serve(node.pub, node.keys)
    try:  # the ROUTER first: a probing peer must find us before we probe it
        node.router.bind(f"tcp://{cfg.local}:{cfg.control_port}")
        node.pub.bind(f"tcp://{cfg.local}:{cfg.bus_port}")
    except zmq.ZMQError as exc:
        node.close()
        raise NodeError(
            f"cannot bind {cfg.local}:{cfg.control_port}..{cfg.bus_port}: {exc}"
        ) from None
    node.blobs = BlobServer(node.ctx, f"tcp://{cfg.local}:{cfg.blob_port}", node.keys)
    try:
        node.blobs.start_and_wait()
    except zmq.ZMQError as exc:
        node.close()
        raise NodeError(f"cannot bind {cfg.local}:{cfg.blob_port}: {exc}") from None
    node.wake_r, node.wake_w = socket.socketpair()
    node.wake_r.setblocking(False)
    node.wake_w.setblocking(False)


def close_all(node: Node) -> None:
    primary = getattr(node, "primary", None)  # absent when a bind failed
    if getattr(node, "secondary", None) is not None:
        node.secondary.stop(final=True)
    if primary is not None:
        primary.stop(final=True)
    if getattr(node, "blobs", None) is not None:
        node.blobs.stop()
    node.sentinels.stop_all()
    if getattr(node, "ops", None) is not None:
        node.ops.close()
    if getattr(node, "primacy", None) is not None:
        node.primacy.close()
    node.notifier.close(timeout=2.0)
    if primary is not None:
        primary.close()  # its journal thread, after the last ACK
    node.agreed.close()
    if getattr(node, "link", None) is not None:
        node.link.close()
    if getattr(node, "router", None) is not None:
        node.router.close(linger=500)  # let a last HANDOVER leave
    if node.auth is not None:
        node.auth.stop()
        node.auth = None
    node.ctx.destroy(linger=0)
    for s in (getattr(node, "wake_r", None), getattr(node, "wake_w", None)):
        if s is not None:
            s.close()
