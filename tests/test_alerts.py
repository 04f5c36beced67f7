"""The alert registry against a real SMTP server: one mail per condition and one "resolved",
rate-limited per condition, kinds chosen by [notify]."""
from __future__ import annotations

import pytest
from sbs.node.alerts import Alerts
from sbs.node.config import NOTIFY_KINDS, ConfigError, EmailConfig, NotifyConfig, load
from sbs.node.notify import Notifier

from tests.pair import wait_for


class Clock:
    """The registry's monotonic clock, moved by the test (rate limits of minutes)."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def registry(smtp):
    port, collector = smtp
    made: list[Notifier] = []

    def make(**notify) -> tuple[Alerts, Clock, list]:
        notifier = Notifier(EmailConfig(enabled=True, smtp_server="127.0.0.1", smtp_port=port),
                            timeout=5.0)
        made.append(notifier)
        clock = Clock()
        events: list[dict] = []
        alerts = Alerts(notifier, "alpha", NotifyConfig(**notify), clock=clock,
                        publish=lambda event, **f: events.append({"event": event, **f}))
        return alerts, clock, events

    yield make, collector
    for notifier in made:
        notifier.close()


def subjects(collector) -> list[str]:
    return [m["subject"] for m in collector.messages]


def test_one_mail_per_condition_and_one_resolved(registry):
    make, inbox = registry
    alerts, _, events = make()
    for _ in range(3):
        alerts.raise_("standby_lost", "standby", "no standby", "beta is gone")
    assert alerts.is_active("standby_lost") and len(alerts.status()) == 1
    wait_for(lambda: inbox.messages, 10, "the alert")
    alerts.resolve("standby_lost")
    alerts.resolve("standby_lost")
    wait_for(lambda: len(inbox.messages) >= 2, 10, "the resolved mail")
    alerts.notice("config", "SBS configuration adopted by alpha", "generation 2")
    wait_for(lambda: len(inbox.messages) >= 3, 10, "the notice")
    assert subjects(inbox) == ["SBS ALERT alpha: no standby", "SBS resolved alpha: no standby",
                               "SBS configuration adopted by alpha"]
    body = inbox.messages[0].get_body(("plain",)).get_content()
    assert "beta is gone" in body and "Condition: standby_lost" in body
    assert [e["alert"] for e in events] == ["raised", "resolved"]
    assert not alerts.status()


def test_a_flapping_condition_is_rate_limited_and_counted(registry):
    make, inbox = registry
    alerts, clock, _ = make(rate_limit=300)
    alerts.raise_("lag", "lag", "standby beta lags behind")
    alerts.resolve("lag")
    wait_for(lambda: len(inbox.messages) >= 2, 10, "alert and resolved")
    for _ in range(2):  # comes and goes twice within the rate limit: no mail
        clock.now += 10
        alerts.raise_("lag", "lag", "standby beta lags behind")
        assert alerts.is_active("lag")
        alerts.resolve("lag")
    clock.now += 300
    alerts.raise_("lag", "lag", "standby beta lags behind")
    wait_for(lambda: len(inbox.messages) >= 3, 10, "the next alert after the rate limit")
    assert subjects(inbox) == ["SBS ALERT alpha: standby beta lags behind",
                               "SBS resolved alpha: standby beta lags behind",
                               "SBS ALERT alpha: standby beta lags behind"]
    body = inbox.messages[2].get_body(("plain",)).get_content()
    assert "came and went 2 time(s)" in body
    # another condition is not held back by this one's limit
    alerts.raise_("disk_full", "disk", "disk full on beta")
    wait_for(lambda: len(inbox.messages) >= 4, 10, "a different condition")


def test_kinds_choose_what_is_mailed(registry):
    make, inbox = registry
    alerts, _, events = make(kinds=frozenset({"failover"}))
    alerts.raise_("standby_lost", "standby", "no standby")
    alerts.resolve("standby_lost")
    alerts.notice("failover", "SBS failover: alpha is now primary", "beta died")
    wait_for(lambda: inbox.messages, 10, "the failover mail")
    assert subjects(inbox) == ["SBS failover: alpha is now primary"]
    assert [e["alert"] for e in events] == ["raised", "resolved"]  # the bus hears of all


def test_notify_section(tmp_path):
    ini = tmp_path / "sbs.ini"
    base = "[node]\nlocal = 127.0.0.1\npeer = 127.0.0.2\n[security]\ncurve = false\n"
    ini.write_text(base + "[notify]\nkinds = failover, standby\nlag_after = 30\n")
    cfg = load(ini)
    assert cfg.notify.kinds == {"failover", "standby"} and cfg.notify.lag_after == 30
    ini.write_text(base)
    assert load(ini).notify.kinds == set(NOTIFY_KINDS)
    ini.write_text(base + "[notify]\nkinds = failover paging\n")
    with pytest.raises(ConfigError, match=r"\[notify\] kinds: unknown kind\(s\) paging"):
        load(ini)
    ini.write_text(base + "[health]\nrestarts = 3\nwindow = 60\n[checks]\nweb = true\n")
    cfg = load(ini)
    assert cfg.health.restarts == 3 and cfg.health.checks == (("web", "true"),)
