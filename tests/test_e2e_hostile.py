"""Hostile peers and hostile trees (issue 12), with real node processes on 127.0.0.1 (alpha)
and 127.0.0.2 (beta). Every wait polls a condition with a deadline."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

import psutil
import pytest
import zmq
from sbs.node import protocol
from sbs.node.security import client, load_keys
from sbs.tools.client import subscribe

from tests.pair import HOSTS, wait_for
from tests.test_e2e_replication import (
    FakePrimary,
    MiB,
    _curve_socket,
    _entry,
    replication,
    sbs_tools,
    started,
    write,
)

DEPTH = 2000  # levels: far past Python's recursion limit (about 1,000)


def _deep(root: Path, depth: int) -> tuple[str, str]:
    """deep/d/d/... `depth` levels made one openat at a time (no long paths, no recursion);
    returns the relpaths of the deepest folder and of a file halfway down."""
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    names = ["deep"] + ["d"] * (depth - 1)
    for n, name in enumerate(names):
        os.mkdir(name, dir_fd=fd)
        sub = os.open(name, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
        os.close(fd)
        fd = sub
        if n == depth // 2:
            f = os.open("half.txt", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd)
            os.write(f, b"half way down\n")
            os.close(f)
    os.close(fd)
    return "/".join(names), "/".join(names[:depth // 2 + 1] + ["half.txt"])


@pytest.mark.timeout(600)  # several phases over 2,000 levels, each with its own deadline
def test_a_tree_2000_levels_deep_replicates_restarts_takes_over_and_deletes(make_pair):
    pair = make_pair(node={"strict": "true"})
    try:
        a, b = pair.folder("alpha"), pair.folder("beta")
        # the deepest folder's absolute path must fit PATH_MAX (4096 with its NUL) on both
        # nodes: a longer temp folder (pytest-xdist's, a deep TMPDIR) leaves a few levels fewer
        depth = min(DEPTH, (4095 - len(os.fsencode(a)) - 4) // 2)
        assert depth >= 1500, f"the test folder's path {a} leaves room for {depth} levels only"
        for n in range(6):  # the one deep file is then no mass deletion for the strict guard
            write(a / f"top{n}.txt", f"top {n}\n")
        deepest, half = _deep(a, depth)
        pair.start_both()  # generous deadlines: 2,000 watches and levels on a loaded machine
        wait_for(lambda: replication(pair.beta).get("synced"), 120,
                 "beta's first sync")
        wait_for(lambda: (b / deepest).is_dir() and (b / half).is_file(), 60,
                 "beta to copy the deep tree")

        # a restarted secondary cleans its temp files over the whole tree, then takes a snapshot
        pair.beta.stop()
        pair.beta.start()
        pair.beta.wait_state("secondary", 60)
        wait_for(lambda: replication(pair.beta).get("synced"), 120,
                 "the restarted beta to sync")
        res = sbs_tools("verify", "--config", str(pair.alpha.config), timeout=120)
        assert res.returncode == 0, res.stdout + res.stderr

        # a takeover watches the whole tree before it scans it
        pair.alpha.kill()
        pair.beta.wait_state("primary", 60)
        wait_for(lambda: replication(pair.beta).get("ready"), 120,
                 "the new primary's first scan")
        pair.alpha.start()
        pair.alpha.wait_state("secondary", 60)
        wait_for(lambda: replication(pair.alpha).get("synced"), 120,
                 "alpha to follow beta")

        # strict: the deep tree deleted on the primary goes to the secondary's trash
        subprocess.run(["rm", "-rf", str(b / "deep")], check=True, timeout=60)
        wait_for(lambda: not (a / "deep").exists(), 180,
                 "alpha to delete the deep tree")
        trash = pair.alpha.cfg.state_dir / "trash"
        assert any(p.name == "deep" for stamp in trash.iterdir() for p in stamp.rglob("deep"))
        res = sbs_tools("verify", "--config", str(pair.beta.config), timeout=120)
        assert res.returncode == 0, res.stdout + res.stderr
        assert pair.alpha.state() == "secondary" and pair.beta.state() == "primary"
    finally:
        # pytest removes old temp folders with shutil.rmtree, which recurses: a tree this deep
        # left behind would end a later test session with a RecursionError
        pair.stop()
        subprocess.run(["rm", "-rf", str(pair.root / "data"), str(pair.root / "state")],
                       check=False, timeout=120)


# ------------------------------------------------------------------------ the file server

class Fetch:
    """A REQ to a node's file server with the peer's key (what a hostile peer holds)."""

    def __init__(self, pair, node: str = "alpha", timeout_ms: int = 5000):
        other = pair.beta if node == "alpha" else pair.alpha
        keys = load_keys(other.cfg)
        self.ctx = zmq.Context()
        self.sock = _curve_socket(self.ctx, zmq.REQ, keys, keys.peer_public)
        self.sock.rcvtimeo = self.sock.sndtimeo = timeout_ms
        self.sock.connect(f"tcp://{HOSTS[node]}:{pair.port + 2}")

    def get(self, items: list[dict]) -> protocol.Message:
        self.sock.send_multipart(protocol.encode("GET", {"id": 1, "items": items}))
        msg = protocol.decode(self.sock.recv_multipart())  # zmq.Again when nobody answers
        assert msg, msg
        return msg

    def close(self) -> None:
        self.sock.close()
        self.ctx.term()


def _primary_alone(pair):
    pair.alpha.start()
    pair.alpha.wait_state("primary")
    wait_for(lambda: replication(pair.alpha).get("ready"), 20, "alpha's first scan")


def test_one_get_cannot_make_the_file_server_hold_more_than_its_bound(make_pair):
    pair = make_pair()
    a = pair.folder("alpha")
    write(a / "big.bin", os.urandom(4 * MiB))
    write(a / "small.txt", "small\n")
    _primary_alone(pair)
    server = psutil.Process(pair.alpha.pid)
    fetch = Fetch(pair)
    try:
        before = server.memory_info().rss
        # 128 items of the largest chunk: 256 MiB in one reply if the server built it
        msg = fetch.get([{"f": "docs", "p": "big.bin", "o": 0, "n": protocol.MAX_CHUNK}] * 128)
        grew = server.memory_info().rss - before
        assert msg.command == "REPLY" and msg.body["status"] == "error", msg.command
        assert str(protocol.MAX_GET_BYTES) in msg.body["reason"]
        assert grew < 64 * MiB, f"the file server grew by {grew / MiB:.0f} MiB"
        # right at the bound is served; the server keeps answering
        msg = fetch.get([{"f": "docs", "p": "big.bin", "o": n * MiB, "n": MiB} for n in range(2)])
        assert msg.command == "DATA" and [len(b) for b in msg.blobs] == [MiB] * 2
        msg = fetch.get([{"f": "docs", "p": "small.txt", "o": 0, "n": 100}])
        assert msg.blobs == [b"small\n"]
    finally:
        fetch.close()
    assert pair.alpha.state() == "primary"


def test_a_fifo_is_refused_and_the_server_keeps_serving_the_secondary(make_pair):
    pair = make_pair()
    a, b = pair.folder("alpha"), pair.folder("beta")
    write(a / "first.txt", "first\n")
    os.mkfifo(a / "pipe")
    os.mkdir(a / "sub")
    started(pair)
    fetch = Fetch(pair)
    try:
        for path in ("pipe", "sub"):  # no writer ever opens the FIFO: a blocking open hangs
            msg = fetch.get([{"f": "docs", "p": path, "o": 0, "n": 100}])
            assert msg.command == "DATA" and msg.body["items"][0]["size"] == -1, path
            assert "regular" in msg.body["items"][0]["err"] and msg.blobs == [b""]
    finally:
        fetch.close()
    write(a / "after.txt", "after the fifo\n")
    wait_for(lambda: (b / "after.txt").is_file(), 20,
             "the real secondary's next fetch")
    assert (b / "after.txt").read_text() == "after the fifo\n"
    assert not (b / "pipe").exists()


def test_the_file_server_serves_only_what_the_filters_replicate(make_pair):
    pair = make_pair(alpha={"folders": {"labels": "data/alpha/labels *.lab"}})
    lab = pair.folder("alpha", "labels")
    write(lab / "secret.txt", "CANARY not replicated\n")
    write(lab / "a.lab", "label\n")
    write(lab / "deep" / "b.lab", "deep label\n")
    _primary_alone(pair)
    fetch = Fetch(pair)
    try:
        msg = fetch.get([{"f": "labels", "p": p, "o": 0, "n": 100}
                         for p in ("secret.txt", "a.lab", "deep/b.lab")])
        metas = msg.body["items"]
        assert metas[0]["size"] == -1 and "filter" in metas[0]["err"]
        assert msg.blobs == [b"", b"label\n", b"deep label\n"]
    finally:
        fetch.close()


def test_one_get_across_many_folders_serves_each_file_and_leaves_no_folder_open(make_pair):
    """The server keeps a request's parent folders open while it answers it (one walk per
    folder, not per file): every file still comes from its own folder, a link on the way is
    still refused, and nothing stays open after the reply."""
    pair = make_pair()
    a = pair.folder("alpha")
    for d in range(20):  # more folders than the server keeps open at once
        for f in range(3):
            write(a / "deep" / f"d{d:02}" / f"f{f}.txt", f"{d}/{f}\n")
    os.symlink("deep/d00", a / "link")
    _primary_alone(pair)
    server = psutil.Process(pair.alpha.pid)
    fetch = Fetch(pair)
    try:
        fetch.get([{"f": "docs", "p": "deep/d00/f0.txt", "o": 0, "n": 100}])
        fds = server.num_fds()
        items = [{"f": "docs", "p": f"deep/d{d:02}/f{f}.txt", "o": 0, "n": 100}
                 for f in range(3) for d in range(20)]
        items.append({"f": "docs", "p": "link/f0.txt", "o": 0, "n": 100})
        msg = fetch.get(items)
        assert msg.command == "DATA"
        want = [f"{d}/{f}\n".encode() for f in range(3) for d in range(20)]
        assert msg.blobs[:-1] == want
        assert msg.body["items"][-1]["size"] == -1 and msg.blobs[-1] == b""
        assert server.num_fds() <= fds, "the request left folders open"
    finally:
        fetch.close()


# ------------------------------------------------------------------------ pushed folder paths

def test_a_bad_pushed_folder_path_refuses_that_folder_and_the_others_replicate(make_pair):
    pair = make_pair(node={"dead_after": 3.0})
    b = pair.folder("beta")
    other = pair.root / "other"  # a folder beta does not configure: the pushed path is used
    data = b"an honest file\n"
    fake = FakePrimary(pair, {n: [_entry("f.txt", data)] for n in
                              ("docs", "other", "nul", "dots", "long", "rel")}, {"f.txt": data})
    fake.folders = {n: ["*"] for n in ("docs", "other", "nul", "dots", "long", "rel")}
    fake.paths = {"other": str(other), "nul": str(pair.root / "a\x00b"),
                  "dots": str(pair.root / "x" / ".." / "dots"), "rel": "rel/dir",
                  "long": "/tmp/" + "x" * 300}
    try:
        pair.beta.start()
        pair.beta.wait_state("secondary")
        wait_for(lambda: (b / "f.txt").is_file() and (other / "f.txt").is_file(), 20,
                 "the good folders to replicate")
    finally:
        fake.stop()
    log = pair.beta.log.read_text()
    for name, why in (("nul", "NUL"), ("dots", "'..'"), ("long", "longer"),
                      ("rel", "not an absolute")):
        assert f"folder '{name}': no path here and no usable path" in log and why in log, name
    assert not (pair.root / "dots").exists() and not (pair.root / "x").exists()
    assert pair.beta.proc.poll() is None


# ------------------------------------------------------------------------ peer commands

def _control(pair, key_of: str, to: str) -> zmq.Socket:
    """A DEALER to `to`'s control port holding `key_of`'s key pair (the peer's key when they
    differ: what a hostile peer holds; the node's own key: what its operator's tools hold)."""
    keys = load_keys(pair.nodes[key_of].cfg)
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.linger = 0
    sock.rcvtimeo = 5000
    client(sock, keys, keys.public if key_of == to else keys.peer_public)
    sock.connect(f"tcp://{HOSTS[to]}:{pair.port}")
    return sock


def _heartbeat(pair, of: str) -> dict:
    """The latest HB body on `of`'s bus, as its peer sees it."""
    other = "beta" if of == "alpha" else "alpha"
    messages = subscribe(pair.nodes[other].cfg, peer=True)
    try:
        for msg in messages:
            if msg and msg.command == "HB":
                return msg.body
    finally:
        messages.close()
    raise AssertionError("no heartbeat")


