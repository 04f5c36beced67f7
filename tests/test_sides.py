"""The primary's and the secondary's sides in-process: a real Node (real sockets, a real Syncer
and journal thread) whose loop is not running, driven by the messages a peer would send. The
test plays the peer with a ROUTER on the peer's address; a test takes milliseconds, where the
end-to-end tests of the same rules take seconds."""
from __future__ import annotations

import dataclasses
import os
import secrets
import subprocess
import time
from types import SimpleNamespace

import orjson
import pytest
import zmq
from sbs.node import primary as primary_side
from sbs.node import protocol
from sbs.node.entries import FileEntry
from sbs.node.fsm import E, S
from sbs.node.lease import Lease
from sbs.node.node import FsmFailure, Node

from tests.pair import HOSTS, plain_config, wait_for

PRIMARY_RUN = secrets.token_hex(8)


@pytest.fixture
def alpha(tmp_path):
    """alpha, not running its loop, and a ROUTER where it looks for its peer beta."""
    cfg = plain_config(tmp_path)
    port = cfg.control_port
    ctx = zmq.Context()
    peer = ctx.socket(zmq.ROUTER)
    peer.linger = 0
    peer.bind(f"tcp://{HOSTS['beta']}:{port}")
    node = Node(cfg)
    try:
        # the node's DEALER drops what it cannot send yet (IMMEDIATE): wait for the connection
        wait_for(lambda: node.link.send("STATUS", {}), 10, "alpha's dealer to connect")
        assert received(peer)[0] == "STATUS"
        node.peer_socket = peer
        yield node
    finally:
        node.close()
        peer.close()
        ctx.term()


def received(peer: zmq.Socket, timeout: float = 5.0) -> tuple[str, dict]:
    """The next command the node sent its peer, and its body."""
    assert peer.poll(timeout * 1000), "nothing sent to the peer"
    msg = protocol.decode(peer.recv_multipart()[1:])
    assert not isinstance(msg, protocol.Bad), msg
    return msg.command, msg.body


def nothing_sent(peer: zmq.Socket) -> bool:
    return not peer.poll(50)


def snapshot_rep(run: str, seq: int) -> protocol.Message:
    msg = protocol.decode(protocol.encode("SNAPSHOT_REP", {
        "name": "beta", "run": run, "epoch": 1, "seq": seq, "folders": {}, "paths": {},
        "sentinels": {}, "active": [], "sv": 0, "index": {},
    }))
    assert not isinstance(msg, protocol.Bad), msg
    return msg


def snapshot_part(run: str, seq: int, part: int, parts: int, index: dict,
                  sid: str = "s1", **fields) -> protocol.Message:
    msg = protocol.decode(protocol.encode("SNAPSHOT_REP", {
        "name": "beta", "run": run, "epoch": 1, "seq": seq, "folders": {}, "paths": {},
        "sentinels": {}, "active": [], "sv": 0, "index": index, "part": part, "parts": parts,
        "sid": sid, **fields}))
    assert not isinstance(msg, protocol.Bad), msg
    return msg


def manifest(run: str, seq: int) -> list[bytes]:
    return protocol.encode_bus("MANIFEST", {"name": "beta", "run": run, "epoch": 1, "seq": seq,
                                            "part": 0, "parts": 1, "entries": {}})


def heartbeat(run: str, seq: int) -> list[bytes]:
    return protocol.encode_bus("HB", {"name": "beta", "run": run, "epoch": 1,
                                      "state": "primary", "seq": seq, "sv": 0})


def following(node: Node, run: str, seq: int) -> None:
    """Make `node` a secondary that took a snapshot of primary run `run` at manifest `seq`."""
    node._do_follow()  # the FSM's FOLLOW action, as on joining a primary
    assert received(node.peer_socket)[0] == "SNAPSHOT"
    node.secondary.on_snapshot(snapshot_rep(run, seq))
    assert (node.secondary.follow.run, node.secondary.follow.seen) == (run, seq)


def test_a_manifest_gap_asks_for_a_new_snapshot(alpha):
    following(alpha, PRIMARY_RUN, 4)
    alpha.secondary.on_bus(manifest(PRIMARY_RUN, 5))
    assert alpha.secondary.follow.seen == 5
    assert nothing_sent(alpha.peer_socket)
    alpha.secondary.on_bus(manifest(PRIMARY_RUN, 7))  # 6 was lost
    assert received(alpha.peer_socket)[0] == "SNAPSHOT"
    assert alpha.secondary.follow.run is None  # nothing counts until the new snapshot
    assert alpha.secondary.follow.snapshot_deadline is not None


