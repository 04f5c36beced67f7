"""Shared fixtures: real node pairs on 127.0.0.1/127.0.0.2, stopped after each test."""
from __future__ import annotations

import email
import socket
import threading
from email.policy import default as default_policy

import pytest
from aiosmtpd.controller import Controller

from tests.pair import Pair, free_port


class Collector:
    """aiosmtpd handler that keeps every message it receives."""

    def __init__(self) -> None:
        self.messages: list[email.message.EmailMessage] = []
        self.envelopes = []

    async def handle_DATA(self, server, session, envelope):
        self.envelopes.append(envelope)
        self.messages.append(email.message_from_bytes(envelope.content, policy=default_policy))
        return "250 Message accepted"


@pytest.fixture
def smtp():
    """A real SMTP server on loopback: (port, collector)."""
    collector = Collector()
    port = free_port()
    controller = Controller(collector, hostname="127.0.0.1", port=port)
    controller.start()
    yield port, collector
    controller.stop()


@pytest.fixture
def make_pair(tmp_path):
    """make_pair(**config) -> Pair; config sections as dicts, per-node under alpha=/beta=."""
    pairs: list[Pair] = []

    def make(**config) -> Pair:
        pair = Pair(tmp_path / f"pair{len(pairs)}", **config)
        pairs.append(pair)
        return pair

    yield make
    for pair in pairs:
        pair.stop()


@pytest.fixture
def mute_port():
    """Accepts TCP connections (kernel backlog) but never says a word: a hung SMTP server."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(8)
        yield sock.getsockname()[1]


@pytest.fixture(autouse=True)
def no_thread_leak():
    """Fail a test that leaves a thread of ours running (watchdog's conftest does the same)."""
    before = set(threading.enumerate())
    yield
    leaked = [t for t in threading.enumerate() if t not in before and t.is_alive()
              and t.name.startswith("sbs-")]
    for t in leaked:
        t.join(2)
    leaked = [t for t in leaked if t.is_alive()]
    assert not leaked, f"leaked threads: {[t.name for t in leaked]}"
