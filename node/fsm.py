"""The failover state machine: one pure table, (state, event) -> (next state, actions).

No I/O here. The node loop turns what it sees into events (a peer message, a silence, a
signal, an operator command), feeds them to `step`, and performs the returned actions in
order. tests/test_fsm.py checks the table's safety invariants on every (state, event) pair.

States
    STARTING   bound and probing the peer; nothing decided yet.
    PRIMARY    runs the sentinels, publishes manifests, serves file content.
    SECONDARY  follows the primary: snapshot, then numbered manifests; runs no sentinel.
    HANDOVER   a primary finishing its last sync before the peer takes over (promote).
    LEAVING    a primary finishing its last sync before it exits (SIGTERM/SIGINT).
    STOPPED    the loop ends.

Events (the loop computes "we win" with protocol.wins, the SPEC's rule: higher epoch, then
role main over backup, then the smaller name)
    PROBE_TIMEOUT           no peer answered within the probe window.
    PEER_PRIMARY_WE_WIN     the peer says primary and loses to us by the rule.
    PEER_PRIMARY_WE_LOSE    the peer says primary and wins by the rule.
    PEER_STARTING_WE_WIN    both starting: we win by the rule.
    PEER_STARTING_WE_LOSE   both starting: the peer wins.
    PEER_SECONDARY          the peer says secondary.
    DUAL_SECONDARY_WE_WIN   both secondary for longer than dead_after (a lost hand-over): we win.
    DUAL_SECONDARY_WE_LOSE  same, the peer wins.
    MAIN_PEER_READY         we are a restricted backup primary and a `main` peer has joined as
                            secondary and caught up: it should run the sentinels, not nobody.
    PEER_SILENT             nothing heard from the peer for dead_after.
    PEER_HANDOVER           the primary peer finished its last sync and hands over to us.
    PEER_ASKS_HANDOVER      the secondary peer asks us (primary) to hand over (its promote).
    PROMOTE                 operator: promote this node (the loop refuses it when the peer is
                            unreachable and there is nobody to hand over to or from).
    PROMOTE_FORCE           operator: promote even though the peer cannot be reached (the loop
                            feeds it only to a secondary whose peer is silent).
    STOP                    SIGTERM/SIGINT.
    SYNC_DONE               the last sync of a hand-over finished (or hit its time bound).
    LEASE_TAKEN             dcs mode: this node took the leader key in etcd.
    LEASE_LOST              dcs mode: etcd says another node holds the leader key.

With [cluster] dcs (an etcd leader lease), DCS_TABLE overrides some rows: only the key makes a
primary, so silence, a probe timeout or the rule between two starting nodes never does.
    SENTINEL_UNHEALTHY      a sentinel crash-loops here (or fails its check) and the peer is
                            a synced secondary where it has not failed: hand it over.

Maintenance mode (node/maintenance.py) is a second, smaller table, MAINTENANCE, consulted
first while it is on: it holds back every move the pair would make by itself.
"""
from __future__ import annotations

from enum import StrEnum


class FsmFailure(RuntimeError):
    """An action of the FSM failed half-way through a transition: the node's own state is in
    doubt, so the loop does not drop it like a bad message; it ends the node."""


class S(StrEnum):
    STARTING = "starting"
    PRIMARY = "primary"
    SECONDARY = "secondary"
    HANDOVER = "handover"
    LEAVING = "leaving"
    STOPPED = "stopped"