def test_a_heartbeat_ahead_of_the_manifests_asks_for_a_new_snapshot(alpha):
    following(alpha, PRIMARY_RUN, 4)
    alpha.secondary.on_bus(heartbeat(PRIMARY_RUN, 4))
    assert nothing_sent(alpha.peer_socket)
    alpha.secondary.on_bus(heartbeat(PRIMARY_RUN, 6))  # manifests 5 and 6 never came
    assert received(alpha.peer_socket)[0] == "SNAPSHOT"


def test_a_restarted_primarys_manifests_from_zero_are_followed(alpha):
    following(alpha, PRIMARY_RUN, 40)
    restarted = secrets.token_hex(8)
    alpha.secondary.on_bus(heartbeat(restarted, 0))
    assert received(alpha.peer_socket)[0] == "SNAPSHOT"
    alpha.secondary.on_bus(manifest(restarted, 1))  # while the snapshot is on its way
    alpha.secondary.on_bus(manifest(PRIMARY_RUN, 41))  # the old run's, numbered alike: not ours
    alpha.secondary.on_snapshot(snapshot_rep(restarted, 0))
    alpha.secondary.on_bus(manifest(restarted, 2))
    assert (alpha.secondary.follow.run, alpha.secondary.follow.seen) == (restarted, 2)
    # the Syncer applies them; its report goes to the primary as an ACK in the new run's numbers
    wait_for(lambda: applied_report(alpha) == 2, 10, "the syncer to apply manifest 2")
    acks = [body for command, body in sent_until_quiet(alpha.peer_socket) if command == "ACK"]
    assert acks and acks[-1]["following"] == restarted and acks[-1]["applied"] == 2
    assert alpha.secondary.progress.applied == 2


def applied_report(node: Node) -> int | None:
    """Hand the Syncer's next report (if any) to the secondary; the `applied` it reported."""
    if not node.secondary.pipe.poll(100):
        return None
    frames = node.secondary.pipe.recv_multipart()
    node.secondary.on_syncer(frames)
    return orjson.loads(frames[1])["applied"] if frames[0] == b"applied" else None


def sent_until_quiet(peer: zmq.Socket) -> list[tuple[str, dict]]:
    out = []
    while peer.poll(200):
        out.append(received(peer))
    return out


def publish_one(node: Node) -> dict:
    entry = {"path": "a.txt", "kind": "file", "size": 1, "mtime": time.time(),
             "hash": "0" * 16, "mode": 0o644}
    node.primary.publish_delta({"docs": [entry]})
    return entry


def taken_snapshots(node: Node, monkeypatch) -> list[tuple[int, dict]]:
    """What the secondary hands its Syncer as snapshots: (seq, index)."""
    taken: list[tuple[int, dict]] = []
    node._do_follow()
    assert received(node.peer_socket)[0] == "SNAPSHOT"
    monkeypatch.setattr(node.secondary.syncer, "submit_snapshot",
                        lambda seq, folders, index, unreadable: taken.append((seq, index)))
    return taken


def entries(*names: str) -> list[dict]:
    return [{"path": n, "kind": "dir", "size": 0, "mtime_ns": 0, "mode": 0o755, "hash": ""}
            for n in names]


def test_a_snapshot_in_parts_is_taken_whole_once_its_last_part_is_here(alpha, monkeypatch):
    taken = taken_snapshots(alpha, monkeypatch)
    sec = alpha.secondary
    sec.on_bus(manifest(PRIMARY_RUN, 4))  # in the snapshot: let go with its first part
    sec.on_snapshot(snapshot_part(PRIMARY_RUN, 4, 0, 3, {"docs": entries("a"), "web": []}))
    assert not sec.follow.buffer
    sec.on_bus(manifest(PRIMARY_RUN, 5))  # published while the parts come: applied after them
    sec.on_snapshot(snapshot_part(PRIMARY_RUN, 4, 1, 3, {"docs": entries("b", "c")}))
    assert not taken and sec.follow.run is None and sec.follow.snapshot_deadline
    sec.on_snapshot(snapshot_part(PRIMARY_RUN, 4, 2, 3, {"docs": entries("d"),
                                                          "logs": entries("x")}))
    assert taken == [(4, {"docs": entries("a", "b", "c", "d"), "web": [], "logs": entries("x")})]
    # each part's entries are made compact as the part arrives, not all at once at the end
    assert all(type(e) is FileEntry for e in taken[0][1]["docs"])
    assert (sec.follow.run, sec.follow.seen) == (PRIMARY_RUN, 5)
    assert not sec.follow.snapshot_deadline


