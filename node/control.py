"""Operator commands on the ROUTER, and the status they read (circus's controller beside its
arbiter): one handler per command in `Control.commands`, each answering with one REPLY.

Work that takes time (verify hashes every folder) runs on a worker thread, which sends its
REPLY frames to the `results` PULL socket; the loop forwards them to the operator.
"""
from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import zmq

from . import conflicts, protocol
from .fsm import PRIMARY_LIKE, PUBLIC, A, E, S
from .scanner import verify_tokens
from .security import client

if TYPE_CHECKING:
    from .node import Node

log = logging.getLogger("sbs.node")

Handler = Callable[[bytes, dict[str, Any]], None]


class Control:
    def __init__(self, node: Node):
        self.node = node
        self.results = node.ctx.socket(zmq.PULL)
        self.results_addr = f"inproc://results-{node.run_id}"
        self.results.bind(self.results_addr)
        self.commands: dict[str, Handler] = {
            "STATUS": self.on_status,
            "PROMOTE": self.on_promote,
            "SENTINEL": self.on_sentinel,
            "VERIFY": self.on_verify,
            "TOKENS": self.on_tokens,  # the peer's VERIFY asks us for ours
            "CONFIRM": self.on_confirm,
        }

    def handle(self, ident: bytes, command: str, body: dict[str, Any]) -> bool:
        """Run an operator command; False when `command` is not one."""
        handler = self.commands.get(command)
        if handler is None:
            return False
        handler(ident, body)
        return True

    def on_result(self, frames: list[bytes]) -> None:
        self.node.reply(frames[0], frames[1:])

    # ------------------------------------------------------------------ commands
    def on_status(self, ident: bytes, body: dict[str, Any]) -> None:
        self.node.reply(ident, protocol.reply_ok(**self.status()))

    def on_promote(self, ident: bytes, body: dict[str, Any]) -> None:
        node, peer, force = self.node, self.node.peer, body["force"]
        if node.sentinel_stop.running:
            node.reply(ident, protocol.reply_error("stopping sentinels; try again shortly"))
            return
        # A secondary takes over as soon as the peer is silent for dead_after, so "not alive"
        # alone never holds here: a peer silent for half of it (and two heartbeats) will not
        # answer a hand-over in time, and counts as unreachable for a promote.
        quiet = time.monotonic() - peer.heard_at > max(node.cfg.dead_after / 2,
                                                       2 * node.cfg.heartbeat)
        reachable = peer.alive and not quiet
        if node.state == S.SECONDARY and not reachable and not force:
            node.reply(ident, protocol.reply_error(
                "peer unreachable: cannot hand over gracefully; use --force"))
            return
        if node.state == S.PRIMARY and not (peer.alive and peer.state == "secondary"):
            node.reply(ident, protocol.reply_error("no live secondary to hand over to"))
            return
        event = E.PROMOTE_FORCE if node.state == S.SECONDARY and not reachable else E.PROMOTE
        # a refused promote was answered by the REFUSE action: one reply per request
        if A.REFUSE not in node.feed(event, context=(ident, "promote")):
            node.reply(ident, protocol.reply_ok(state=PUBLIC[node.state]))

    def on_sentinel(self, ident: bytes, body: dict[str, Any]) -> None:
        node = self.node
        action, name = body["action"], body.get("name", "")
        if action != "list":
            if node.state not in PRIMARY_LIKE:
                node.reply(ident, protocol.reply_error(
                    f"sentinels are managed on the primary ({node.peer.name or node.cfg.peer})"))
                return
            try:  # restricted: start() only activates, since the sentinels are not running
                getattr(node.sentinels, action)(name)
            except (KeyError, ValueError) as exc:
                node.reply(ident, protocol.reply_error(str(exc)))
                return
            fields = node.lists.sentinels_changed()
            node.pub.send_multipart(protocol.encode_bus("SENTINELS", {
                "name": node.cfg.name, "epoch": node.epoch, **fields}))
        node.reply(ident, protocol.reply_ok(sentinels=node.sentinels.status(),
                                            active=node.sentinels.active,
                                            restricted=node.restricted))

    def on_verify(self, ident: bytes, body: dict[str, Any]) -> None:
        self._verify(ident, peer=body.get("peer", False))

    def on_tokens(self, ident: bytes, body: dict[str, Any]) -> None:
        self._verify(ident)

    def _verify(self, ident: bytes, *, peer: bool = False) -> None:
        """Hash every folder afresh on a worker thread; with `peer`, ask the peer for its own
        tokens (TOKENS, a peer command: the operator's key is not the peer's operator key)."""
        folders = dict(self.node.folders)
        ctx, results_addr = self.node.ctx, self.results_addr

        def work() -> None:
            push = ctx.socket(zmq.PUSH)
            push.linger = 1000
            push.connect(results_addr)
            try:
                if peer:
                    push.send_multipart([ident, *self._peer_tokens()])
                    return
                tokens = verify_tokens(folders)
                push.send_multipart([ident, *protocol.reply_ok(folders=tokens)])
            except Exception as exc:
                push.send_multipart([ident, *protocol.reply_error(f"verify failed: {exc}")])
            finally:
                push.close()

        threading.Thread(target=work, name="sbs-verify", daemon=True).start()

    def _peer_tokens(self, timeout: float = 600.0) -> list[bytes]:
        """The peer's REPLY to TOKENS, on a socket of the calling (worker) thread."""
        node = self.node
        if not node.peer.alive:
            return protocol.reply_error(f"no answer from the peer {node.cfg.peer}")
        sock = node.socket(zmq.DEALER, maxmsg=protocol.MAX_REPLY_IN)
        try:
            client(sock, node.keys)
            sock.connect(f"tcp://{node.cfg.peer}:{node.cfg.control_port}")
            sock.send_multipart(protocol.encode("TOKENS", {"name": node.cfg.name}))
            if not sock.poll(timeout * 1000):
                return protocol.reply_error(f"the peer did not answer within {timeout:.0f}s")
            return sock.recv_multipart()
        finally:
            sock.close()

    def on_confirm(self, ident: bytes, body: dict[str, Any]) -> None:
        if (why := self.node.secondary.confirm_deletions(body.get("folder"))) is None:
            self.node.reply(ident, protocol.reply_ok())
        else:
            self.node.reply(ident, protocol.reply_error(why))

    # ------------------------------------------------------------------ status
    def status(self) -> dict[str, Any]:
        node, peer = self.node, self.node.peer
        now = time.monotonic()
        return {
            "name": node.cfg.name,
            "state": node.public_state(),
            "internal_state": node.state.value,
            "epoch": node.epoch,
            "role": node.cfg.role,
            "restricted": node.restricted,
            "pid": os.getpid(),
            "uptime": round(now - node.started_at, 3),
            "in_state_for": round(now - node.state_at, 3),
            "peer": {
                "name": peer.name or node.cfg.peer, "address": node.cfg.peer,
                "state": peer.state if peer.alive else "unreachable", "epoch": peer.epoch,
                "last_heard": None if peer.heard_at < 0 else round(now - peer.heard_at, 3),
                "applied": peer.applied, "synced": peer.synced,
            },
            "peer_state": peer.state if peer.alive else "unreachable",
            "replication": (node.primary.status() if node.state in PRIMARY_LIKE
                            else node.secondary.status(now)),
            "sentinels": node.sentinels.status(),
            "active_sentinels": node.sentinels.active,
            "email": node.notifier.status(),
            "lease": node.primacy.status(now),
            # state_dir writes that failed (a full disk) and are being retried: {file: error}
            "state_writes": node.writes.status(),
            "conflicts": self._conflicts_status(),
            **node.ops.status(),  # maintenance, the lists' stamp, open alerts, health
        }

    def _conflicts_status(self) -> dict[str, Any]:
        # a directory walk, bounded: status stays cheap with a large conflicts/ folder
        state_dir = self.node.state_dir
        kept = conflicts.listing(state_dir, limit=1000)
        return {"count": len(kept), "latest": kept[0]["time"] if kept else None,
                "files": kept[:50], "where": str(state_dir / "conflicts")}
