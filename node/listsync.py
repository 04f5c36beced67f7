"""The pair-wide lists ([folders] and [sentinels]) and reload: an edit of sbs.ini here (a
reload, SIGHUP, or a change made while the node was stopped) becomes the pair's lists, a new
generation stamped as node/listedits.py describes; the peer's newer lists are adopted, from its
LISTS or from the primary's snapshot. The lists live in the node's pair.json (node.lists).

A part of the Operator (node/ops.py), whose alerts and health it reconfigures on a reload.
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from . import protocol
from .config import Config, ConfigError, load
from .fsm import S
from .listedits import (
    Stamp,
    changes,
    own_fingerprint,
    own_lists,
    pair_fingerprint,
    restart_keys,
    stamp_from,
)
from .notify import Notifier
from .protocol import Message

if TYPE_CHECKING:
    from .node import Node
    from .ops import Operator

log = logging.getLogger("sbs.ops")

# a peer with an older stamp is sent the lists at most this often (seconds)
LISTS_RESEND = 1.0


def lists_at_start(node: Node) -> None:
    """Before the node picks its lists: an edit of sbs.ini made while it was stopped becomes
    the pair's lists (a new generation); an unchanged file leaves the pair's copy alone."""
    pair, cfg = node.lists.pair, node.cfg
    fp = own_fingerprint(cfg)
    seen = pair.get("own_fp")
    stamp = stamp_from(pair.get("lists")) or Stamp()
    if seen is None:
        # first run with a stamp: what the node ran before stays what it runs
        if node.last_role != "secondary" or pair.get("folders") is None:
            pair.update(own_lists(cfg))
    elif seen != fp and fp != pair_fingerprint(pair):
        new = Stamp(max(stamp.gen, int(pair.get("peer_gen", 0))) + 1, time.time(), cfg.name)
        log.warning("sbs.ini's [folders]/[sentinels] changed while stopped (%s): they become "
                    "the pair's lists, %s", changes(pair, own_lists(cfg)), new.describe())
        pair.update(own_lists(cfg))
        pair["lists"] = new.wire()
    pair["own_fp"] = fp
    pair.setdefault("lists", stamp.wire())
    _save_pair(node)


def _save_pair(node: Node) -> None:
    node.writes.save(node.lists.path, node.lists.pair)  # a full disk: retried


class ListSync:
    """Reload, and the pair's lists between the two nodes. See the module docstring."""

    def __init__(self, ops: Operator) -> None:
        self.ops = ops
        self.node = ops.node
        self.lists_sent_at = 0.0
        self.peer_stamp: Stamp | None = None
        self.snapshot_stamp: Stamp | None = None  # secondary: the lists of the last snapshot

    @property
    def stamp(self) -> Stamp:
        return stamp_from(self.node.lists.pair.get("lists")) or Stamp()

    def on_peer(self, body: dict[str, Any]) -> None:
        """The peer's PING/PONG: a primary with other lists than our snapshot's means a new
        snapshot; a peer with older lists is sent ours."""
        node = self.node
        peer = body["name"]
        theirs = stamp_from(body.get("lists"))
        if theirs is None:
            return
        self.peer_stamp = theirs
        secondary = node.secondary
        following = secondary.syncer is not None and not secondary.follow.snapshot_deadline
        if (node.state == S.SECONDARY and body["state"] == "primary" and following
                and self.snapshot_stamp is not None and theirs != self.snapshot_stamp):
            log.info("the primary runs lists %s: new snapshot", theirs.describe())
            node.secondary.request_snapshot()
        if theirs.gen > int(node.lists.pair.get("peer_gen", 0)):
            node.lists.pair["peer_gen"] = theirs.gen  # the next edit here numbers above it
        mine = self.stamp
        now = time.monotonic()
        if mine > theirs and now - self.lists_sent_at >= LISTS_RESEND:
            self.lists_sent_at = now
            pair = node.lists.pair
            node.link.send("LISTS", {
                "name": node.cfg.name, "run": node.run_id, "epoch": node.epoch, **mine.wire(),
                "folders": pair.get("folders") or {}, "paths": pair.get("paths") or {},
                "sentinels": pair.get("sentinels") or {},
            })
            log.info("peer %s has lists %s; sent ours, %s", peer, theirs.describe(),
                     mine.describe())

    def on_reload(self, ident: bytes, body: dict[str, Any]) -> None:
        ok, text = self.reload("sbs-tools reload")
        self.node.reply(ident, protocol.reply_ok(result=text, lists=self.stamp.wire())
                        if ok else protocol.reply_error(text))

    def on_lists(self, ident: bytes, msg: Message) -> None:
        """LISTS, a peer command: from the peer's current run and epoch only."""
        if (why := protocol.stale(msg.body, self.node.peer.run, self.node.peer.epoch)):
            log.warning("ignored LISTS %s", why)
            return
        self.offer_lists(msg.body)

    def reload(self, source: str) -> tuple[bool, str]:
        """Re-read sbs.ini. (done, what happened or why it was refused); nothing changes on a
        refusal."""
        node = self.node
        try:
            new = load(node.cfg.file)
        except ConfigError as exc:
            log.error("reload (%s) refused, nothing changed: %s", source, exc)
            return False, f"configuration error, nothing changed: {exc}"
        if keys := restart_keys(node.cfg, new):
            text = (f"{', '.join(keys)} changed: these need a restart of the node "
                    f"(nothing changed; put them back or restart)")
            log.error("reload (%s) refused: %s", source, text)
            return False, text
        old = node.cfg
        node.cfg = node.lists.cfg = new
        done = []
        if new.email != old.email:
            # the old one may be delivering (seconds): it finishes on a thread of its own
            threading.Thread(target=node.notifier.close, name="sbs-notify-close",
                             daemon=True).start()
            node.notifier = Notifier(new.email)
            done.append("[email]")
        if new.email != old.email or new.notify != old.notify:
            self.ops.alerts.reconfigure(node.notifier, new.notify)
            done.append("[notify]") if new.notify != old.notify else None
        if new.health != old.health:
            self.ops.health.reconfigure(new.health)
            done.append("[health]")
        pair = node.lists.pair
        fp = own_fingerprint(new)
        if fp != pair.get("own_fp"):
            pair["own_fp"] = fp
            if fp != pair_fingerprint(pair):
                stamp = Stamp(max(self.stamp.gen, int(pair.get("peer_gen", 0))) + 1,
                              time.time(), new.name)
                what = changes(pair, own_lists(new))
                self._take_lists(own_lists(new), stamp, f"edited here ({source}): {what}")
                done.append(f"lists {stamp.describe()}: {what}")
            else:
                _save_pair(node)
        if [f.path for f in new.folders] != [f.path for f in old.folders]:
            # a path of ours changed: the primary rescans, the secondary follows anew
            if node.state == S.SECONDARY:
                node.secondary.request_snapshot()
            self._apply()
        text = "reloaded: " + ("; ".join(done) if done else "nothing changed")
        log.info("reload (%s): %s", source, text)
        return True, text

    def offer_lists(self, body: dict[str, Any]) -> None:
        """The peer's lists: adopted when their stamp is newer than ours."""
        stamp = stamp_from(body)
        if stamp is None or not stamp > self.stamp:
            return
        lists = {"folders": body["folders"], "paths": body["paths"],
                 "sentinels": body["sentinels"]}
        what = changes(self.node.lists.pair, lists)
        self._refresh_own_paths(lists)
        self._take_lists(lists, stamp, f"adopted from {body['name']}: {what}")
        self._adopted(stamp, body["name"], what)

    def _adopted(self, stamp: Stamp, peer: str, what: str) -> None:
        if not stamp.by:
            return  # generation 0: the lists as first configured, nothing was edited
        self.ops.alerts.notice("config", f"SBS configuration adopted by {self.node.cfg.name}",
                           f"{self.node.cfg.name} adopted the pair's folder and sentinel lists"
                           f" {stamp.describe()} from {peer}: {what}.\n",
                           key=f"config:{stamp.gen}:{stamp.by}")

    def lists_newer_than_peer(self) -> bool:
        return self.peer_stamp is not None and self.stamp > self.peer_stamp

    def snapshot_lists(self, body: dict[str, Any]) -> bool:
        """A snapshot from the primary: may its lists replace ours? (Not when ours are newer:
        they are on their way to it.)"""
        theirs = self.snapshot_stamp = stamp_from(body.get("lists")) or Stamp()
        if self.stamp > theirs:
            log.info("snapshot carries lists %s; keeping ours, %s, for the primary to adopt",
                     theirs.describe(), self.stamp.describe())
            return False
        if theirs > self.stamp:
            what = changes(self.node.lists.pair, body)
            self._refresh_own_paths(body)
            how = f"adopted from {body['name']}: {what}"
            log.warning("pair lists now %s, %s", theirs.describe(), how)
            self.node.publish_event("lists", gen=theirs.gen, by=theirs.by, at=theirs.at, how=how)
            self._adopted(theirs, body["name"], what)
        self.node.lists.pair["lists"] = theirs.wire()
        return True

    def _take_lists(self, lists: dict[str, Any], stamp: Stamp, how: str) -> None:
        node = self.node
        node.lists.pair.update(lists)
        node.lists.pair["lists"] = stamp.wire()
        _save_pair(node)
        log.warning("pair lists now %s, %s", stamp.describe(), how)
        node.publish_event("lists", gen=stamp.gen, by=stamp.by, at=stamp.at, how=how)
        self._apply()

    def _refresh_own_paths(self, lists: dict[str, Any]) -> None:
        """Adopting the peer's lists: take this node's paths for them from its sbs.ini as it is
        now (the operator adds a folder on both nodes, each with its own path, and reloads
        one). Only folder paths are taken; a file with the same lists is not an edit later."""
        node = self.node
        try:
            now = load(node.cfg.file)
        except ConfigError as exc:
            log.warning("adopting the peer's lists: cannot read this node's paths: %s", exc)
            return
        if restart_keys(node.cfg, now):
            return
        node.cfg = node.lists.cfg = _with_folders(node.cfg, now)
        if own_fingerprint(now) == pair_fingerprint(lists):
            node.lists.pair["own_fp"] = own_fingerprint(now)

    def _apply(self) -> None:
        """A primary runs the pair's lists at once; a secondary's come with its snapshot."""
        node = self.node
        if node.state != S.PRIMARY:
            return
        node.lists.load_sentinels(own=False, new_active=True)
        node.folders = node.lists.pushed_folders()
        node.primary.restart(node.folders)
        fields = node.lists.sentinels_changed()  # sv + 1: the secondary takes a new snapshot
        node.pub.send_multipart(protocol.encode_bus("SENTINELS", {
            "name": node.cfg.name, "epoch": node.epoch, **fields}))
        self.ops.watch_checks()


def _with_folders(cfg: Config, new: Config) -> Config:
    return replace(cfg, folders=new.folders, sentinels=new.sentinels)