def test_a_snapshot_part_out_of_order_or_of_another_reply_is_refused(alpha, monkeypatch,
                                                                     caplog):
    taken = taken_snapshots(alpha, monkeypatch)
    sec = alpha.secondary
    first = snapshot_part(PRIMARY_RUN, 4, 0, 3, {"docs": entries("a")})
    sec.on_snapshot(first)
    # parts of another reply (another sid, seq or count of parts) are ignored
    for other in (snapshot_part(PRIMARY_RUN, 4, 1, 3, {"docs": entries("evil")}, sid="s2"),
                  snapshot_part(PRIMARY_RUN, 3, 1, 3, {"docs": entries("evil")}),
                  snapshot_part(PRIMARY_RUN, 4, 1, 2, {"docs": entries("evil")})):
        sec.on_snapshot(other)
    assert caplog.text.count("of a reply not being received") == 3
    sec.on_snapshot(snapshot_part(PRIMARY_RUN, 4, 1, 3, {"docs": entries("b")}))
    sec.on_snapshot(snapshot_part(PRIMARY_RUN, 4, 2, 3, {"docs": entries("c")}))
    assert taken == [(4, {"docs": entries("a", "b", "c")})]

    # a part skipped: the parts so far are dropped, and a new snapshot is asked for soon
    sec.request_snapshot()
    assert received(alpha.peer_socket)[0] == "SNAPSHOT"
    sec.on_snapshot(snapshot_part(PRIMARY_RUN, 6, 0, 3, {"docs": entries("a")}, sid="s3"))
    sec.on_snapshot(snapshot_part(PRIMARY_RUN, 6, 2, 3, {"docs": entries("c")}, sid="s3"))
    assert "ignored SNAPSHOT_REP part 3/3: part 2 was due; asking again" in caplog.text
    assert sec.follow.snapshot_deadline <= time.monotonic() + 1  # soon, not in 10 s
    sec.on_snapshot(snapshot_part(PRIMARY_RUN, 6, 1, 3, {"docs": entries("b")}, sid="s3"))
    assert caplog.text.count("of a reply not being received") == 4
    assert len(taken) == 1 and sec.follow.run is None
    # a part with no first part before it is ignored too; a whole new reply is taken
    sec.on_snapshot(snapshot_part(PRIMARY_RUN, 6, 2, 3, {"docs": entries("c")}, sid="s3"))
    assert len(taken) == 1
    sec.on_snapshot(snapshot_rep(PRIMARY_RUN, 6))
    assert taken[1] == (6, {}) and sec.follow.run == PRIMARY_RUN


def test_a_huge_snapshot_comes_in_bigger_parts_not_more_than_the_queue_holds(alpha,
                                                                             monkeypatch):
    """The parts wait in the ROUTER's queue (1,000 messages, dropped silently beyond it):
    past SNAPSHOT_PARTS_MAX parts they grow instead, and every entry is still sent once."""
    monkeypatch.setattr(protocol, "SNAPSHOT_PART", 2)
    monkeypatch.setattr(protocol, "SNAPSHOT_PARTS_MAX", 3)
    sent: list[dict] = []
    monkeypatch.setattr(alpha, "reply", lambda ident, frames: sent.append(
        protocol.decode(frames).body) or True)
    monkeypatch.setattr(alpha, "state", S.PRIMARY)
    alpha.primary.index_ready = True
    paths = [f"f{i:02}" for i in range(13)]
    alpha.primary.index = {"docs": {p: {"path": p, "kind": "file", "size": 1, "mtime_ns": 1,
                                        "mode": 0o644, "hash": "0" * 32} for p in paths}}
    alpha.primary.on_snapshot_request(b"beta", {})
    assert [(b["part"], b["parts"]) for b in sent] == [(0, 3), (1, 3), (2, 3)]
    got = [e["path"] for b in sent for e in b["index"].get("docs", [])]
    assert got == paths and len({b["sid"] for b in sent}) == 1


