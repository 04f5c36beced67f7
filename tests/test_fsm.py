"""The failover table's invariants on every (state, event) pair, and two-node simulations of
the rule."""
from __future__ import annotations

import itertools

import pytest
from sbs.node.fsm import DCS_TABLE, PUBLIC, TABLE, A, E, S, step
from sbs.node.peer import Peer
from sbs.node.protocol import wins

PRIMARY_LIKE = (S.PRIMARY, S.HANDOVER, S.LEAVING)


# What this checks: the safety invariants below hold for every (state, event) pair (6 states x
# 19 events, with and without an etcd lease), whatever the row says. It does not restate each
# row's next state: a copy of the table checked against itself proves nothing. The rows'
# behaviour is proven by the simulations below and by the real pairs in test_e2e_*.py.
@pytest.mark.parametrize("dcs", [False, True], ids=["two-node", "lease"])
@pytest.mark.parametrize(("state", "event"), list(itertools.product(S, E)))
def test_every_pair_keeps_the_invariants(state, event, dcs):
    nxt, actions = step(state, event, dcs=dcs)
    assert all(isinstance(a, A) for a in actions)
    if (state, event) not in TABLE and not (dcs and (state, event) in DCS_TABLE):
        assert (nxt, actions) == (state, ()), "an unlisted pair changes nothing"
    assert nxt != S.STARTING or state == S.STARTING, "nothing goes back to starting"
    if state == S.STOPPED:
        assert nxt == S.STOPPED, "stopped is final"
    if nxt == S.PRIMARY and state in (S.STARTING, S.SECONDARY):
        assert actions and actions[0] in (A.START_PRIMARY, A.TAKE_OVER), "epoch bump first"
    if A.START_PRIMARY in actions or A.TAKE_OVER in actions:
        assert state in (S.STARTING, S.SECONDARY) and nxt == S.PRIMARY
    if state in PRIMARY_LIKE and nxt in (S.SECONDARY, S.STOPPED):
        assert A.STOP_SENTINELS in actions, "a primary never leaves with its sentinels running"
    if state in PRIMARY_LIKE and event == E.PEER_PRIMARY_WE_LOSE:
        assert nxt not in PRIMARY_LIKE, "the loser by the rule gives way"
    if not dcs and state == S.SECONDARY and event in (E.PEER_SILENT, E.PEER_HANDOVER):
        assert nxt == S.PRIMARY, "a secondary takes over on silence and on a hand-over"
    if dcs and nxt == S.PRIMARY and state != S.PRIMARY:
        assert event == E.LEASE_TAKEN or state == S.HANDOVER, "with a lease only the key " \
            "makes a primary (a hand-over aborted keeps the one that holds it)"
    if dcs and event == E.LEASE_LOST and state in PRIMARY_LIKE:
        assert nxt not in PRIMARY_LIKE, "a primary whose key another holds gives way"
    if not dcs and event in (E.LEASE_TAKEN, E.LEASE_LOST):
        assert (nxt, actions) == (state, ()), "the two-node mode has no lease"
    if event == E.STOP and state != S.STOPPED:
        assert nxt in (S.LEAVING, S.STOPPED), "a stop always ends the node"
    if nxt == S.SECONDARY and state != S.SECONDARY:
        assert actions[-1] == A.FOLLOW, "becoming secondary always starts following"
    if nxt == S.STOPPED and state != S.STOPPED:
        assert actions[-1] == A.EXIT
    if event == E.PROMOTE and nxt == state and state != S.SECONDARY:
        assert A.REFUSE in actions or state == S.HANDOVER and event == E.PROMOTE


def test_table_has_no_dead_rows():
    for (state, event), (nxt, actions) in TABLE.items():
        assert nxt != state or actions, f"{state}+{event} listed but does nothing"