class E(StrEnum):
    PROBE_TIMEOUT = "probe_timeout"
    PEER_PRIMARY_WE_WIN = "peer_primary_we_win"
    PEER_PRIMARY_WE_LOSE = "peer_primary_we_lose"
    PEER_STARTING_WE_WIN = "peer_starting_we_win"
    PEER_STARTING_WE_LOSE = "peer_starting_we_lose"
    PEER_SECONDARY = "peer_secondary"
    DUAL_SECONDARY_WE_WIN = "dual_secondary_we_win"
    DUAL_SECONDARY_WE_LOSE = "dual_secondary_we_lose"
    MAIN_PEER_READY = "main_peer_ready"
    PEER_SILENT = "peer_silent"
    PEER_HANDOVER = "peer_handover"
    PEER_ASKS_HANDOVER = "peer_asks_handover"
    PROMOTE = "promote"
    PROMOTE_FORCE = "promote_force"
    STOP = "stop"
    SYNC_DONE = "sync_done"
    LEASE_TAKEN = "lease_taken"
    LEASE_LOST = "lease_lost"
    SENTINEL_UNHEALTHY = "sentinel_unhealthy"


class A(StrEnum):
    START_PRIMARY = "start_primary"  # epoch+1; restricted if role=backup; sentinels; publish
    TAKE_OVER = "take_over"  # epoch+1; unrestricted; sentinels; email; publish
    FOLLOW = "follow"  # subscribe to the peer's bus, snapshot, then manifests
    STOP_SENTINELS = "stop_sentinels"
    SPLIT_BRAIN_LOST = "split_brain_lost"  # report: we yield (conflicts are kept by the sync)
    SPLIT_BRAIN_WON = "split_brain_won"  # report and email: the peer will yield
    FINAL_SYNC = "final_sync"  # flush the watcher, wait (bounded) for the peer's ack
    ABORT_HANDOVER = "abort_handover"  # the peer vanished mid hand-over: stay primary
    SEND_HANDOVER = "send_handover"  # tell the peer to take over now
    ASK_HANDOVER = "ask_handover"  # ask the primary peer to hand over to us
    REFUSE = "refuse"  # answer the operator's command with an error
    PEER_LOST = "peer_lost"  # log/bus: the secondary went silent
    HOLD = "hold"  # log: maintenance mode holds back what this event would do
    CAMPAIGN = "campaign"  # dcs: try for the leader key now (the primary handed over)
    EXIT = "exit"


Row = tuple[S, tuple[A, ...]]

_FOLLOW = (A.FOLLOW,)
_DEMOTE = (A.STOP_SENTINELS, A.SPLIT_BRAIN_LOST, A.FOLLOW)
_HAND_OVER_AND_FOLLOW = (A.STOP_SENTINELS, A.SEND_HANDOVER, A.FOLLOW)