def test_the_heartbeat_goes_out_between_the_parts_of_a_snapshot_and_of_a_first_scan(
        alpha, monkeypatch):
    """Sending a 100,000-entry snapshot or a first scan's manifests held the loop ~1 s on a
    loaded machine, past the sentinel guard's deadline: the guard stopped a healthy primary's
    sentinels. A heartbeat that falls due meanwhile now goes out between two parts (here one
    falls due after every part)."""
    monkeypatch.setattr(protocol, "SNAPSHOT_PART", 2)
    monkeypatch.setattr(protocol, "MANIFEST_PART", 2)
    monkeypatch.setattr(alpha, "state", S.PRIMARY)
    sent: list[str] = []
    real_reply = alpha.reply

    def reply(ident: bytes, frames: list) -> bool:
        sent.append("part")
        alpha.link.next_ping = 0.0  # the next heartbeat is due now
        return real_reply(ident, frames)

    monkeypatch.setattr(alpha, "reply", reply)
    paths = [f"f{i:02}" for i in range(7)]
    entries = [{"path": p, "kind": "file", "size": 1, "mtime_ns": 1, "mode": 0o644,
                "hash": "0" * 32} for p in paths]
    pub = alpha.pub

    class Pub:  # the node's PUB socket, with a heartbeat falling due after each manifest
        def send_multipart(self, frames, *args, **kw):
            if bytes(frames[0]) == b"manifest":
                sent.append("manifest")
                alpha.link.next_ping = 0.0
            return pub.send_multipart(frames, *args, **kw)

    monkeypatch.setattr(alpha, "pub", Pub())
    alpha.primary.publish_delta({"docs": entries})  # 4 manifests
    alpha.primary.index_ready = True
    alpha.primary.on_snapshot_request(b"beta", {})  # 4 parts
    assert sent == ["manifest"] * 4 + ["part"] * 4
    pings = [cmd for cmd, _ in sent_until_quiet(alpha.peer_socket) if cmd == "PING"]
    assert len(pings) == 8, pings


def test_the_heartbeat_goes_out_between_the_messages_of_a_burst(alpha):
    """A burst the loop drains in one turn (the 21 parts of a 100,000-entry snapshot took a
    loaded secondary ~0.7 s): a heartbeat that falls due meanwhile goes out between two
    messages, not after the last (here one falls due with each message)."""
    assert alpha.link.send("STATUS", {})
    ident = alpha.peer_socket.recv_multipart()[0]
    handled = []

    def handler(frames):
        handled.append(frames)
        alpha.link.next_ping = 0.0  # the next heartbeat is due now

    alpha.handlers = [(lambda: alpha.link.dealer, handler)]
    # what run() sets: the loop is not running
    alpha.probe_deadline, alpha.stop_requested = time.monotonic() + 60, 0
    for i in range(10):
        alpha.peer_socket.send_multipart([ident, b"burst %d" % i])
    wait_for(lambda: alpha.link.dealer.getsockopt(zmq.EVENTS) & zmq.POLLIN, 10,
             "the burst to reach alpha")
    wait_for(lambda: (alpha._loop_once(), len(handled) == 10)[1], 10, "the burst handled")
    pings = [cmd for cmd, _ in sent_until_quiet(alpha.peer_socket) if cmd == "PING"]
    assert len(pings) >= 10, pings  # without: one a turn of the loop, after its last message


def test_an_ack_for_another_primary_run_is_ignored(alpha):
    publish_one(alpha)
    assert alpha.primary.seq == 1
    alpha.primary.on_ack(b"", {"name": "beta", "run": "r", "applied": 1, "snapshot": False,
                               "following": secrets.token_hex(8)})
    assert alpha.peer.applied == 0
    assert len(alpha.primary.unacked) == 1  # still not agreed
    assert alpha.primary.journal_jobs.empty()


def test_an_ack_for_this_run_makes_the_manifest_agreed(alpha):
    entry = publish_one(alpha)
    alpha.primary.on_ack(b"", {"name": "beta", "run": "r", "applied": 1, "snapshot": False,
                               "following": alpha.run_id})
    assert alpha.peer.applied == 1
    assert not alpha.primary.unacked
    wait_for(lambda: alpha.agreed.get("docs", "a.txt") == entry["hash"], 5, "the journal")


# ------------------------------------------------------------------ the scan begun at start-up

def start_folders(node: Node) -> dict:
    """The folders a starting node scans (Node.run) and a primary runs (_do_start_primary)."""
    return node.lists.pushed_folders() or node.lists.own_folders()


def pump_until_held(node: Node, kind: bytes = b"full") -> None:
    """Read the scanner's pipe as the loop does until a report of `kind` is held."""
    def held() -> bool:
        while node.primary.pipe.poll(0):
            node.primary.on_scanner(node.primary.pipe.recv_multipart())
        return any(f[0] == b"delta" and f[2] == kind for f in node.primary.held)
    wait_for(held, 20, f"a {kind.decode()} report of the prescan")