def test_with_a_lease_silence_a_probe_and_the_rule_make_no_primary():
    """The DCS_TABLE rows that keep the state are the point: two-node mode moves on these."""
    for state, event in [(S.STARTING, E.PROBE_TIMEOUT), (S.STARTING, E.PEER_STARTING_WE_WIN),
                         (S.STARTING, E.PEER_SECONDARY), (S.SECONDARY, E.PEER_SILENT),
                         (S.SECONDARY, E.DUAL_SECONDARY_WE_WIN)]:
        assert step(state, event)[0] == S.PRIMARY
        assert step(state, event, dcs=True) == (state, ())
    assert step(S.SECONDARY, E.PEER_HANDOVER, dcs=True) == (S.SECONDARY, (A.CAMPAIGN,))
    assert step(S.SECONDARY, E.PROMOTE_FORCE, dcs=True) == (S.SECONDARY, (A.REFUSE,))


def test_hand_over_runs_the_final_sync_before_stopping_sentinels():
    assert step(S.PRIMARY, E.STOP) == (S.LEAVING, (A.FINAL_SYNC,))
    nxt, actions = step(S.LEAVING, E.SYNC_DONE)
    assert actions.index(A.STOP_SENTINELS) < actions.index(A.SEND_HANDOVER)


def test_a_sick_sentinel_moves_by_the_graceful_hand_over():
    assert step(S.PRIMARY, E.SENTINEL_UNHEALTHY) == (S.HANDOVER, (A.FINAL_SYNC,))
    for state in (S.STARTING, S.SECONDARY, S.HANDOVER, S.LEAVING, S.STOPPED):
        assert step(state, E.SENTINEL_UNHEALTHY) == (state, ()), "only a primary moves it"


def test_public_states_are_the_specs():
    assert set(PUBLIC.values()) <= {"starting", "primary", "secondary", "stopping", "stopped"}


# --- the rule -------------------------------------------------------------------------------

def node(name, epoch=0, role="main"):
    return {"name": name, "epoch": epoch, "role": role}


@pytest.mark.parametrize(("a", "b"), [
    (node("b", 2), node("a", 1)),  # higher epoch first
    (node("b", 1, "main"), node("a", 1, "backup")),  # then main over backup
    (node("a", 1), node("b", 1)),  # then the smaller name
])
def test_rule(a, b):
    assert wins(a, b) and not wins(b, a)


# --- two nodes, each with its own table, exchanging their states ----------------------------

def simulate(a: dict, b: dict, sa: S, sb: S, rounds: int = 10) -> tuple[S, S]:
    """Each round, each node sees the other's public state and steps; epochs bump on becoming
    primary as the loop does. Returns the final states."""
    states = {"a": sa, "b": sb}
    info = {"a": dict(a), "b": dict(b)}
    for _ in range(rounds):
        for me, other in (("a", "b"), ("b", "a")):
            peer = Peer(dead_after=1.0)
            peer.update({**info[other], "run": other, "n": 1, "state": PUBLIC[states[other]],
                         "restricted": False, "since": 5.0, "seq": 0, "applied": 0,
                         "synced": True, "pending_files": 0, "pending_bytes": 0, "error": ""},
                        now=0.0)
            event = peer.event(info[me], states[me], my_since=5.0)
            if event is None:
                continue
            nxt, actions = step(states[me], event)
            if A.START_PRIMARY in actions or A.TAKE_OVER in actions:
                info[me]["epoch"] = max(info[me]["epoch"], info[other]["epoch"]) + 1
            states[me] = nxt
    return states["a"], states["b"]


STARTS = [S.STARTING, S.PRIMARY, S.SECONDARY]


@pytest.mark.parametrize(("sa", "sb"), list(itertools.product(STARTS, STARTS)))
@pytest.mark.parametrize(("ea", "eb", "ra", "rb"), [
    (0, 0, "main", "main"), (3, 1, "main", "main"), (1, 3, "main", "main"),
    (2, 2, "backup", "main"), (2, 2, "main", "backup"),
])
def test_two_nodes_always_settle_on_one_primary(sa, sb, ea, eb, ra, rb):
    a, b = simulate(node("alpha", ea, ra), node("beta", eb, rb), sa, sb)
    assert sorted([a, b]) == sorted([S.PRIMARY, S.SECONDARY]), (sa, sb, a, b)


