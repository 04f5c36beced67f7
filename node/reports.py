"""What the node tells people when the pair changes hands: a takeover and a split brain, each
as a log line, a bus event and (once) an email, through the alert registry (node/alerts.py),
which tells a planned hand-over from a failover and honours [notify] kinds."""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .fsm import E
    from .node import Node

log = logging.getLogger("sbs.node")


class Reports:
    def __init__(self, node: Node):
        self.node = node
        self.split_reported: str | None = None  # the loser's run and term we reported

    def took_over(self, old: str, why: str, event: E) -> None:
        node, cfg = self.node, self.node.cfg
        node.ops.takeover_notice(old, why, event)
        node.publish_event("takeover", old_primary=old, new_primary=cfg.name,
                           epoch=node.epoch, why=why)

    def split_brain_lost(self) -> None:
        # The loser always knows (it yields); the winner may not have seen two primaries (the
        # loser heard it first). So the loser sends the one email, and tells the winner in its
        # pings, which report it on their side too.
        node, peer, name = self.node, self.node.peer, self.node.cfg.name
        log.error("SPLIT BRAIN: peer %s is primary too and wins by the rule (epoch %d vs %d);"
                  " yielding: files changed here are kept under %s/conflicts/",
                  peer.name, peer.epoch, node.epoch, node.state_dir)
        node.publish_event("split_brain", winner=peer.name, loser=name,
                           winner_epoch=peer.epoch, loser_epoch=node.epoch, seen_by="loser")
        node.ops.alerts.notice(
            "split_brain", f"SBS split brain resolved: {peer.name} stays primary",
            f"Both {peer.name} (epoch {peer.epoch}) and {name} (epoch "
            f"{node.epoch}) were primary. By the rule {peer.name} stays primary; "
            f"{name} (this node) yielded: it stops its sentinels, becomes secondary and "
            f"keeps the files it changed meanwhile under its state_dir/conflicts/ "
            f"({node.state_dir}/conflicts/).\n",
            key=f"split_brain:{peer.run}:{node.epoch}",  # each split brain: one mail
        )

    def split_brain_won(self, loser_epoch: int, *, how: str) -> None:
        """Log and publish the split brain once per term of the loser (the loser emails)."""
        node, peer = self.node, self.node.peer
        key = f"{peer.run}:{loser_epoch}"
        if self.split_reported == key:
            return
        self.split_reported = key
        log.error("SPLIT BRAIN: peer %s was primary too; %s (epoch %d vs %d); the peer yields",
                  peer.name, how, node.epoch, loser_epoch)
        node.publish_event("split_brain", winner=node.cfg.name, loser=peer.name,
                           winner_epoch=node.epoch, loser_epoch=loser_epoch, seen_by="winner")