def test_a_scan_begun_before_the_role_is_known_is_held_then_taken_on(alpha, caplog):
    caplog.set_level("INFO", logger="sbs")
    docs = alpha.cfg.folders[0].path
    for i in range(50):
        (docs / f"f{i}").write_bytes(b"x" * i)
    alpha.primary.prescan(start_folders(alpha))
    scanner = alpha.primary.scanner
    pump_until_held(alpha)
    # not primary yet: nothing published, no index to serve a snapshot from
    assert (alpha.primary.seq, alpha.primary.index, alpha.primary.index_ready) == (0, {}, False)
    alpha.feed(E.PROBE_TIMEOUT)  # nobody answered: primary
    assert alpha.state == S.PRIMARY
    assert alpha.primary.scanner is scanner, "a second scan instead of the first one's result"
    assert alpha.primary.index_ready
    assert sorted(alpha.primary.index["docs"]) == sorted(f"f{i}" for i in range(50))
    assert alpha.primary.seq >= 1
    assert "taking on the scan begun at start-up (done, 1 report(s) held)" in caplog.text
    (docs / "later").write_bytes(b"new")  # the adopted scanner's watcher goes on reporting
    wait_for(lambda: (alpha.primary.pipe.poll(0) and alpha.primary.on_scanner(
        alpha.primary.pipe.recv_multipart())) or "later" in alpha.primary.index["docs"], 20,
        "the watcher's report of a file written after the adoption")


def test_a_node_that_follows_drops_the_scan_begun_at_start_up(alpha, caplog):
    caplog.set_level("INFO", logger="sbs")
    (alpha.cfg.folders[0].path / "a").write_bytes(b"a")
    alpha.primary.prescan(start_folders(alpha))
    scanner = alpha.primary.scanner
    alpha._do_follow()  # returns without waiting for the scan: the loop must go on pinging
    assert alpha.primary.scanner is None
    wait_for(lambda: not scanner.thread.is_alive(), 30, "the dropped scanner to end")
    assert alpha.primary.prescan_folders is None
    assert "the scan begun at start-up is dropped: this node is not primary" in caplog.text
    while alpha.primary.pipe.poll(100):  # what it reported before it stopped is not published
        alpha.primary.on_scanner(alpha.primary.pipe.recv_multipart())
    assert alpha.primary.seq == 0 and alpha.primary.index == {}


def test_a_changed_folder_list_is_scanned_anew_not_taken_from_the_early_scan(alpha, caplog):
    caplog.set_level("INFO", logger="sbs")
    folders = start_folders(alpha)
    alpha.primary.prescan(folders)
    early = alpha.primary.scanner
    other = {n: dataclasses.replace(f, filters=("*.txt",)) for n, f in folders.items()}
    alpha.primary.start(other)
    assert alpha.primary.scanner is not None and alpha.primary.scanner is not early
    assert not early.thread.is_alive()
    assert "the folder list changed since the scan begun at start-up" in caplog.text


def test_a_start_with_a_scanner_that_is_no_prescan_scans_anew(alpha):
    """Only a prescan of the same folders is taken on: any other scanner still running (of an
    earlier start) is stopped, and the new one's first scan makes the index ready."""
    (alpha.cfg.folders[0].path / "a").write_bytes(b"a")
    folders = start_folders(alpha)
    alpha.primary.start(folders)
    old = alpha.primary.scanner
    alpha.primary.start(folders)
    assert alpha.primary.scanner is not old and not old.thread.is_alive()
    side = alpha.primary
    wait_for(lambda: (side.pipe.poll(0) and side.on_scanner(side.pipe.recv_multipart()))
             or side.index_ready, 20, "the new scanner's first scan")
    assert "a" in side.index["docs"]


def test_a_prescan_that_holds_too_much_is_dropped(alpha, monkeypatch, caplog):
    caplog.set_level("INFO", logger="sbs")
    monkeypatch.setattr(primary_side, "PRESCAN_HELD_MAX", 0)
    alpha.primary.prescan(start_folders(alpha))
    wait_for(lambda: alpha.primary.pipe.poll(0) and alpha.primary.on_scanner(
        alpha.primary.pipe.recv_multipart()) is None and alpha.primary.scanner is None, 20,
        "the prescan to be dropped")
    assert "reports held while the role is still not known" in caplog.text
    alpha.primary.start(start_folders(alpha))  # a primary after all: a scan of its own
    assert alpha.primary.scanner is not None
    pump = alpha.primary
    wait_for(lambda: (pump.pipe.poll(0) and pump.on_scanner(pump.pipe.recv_multipart()))
             or pump.index_ready, 20, "the new scanner's first scan")


