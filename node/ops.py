"""The operator's pair: reload, pair-wide lists, maintenance, alerts and sentinel health.

One object beside the node loop, called from a few hooks: what the node adds to its PING
(`peer_fields`), what it makes of the peer's (`on_peer`), the tool commands RELOAD and
MAINTENANCE and the peer's LISTS (`on_command`), a `tick`, the sentinel and sync events, and
its part of status. It owns the alert registry (node/alerts.py), the maintenance record
(node/maintenance.py) and the sentinel health counts (node/health.py); the pair's lists are
the node's pair.json, stamped as node/listedits.py describes.
"""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from . import protocol
from .alerts import Alerts
from .config import Config, ConfigError, load
from .fsm import PRIMARY_LIKE, E, S
from .health import Health
from .listedits import (
    Stamp,
    changes,
    own_fingerprint,
    own_lists,
    pair_fingerprint,
    restart_keys,
    stamp_from,
)
from .maintenance import Maintenance
from .maintenance import from_wire as maint_from_wire
from .notify import Notifier
from .protocol import Message

if TYPE_CHECKING:
    from .node import Node

log = logging.getLogger("sbs.ops")

# a peer with an older stamp is sent the lists at most this often (seconds)
LISTS_RESEND = 1.0
# a sentinel counts as recovered once it has run this long without a failure (seconds)
SENTINEL_STABLE = 10.0
# a primary without a live secondary for this long (seconds) raises "standby lost" even if it
# never had one this run (started alone)
ALONE_AFTER = 60.0


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


