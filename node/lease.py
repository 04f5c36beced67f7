"""The leader lease in etcd ([cluster] dcs): a third vote, so a cut link never makes two
primaries.

The leader key (`[cluster] key`) holds the primary's name on the primary's own etcd lease. It
is taken with a create-if-absent transaction and kept alive every `loop_wait`; when the holder
stops renewing, etcd deletes it `ttl` later and a standby may take it. The term is the key's
create revision: it only grows, and every message and manifest carries it as the epoch.

The talking to etcd (HTTP to its /v3 JSON gateway, which may take up to `retry_timeout` per
request) runs in a thread, LeaseKeeper, reached only over an inproc PAIR: the node loop sends
what it wants ({"want": bool}, {"resign": true}, {"now": true}) and receives one JSON report
per cycle. Lease is the loop's side. A renewal counts from the moment its request left (our
monotonic clock), never from when the answer came, so `renewed_at + ttl` is never later than
etcd's own expiry.

What a report may claim: "mine" only for the lease the key was last seen on, so a lease
granted for a create whose answer never came is no licence (even while etcd cannot be read);
a report made before the keeper read the loop's resignation is dropped (a "gen" on each); and
a lease with no renewal confirmed for `ttl` is revoked, not kept alive: the keep-alives of a
node that cannot hear etcd's answers would hold the key for a primary whose sentinels the
guard has stopped, and the peer would never get it.
"""
from __future__ import annotations

import base64
import json
import logging
import math
import threading
import time
from typing import Any

import zmq

from .config import ClusterConfig
from .fsm import PRIMARY_LIKE, E, S

log = logging.getLogger("sbs.lease")

# A primary runs its sentinels until LEASE_SHARE of ttl after its last renewal (the guard's
# SIGTERM), and the guard SIGKILLs what is left LEASE_KILL_SHARE of ttl later: they are gone
# before etcd can hand the key to the peer.
LEASE_SHARE = 3 / 4
LEASE_KILL_SHARE = 1 / 8


class EtcdError(Exception):
    pass


class EtcdNotFound(EtcdError):
    """etcd answered 404: what was asked for (a lease to revoke) is not there."""


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def _unb64(text: str) -> str:
    return base64.b64decode(text).decode(errors="replace")