def test_split_brain_is_won_by_the_rule():
    a, b = simulate(node("alpha", 5), node("beta", 6), S.PRIMARY, S.PRIMARY)
    assert (a, b) == (S.SECONDARY, S.PRIMARY)
    a, b = simulate(node("alpha", 6), node("beta", 6, "backup"), S.PRIMARY, S.PRIMARY)
    assert (a, b) == (S.PRIMARY, S.SECONDARY)


def test_fresh_dual_secondary_waits_for_dead_after():
    peer = Peer(dead_after=1.0)
    peer.update({"name": "beta", "run": "r", "n": 1, "state": "secondary", "epoch": 0,
                 "role": "main", "restricted": False, "since": 0.1, "seq": 0, "applied": 0,
                 "synced": True, "pending_files": 0, "pending_bytes": 0, "error": ""}, now=0.0)
    assert peer.event(node("alpha"), S.SECONDARY, my_since=0.1) == E.PEER_SECONDARY
    peer.since = 5.0
    assert peer.event(node("alpha"), S.SECONDARY, my_since=5.0) == E.DUAL_SECONDARY_WE_WIN


def test_restricted_backup_gives_way_to_a_synced_main():
    peer = Peer(dead_after=1.0)
    body = {"name": "alpha", "run": "r", "n": 1, "state": "secondary", "epoch": 0,
            "role": "main", "restricted": False, "since": 2.0, "seq": 0, "applied": 3,
            "synced": False, "pending_files": 4, "pending_bytes": 0, "error": ""}
    peer.update(body, now=0.0)
    backup = {**node("beta", 1, "backup"), "restricted": True}
    assert peer.event(backup, S.PRIMARY, 5.0) == E.PEER_SECONDARY  # not yet in sync
    peer.update({**body, "n": 2, "synced": True, "pending_files": 0}, now=0.1)
    assert peer.event(backup, S.PRIMARY, 5.0) == E.MAIN_PEER_READY
    assert step(S.PRIMARY, E.MAIN_PEER_READY) == (S.HANDOVER, (A.FINAL_SYNC,))
    # an unrestricted backup (it took over from a failed main) keeps the services
    assert peer.event({**backup, "restricted": False}, S.PRIMARY, 5.0) == E.PEER_SECONDARY


def test_stale_peer_messages_are_ignored():
    peer = Peer(dead_after=1.0)
    body = {"name": "beta", "run": "r", "n": 5, "state": "primary", "epoch": 3, "role": "main",
            "restricted": False, "since": 1.0, "seq": 0, "applied": 0, "synced": True,
            "pending_files": 0, "pending_bytes": 0, "error": ""}
    assert peer.update(body, now=1.0)
    assert not peer.update({**body, "n": 4, "state": "secondary"}, now=2.0)
    assert peer.state == "primary"
    assert peer.update({**body, "run": "new", "n": 1, "state": "starting"}, now=3.0)
    assert peer.silent(4.5) and not peer.silent(3.5)


# Maintenance: what the pair would do by itself is held; everything else is the ordinary table.
HELD = {
    (S.SECONDARY, E.PEER_SILENT), (S.SECONDARY, E.DUAL_SECONDARY_WE_WIN),
    (S.PRIMARY, E.MAIN_PEER_READY), (S.PRIMARY, E.SENTINEL_UNHEALTHY),
}


@pytest.mark.parametrize(("state", "event"), list(itertools.product(S, E)))
def test_maintenance(state, event):
    nxt, actions = step(state, event, maintenance=True)
    if (state, event) in HELD:
        assert (nxt, actions) == (state, (A.HOLD,)), "nothing moves by itself"
    elif (state, event) == (S.PRIMARY, E.STOP):
        # a stopping primary does not hand over: the peer waits, it does not take over
        assert nxt == S.STOPPED and A.SEND_HANDOVER not in actions
        assert actions[-2:] == (A.STOP_SENTINELS, A.EXIT)
    else:
        assert (nxt, actions) == step(state, event), "the rest is the ordinary table"
    assert A.TAKE_OVER not in actions or event in (E.PEER_HANDOVER, E.PROMOTE_FORCE)