class Operator:
    def __init__(self, node: Node) -> None:
        self.node = node
        cfg = node.cfg
        self.maintenance = Maintenance(node.state_dir, cfg.name)
        self.alerts = Alerts(node.notifier, cfg.name, cfg.notify, publish=node.publish_event)
        self.health = Health(cfg.health)
        self.lists_sent_at = 0.0
        self.handover_why = ""  # why our next HANDOVER is sent (its mail tells planned apart)
        self.peer_handover_why = ""  # why the peer's HANDOVER came
        self.unhealthy = ""  # the sentinel our current hand-over moves, for the log and mail
        self.peer_sick: list[str] = []
        self.peer_stamp: Stamp | None = None
        self.snapshot_stamp: Stamp | None = None  # secondary: the lists of the last snapshot
        self.last_failure: dict[str, float] = {}
        self.primary_since: float | None = None
        self.standby_since: float | None = None  # primary: monotonic, since a standby is there
        self.in_sync_at: float | None = None  # primary: monotonic, the standby last had it all

    # -- the pair's settings in every PING ------------------------------------------------------

    @property
    def stamp(self) -> Stamp:
        return stamp_from(self.node.lists.pair.get("lists")) or Stamp()

    def peer_fields(self) -> dict[str, Any]:
        return {"maint": self.maintenance.record.wire(), "lists": self.stamp.wire(),
                "sick": self.health.sick(time.monotonic())[:100]}

    def on_peer(self, body: dict[str, Any]) -> None:
        """The peer's PING/PONG (already taken by node.peer): adopt its newer maintenance
        switch, send it our lists when its stamp is older, remember where sentinels failed."""
        node = self.node
        peer = body["name"]
        if "maint" in body and (rec := maint_from_wire(body["maint"])) is not None:
            if self.maintenance.offer(rec, peer):
                node.publish_event("maintenance", on=rec.on, by=rec.by, at=rec.at)
        self.peer_sick = list(body.get("sick") or [])
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

    # -- commands -------------------------------------------------------------------------------

    def commands(self) -> dict[str, Callable[[bytes, dict[str, Any]], None]]:
        """The operator's commands this room answers (Control's table takes them)."""
        return {"RELOAD": self.on_reload, "MAINTENANCE": self.on_maintenance}

    def on_reload(self, ident: bytes, body: dict[str, Any]) -> None:
        ok, text = self.reload("sbs-tools reload")
        self.node.reply(ident, protocol.reply_ok(result=text, lists=self.stamp.wire())
                        if ok else protocol.reply_error(text))

    def on_maintenance(self, ident: bytes, body: dict[str, Any]) -> None:
        node = self.node
        if "on" in body and body["on"] != self.maintenance.on:
            rec = self.maintenance.switch(body["on"])
            node.publish_event("maintenance", on=rec.on, by=rec.by, at=rec.at)
            word = "on" if rec.on else "off"
            self.alerts.notice("maintenance", f"SBS maintenance {word}: {node.cfg.name}",
                               f"Maintenance mode was switched {word} on {node.cfg.name}. "
                               + ("No takeover and no automatic hand-over until it is "
                                  "switched off; replication goes on.\n" if rec.on else
                                  "Failover is armed again.\n"))
            node.link.send_ping()  # the peer hears it now, not at the next heartbeat
        node.reply(ident, protocol.reply_ok(maintenance=self.maintenance.status()))

    def on_lists(self, ident: bytes, msg: Message) -> None:
        """LISTS, a peer command: from the peer's current run and epoch only."""
        if (why := protocol.stale(msg.body, self.node.peer.run, self.node.peer.epoch)):
            log.warning("ignored LISTS %s", why)
            return
        self.offer_lists(msg.body)

    # -- reload ---------------------------------------------------------------------------------

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
            self.alerts.reconfigure(node.notifier, new.notify)
            done.append("[notify]") if new.notify != old.notify else None
        if new.health != old.health:
            self.health.reconfigure(new.health)
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
        self.alerts.notice("config", f"SBS configuration adopted by {self.node.cfg.name}",
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
        node.pub.send_multipart(protocol.encode_bus("SENTINELS", {"name": node.cfg.name,
                                                                   **fields}))
        self.watch_checks()

    # -- the tick -------------------------------------------------------------------------------

    def tick(self, now: float) -> None:
        node = self.node
        self.health.drain()
        if node.state in PRIMARY_LIKE:
            self._primary_conditions(now)
        else:
            self.primary_since = self.standby_since = self.in_sync_at = None
            for key in ("standby_lost", "lag", "restricted"):
                self.alerts.resolve(key)
            self.alerts.resolve_prefix("sentinel:")
        if node.state == S.SECONDARY:
            self._secondary_conditions()
        else:
            self.alerts.resolve("stall")  # only a secondary follows a link that can stall

    def _primary_conditions(self, now: float) -> None:
        node, peer, alerts = self.node, self.node.peer, self.alerts
        if self.primary_since is None:
            self.primary_since = now
        standby = peer.alive and peer.state == "secondary"
        if standby:
            alerts.resolve("standby_lost")
        elif now - self.primary_since > ALONE_AFTER:
            self.standby_lost("no secondary has joined")
        # lagging: a standby that has not had everything we published for lag_after seconds
        # (counted from when it joined: a returning one catches up first)
        if not standby:
            self.standby_since = self.in_sync_at = None
        elif self.standby_since is None:
            self.standby_since = now
        caught_up = standby and peer.synced and peer.follows(node.run_id) and (
            peer.applied >= node.primary.seq)
        if caught_up:
            self.in_sync_at = now
            alerts.resolve("lag")
        lag_after = node.cfg.notify.lag_after
        behind_since = self.in_sync_at or self.standby_since
        if standby and not caught_up and now - behind_since > lag_after:
            alerts.raise_("lag", "lag", f"standby {peer.name} lags behind",
                          f"The secondary {peer.name} has not been in sync for more than "
                          f"{lag_after:g}s (applied {peer.applied}, this node is at manifest "
                          f"{node.primary.seq}, pending {peer.pending_files} files / "
                          f"{peer.pending_bytes} bytes{', ' + peer.error if peer.error else ''})"
                          f".\nA failover now would lose what it lacks.\n")
        active = node.sentinels.active
        if node.restricted and active:
            alerts.raise_("restricted", "restricted",
                          f"{node.cfg.name} is a restricted backup: no sentinel runs",
                          f"{node.cfg.name} (role = backup) started without its peer, so by the "
                          f"licence rule it runs no sentinel: {', '.join(active)} are down. "
                          f"Start the main node; the backup hands over once it has caught up."
                          f"\n")
        elif not node.restricted:
            alerts.resolve("restricted")
        self._sentinel_health(now)

    def standby_lost(self, why: str) -> None:
        peer = self.node.peer
        self.alerts.raise_("standby_lost", "standby", "no standby",
                           f"{self.node.cfg.name} is primary without a secondary ({why}; "
                           f"peer {peer.name or self.node.cfg.peer}). A failure of this node "
                           f"now stops the services.\n")

    def _secondary_conditions(self) -> None:
        node, alerts = self.node, self.alerts
        progress, error = node.secondary.progress, node.secondary.error
        pending = progress.pending_files
        if pending and ("disk full" in progress.stuck or error.startswith("disk full")):
            alerts.raise_("disk_full", "disk", f"disk full on {node.cfg.name}",
                          f"The secondary cannot apply what the primary sent: "
                          f"{progress.stuck or error}.\nThe previous copy is kept; "
                          f"free space and it catches up by itself.\n")
        elif not pending:  # everything that was sent is written (or no longer wanted)
            alerts.resolve("disk_full")
        if "strict guard" not in error:
            alerts.resolve_prefix("guard:")

    def on_sync_event(self, body: dict[str, Any]) -> None:
        event = body.get("event")
        if event == "strict_guard":
            folder = str(body.get("folder"))
            self.alerts.raise_(f"guard:{folder}", "guard", f"strict guard holds deletions in "
                               f"{folder}",
                               f"The primary lacks {body.get('deletions')} of the "
                               f"{body.get('files')} files of folder {folder} on "
                               f"{self.node.cfg.name}; strict mode would delete them, and the "
                               f"guard holds that back (an unmounted disk on the primary looks "
                               f"like this). If the deletions are meant, run `sbs-tools "
                               f"confirm-deletions {folder}` on {self.node.cfg.name}.\n")

    # -- sentinel health ------------------------------------------------------------------------

    def on_sentinel_event(self, event: dict[str, Any]) -> None:
        name = event.get("name", "")
        if event.get("event") == "exited":
            now = time.monotonic()
            self.last_failure[name] = now
            self.health.failed(name, f"exited with {event.get('code')}", now)
        elif event.get("event") == "failing":
            self._raise_sentinel(name, "it keeps exiting right after it starts")

    def _raise_sentinel(self, name: str, why: str) -> None:
        self.alerts.raise_(f"sentinel:{name}", "sentinel", f"sentinel {name} is crash-looping",
                           f"Sentinel {name} on {self.node.cfg.name}: {why}. Its log is "
                           f"state_dir/logs/{name}.log.\n")

    def _sentinel_health(self, now: float) -> None:
        node = self.node
        states = {s["name"]: s for s in node.sentinels.status()}
        for key in [a["key"] for a in self.alerts.status() if a["key"].startswith("sentinel")]:
            name = key.split(":", 1)[1]
            s = states.get(name)
            quiet = now - self.last_failure.get(name, -1e9) > SENTINEL_STABLE
            if s is None or not s["active"] or (s["state"] == "running" and quiet):
                self.alerts.resolve(key)
        if node.state != S.PRIMARY or node.restricted:
            return
        for name in self.health.failing(now):
            s = states.get(name)
            if s is None or not s["active"]:
                continue
            n = self.health.count(name, now)
            why = (f"{n} failures in {node.cfg.health.window:g}s (more than [health] restarts "
                   f"= {node.cfg.health.restarts})")
            self._raise_sentinel(name, why)
            self._move(name, why, now)

    def _move(self, name: str, why: str, now: float) -> None:
        """Hand a sick sentinel over to a healthy, synced secondary, once per pair."""
        node, peer = self.node, self.node.peer
        if name in self.peer_sick:
            self.alerts.raise_(f"sentinel_stuck:{name}", "sentinel",
                               f"sentinel {name} fails on both nodes: not moved again",
                               f"Sentinel {name} failed on {peer.name} before it was handed "
                               f"over here, and fails here too ({why}). The pair does not move "
                               f"it back and forth; it keeps restarting it here. Fix the "
                               f"service, then restart it with `sbs-tools sentinel stop/start "
                               f"{name}`.\n")
            return
        synced = (peer.alive and peer.state == "secondary" and peer.synced
                  and peer.follows(node.run_id) and peer.applied >= node.primary.seq)
        if not synced or self.maintenance.on:
            return  # a secondary that lacks data is no place to move to; a later tick retries
        self.health.mark_sick(name, now)
        self.unhealthy = name
        log.error("sentinel %s is unhealthy here (%s): handing over to %s", name, why,
                  peer.name)
        node.feed(E.SENTINEL_UNHEALTHY)

    def watch_checks(self) -> None:
        node = self.node
        running = node.state in PRIMARY_LIKE and not node.restricted
        self.health.watch(node.sentinels.active if running else [])

    def became_primary(self) -> None:
        self.health.reset()
        self.last_failure.clear()
        self.watch_checks()

    # -- hand-over and takeover mail ------------------------------------------------------------

    def handover_reason(self, event: E) -> str:
        if event == E.SENTINEL_UNHEALTHY:
            return f"health: sentinel {self.unhealthy} crash-looping on {self.node.cfg.name}"
        return {E.STOP: "stop", E.PROMOTE: "promote", E.PEER_ASKS_HANDOVER: "promote",
                E.MAIN_PEER_READY: "restricted backup gives way to the main node"}.get(
                    event, event.value)

    def takeover_notice(self, old: str, why: str, event: E) -> None:
        node = self.node
        planned = event == E.PEER_HANDOVER
        reason = self.peer_handover_why or "hand-over"
        subject = (f"SBS hand-over ({reason}): {node.cfg.name} is now primary" if planned
                   else f"SBS failover: {node.cfg.name} is now primary")
        stamp = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
        kind = "handover" if planned else "failover"
        self.alerts.notice(kind, subject,
                           f"Node {node.cfg.name} took over from {old} at {stamp}.\n"
                           f"Old primary: {old}\nNew primary: {node.cfg.name}\n"
                           f"Epoch: {node.epoch}\nWhy: {why}"
                           + (f" ({reason}, planned)" if planned else " (failover)") +
                           f"\nSentinels started: {', '.join(node.sentinels.active) or 'none'}"
                           f"\n", key=f"takeover:{node.epoch}")

    # -- status ---------------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        now = time.monotonic()
        return {
            "maintenance": self.maintenance.on,
            "maintenance_switch": self.maintenance.status(),
            "lists": self.stamp.wire(),
            "alerts": self.alerts.status(),
            "health": {"restarts": self.node.cfg.health.restarts,
                       "window": self.node.cfg.health.window,
                       "sick_here": self.health.sick(now), "sick_on_peer": self.peer_sick,
                       "failures": {n: self.health.count(n, now)
                                    for n in sorted(self.last_failure)}},
        }

    def close(self) -> None:
        self.health.close()


def _with_folders(cfg: Config, new: Config) -> Config:
    from dataclasses import replace

    return replace(cfg, folders=new.folders, sentinels=new.sentinels)
