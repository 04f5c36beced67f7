"""The link between the nodes cut by a loopback proxy (tests/netproxy.py), both nodes alive:
half-open links, split brains, and what each node tells the operator (issue 11)."""
from __future__ import annotations

import time

from tests.pair import wait_for
from tests.test_e2e_replication import Bus, replication, started, tree, wait_equal, write


def smtp_email(port: int) -> dict:
    return {"enabled": "true", "smtp_server": "127.0.0.1", "smtp_port": port,
            "sender": "sbs@example.com", "receiver": "ops@example.com"}


def test_one_way_cut_shows_a_stall_and_heals_without_a_restart(make_pair, smtp):
    port, mail = smtp
    pair = started(make_pair(proxy=True, email=smtp_email(port)))
    src, dst = pair.folder("alpha"), pair.folder("beta")
    write(src / "before.txt", "before")
    wait_equal(src, dst)
    bus = Bus(pair.beta)
    try:
        pair.cut("beta", "alpha")  # beta's pings, acks and fetches are swallowed; alpha's pass
        cut_at = time.monotonic()
        for i in range(20):
            write(src / f"cut/{i}.txt", f"written during the cut {i}")
        dead_after = pair.beta.cfg.dead_after
        rep = wait_for(lambda: (r := replication(pair.beta)).get("stalled") and r, 2 * dead_after
                       + 2.0, f"beta to report a stall (log: {pair.beta.tail_log()})")
        # within 2 x dead_after of the cut (what the status poll itself takes is allowed for)
        assert time.monotonic() - cut_at < 2 * dead_after + 2.0
        assert rep["synced"] is False and pair.beta.state() == "secondary"
        wait_for(lambda: bus.seen("stall"), 10, "a stall event on beta's bus")
        wait_for(lambda: any("stalled" in m["Subject"] for m in mail.messages), 15,
                 "an email about the stall")
        assert pair.alpha.state() == "primary"
        pair.heal()
        wait_equal(src, dst, 30, "beta to catch up after the heal, without a restart")
        wait_for(lambda: (r := replication(pair.beta)).get("synced") and not r["stalled"]
                 and r["applied"] >= r["primary_seq"], 20, "beta in sync again")
    finally:
        bus.stop()
    want = tree(src)
    pair.alpha.kill()
    pair.beta.wait_state("primary", 15)
    assert tree(dst) == want  # nothing lost when the primary dies right after the heal
