"""Failover notifications through apprise: the [email] SMTP server plus any other apprise URLs.

send() never blocks the node loop (SPEC 10): one worker thread delivers from a queue, retries
with backoff, and only logs and counts a failure. send_now() is the blocking variant for
`sbs-tools test-email`, and says why a delivery failed.

apprise is imported when a notification is first delivered (or an extra apprise URL has to be
described), not with the node: it and the plugins it loads cost a node ~12 MB and ~0.1 s of
start-up for mail that most runs never send.
"""

from __future__ import annotations

import logging
import queue
import socket
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING
from urllib.parse import quote, urlencode

from .config import EmailConfig
from .names import shown

if TYPE_CHECKING:
    import apprise

log = logging.getLogger(__name__)

DISABLED = "email is disabled in [email]"
_STOP = object()  # queued by close(): the worker ends when it reaches it
# 2**10 times the backoff is far beyond any sensible retry count; keeps the float finite.
_MAX_EXPONENT = 10


def mail_urls(email: EmailConfig, *, timeout: float | None = None) -> list[str]:
    """The apprise URLs for `email`: the SMTP server (only when enabled), then the extra urls.

    `timeout` becomes apprise's `cto`, which the mailto plugin hands to smtplib as the socket
    timeout, so it bounds the connect and every later read (apprise's own default is 15 s).
    """
    urls = [_smtp_url(email, timeout)] if email.enabled else []
    urls.extend(url for url in email.urls if url.strip())
    return urls


def _smtp_url(email: EmailConfig, timeout: float | None) -> str:
    if email.secure:
        # secure = true means TLS: implicit TLS on the SMTPS port, STARTTLS anywhere else.
        scheme, mode = "mailtos", "ssl" if email.smtp_port == 465 else "starttls"
    else:
        # Explicit, or apprise would pick STARTTLS for a URL that looks secure.
        scheme, mode = "mailto", "insecure"
    auth = ""
    if email.user:
        # safe="" quotes '@', ':' and '/' too, which apprise would otherwise read as delimiters.
        auth = quote(email.user, safe="")
        if email.password:
            auth += ":" + quote(email.password, safe="")
        auth += "@"
    host = f"[{email.smtp_server}]" if ":" in email.smtp_server else email.smtp_server
    query = {
        "from": email.sender,
        "to": email.receiver,
        # An explicit smtp= stops apprise from swapping in the host, port and mode of a
        # well-known provider that it guesses from the user name (gmail.com and the like).
        "smtp": email.smtp_server,
        "mode": mode,
    }
    if timeout is not None:
        query["cto"] = f"{timeout:g}"
    return f"{scheme}://{auth}{host}:{email.smtp_port}?{urlencode(query, quote_via=quote)}"


@dataclass(frozen=True)
class _Target:
    url: str
    label: str  # for people: names the server, never the password
    smtp: tuple[str, int] | None = None  # set for the [email] SMTP server


@dataclass(frozen=True)
class _Message:
    subject: str
    body: str


