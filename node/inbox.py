"""The ROUTER's inbox: each message's sender key is checked against the command (node/
security.py) before it is read; the peer's commands go to their owners, the operator's to
Control. A malformed or refused message is logged and dropped.
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

import zmq

from . import protocol
from .fsm import E, FsmFailure
from .protocol import Bad, Message
from .security import PEER_COMMANDS, refusal, sender_key

if TYPE_CHECKING:
    from .node import Node

log = logging.getLogger("sbs.node")


class Inbox:
    """Reads the ROUTER. See the module docstring."""

    def __init__(self, node: Node) -> None:
        self.node = node
        # peer commands on the ROUTER; the others are the operator's (Control)
        self.peer_commands: dict[str, Callable[[bytes, Message], None]] = {
            "PING": node.link.on_ping,
            "HANDOVER": lambda ident, msg: node.link.obey(msg, E.PEER_HANDOVER),
            "ASK_HANDOVER": lambda ident, msg: node.link.obey(msg, E.PEER_ASKS_HANDOVER),
            "SNAPSHOT": lambda ident, msg: node.primary.on_snapshot_request(ident, msg.body),
            "ACK": lambda ident, msg: node.primary.on_ack(ident, msg.body),
            "LISTS": node.ops.listsync.on_lists,
        }

    def on_router(self, raw: list[zmq.Frame]) -> None:
        key = sender_key(raw[-1])
        frames = [f.bytes for f in raw]
        if len(frames) < 2:
            log.warning("dropped a control message without identity")
            return
        ident, rest = frames[0], frames[1:]
        msg = protocol.decode(rest)
        if isinstance(msg, Bad):
            log.warning("dropped a bad control message: %s", msg.reason)
            return
        if (why := refusal(msg.command, key, self.node.keys)) is not None:
            log.warning("refused %s from key %s: %s", msg.command, (key or "?")[:8], why)
            if msg.command not in PEER_COMMANDS:
                self.node.reply(ident, protocol.reply_error(f"refused: {why}"))
            return
        if (handler := self.peer_commands.get(msg.command)) is not None:
            handler(ident, msg)
            return
        try:
            handled = self.node.control.handle(ident, msg.command, msg.body)
        except FsmFailure:
            raise  # the node's own state is in doubt: that ends it (node.py)
        except Exception as e:  # the operator hears of it at once instead of at a timeout
            log.exception("operator command %s failed; the node goes on", msg.command)
            self.node.reply(ident, protocol.reply_error(
                f"{msg.command} failed inside the node ({type(e).__name__}: {e}); "
                "see the node's log"))
            return
        if not handled:
            log.warning("dropped control message %s: not accepted on this port", msg.command)