# fmt: off
# Only the rows that do something are listed; every other (state, event) pair keeps the state
# and does nothing (see `step`). Why each row:
TABLE: dict[tuple[S, E], Row] = {
    # A starting node joins a running primary whatever the rule says: the primary is the one
    # with the newest data, and it is already serving.
    (S.STARTING, E.PROBE_TIMEOUT):          (S.PRIMARY, (A.START_PRIMARY,)),
    (S.STARTING, E.PEER_PRIMARY_WE_WIN):    (S.SECONDARY, _FOLLOW),
    (S.STARTING, E.PEER_PRIMARY_WE_LOSE):   (S.SECONDARY, _FOLLOW),
    # Both starting: both see the same two facts, so both reach the same verdict.
    (S.STARTING, E.PEER_STARTING_WE_WIN):   (S.PRIMARY, (A.START_PRIMARY,)),
    (S.STARTING, E.PEER_STARTING_WE_LOSE):  (S.SECONDARY, _FOLLOW),
    # A secondary without a primary is waiting for one.
    (S.STARTING, E.PEER_SECONDARY):         (S.PRIMARY, (A.START_PRIMARY,)),
    (S.STARTING, E.PEER_HANDOVER):          (S.PRIMARY, (A.TAKE_OVER,)),
    (S.STARTING, E.PROMOTE):                (S.STARTING, (A.REFUSE,)),
    (S.STARTING, E.STOP):                   (S.STOPPED, (A.EXIT,)),

    # Split brain: the loser stops its sentinels and follows; the winner reports it.
    (S.PRIMARY, E.PEER_PRIMARY_WE_WIN):     (S.PRIMARY, (A.SPLIT_BRAIN_WON,)),
    (S.PRIMARY, E.PEER_PRIMARY_WE_LOSE):    (S.SECONDARY, _DEMOTE),
    (S.PRIMARY, E.PEER_SILENT):             (S.PRIMARY, (A.PEER_LOST,)),
    # A backup licence may only run the services as a failover: a restricted primary gives
    # way to the main node once it is in sync, by the ordinary graceful hand-over.
    (S.PRIMARY, E.MAIN_PEER_READY):         (S.HANDOVER, (A.FINAL_SYNC,)),
    (S.PRIMARY, E.PEER_ASKS_HANDOVER):      (S.HANDOVER, (A.FINAL_SYNC,)),
    (S.PRIMARY, E.PROMOTE):                 (S.HANDOVER, (A.FINAL_SYNC,)),
    (S.PRIMARY, E.STOP):                    (S.LEAVING, (A.FINAL_SYNC,)),
    # Health: a crash-looping sentinel moves to a healthy secondary by the graceful hand-over.
    (S.PRIMARY, E.SENTINEL_UNHEALTHY):      (S.HANDOVER, (A.FINAL_SYNC,)),

    # Hand-over for a switchover: sentinels stop only after the last sync, then the peer is
    # told at once so it does not wait for dead_after.
    (S.HANDOVER, E.SYNC_DONE):              (S.SECONDARY, _HAND_OVER_AND_FOLLOW),
    (S.HANDOVER, E.PEER_PRIMARY_WE_WIN):    (S.HANDOVER, (A.SPLIT_BRAIN_WON,)),
    (S.HANDOVER, E.PEER_PRIMARY_WE_LOSE):   (S.SECONDARY, _DEMOTE),
    (S.HANDOVER, E.PEER_SILENT):            (S.PRIMARY, (A.ABORT_HANDOVER, A.PEER_LOST)),
    (S.HANDOVER, E.PROMOTE):                (S.HANDOVER, (A.REFUSE,)),
    (S.HANDOVER, E.STOP):                   (S.LEAVING, ()),

    # Leaving: same last sync, then exit. A second signal means "now".
    (S.LEAVING, E.SYNC_DONE):               (S.STOPPED, (A.STOP_SENTINELS, A.SEND_HANDOVER,
                                                         A.EXIT)),
    (S.LEAVING, E.PEER_PRIMARY_WE_LOSE):    (S.STOPPED, (A.STOP_SENTINELS, A.EXIT)),
    (S.LEAVING, E.PEER_PRIMARY_WE_WIN):     (S.LEAVING, (A.SPLIT_BRAIN_WON,)),
    (S.LEAVING, E.STOP):                    (S.STOPPED, (A.STOP_SENTINELS, A.EXIT)),
    (S.LEAVING, E.PROMOTE):                 (S.LEAVING, (A.REFUSE,)),

    # The secondary takes over on silence, at once on a hand-over, or when a lost hand-over
    # left two secondaries (the rule picks one).
    (S.SECONDARY, E.PEER_SILENT):           (S.PRIMARY, (A.TAKE_OVER,)),
    (S.SECONDARY, E.PEER_HANDOVER):         (S.PRIMARY, (A.TAKE_OVER,)),
    (S.SECONDARY, E.DUAL_SECONDARY_WE_WIN): (S.PRIMARY, (A.TAKE_OVER,)),
    (S.SECONDARY, E.PROMOTE):               (S.SECONDARY, (A.ASK_HANDOVER,)),
    (S.SECONDARY, E.PROMOTE_FORCE):         (S.PRIMARY, (A.TAKE_OVER,)),
    (S.SECONDARY, E.STOP):                  (S.STOPPED, (A.EXIT,)),

    (S.STOPPED, E.PROMOTE):                 (S.STOPPED, (A.REFUSE,)),
}
# fmt: on