class Notifier:
    """Delivers notifications to every configured target; see the module docstring."""

    def __init__(self, email: EmailConfig, *, retries: int = 3, backoff: float = 1.0,
                 timeout: float = 10.0) -> None:
        self._retries = retries  # retries after the first attempt
        self._backoff = backoff
        self._timeout = timeout
        urls = mail_urls(email, timeout=timeout)
        self._targets: list[_Target] = []
        if email.enabled:  # described by us, so apprise is not loaded for it
            self._targets.append(_Target(
                urls.pop(0),
                f"SMTP server {email.smtp_server}:{email.smtp_port} "
                f"({'TLS' if email.secure else 'plain'})",
                (email.smtp_server, email.smtp_port),
            ))
        self._targets.extend(_describe(url) for url in urls)
        self._asset: apprise.AppriseAsset | None = None  # made with the first delivery
        self._queue: queue.Queue = queue.Queue()
        self._closing = threading.Event()
        self._lock = threading.Lock()  # guards the counters below and _worker
        self._worker: threading.Thread | None = None
        self._sent = 0
        self._failed = 0
        self._pending = 0
        self._last_error: str | None = None
        self._last_sent_at: str | None = None

    @property
    def enabled(self) -> bool:
        return bool(self._targets)

    def send(self, subject: str, body: str) -> None:
        """Queue a notification and return at once; the worker thread delivers it."""
        if not self._targets:
            log.debug("notification not sent (%s): %s", DISABLED, subject)
            return
        with self._lock:
            if self._closing.is_set():
                log.warning("notifier is closed, notification dropped: %s", subject)
                return
            self._pending += 1
            if self._worker is None:
                self._worker = threading.Thread(target=self._work, name="sbs-notify",
                                                daemon=True)
                self._worker.start()
            # Under the lock, so it cannot land behind the stop marker that close() queues.
            # a file name that is not UTF-8 is written \xNN (node/names.py): SMTP takes text
            self._queue.put(_Message(shown(subject), shown(body)))

    def send_now(self, subject: str, body: str) -> tuple[bool, str]:
        """Deliver once to every target, blocking: (delivered to all?, a message for people)."""
        if not self._targets:
            return False, DISABLED
        errors = self._attempt(self._targets, _Message(shown(subject), shown(body)))
        self._record(errors)
        if not errors:
            return True, "delivered to " + ", ".join(t.label for t in self._targets)
        return False, "; ".join(f"{t.label}: {error}" for t, error in errors.items())

    def status(self) -> dict:
        with self._lock:
            return {
                "enabled": self.enabled,
                "sent": self._sent,
                "failed": self._failed,
                "pending": self._pending,
                "last_error": self._last_error,
                "last_sent_at": self._last_sent_at,
            }

    def close(self, timeout: float = 5.0) -> None:
        """Stop the worker. What is queued gets one more attempt but no further retries."""
        with self._lock:
            self._closing.set()
            worker = self._worker
        if worker is None:
            return
        self._queue.put(_STOP)
        worker.join(timeout)
        if worker.is_alive():
            log.warning("notification worker still busy after %.1f s; left behind", timeout)

    # -- the worker ----------------------------------------------------------------------------

    def _work(self) -> None:
        while (item := self._queue.get()) is not _STOP:
            try:
                self._deliver(item)
            except Exception:  # the worker must survive anything a plugin throws
                log.exception("notification %r failed unexpectedly", item.subject)
                self._record({self._targets[0]: "internal error (see log)"})
            finally:
                with self._lock:
                    self._pending -= 1

    def _deliver(self, message: _Message) -> None:
        """Try every target, then retry the ones that failed, with doubling waits. A target that
        took the message is not sent it again."""
        remaining = list(self._targets)
        errors: dict[_Target, str] = {}
        for attempt in range(self._retries + 1):
            if attempt:
                delay = self._backoff * 2 ** min(attempt - 1, _MAX_EXPONENT)
                if self._closing.wait(delay):
                    break  # closing: no more waiting
            errors = self._attempt(remaining, message)
            if not errors:
                break
            remaining = list(errors)
            log.warning("notification %r, attempt %d of %d failed: %s", message.subject,
                        attempt + 1, self._retries + 1, _join(errors))
        self._record(errors, message.subject)

    def _record(self, errors: dict[_Target, str], subject: str | None = None) -> None:
        with self._lock:
            if errors:
                self._failed += 1
                self._last_error = _join(errors)
            else:
                self._sent += 1
                self._last_sent_at = datetime.now(UTC).isoformat(timespec="seconds")
        if subject is None:
            return
        if errors:
            log.error("notification %r not delivered: %s", subject, _join(errors))
        else:
            log.info("notification %r delivered", subject)

    # -- one attempt ---------------------------------------------------------------------------

    def _attempt(self, targets: list[_Target], message: _Message) -> dict[_Target, str]:
        """One delivery to each target; returns the ones that failed, with the reason."""
        errors = {}
        for target in targets:
            error = self._attempt_one(target, message)
            if error is not None:
                errors[target] = error
        return errors

    def _attempt_one(self, target: _Target, message: _Message) -> str | None:
        import apprise

        if self._asset is None:
            # Delivery runs in the calling thread: apprise's own thread pools are process-wide
            # and their threads never end, and our worker already keeps the node loop free.
            self._asset = apprise.AppriseAsset(async_mode=False, service_timeout=0)
        notifier = apprise.Apprise(asset=self._asset)
        if not notifier.add(target.url):
            return "not a valid apprise URL"
        started = time.monotonic()
        try:
            result = notifier.notify(body=message.body, title=message.subject,
                                     body_format=apprise.NotifyFormat.TEXT)
        except Exception as exc:  # a plugin bug must not look like success or kill the worker
            return f"apprise failed: {exc!r}"
        if result:
            return None
        said = "; ".join(entry.message for entry in result.logs()) or "delivery failed"
        if target.smtp is None:
            return said
        return self._smtp_reason(target.smtp, time.monotonic() - started, said)

    def _smtp_reason(self, server: tuple[str, int], elapsed: float, said: str) -> str:
        """apprise keeps the socket error at debug level; find out what went wrong ourselves."""
        if elapsed >= 0.9 * self._timeout:
            return f"no answer within {self._timeout:g} s"
        try:
            with socket.create_connection(server, timeout=max(0.5, self._timeout - elapsed)):
                pass
        except OSError as exc:
            return f"cannot connect: {exc.strerror or str(exc) or type(exc).__name__}"
        return (f"connected, but the SMTP session failed ({said}); "
                "check secure, user, password, sender and receiver")


def _describe(url: str) -> _Target:
    import apprise

    service = apprise.Apprise.instantiate(url)
    if service is None:
        return _Target(url, url.split("://", 1)[0] + "://… (invalid URL)")
    # The query holds apprise's defaults (method=POST&overflow=...): noise in a message.
    return _Target(url, service.url(privacy=True).split("?", 1)[0])


def _join(errors: dict[_Target, str]) -> str:
    return "; ".join(f"{target.label}: {error}" for target, error in errors.items())
