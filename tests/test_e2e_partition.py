"""The link between the nodes cut by a loopback proxy (tests/netproxy.py), both nodes alive:
half-open links, split brains, and what each node tells the operator (issue 11)."""
from __future__ import annotations

import os
import signal
import time

import orjson
import pytest

from tests.pair import wait_for
from tests.test_e2e_replication import (
    Bus,
    conflicts,
    replication,
    sbs_tools,
    started,
    tree,
    wait_equal,
    write,
)


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
        rep = wait_for(lambda: (r := replication(pair.beta)).get("stalled") and r, 15,
                       "beta to report a stall")
        # within 2 x dead_after of the cut, by beta's own count of how long it has been
        # stalled (what the status polls take on a loaded machine is not counted)
        stalled_at = time.monotonic() - rep["stalled_for"]
        assert stalled_at - cut_at < 2 * dead_after + 2.0, (stalled_at - cut_at, rep)
        assert rep["synced"] is False and pair.beta.state() == "secondary"
        log = pair.beta.log.read_text(errors="replace")
        assert f"replication stalled: {rep['stalled']}" in log, pair.beta.tail_log()
        assert f"reconnecting to {pair.beta.cfg.peer}" in log, pair.beta.tail_log()
        shown = " ".join(sbs_tools("status", "--config", str(pair.beta.config)).stdout.split())
        assert "replication stalled" in shown, shown
        wait_for(lambda: bus.seen("stall"), 10, "a stall event on beta's bus")
        wait_for(lambda: any("stalled" in m["Subject"] for m in mail.messages), 15,
                 "an email about the stall")
        # the primary hears nothing of beta's: it cannot tell a lag (beta's applied number
        # does not reach it) and shows its standby lost instead
        st = wait_for(lambda: (s := pair.alpha.status(2.0)) and s["peer_state"] == "unreachable"
                      and any(a["key"] == "standby_lost" for a in s["alerts"]) and s, 15,
                      "alpha to show its standby lost")
        assert st["state"] == "primary"
        assert st["replication"]["peer_following"] is False
        assert st["replication"]["lag_manifests"] is None
        pair.heal()
        wait_equal(src, dst, 30, "beta to catch up after the heal, without a restart")
        wait_for(lambda: (r := replication(pair.beta)).get("synced") and not r["stalled"]
                 and r["applied"] >= r["primary_seq"], 20, "beta in sync again")
        wait_for(lambda: "replication flows again" in pair.beta.log.read_text(errors="replace"),
                 10, "beta to log the stall's end")
        # and the primary sees its standby following, with nothing left to apply
        wait_for(lambda: (s := pair.alpha.status(2.0))
                 and s["replication"]["lag_manifests"] == 0
                 and not any(a["key"] == "standby_lost" for a in s["alerts"]), 20,
                 "alpha to see beta caught up")
    finally:
        bus.stop()
    want = tree(src)
    pair.alpha.kill()
    pair.beta.wait_state("primary", 15)
    assert tree(dst) == want  # nothing lost when the primary dies right after the heal


# the issue asks for 10 rounds; SBS_SPLIT_ROUNDS makes it fewer (or more) on a slow machine
SPLIT_ROUNDS = int(os.environ.get("SBS_SPLIT_ROUNDS", "10"))


@pytest.mark.timeout(60 + 30 * SPLIT_ROUNDS)  # rounds of a few seconds, on a loaded machine
def test_every_split_brain_is_reported_once_by_email_and_by_both_nodes(make_pair, smtp):
    """Symmetric cuts (both directions swallowed) long enough for both to be primary; after
    each heal exactly one split-brain email (from the loser, whoever saw it first), and a
    SPLIT BRAIN line in the log of each node."""
    port, mail = smtp
    pair = make_pair(proxy=True, email=smtp_email(port))
    pair.start_both()

    def split_mails() -> list:
        return [m for m in mail.messages if "split brain" in m["Subject"]]

    def split_lines(name: str) -> int:
        return pair.nodes[name].log.read_text(errors="replace").count("SPLIT BRAIN")

    for round_ in range(1, SPLIT_ROUNDS + 1):
        was = pair.primaries()
        assert len(was) == 1, was
        # one mail per round so far: a second mail of the last round would show here
        assert len(split_mails()) == round_ - 1, [m["Subject"] for m in split_mails()]
        pair.cut("alpha", "beta")
        pair.cut("beta", "alpha")
        wait_for(lambda: pair.primaries() == ["alpha", "beta"], 15,
                 f"both to be primary in round {round_}")
        pair.heal()
        wait_for(lambda: len(pair.primaries()) == 1
                 and {n.state() for n in pair.nodes.values()} == {"primary", "secondary"}, 20,
                 f"one primary again in round {round_}")
        wait_for(lambda r=round_: len(split_mails()) >= r, 15, f"the email of round {round_}")
        wait_for(lambda r=round_: split_lines("alpha") + split_lines("beta") >= 2 * r, 10,
                 f"both nodes to log the split brain of round {round_}")
    assert len(split_mails()) == SPLIT_ROUNDS, [m["Subject"] for m in split_mails()]
    assert split_lines("alpha") + split_lines("beta") == 2 * SPLIT_ROUNDS