def test_a_handover_with_a_stale_epoch_is_logged_and_dropped(make_pair):
    pair = make_pair()
    pair.start_both()
    pair.alpha.stop()  # alpha again, so its epoch is 2 and epoch 1 is a real, older one
    pair.beta.wait_state("primary")
    pair.alpha.start()
    pair.alpha.wait_state("secondary")
    pair.beta.stop()
    pair.alpha.wait_state("primary")
    pair.beta.start()
    pair.beta.wait_state("secondary")
    hb = _heartbeat(pair, "alpha")
    assert hb["state"] == "primary" and hb["epoch"] >= 2
    sock = _control(pair, "alpha", "beta")  # the primary's key, as a peer-key holder has it
    try:
        for epoch in (hb["epoch"] - 1, 0):
            sock.send_multipart(protocol.encode("HANDOVER", {
                "name": "alpha", "run": hb["run"], "epoch": epoch, "seq": hb["seq"]}))
            wait_for(lambda e=epoch: f"ignored HANDOVER stale epoch {e}" in
                     pair.beta.log.read_text(), 10, f"beta to drop the HANDOVER of epoch {epoch}")
        # and a replayed ASK_HANDOVER of an older epoch reaches the primary no better
        sock_a = _control(pair, "beta", "alpha")
        hb_b = _heartbeat(pair, "beta")
        sock_a.send_multipart(protocol.encode("ASK_HANDOVER", {
            "name": "beta", "run": hb_b["run"], "epoch": hb_b["epoch"] - 1}))
        wait_for(lambda: "ignored ASK_HANDOVER stale epoch" in pair.alpha.log.read_text(), 10,
                 "alpha to drop the stale ASK_HANDOVER")
        sock_a.close()
    finally:
        sock.close()
    # the dropped commands moved nobody: a pong round later the roles are as they were
    assert pair.beta.status()["state"] == "secondary"
    assert pair.alpha.status()["state"] == "primary"
    assert "took over" not in pair.beta.log.read_text().split("ignored HANDOVER")[-1]


