"""The operator's pair: maintenance, alerts, sentinel health and the hand-over it asks for.

One object beside the node loop, called from a few hooks: what the node adds to its PING
(`peer_fields`), what it makes of the peer's (`on_peer`), the tool commands RELOAD and
MAINTENANCE (`commands`), a `tick`, the sentinel and sync events, and its part of status. It
owns the alert registry (node/alerts.py), the maintenance record (node/maintenance.py), the
sentinel health counts (node/health.py) and the ListSync (node/listsync.py): reload and the
pair's lists, with the peer's LISTS.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from . import protocol
from .alerts import Alerts
from .fsm import PRIMARY_LIKE, E, S
from .health import Health
from .listsync import ListSync
from .maintenance import Maintenance
from .maintenance import from_wire as maint_from_wire

if TYPE_CHECKING:
    from .node import Node

log = logging.getLogger("sbs.ops")

# a sentinel counts as recovered once it has run this long without a failure (seconds)
SENTINEL_STABLE = 10.0
# a primary without a live secondary for this long (seconds) raises "standby lost" even if it
# never had one this run (started alone)
ALONE_AFTER = 60.0


class Operator:
    def __init__(self, node: Node) -> None:
        self.node = node
        cfg = node.cfg
        self.maintenance = Maintenance(node.state_dir, cfg.name, node.writes)
        self.alerts = Alerts(node.notifier, cfg.name, cfg.notify, publish=node.publish_event)
        self.health = Health(cfg.health)
        self.handover_why = ""  # why our next HANDOVER is sent (its mail tells planned apart)
        self.peer_handover_why = ""  # why the peer's HANDOVER came
        self.unhealthy = ""  # the sentinel our current hand-over moves, for the log and mail
        self.peer_sick: list[str] = []
        self.peer_unreplicable: dict[str, Any] | None = None  # the primary's, from its PINGs
        self.last_failure: dict[str, float] = {}
        self.primary_since: float | None = None
        self.standby_since: float | None = None  # primary: monotonic, since a standby is there
        self.in_sync_at: float | None = None  # primary: monotonic, the standby last had it all
        self.listsync = ListSync(self)

    # -- the pair's settings in every PING ------------------------------------------------------

    def peer_fields(self) -> dict[str, Any]:
        unrepl = self.node.primary.unreplicable() if self.node.state in PRIMARY_LIKE else None
        return {"maint": self.maintenance.record.wire(), "lists": self.listsync.stamp.wire(),
                "sick": self.health.sick(time.monotonic())[:100],
                **({"unrepl": unrepl} if unrepl else {})}

    def on_peer(self, body: dict[str, Any]) -> None:
        """The peer's PING/PONG (already taken by node.peer): adopt its newer maintenance
        switch, remember where sentinels failed, and compare the pair's lists (ListSync)."""
        node = self.node
        peer = body["name"]
        if "maint" in body and (rec := maint_from_wire(body["maint"])) is not None:
            if self.maintenance.offer(rec, peer):
                node.publish_event("maintenance", on=rec.on, by=rec.by, at=rec.at)
        self.peer_sick = list(body.get("sick") or [])
        u = body.get("unrepl")  # the schema's fields only, on to our status
        self.peer_unreplicable = {k: u[k] for k in ("count", "names", "capped")} if u else None
        self.listsync.on_peer(body)

    # -- commands -------------------------------------------------------------------------------

    def commands(self) -> dict[str, Callable[[bytes, dict[str, Any]], None]]:
        """The operator's commands this room answers (Control's table takes them)."""
        return {"RELOAD": self.listsync.on_reload, "MAINTENANCE": self.on_maintenance}

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
        """A sentinel's event: its health here, and the bus. Sentinels reports {"event",
        "name", ...}: both keys are taken on the bus (the event kind and the node name), so
        they travel as `action` and `sentinel`."""
        self._sentinel_health_event(event)
        fields = dict(event)
        self.node.publish_event("sentinel", action=fields.pop("event"),
                                sentinel=fields.pop("name"), **fields)

    def _sentinel_health_event(self, event: dict[str, Any]) -> None:
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
            "lists": self.listsync.stamp.wire(),
            "alerts": self.alerts.status(),
            "health": {"restarts": self.node.cfg.health.restarts,
                       "window": self.node.cfg.health.window,
                       "sick_here": self.health.sick(now), "sick_on_peer": self.peer_sick,
                       "failures": {n: self.health.count(n, now)
                                    for n in sorted(self.last_failure)}},
        }

    def close(self) -> None:
        self.health.close()