def test_a_split_brain_losers_own_files_are_kept_listed_and_announced(make_pair, smtp):
    """Both sides write during a symmetric cut. The loser keeps every file of its term that
    the winner lacks or has otherwise under conflicts/<UTC time>/docs/ before it follows;
    status, `sbs-tools conflicts`, the bus and an email say so; then verify finds no
    difference."""
    port, mail = smtp
    pair = make_pair(proxy=True, email=smtp_email(port))
    a, b = pair.folder("alpha"), pair.folder("beta")
    write(a / "shared.txt", "v1\n")
    write(a / "stable.txt", "never changes\n")
    write(a / "doomed.txt", "deleted on the loser during the cut\n")
    started(pair)
    wait_equal(a, b)
    pair.cut("alpha", "beta")
    pair.cut("beta", "alpha")
    wait_for(lambda: pair.primaries() == ["alpha", "beta"], 15, "both to be primary")
    # beta took over with a higher epoch: it wins when they meet again
    write(b / "beta new.txt", "written on the winner\n")
    write(b / "shared.txt", "v3 on beta, the winner\n")
    mine = {f"alpha new {i}.txt": f"created on the loser {i}\n" for i in range(20)}
    mine["alpha dir/inner.txt"] = "in a folder made on the loser\n"
    for path, text in mine.items():
        write(a / path, text)
    write(a / "shared.txt", "v2 on alpha, the loser\n")
    (a / "doomed.txt").unlink()
    bus = Bus(pair.alpha)
    try:
        pair.heal()
        pair.alpha.wait_state("secondary", 20)
        assert pair.beta.state() == "primary"
        wait_equal(b, a, 20, "the loser converging on the winner")
        res = sbs_tools("verify", "--config", str(pair.alpha.config))
        assert res.returncode == 0, res.stdout + res.stderr
        kept = conflicts("alpha", pair)
        assert kept == {**{p: t.encode() for p, t in mine.items()},
                        "shared.txt": b"v2 on alpha, the loser\n"}, kept
        assert not conflicts("beta", pair)
        st = pair.alpha.status(2.0)
        assert st["conflicts"]["count"] == len(kept)
        assert {f["path"] for f in st["conflicts"]["files"]} == set(kept)
        listed = orjson.loads(sbs_tools("conflicts", "--json", "--config",
                                        str(pair.alpha.config)).stdout)
        assert {(f["folder"], f["path"]) for f in listed["files"]} == {("docs", p) for p in kept}
        shown = " ".join(sbs_tools("status", "--config", str(pair.alpha.config)).stdout.split())
        assert f"{len(kept)} conflict copies" in shown, shown
        wait_for(lambda: bus.seen("conflicts"), 10, "the conflicts event on alpha's bus")
        assert bus.seen("conflicts")["count"] == len(kept)
        note = wait_for(lambda: [m for m in mail.messages if "conflicts" in m["Subject"]], 15,
                        "the conflicts email")
        text = note[0].get_content()
        assert all(p in text for p in kept), text
    finally:
        bus.stop()


def test_a_crashed_primary_rejoining_sets_aside_what_it_never_sent(make_pair):
    """Without strict deletions too: the old primary's files that never reached the peer are
    kept under conflicts/ and leave its live folder, so the pair is identical after."""
    pair = make_pair()
    a, b = pair.folder("alpha"), pair.folder("beta")
    write(a / "shared.txt", "v1\n")
    started(pair)
    wait_equal(a, b)
    pair.beta.signal(signal.SIGSTOP)  # beta hears nothing of what follows
    seq = replication(pair.alpha)["seq"]
    write(a / "alpha only.txt", "created on alpha only\n")
    wait_for(lambda: replication(pair.alpha).get("seq", 0) > seq, 10, "alpha's manifest")
    pair.alpha.kill()
    pair.beta.signal(signal.SIGCONT)
    pair.beta.wait_state("primary", timeout=10)
    write(b / "while alpha was away.txt", "written on the new primary\n")
    pair.alpha.start()
    pair.alpha.wait_state("secondary")
    wait_equal(b, a, 15, "alpha catching up with beta")
    assert conflicts("alpha", pair) == {"alpha only.txt": b"created on alpha only\n"}
    res = sbs_tools("verify", "--config", str(pair.alpha.config))
    assert res.returncode == 0, res.stdout + res.stderr
