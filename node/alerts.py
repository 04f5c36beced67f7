"""The alert registry: degraded states raised and resolved by a condition key, plus one-shot
notices (a takeover, a hand-over, a configuration adopted), all mailed through the Notifier.

A condition (`standby_lost`, `disk_full:docs`, `sentinel:printer`...) is raised once, however
often the code that watches it calls `raise_`, and resolved once; only an alert that was mailed
gets a "resolved" mail, so the operator never holds an open alert nobody closes. Mails about one
key are at least `rate_limit` seconds apart: a condition that flaps within that time is kept in
status and counted, and the next mail says how often it came and went. `[notify] kinds` picks
which kinds are mailed; every raise and resolve is logged and published on the bus either way.

Only the node loop calls this object; sending happens on the Notifier's worker thread.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .config import NotifyConfig
from .notify import Notifier

log = logging.getLogger("sbs.alerts")


@dataclass
class _Alert:
    kind: str
    subject: str
    since: float  # wall time, for people
    mailed: bool = False


class Alerts:
    def __init__(self, notifier: Notifier, node: str, cfg: NotifyConfig, *,
                 publish: Callable[..., None] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.notifier, self.node, self.cfg = notifier, node, cfg
        self._publish = publish or (lambda *a, **k: None)
        self._clock = clock
        self._active: dict[str, _Alert] = {}
        self._last_mail: dict[str, float] = {}  # key -> monotonic time of its last mail
        self._flaps: dict[str, int] = {}  # key -> raises not mailed since its last mail

    def reconfigure(self, notifier: Notifier, cfg: NotifyConfig) -> None:
        self.notifier, self.cfg = notifier, cfg

    # -- conditions ----------------------------------------------------------------------------

    def raise_(self, key: str, kind: str, subject: str, body: str = "") -> None:
        """The condition `key` holds. Only its first raise (until resolved) does anything."""
        if key in self._active:
            return
        alert = self._active[key] = _Alert(kind, subject, time.time())
        log.warning("ALERT %s: %s", key, subject)
        self._publish("alert", key=key, kind=kind, alert="raised", subject=subject)
        alert.mailed = self._mail(key, kind, f"SBS ALERT {self.node}: {subject}", body)

    def resolve(self, key: str, body: str = "") -> None:
        """The condition `key` is over (nothing happens if it was not raised)."""
        alert = self._active.pop(key, None)
        if alert is None:
            return
        log.info("resolved %s: %s", key, alert.subject)
        self._publish("alert", key=key, kind=alert.kind, alert="resolved", subject=alert.subject)
        if alert.mailed:
            # the operator heard of it, so they hear of its end, whatever the rate limit says
            self._send(key, alert.kind, f"SBS resolved {self.node}: {alert.subject}",
                       body or f"The condition reported at {_clock(alert.since)} is over.\n")

    def resolve_prefix(self, prefix: str, keep: set[str] | frozenset[str] = frozenset()) -> None:
        """Resolve every active key starting with `prefix` that is not in `keep`."""
        for key in [k for k in self._active if k.startswith(prefix) and k not in keep]:
            self.resolve(key)

    def is_active(self, key: str) -> bool:
        return key in self._active

    # -- one-shot notices ----------------------------------------------------------------------

    def notice(self, kind: str, subject: str, body: str, *, key: str | None = None) -> None:
        """Something happened (no "resolved" will follow): mailed as `subject`, rate-limited
        by `key`."""
        key = key or kind
        log.info("notice %s: %s", key, subject)
        self._mail(key, kind, subject, body)

    def status(self) -> list[dict[str, Any]]:
        return [{"key": k, "kind": a.kind, "subject": a.subject, "since": a.since,
                 "mailed": a.mailed} for k, a in sorted(self._active.items())]

    # -- mail ----------------------------------------------------------------------------------

    def _mail(self, key: str, kind: str, subject: str, body: str) -> bool:
        if kind not in self.cfg.kinds:
            log.debug("not mailed ([notify] kinds has no %s): %s", kind, subject)
            return False
        last = self._last_mail.get(key)
        if last is not None and self._clock() - last < self.cfg.rate_limit:
            self._flaps[key] = self._flaps.get(key, 0) + 1
            log.info("not mailed (last mail about %s %.0fs ago, rate_limit %.0fs): %s", key,
                     self._clock() - last, self.cfg.rate_limit, subject)
            return False
        flaps = self._flaps.pop(key, 0)
        if flaps:
            body += (f"\n(This condition also came and went {flaps} time(s) since the last "
                     f"mail about it, within [notify] rate_limit.)\n")
        self._send(key, kind, subject, body)
        return True

    def _send(self, key: str, kind: str, subject: str, body: str) -> None:
        self._last_mail[key] = self._clock()
        stamp = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
        self.notifier.send(subject, f"{body.rstrip()}\n\nNode: {self.node}\nTime: {stamp}\n"
                                    f"Kind: {kind}\nCondition: {key}\n")


def _clock(wall: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(wall))