# ------------------------------------------------------------------ the loop and bad messages

def operator(node: Node) -> zmq.Socket:
    """A DEALER to the node's control port (no CURVE here: any sender may send anything); the
    node's loop may then run (_loop_once), still probing for its peer meanwhile."""
    node.probe_deadline = time.monotonic() + 600  # what run() sets
    node.stop_requested = 0
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.linger = 0
    sock.connect(f"tcp://{node.cfg.local}:{node.cfg.control_port}")
    return sock


def answer(node: Node, sock: zmq.Socket, command: str, body: dict | None = None,
           timeout: float = 20.0) -> protocol.Message | None:
    """Send `command`, run the node's loop until it answers (None: no answer in `timeout`)."""
    sock.send_multipart(protocol.encode(command, body or {}))
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        node._loop_once()
        if sock.poll(0):
            return protocol.decode(sock.recv_multipart())
    return None


def test_status_answers_with_a_kept_copy_2000_levels_deep(alpha, tmp_path):
    fd = os.open(alpha.state_dir, os.O_RDONLY | os.O_DIRECTORY)
    for name in ["conflicts", "20261205T000000.000Z", "docs"] + ["d"] * 1999:
        os.mkdir(name, dir_fd=fd)
        sub = os.open(name, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
        os.close(fd)
        fd = sub
    os.close(os.open("f.txt", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd))
    os.close(fd)
    sock = operator(alpha)
    try:
        msg = answer(alpha, sock, "STATUS")
        assert msg is not None and msg.command == "REPLY", msg
        conflicts = msg.body["conflicts"]
        assert conflicts["count"] == 1
        assert conflicts["files"][0]["path"] == "/".join(["d"] * 1999 + ["f.txt"])
    finally:  # pytest's own cleanup (shutil.rmtree) recurses: remove the deep tree here
        sock.close()
        subprocess.run(["rm", "-rf", str(alpha.state_dir / "conflicts")], check=False,
                       timeout=120)


def test_a_message_its_handler_fails_on_is_logged_and_dropped_and_the_loop_goes_on(
        alpha, caplog):
    status = alpha.control.commands["STATUS"]
    calls = []

    def broken_once(ident: bytes, body: dict) -> None:
        calls.append(body)
        if len(calls) == 1:
            raise KeyError("a bug one message meets")
        status(ident, body)

    alpha.control.commands["STATUS"] = broken_once
    sock = operator(alpha)
    try:
        # the operator hears at once that the command failed, and why, instead of a timeout
        msg = answer(alpha, sock, "STATUS")
        assert msg is not None and msg.body["status"] == "error", msg
        assert "STATUS failed inside the node (KeyError" in msg.body["reason"], msg
        msg = answer(alpha, sock, "STATUS")
        assert msg is not None and msg.body["status"] == "ok", msg
    finally:
        sock.close()
    failed = [r for r in caplog.records if "operator command STATUS failed" in r.getMessage()]
    assert len(failed) == 1
    assert failed[0].exc_info and failed[0].exc_info[0] is KeyError  # with its traceback


def test_a_peer_message_its_handler_fails_on_is_logged_and_dropped(alpha, caplog):
    """Any other handler's failure: the loop logs it with its traceback and goes on."""
    calls = []

    def broken(ident: bytes, msg: protocol.Message) -> None:
        calls.append(msg)
        raise KeyError("a bug one message meets")

    alpha.inbox.peer_commands["SNAPSHOT"] = broken
    sock = operator(alpha)
    try:
        sock.send_multipart(protocol.encode("SNAPSHOT", {"name": "beta"}))
        deadline = time.monotonic() + 20
        while not calls and time.monotonic() < deadline:
            alpha._loop_once()
        assert calls, "the SNAPSHOT never reached its handler"
        msg = answer(alpha, sock, "STATUS")  # the loop goes on
        assert msg is not None and msg.body["status"] == "ok", msg
    finally:
        sock.close()
    dropped = [r for r in caplog.records if r.getMessage().startswith("dropped a message")]
    assert len(dropped) == 1 and "on_router" in dropped[0].getMessage()
    assert dropped[0].exc_info and dropped[0].exc_info[0] is KeyError  # with its traceback


def test_an_fsm_action_that_fails_is_not_dropped_it_ends_the_loop(alpha, monkeypatch):
    def broken(**how) -> None:
        raise OSError("an action failed half-way")

    monkeypatch.setattr(alpha, "_do_refuse", broken)  # STARTING + PROMOTE refuses
    sock = operator(alpha)
    try:
        with pytest.raises(FsmFailure, match="starting \\+ promote -> starting: OSError"):
            answer(alpha, sock, "PROMOTE", {"force": False})
    finally:
        sock.close()


# ------------------------------------------------------------------ the term ([cluster] dcs)

def sentinels(epoch: int, sv: int) -> list[bytes]:
    return protocol.encode_bus("SENTINELS", {"name": "beta", "epoch": epoch, "sv": sv,
                                             "sentinels": {"web": "sleep 600"},
                                             "active": ["web"]})


def test_a_sentinel_list_of_a_term_older_than_the_keys_is_refused(alpha, monkeypatch, caplog):
    following(alpha, PRIMARY_RUN, 4)
    # then etcd tells alpha the leader key's create revision is 5 (a real Lease's check)
    lease = SimpleNamespace(term=5, _refused=None)
    monkeypatch.setattr(alpha.primacy, "stale", lambda what, body: Lease.stale(lease, what, body))
    alpha.secondary.on_bus(sentinels(4, 3))  # a primary that lost its lease, not knowing it
    assert alpha.lists.sv != 3 and "web" not in alpha.lists.pair.get("sentinels", {})
    assert "refused SENTINELS from beta: term 4 is older than the leader key's 5" in caplog.text
    alpha.secondary.on_bus(sentinels(4, 3))  # again (it comes with every heartbeat): said once
    assert caplog.text.count("refused SENTINELS from beta: term 4") == 1
    assert alpha.lists.sv != 3
    alpha.secondary.on_bus(sentinels(5, 3))  # the key's holder
    assert alpha.lists.sv == 3 and alpha.lists.pair["sentinels"] == {"web": "sleep 600"}


@pytest.mark.parametrize("state", [S.PRIMARY, S.HANDOVER, S.LEAVING])
def test_a_primary_that_retakes_an_expired_key_takes_its_term_in_a_hand_over_too(alpha, state,
                                                                                   monkeypatch):
    """etcd was away longer than ttl and the key expired; the primary took it again, under a
    new term. Its manifests must carry that term, or the secondary refuses them as a lost
    lease's: in the middle of a hand-over (HANDOVER, LEAVING) the final sync then timed out
    and the hand-over went ahead without the last files."""

    class Retaken:
        holder, term, reachable, mine, error = "alpha", 9, True, True, ""

        def on_report(self, frames: list[bytes]) -> bool:
            return True

        def event(self, state: S) -> None:
            return None

        def wish(self, state: S, **_) -> None:
            pass

        def want(self, flag: bool) -> None:
            pass

    alpha.epoch, alpha.state = 4, state
    monkeypatch.setattr(alpha.primacy, "lease", Retaken())  # undone before alpha closes
    alpha.primacy.on_report([b"{}"])
    assert alpha.epoch == 9


def test_unacknowledged_manifests_are_bounded_by_the_entries_they_hold(alpha, monkeypatch,
                                                                       caplog):
    """A primary whose secondary does not acknowledge (away, or far behind) keeps its
    manifests for the journal up to KEEP_UNACKED_ENTRIES entries, not every entry of 10,000
    manifests; what is let go is said once, and an acknowledgement starts afresh."""
    from sbs.node import primary as primary_mod
    monkeypatch.setattr(primary_mod, "KEEP_UNACKED_ENTRIES", 50)
    p = alpha.primary
    with caplog.at_level("INFO", logger="sbs.node"):
        for i in range(10):  # 10 manifests of 20 entries
            p.publish_delta({"docs": entries(*(f"d{i}-{j}" for j in range(20)))})
    assert p.seq == 10
    assert [s for s, _ in p.unacked] == [9, 10]  # 40 entries: a third would pass 50
    assert p.unacked_entries == sum(len(v) for _, part in p.unacked for v in part.values())
    assert sum("the oldest are let go" in r.message for r in caplog.records) == 1
    p.publish_delta({"docs": entries(*(f"big-{j}" for j in range(80)))})  # alone over 50
    assert [s for s, _ in p.unacked] == [11] and p.unacked_entries == 80  # the newest stays
    p.on_ack(b"", {"name": "beta", "run": "r", "applied": 11, "snapshot": False,
                   "following": alpha.run_id})
    assert not p.unacked and p.unacked_entries == 0 and p.unacked_dropped == 0
    wait_for(lambda: alpha.agreed.get("docs", "big-79") is not None, 5, "the journal")
    assert alpha.agreed.get("docs", "d0-0") is None  # let go: not recorded as agreed


def test_a_snapshot_older_than_a_manifest_let_go_records_no_agreement(alpha, monkeypatch):
    """A snapshot is acknowledged after manifests newer than it were let go unacknowledged:
    which paths changed after the snapshot is not known any more, so nothing of the index is
    recorded as agreed (a rejoin then keeps copies rather than deleting); a later snapshot's
    acknowledgement records it all."""
    from sbs.node import primary as primary_mod
    monkeypatch.setattr(primary_mod, "KEEP_UNACKED_ENTRIES", 40)
    p = alpha.primary
    jobs: list[tuple] = []
    put = p.journal_jobs.put
    monkeypatch.setattr(p.journal_jobs, "put", lambda job: (jobs.append(job), put(job)))
    p.publish_delta({"docs": entries("before")})  # manifest 1: the snapshot is taken here
    for i in range(4):  # manifests 2-5, 20 entries each: 1, 2 and 3 are let go
        p.publish_delta({"docs": entries(*(f"after{i}-{j}" for j in range(20)))})
    assert [s for s, _ in p.unacked] == [4, 5] and p.dropped_seq == 3
    p.on_ack(b"", {"name": "beta", "run": "r", "applied": 1, "snapshot": True,
                   "following": alpha.run_id})
    assert not any(whole for whole, _, _ in jobs)  # the index is not recorded as agreed
    assert [s for s, _ in p.unacked] == [4, 5]  # still waiting for their acknowledgement
    p.on_ack(b"", {"name": "beta", "run": "r", "applied": 5, "snapshot": True,
                   "following": alpha.run_id})
    assert any(whole for whole, _, _ in jobs)
    wait_for(lambda: alpha.agreed.get("docs", "after0-0") is not None, 5,
             "the index recorded at the later snapshot")
    assert alpha.agreed.get("docs", "after3-19") is not None
    assert alpha.agreed.get("docs", "before") is not None


def test_a_syncer_told_to_stop_in_the_middle_of_its_scan_ends_there(tmp_path, monkeypatch):
    """Syncer.stop runs on the node loop (a takeover stops the secondary's syncer): a snapshot
    scan under way ends at its next folder instead of walking the rest of the tree, and the
    stop is not reported as a failed sync job."""
    from sbs.node import syncer as syncer_mod
    from sbs.node.journal import Agreed

    cfg = plain_config(tmp_path)
    ctx = zmq.Context()
    pipe = ctx.socket(zmq.PAIR)
    pipe.bind("inproc://syncer-stop")
    agreed = Agreed(tmp_path / "agreed.jsonl")
    syncer = syncer_mod.Syncer(ctx, "inproc://syncer-stop", cfg, None, agreed)
    walked = []

    def scan(root, filt, cache, *, between=None, **kw):
        walked.append(root)
        syncer.fetcher.cancelled.set()  # the stop comes while the walk is in its first folder
        between()  # what scan_folder calls after each folder
        walked.append("went on")
        return {}

    monkeypatch.setattr(syncer_mod, "scan_folder", scan)
    try:
        syncer.start()
        syncer.submit_snapshot(1, {f.name: f for f in cfg.folders}, {"docs": []})
        syncer.thread.join(10)
        assert not syncer.thread.is_alive()
        assert walked == [str(cfg.folders[0].path)]
        assert syncer.pending.error == "" and not pipe.poll(0)  # no report of a failed job
    finally:
        syncer.stop()
        pipe.close(0)
        agreed.close()
        ctx.term()


def test_the_same_error_answer_of_the_peer_is_logged_once(alpha, caplog):
    """A secondary asks a peer that is not primary yet for a snapshot every few hundred ms
    (after a hand-over, until the peer has the key): one warning, not one per answer."""
    with caplog.at_level("DEBUG", logger="sbs.node"):
        for _ in range(5):
            alpha.link.on_dealer(protocol.reply_error("not primary"))
        alpha.link.on_dealer(protocol.reply_error("busy"))
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert warned == ["peer answered: not primary", "peer answered: busy"], warned