# fmt: off
# Maintenance: nothing moves by itself. No takeover (on silence, or from two secondaries), no
# automatic hand-over (a stop leaves the peer waiting, a restricted backup keeps the primary
# role, a sick sentinel stays). The operator's promote and hand-overs already under way go on;
# split brain is still resolved (two primaries are never left running).
MAINTENANCE: dict[tuple[S, E], Row] = {
    (S.SECONDARY, E.PEER_SILENT):           (S.SECONDARY, (A.HOLD,)),
    (S.SECONDARY, E.DUAL_SECONDARY_WE_WIN): (S.SECONDARY, (A.HOLD,)),
    (S.PRIMARY, E.MAIN_PEER_READY):         (S.PRIMARY, (A.HOLD,)),
    (S.PRIMARY, E.SENTINEL_UNHEALTHY):      (S.PRIMARY, (A.HOLD,)),
    (S.PRIMARY, E.STOP):                    (S.STOPPED, (A.HOLD, A.STOP_SENTINELS, A.EXIT)),
}

# dcs mode: the leader key in etcd is the third vote. A cut link looks like a dead peer to both
# nodes; only the node that holds the key may be primary, so these rows replace the table's.
DCS_TABLE: dict[tuple[S, E], Row] = {
    (S.STARTING, E.PROBE_TIMEOUT):          (S.STARTING, ()),  # wait for the key
    (S.STARTING, E.PEER_STARTING_WE_WIN):   (S.STARTING, ()),
    (S.STARTING, E.PEER_SECONDARY):         (S.STARTING, ()),
    (S.STARTING, E.PEER_HANDOVER):          (S.STARTING, (A.CAMPAIGN,)),
    (S.STARTING, E.LEASE_TAKEN):            (S.PRIMARY, (A.START_PRIMARY,)),
    (S.SECONDARY, E.PEER_SILENT):           (S.SECONDARY, ()),  # the key holder may be alive
    (S.SECONDARY, E.DUAL_SECONDARY_WE_WIN): (S.SECONDARY, ()),
    (S.SECONDARY, E.PEER_HANDOVER):         (S.SECONDARY, (A.CAMPAIGN,)),
    (S.SECONDARY, E.PROMOTE_FORCE):         (S.SECONDARY, (A.REFUSE,)),
    (S.SECONDARY, E.LEASE_TAKEN):           (S.PRIMARY, (A.TAKE_OVER,)),
    (S.PRIMARY, E.LEASE_LOST):              (S.SECONDARY, (A.STOP_SENTINELS, A.FOLLOW)),
    (S.HANDOVER, E.LEASE_LOST):             (S.SECONDARY, (A.ABORT_HANDOVER, A.STOP_SENTINELS,
                                                           A.FOLLOW)),
    (S.LEAVING, E.LEASE_LOST):              (S.STOPPED, (A.STOP_SENTINELS, A.EXIT)),
}
# fmt: on

# What status shows to the operator: the SPEC's four states (a hand-over is still primary).
PUBLIC = {
    S.STARTING: "starting",
    S.PRIMARY: "primary",
    S.SECONDARY: "secondary",
    S.HANDOVER: "primary",
    S.LEAVING: "stopping",
    S.STOPPED: "stopped",
}

PRIMARY_LIKE = frozenset({S.PRIMARY, S.HANDOVER, S.LEAVING})


def step(state: S, event: E, *, dcs: bool = False, maintenance: bool = False) -> Row:
    """The next state and the actions for `event` in `state`; unlisted pairs change nothing.
    Maintenance holds back first (it only keeps a state); the lease's rows come next."""
    if maintenance and (state, event) in MAINTENANCE:
        return MAINTENANCE[(state, event)]
    if dcs and (state, event) in DCS_TABLE:
        return DCS_TABLE[(state, event)]
    return TABLE.get((state, event), (state, ()))