def test_snapshot_parts_out_of_order_or_of_a_stale_run_are_logged_and_refused(make_pair):
    """A snapshot in parts is taken only whole, its parts in order and all of the primary's
    current run and epoch: a part out of place or a stale one in the middle leaves nothing
    applied (and a new snapshot asked for); the same parts in order are taken."""
    pair = make_pair(node={"dead_after": 3.0})
    b = pair.folder("beta")
    data = b"from a snapshot in parts\n"
    fake = FakePrimary(pair, {"docs": [_entry("f.txt", data), _entry("g.txt", data)]},
                       {"f.txt": data, "g.txt": data})
    fake.folders, fake.paths = {"docs": ["*"]}, {"docs": str(b)}

    def parts(order: tuple[int, ...], changed: dict[int, dict] | None = None):
        def split(body: dict) -> list[dict]:
            first, second = body["index"]["docs"]
            pieces = [{"docs": []}, {"docs": [first]}, {"docs": [second]}]
            return [{**body, "part": n, "parts": 3, "sid": "s1", "index": pieces[n],
                     **(changed or {}).get(n, {})} for n in order]
        return split

    try:
        for split, why in ((parts((0, 2, 1)), "part 3/3: part 2 was due; asking again"),
                           (parts((0, 1, 2), {1: {"run": "oldrun"}}), "from run oldrun"),
                           (parts((0, 1, 2), {1: {"epoch": 6}}), "stale epoch 6"),
                           (parts((1, 2)), "part 2/3 of a reply not being received")):
            fake.snapshot_parts = split
            pair.beta.start()
            pair.beta.wait_state("secondary")
            wait_for(lambda w=why: w in pair.beta.log.read_text(), 20,
                     f"beta to refuse the part ({why})")
            wait_for(lambda: fake.snapshots >= 2, 30, "beta to ask again")
            assert not (b / "f.txt").exists() and not (b / "g.txt").exists()
            assert "snapshot from alpha" not in pair.beta.log.read_text()
            pair.beta.stop()
            fake.snapshots = 0
        fake.snapshot_parts = parts((0, 1, 2))
        pair.beta.start()
        pair.beta.wait_state("secondary")
        wait_for(lambda: (b / "f.txt").is_file() and (b / "g.txt").is_file(), 20,
                 "beta to take the parts in order")
        assert "2 entries in 3 part(s)" in pair.beta.log.read_text()
    finally:
        fake.stop()