class Etcd:
    """The few calls of etcd's v3 JSON gateway the lease needs, over several endpoints."""

    def __init__(self, endpoints: tuple[tuple[str, int], ...], timeout: float):
        self.endpoints = list(endpoints)
        self.timeout = timeout
        self.good = 0  # the endpoint that answered last is tried first

    def call(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        # imported here: HTTP, ssl and email parsing cost a node ~5 MB, and only a node with
        # [cluster] dcs ever calls
        import urllib.error
        import urllib.request

        deadline = time.monotonic() + self.timeout
        errors = []
        for i in range(len(self.endpoints)):
            index = (self.good + i) % len(self.endpoints)
            host, port = self.endpoints[index]
            left = deadline - time.monotonic()
            if left <= 0:
                break
            request = urllib.request.Request(
                f"http://{host}:{port}/v3/{path}", data=json.dumps(body).encode(),
                headers={"Content-Type": "application/json"}, method="POST")
            try:
                with urllib.request.urlopen(request, timeout=left) as answer:
                    reply = json.loads(answer.read(1 << 20))
            except urllib.error.HTTPError as exc:
                if exc.code == 404:
                    raise EtcdNotFound(f"{host}:{port}: {path}: not found") from None
                errors.append(f"{host}:{port}: {exc}")
                continue
            except (OSError, ValueError) as exc:  # URLError, timeouts, refused, bad JSON
                errors.append(f"{host}:{port}: {getattr(exc, 'reason', exc)}")
                continue
            if not isinstance(reply, dict):
                errors.append(f"{host}:{port}: unexpected answer")
                continue
            self.good = index
            return reply
        raise EtcdError("; ".join(errors) or "no endpoint answered in time")

    def get(self, key: str) -> dict[str, Any] | None:
        kvs = self.call("kv/range", {"key": _b64(key)}).get("kvs") or []
        return kvs[0] if kvs else None

    def grant(self, ttl: int) -> str:
        lease = self.call("lease/grant", {"TTL": ttl}).get("ID")
        if not lease:
            raise EtcdError("lease grant without an ID")
        return str(lease)

    def keepalive(self, lease: str) -> int:
        """The lease's TTL after renewal; 0 when it has expired (or never existed)."""
        result = self.call("lease/keepalive", {"ID": lease}).get("result") or {}
        return int(result.get("TTL") or 0)

    def create(self, key: str, value: str, lease: str) -> bool:
        """Put key = value on `lease` only if the key does not exist."""
        reply = self.call("kv/txn", {
            "compare": [{"key": _b64(key), "target": "CREATE", "create_revision": "0"}],
            "success": [{"request_put": {"key": _b64(key), "value": _b64(value),
                                         "lease": lease}}],
        })
        return bool(reply.get("succeeded"))

    def revoke(self, lease: str) -> None:
        self.call("lease/revoke", {"ID": lease})


class LeaseKeeper(threading.Thread):
    """The thread that talks to etcd; see the module docstring."""

    def __init__(self, ctx: zmq.Context, address: str, cluster: ClusterConfig, name: str):
        super().__init__(name="sbs-lease", daemon=True)
        self.ctx, self.address, self.cluster, self.name = ctx, address, cluster, name
        self.etcd = Etcd(cluster.dcs, cluster.retry_timeout)
        self.want = False
        self.lease: str | None = None
        self.renewed_at: float | None = None
        self.held: str | None = None  # the lease the key was last seen on, ours
        self.unrevoked: str | None = None  # given up, but its revoke got no answer yet
        self.gen = 0  # the loop's, from its last resignation: stamped on every report

    def run(self) -> None:
        pipe = self.ctx.socket(zmq.PAIR)
        pipe.linger = 0
        pipe.connect(self.address)
        try:
            next_cycle = 0.0
            while True:
                wait = max(0.0, next_cycle - time.monotonic())
                if pipe.poll(wait * 1000):
                    command = json.loads(pipe.recv())
                    if command.get("stop"):
                        return
                    self.gen = int(command.get("gen", self.gen))
                    if command.get("resign"):
                        self._resign()
                    if "want" in command:
                        self.want = bool(command["want"])
                    if not command.get("now") and not command.get("resign"):
                        continue
                next_cycle = time.monotonic() + self.cluster.loop_wait
                pipe.send(json.dumps(self._cycle()).encode())
        finally:
            pipe.close()

    def _cycle(self) -> dict[str, Any]:
        report: dict[str, Any] = {"reachable": False, "holder": None, "term": None,
                                  "mine": False, "error": ""}
        try:
            self._revoke_again()
            if self.renewed_at is not None and time.monotonic() >= (
                    self.renewed_at + self.cluster.ttl):
                log.warning("lease %s: no renewal confirmed for ttl (%gs): giving it up",
                            self.lease, self.cluster.ttl)
                self._revoke()
            if self.lease is not None:
                sent = time.monotonic()
                if self.etcd.keepalive(self.lease) > 0:
                    self.renewed_at = sent
                else:
                    log.warning("lease %s expired in etcd", self.lease)
                    self.lease = self.renewed_at = None
            kv = self.etcd.get(self.cluster.key)
            if kv is None and self.want:
                if self.lease is None:
                    sent = time.monotonic()
                    self.lease = self.etcd.grant(math.ceil(self.cluster.ttl))
                    self.renewed_at = sent
                if self.etcd.create(self.cluster.key, self.name, self.lease):
                    log.info("took the leader key %s", self.cluster.key)
                kv = self.etcd.get(self.cluster.key)
            report["reachable"] = True
            if kv is not None:
                report["holder"] = _unb64(kv.get("value", ""))
                report["term"] = int(kv.get("create_revision", 0))
                report["mine"] = (report["holder"] == self.name and self.lease is not None
                                  and str(kv.get("lease")) == self.lease)
            self.held = self.lease if report["mine"] else None
            if self.lease is not None and not report["mine"]:
                self._revoke()  # a lease granted for a race we lost: let it go
        except (EtcdError, ValueError, TypeError) as exc:
            report["error"] = str(exc)[:500]
            report["mine"] = self.lease is not None and self.lease == self.held
        report["renewed_at"] = self.renewed_at if report["mine"] else None
        report["gen"] = self.gen
        return report

    def _resign(self) -> None:
        self.want = False
        self._revoke()

    def _revoke(self) -> None:
        lease, self.lease, self.renewed_at, self.held = self.lease, None, None, None
        if lease is not None:
            try:
                self.etcd.revoke(lease)  # deletes the key at once: the peer need not wait ttl
            except EtcdNotFound:
                pass
            except EtcdError as exc:
                log.warning("cannot revoke lease %s yet (tried again each cycle; it expires by "
                            "itself): %s", lease, exc)
                self.unrevoked = lease

    def _revoke_again(self) -> None:
        """An etcd that was down keeps a lease (and our key on it) for ttl once it is back; the
        peer gets the key as soon as our revoke is answered."""
        if self.unrevoked is not None:
            try:
                self.etcd.revoke(self.unrevoked)
            except EtcdNotFound:
                pass
            except EtcdError:
                return
            log.info("lease %s revoked (or gone) at last", self.unrevoked)
            self.unrevoked = None


class Lease:
    """The loop's view of the leader key, fed by LeaseKeeper's reports."""

    def __init__(self, ctx: zmq.Context, cluster: ClusterConfig, name: str, run_id: str):
        self.cluster, self.name = cluster, name
        self.pipe = ctx.socket(zmq.PAIR)
        self.pipe.linger = 0
        address = f"inproc://lease-{run_id}"
        self.pipe.bind(address)
        self.keeper = LeaseKeeper(ctx, address, cluster, name)
        self.reachable = False
        self.holder: str | None = None
        self.term: int | None = None
        self.mine = False
        self.renewed_at: float | None = None  # monotonic, of our last renewal that etcd took
        self.error = "no answer from etcd yet"
        self.heard_at: float | None = None
        self.wanted: bool | None = None
        self.hold_off_until = 0.0
        self.gen = 0  # bumped by resign(): the keeper's reports made before it are stale
        self._refused: tuple | None = None  # what stale() last logged
        self.keeper.start()

    # -- the loop asks
    def want(self, flag: bool) -> None:
        flag = flag and time.monotonic() >= self.hold_off_until
        if flag != self.wanted:
            self.wanted = flag
            self._send({"want": flag, "now": flag})

    def campaign_now(self) -> None:
        self.hold_off_until = 0.0
        self.wanted = True
        self._send({"want": True, "now": True})

    def resign(self, hold_off: float) -> None:
        """Give the key up now (the peer takes over) and do not ask for it for `hold_off`."""
        self.hold_off_until = time.monotonic() + hold_off
        self.wanted = False
        self.mine, self.renewed_at = False, None
        self.gen += 1
        self._send({"resign": True, "want": False, "gen": self.gen})

    def _send(self, command: dict[str, Any]) -> None:
        try:
            self.pipe.send(json.dumps(command).encode(), zmq.NOBLOCK)
        except zmq.Again:
            log.warning("lease thread busy: %s not sent", command)

    # -- the keeper reports
    def on_report(self, frames: list[bytes]) -> bool:
        """Take a report in; False when it is stale (made before our resignation reached the
        keeper: it may still call the key ours)."""
        report = json.loads(frames[0])
        if report.get("gen", 0) < self.gen:
            return False
        self.heard_at = time.monotonic()
        self.reachable, self.error = report["reachable"], report["error"]
        self.mine = report["mine"]  # the keeper's word even when etcd is silent
        if self.reachable:
            self.holder, self.term = report["holder"], report["term"]
        self.renewed_at = report["renewed_at"] if self.mine else None
        return True

    # -- what it means for the node
    def event(self, state: S) -> E | None:
        """The fsm event the latest report makes in `state`, if any."""
        if self.mine and state in (S.STARTING, S.SECONDARY):
            return E.LEASE_TAKEN
        if self.reachable and self.holder not in (None, self.name) and state in PRIMARY_LIKE:
            log.error("etcd says %s holds the leader key (term %s): this node is no longer "
                      "primary", self.holder, self.term)
            return E.LEASE_LOST
        return None

    def wish(self, state: S, *, starting_may_ask: bool) -> None:
        """Who asks etcd for the key: any primary or secondary; a starting node once its probe
        is over, or at once when it wins the rule against a starting peer (the rule prefers
        the node that was primary most recently, i.e. the most up to date)."""
        if state == S.STARTING:
            self.want(starting_may_ask)
        else:
            self.want(state in (S.SECONDARY, S.PRIMARY, S.HANDOVER, S.LEAVING))

    def stale(self, what: str, body: dict[str, Any]) -> bool:
        """A primary whose term is below the key's current one has lost its lease: refused."""
        if self.term and body["epoch"] < self.term:
            said = (what, body["name"], body["epoch"], self.term)
            if said != self._refused:  # once, not at every heartbeat of a peer that lags
                self._refused = said
                log.warning("refused %s from %s: term %d is older than the leader key's %d "
                            "(said once for this term)", *said)
            return True
        return False

    def valid_until(self) -> float | None:
        """Until when a primary may run its sentinels on this lease (monotonic), or None."""
        if not self.mine or self.renewed_at is None:
            return None
        return self.renewed_at + self.cluster.ttl * LEASE_SHARE

    def ok(self, now: float) -> bool:
        until = self.valid_until()
        return until is not None and now < until

    def status(self, now: float, *, lone_secondary: bool = False) -> dict[str, Any]:
        """What status shows; `lone_secondary`: we are secondary and miss the peer, so say why
        we do not take over."""
        until = self.valid_until()
        status = {
            "dcs": ",".join(f"{h}:{p}" for h, p in self.cluster.dcs),
            "key": self.cluster.key, "holder": self.holder, "term": self.term,
            "mine": self.mine, "reachable": self.reachable, "error": self.error,
            "time_left": None if until is None else round(max(0.0, until - now), 3),
            "ttl": self.cluster.ttl,
        }
        if lone_secondary:
            status["why_no_takeover"] = (
                f"peer unreachable, but {self.holder} holds the leader key: no takeover "
                "while its lease lives" if self.holder else
                "peer unreachable; the leader key is free: taking it" if self.reachable
                else "peer unreachable and etcd unreachable: no takeover without the key")
        return status

    def close(self) -> None:
        self._send({"stop": True})
        self.keeper.join(self.cluster.retry_timeout + 2)
        self.pipe.close()
