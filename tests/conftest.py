"""Shared fixtures: real node pairs on 127.0.0.1/127.0.0.2, stopped after each test."""
from __future__ import annotations

import threading

import pytest

from tests.pair import Pair


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