def test_a_stale_snapshot_rep_and_a_stale_lists_are_logged_and_dropped(make_pair):
    """The fake primary is run "fakerun" at epoch 7 (its pongs and heartbeats say so); what it
    answers or sends as an older run or epoch is dropped, what it sends as itself is taken."""
    pair = make_pair(node={"dead_after": 3.0})
    b = pair.folder("beta")
    data = b"from the current snapshot\n"
    fake = FakePrimary(pair, {"docs": [_entry("f.txt", data)]}, {"f.txt": data})
    fake.folders, fake.paths = {"docs": ["*"]}, {"docs": str(b)}
    try:
        for stale, why in (({"run": "fakerun", "epoch": 6}, "stale epoch 6"),
                           ({"run": "oldrun", "epoch": 7}, "from run oldrun")):
            fake.snapshot_from = stale
            pair.beta.start()
            pair.beta.wait_state("secondary")
            wait_for(lambda w=why: f"ignored SNAPSHOT_REP {w}" in pair.beta.log.read_text(), 20,
                     f"beta to drop the SNAPSHOT_REP ({why})")
            assert not (b / "f.txt").exists()
            pair.beta.stop()
        fake.snapshot_from = {"run": "fakerun", "epoch": 7}
        pair.beta.start()
        pair.beta.wait_state("secondary")
        wait_for(lambda: (b / "f.txt").is_file(), 20,
                 "beta to follow the current snapshot")

        sock = _control(pair, "alpha", "beta")  # alpha's key, as the fake holds it
        try:
            lists = {"name": "alpha", "run": "fakerun", "epoch": 7, "gen": 7, "at": 1.0,
                     "by": "alpha", "folders": {"docs": ["*"]}, "paths": {"docs": str(b)},
                     "sentinels": {}}
            for stale, why in (({"epoch": 6}, "stale epoch 6"), ({"epoch": 0}, "stale epoch 0"),
                               ({"run": "oldrun"}, "from run oldrun")):
                sock.send_multipart(protocol.encode("LISTS", {**lists, **stale}))
                wait_for(lambda w=why: f"ignored LISTS {w}" in pair.beta.log.read_text(), 10,
                         f"beta to drop the LISTS ({why})")
            assert pair.beta.status()["lists"]["gen"] == 0
            sock.send_multipart(protocol.encode("LISTS", lists))  # current: taken
            wait_for(lambda: pair.beta.status()["lists"]["gen"] == 7, 10,
                     "beta to take the current LISTS")
        finally:
            sock.close()
    finally:
        fake.stop()
    assert "Traceback" not in pair.beta.log.read_text()


