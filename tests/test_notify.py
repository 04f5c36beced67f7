"""Notifier against a real SMTP server (aiosmtpd on loopback) and real closed or mute ports."""

from __future__ import annotations

import threading
import time
from datetime import datetime

import apprise
import pytest
from sbs.node.config import EmailConfig
from sbs.node.notify import Notifier, mail_urls

from tests.conftest import free_port


def wait_for(condition, timeout: float = 5.0, interval: float = 0.02):
    deadline = time.monotonic() + timeout
    while not (result := condition()):
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        time.sleep(interval)
    return result


@pytest.fixture
def closed_port() -> int:
    return free_port()  # nothing listens there any more: connection refused


@pytest.fixture
def make():
    """Builds Notifiers and closes them after the test; fails if a worker thread is left."""
    created: list[Notifier] = []

    def factory(port: int | None = None, **kwargs) -> Notifier:
        config = kwargs.pop("config", None) or EmailConfig(
            enabled=True, smtp_server="127.0.0.1", smtp_port=port,
            sender="sbs@example.com", receiver="ops@example.com",
        )
        kwargs.setdefault("timeout", 2.0)
        notifier = Notifier(config, **kwargs)
        created.append(notifier)
        return notifier

    yield factory
    for notifier in created:
        notifier.close(timeout=5.0)
    assert not [t for t in threading.enumerate() if t.name == "sbs-notify"]


def text_of(message) -> str:
    return message.get_body(preferencelist=("plain",)).get_content()


def test_send_delivers_subject_and_body(make, smtp):
    port, collector = smtp
    notifier = make(port)
    notifier.send("SBS: beta took over", "alpha stopped answering.\nbeta is primary, epoch 7.")
    wait_for(lambda: notifier.status()["sent"] == 1)

    [message] = collector.messages
    assert message["Subject"] == "SBS: beta took over"
    assert message["From"] == "sbs@example.com"
    assert message["To"] == "ops@example.com"
    assert "beta is primary, epoch 7." in text_of(message)
    assert collector.envelopes[0].rcpt_tos == ["ops@example.com"]
    status = notifier.status()
    assert status | {"last_sent_at": None} == {
        "enabled": True, "sent": 1, "failed": 0, "pending": 0, "last_error": None,
        "last_sent_at": None,
    }
    assert datetime.fromisoformat(status["last_sent_at"]).tzinfo is not None


def test_send_now_delivers_and_says_where(make, smtp):
    port, collector = smtp
    ok, message = make(port).send_now("SBS test", "This is a test notification.")
    assert ok, message
    assert f"127.0.0.1:{port}" in message
    assert text_of(collector.messages[0]).strip() == "This is a test notification."


def test_unreachable_server_fails_fast_and_never_blocks(make, closed_port):
    notifier = make(closed_port, retries=2, backoff=0.05, timeout=2.0)
    started = time.monotonic()
    ok, message = notifier.send_now("SBS test", "body")
    assert time.monotonic() - started < 2.0
    assert not ok
    assert f"127.0.0.1:{closed_port}" in message and "refused" in message.lower()

    notifier.send("SBS: failover", "body")  # never blocks: see the hung server below
    status = wait_for(lambda: (s := notifier.status())["failed"] == 2 and s)  # send_now + send
    assert status["sent"] == 0 and status["pending"] == 0
    assert "refused" in status["last_error"].lower()


def test_hung_server_times_out_within_timeout(make, mute_port):
    """send() returns long before a delivery to a server that never answers could end (a
    blocking send would take the whole timeout); send_now() waits that timeout, no longer."""
    notifier = make(mute_port, retries=0, timeout=2.0)
    started = time.monotonic()
    notifier.send("SBS: failover", "body")
    assert time.monotonic() - started < 1.0

    started = time.monotonic()
    ok, message = notifier.send_now("SBS test", "body")
    elapsed = time.monotonic() - started
    assert not ok
    # the timeout, plus apprise's first load of its plugins (seconds on a loaded machine);
    # without our timeout apprise would wait 15 s
    assert 1.9 < elapsed < 8.0
    assert "no answer within 2 s" in message
    wait_for(lambda: notifier.status()["failed"] == 2)