def _ask(sock: zmq.Socket, command: str, body: dict | None = None) -> dict:
    sock.send_multipart(protocol.encode(command, body or {}))
    msg = protocol.decode(sock.recv_multipart())
    assert msg and msg.command == "REPLY", msg
    return msg.body


OPERATOR = [("PROMOTE", {"force": True}), ("PROMOTE", {"force": False}),
            ("SENTINEL", {"action": "stop", "name": "svc"}),
            ("SENTINEL", {"action": "start", "name": "svc"}), ("SENTINEL", {"action": "list"}),
            ("CONFIRM", {}), ("VERIFY", {}), ("VERIFY", {"peer": True}), ("STATUS", {})]


def test_operator_commands_need_the_nodes_own_key_not_the_peers(make_pair):
    pair = make_pair(node={"strict": "true"}, sentinels={"svc": "sleep 600"})
    pair.start_both()

    def svc() -> dict:
        st = pair.alpha.status(2.0)
        return next((s for s in st["sentinels"] if s["name"] == "svc"), {}) if st else {}

    # running before the refused commands (the primary starts it just after saying primary)
    pid = wait_for(lambda: svc().get("state") == "running" and svc()["pid"], 15, "svc running")
    for node, peer in (("alpha", "beta"), ("beta", "alpha")):
        sock = _control(pair, peer, node)  # the peer's key, speaking to `node`
        try:
            for command, body in OPERATOR:
                reply = _ask(sock, command, body)
                assert reply["status"] == "error", (node, command, reply)
                assert reply["reason"] == f"refused: {command} needs this node's own key"
        finally:
            sock.close()
    assert pair.alpha.status()["state"] == "primary"
    assert pair.beta.status()["state"] == "secondary"
    after = svc()  # the refused stop and start changed nothing: the same process runs
    assert after["state"] == "running" and after["active"] and after["pid"] == pid, after
    # the node's own key (its operator's tools) may; a peer command from it is dropped
    own = _control(pair, "beta", "beta")
    try:
        assert _ask(own, "STATUS")["state"] == "secondary"
        # taken (not refused for its key): the guard holds nothing, which is its answer
        confirm = _ask(own, "CONFIRM")
        assert "holds no deletions" in confirm.get("reason", ""), confirm
        assert set(_ask(own, "VERIFY")["folders"]) == {"docs"}
        assert set(_ask(own, "VERIFY", {"peer": True})["folders"]) == {"docs"}
        own.send_multipart(protocol.encode("HANDOVER", {
            "name": "alpha", "run": _heartbeat(pair, "alpha")["run"],
            "epoch": 99, "seq": 0}))
        wait_for(lambda: "refused HANDOVER" in pair.beta.log.read_text(), 10,
                 "beta to refuse a HANDOVER sent with its own key")
    finally:
        own.close()
    res = sbs_tools("verify", "--config", str(pair.beta.config), timeout=120)
    assert res.returncode == 0 and "identical" in res.stdout, res.stdout + res.stderr
    res = sbs_tools("promote", "--config", str(pair.beta.config), timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    pair.beta.wait_state("primary")
    assert pair.alpha.status()["state"] == "secondary"


def test_pinned_sentinels_refuse_commands_the_secondarys_own_config_does_not_name(make_pair):
    """The primary (a peer-key holder) chooses the sentinel commands a takeover runs, unless
    the secondary pins them: [security] pin_sentinels = true."""
    pair = make_pair(
        alpha={"sentinels": {"svc": "sleep 600", "planted": "sleep 601",
                             "changed": "sleep 602"}},
        beta={"sentinels": {"svc": "sleep 600", "changed": "sleep 603"},
              "security": {"pin_sentinels": "true"}})
    pair.start_both()
    pair.alpha.kill()
    st = pair.beta.wait_state("primary", 20)
    running = {s["name"]: s for s in st["sentinels"]}
    assert set(running) == {"svc"}, running  # "changed" runs neither alpha's nor its own
    wait_for(lambda: [s for s in pair.beta.status()["sentinels"] if s["state"] == "running"],
             10, "svc to run on beta")
    log = pair.beta.log.read_text()
    assert "refused sentinel 'planted' pushed by the peer: not in this node's sbs.ini" in log
    assert "refused sentinel 'changed' pushed by the peer: its command differs" in log