def test_retries_only_the_targets_that_failed(make, smtp, closed_port):
    port, collector = smtp
    config = EmailConfig(enabled=True, smtp_server="127.0.0.1", smtp_port=port,
                         urls=(f"json://127.0.0.1:{closed_port}/",))
    notifier = make(config=config, retries=2, backoff=0.05)
    notifier.send("SBS: failover", "body")
    status = wait_for(lambda: (s := notifier.status())["failed"] == 1 and s)
    assert len(collector.messages) == 1  # the SMTP server got it once, not once per retry
    assert f"json://127.0.0.1:{closed_port}" in status["last_error"]
    assert "SMTP server" not in status["last_error"]


def test_disabled_is_a_no_op(make):
    notifier = make(config=EmailConfig())
    notifier.send("SBS: failover", "body")
    assert notifier.send_now("SBS test", "body") == (False, "email is disabled in [email]")
    assert notifier.status() == {"enabled": False, "sent": 0, "failed": 0, "pending": 0,
                                 "last_error": None, "last_sent_at": None}
    assert not [t for t in threading.enumerate() if t.name == "sbs-notify"]


def test_close_stops_the_worker_and_later_sends_are_dropped(make, smtp):
    port, collector = smtp
    notifier = make(port)
    notifier.send("one", "body")
    notifier.close()
    assert not [t for t in threading.enumerate() if t.name == "sbs-notify"]
    assert notifier.status()["sent"] == 1  # queued before close: still delivered
    notifier.send("two", "body")
    assert notifier.status()["pending"] == 0
    assert [m["Subject"] for m in collector.messages] == ["one"]


def test_mail_urls_plain():
    config = EmailConfig(enabled=True, smtp_server="127.0.0.1", smtp_port=2525,
                         sender="sbs@example.com", receiver="ops@example.com",
                         urls=("json://hooks.example.com/sbs",))
    assert mail_urls(config) == [
        "mailto://127.0.0.1:2525?from=sbs%40example.com&to=ops%40example.com"
        "&smtp=127.0.0.1&mode=insecure",
        "json://hooks.example.com/sbs",
    ]
    service = apprise.Apprise.instantiate(mail_urls(config, timeout=3)[0])
    assert (service.secure, service.secure_mode) == (False, "insecure")
    assert service.socket_connect_timeout == 3.0
    assert mail_urls(EmailConfig(urls=("json://h/",))) == ["json://h/"]  # SMTP off, extras on


@pytest.mark.parametrize(("port", "mode"), [(587, "starttls"), (465, "ssl")])
def test_mail_urls_secure_with_credentials(port, mode):
    user, password = "ops+sbs@example.com", "p@ss:/w?#%&+ x"
    config = EmailConfig(enabled=True, smtp_server="smtp.gmail.com", smtp_port=port,
                         sender="sbs@example.com", receiver="a@example.com, b@example.com",
                         secure=True, user=user, password=password)
    [url] = mail_urls(config)
    assert url.startswith("mailtos://ops%2Bsbs%40example.com:p%40ss%3A%2Fw%3F%23%25%26%2B%20x@")
    service = apprise.Apprise.instantiate(url)
    assert (service.user, service.password) == (user, password)
    assert (service.smtp_host, service.port, service.secure_mode) == ("smtp.gmail.com", port, mode)
    assert [t[1] for t in service.targets] == ["a@example.com", "b@example.com"]


def test_apprise_is_loaded_with_the_first_mail_not_with_the_node(smtp, tmp_path):
    """A node carries no apprise (and its plugins: ~12 MB) until it has mail to deliver; the
    first delivery loads it and still arrives."""
    import subprocess
    import sys

    port, collector = smtp
    script = f"""
import sys
import sbs.node.cli, sbs.node.node
from sbs.node.config import EmailConfig
from sbs.node.notify import Notifier
n = Notifier(EmailConfig(enabled=True, smtp_server="127.0.0.1", smtp_port={port},
                         sender="sbs@example.com", receiver="ops@example.com"), timeout=5.0)
before = "apprise" in sys.modules
ok, said = n.send_now("SBS: lazy", "body")
print(before, ok, "apprise" in sys.modules, said)
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=60, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split()[:3] == ["False", "True", "True"], done.stdout
    wait_for(lambda: collector.messages, timeout=10)
    assert collector.messages[0]["Subject"] == "SBS: lazy"
