"""Edges of the secondary's apply: a failure that goes away must not make a file that depends
on it be given up for good, and a reply shorter than the file must not count as applied.

Every wait polls a condition with a deadline.
"""
from __future__ import annotations

import os

import pytest

from tests.pair import wait_for
from tests.test_e2e_replication import (
    _unshare_works,
    replication,
    started,
    wait_equal,
    write,
)
from tests.test_e2e_state_disk import fill, on_tmpfs


@pytest.mark.skipif(not _unshare_works(), reason="needs unshare -m and mount (root)")
def test_a_file_under_a_folder_that_replaces_a_file_arrives_once_the_state_disk_has_room(
        make_pair):
    """On the primary a file `d` becomes a folder `d` holding `d/e`. The secondary first moves
    its old `d` to the trash, in state_dir: that disk is full, so `d` stays pending (a full
    disk is retried). `d/e` then meets the old file `d` in its way: it must wait for `d`, not
    be refused for good, or once the state disk has room `d` arrives and `d/e` never does,
    while the secondary says it is in sync."""
    pair = make_pair()
    beta, state = on_tmpfs(pair, "beta")
    a, b = pair.folder("alpha"), pair.folder("beta")
    write(a / "d", os.urandom(256 << 10))  # too big for what is left on the full state disk
    started(pair)
    wait_equal(a, b, 20, "d on beta")
    filler = fill(beta.inside(state))
    # a file becomes a folder with a file in it (renamed in whole: one watcher batch or two)
    staged = pair.root / "staged"
    write(staged / "e", "in the folder that replaced a file\n")
    os.unlink(a / "d")
    os.rename(staged, a / "d")
    wait_for(lambda: "disk full" in replication(beta).get("error", ""), 20,
             f"beta to meet its full state disk {beta.tail_log()}")
    os.unlink(filler)  # room again: the retry moves the old d to the trash
    wait_for(lambda: (b / "d").is_dir(), 20, f"d to become a folder on beta {beta.tail_log()}")
    wait_equal(a, b, 20, "d/e on beta")
    wait_for(lambda: replication(beta).get("synced"), 20, "beta in sync")


def test_a_reply_shorter_than_the_file_leaves_it_pending_not_applied(tmp_path):
    """The last chunk of a big file comes back shorter than asked (a file server that read a
    file shrinking under it, or a broken peer), its size still the manifest's: the file is not
    complete, so it stays pending and is fetched again, instead of being dropped while the
    syncer reports the snapshot applied."""
    import threading

    import orjson
    import zmq
    from sbs.node import protocol
    from sbs.node.config import load
    from sbs.node.index import hash_bytes
    from sbs.node.journal import Agreed
    from sbs.node.syncer import Syncer

    from tests.pair import free_port_triplet, write_config

    port = free_port_triplet()
    (tmp_path / "data/alpha/docs").mkdir(parents=True)
    cfg = load(write_config(tmp_path, "alpha", port, security={"curve": "false"}))
    content = os.urandom(3 << 19)  # 1.5 MiB: two chunks, the second one of 0.5 MiB
    entry = {"path": "big.bin", "kind": "file", "size": len(content),
             "mtime_ns": 1_700_000_000_000_000_000, "mode": 0o644, "hash": hash_bytes(content)}
    ctx = zmq.Context()
    rep = ctx.socket(zmq.REP)
    rep.linger = 0
    rep.bind(f"tcp://{cfg.peer}:{cfg.blob_port}")  # where the syncer fetches from
    cut = {"done": False}
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            if not rep.poll(50):
                continue
            msg = protocol.decode(rep.recv_multipart())
            metas, blobs = [], []
            for item in msg.body["items"]:
                data = content[item["o"]:item["o"] + item["n"]]
                if item["o"] + item["n"] >= len(content) and not cut["done"]:
                    cut["done"] = True  # the first time only: half of the last chunk
                    data = data[:len(data) // 2]
                metas.append({"size": len(content)})
                blobs.append(data)
            rep.send_multipart(protocol.encode("DATA", {"id": msg.body["id"], "items": metas},
                                               *blobs))

    server = threading.Thread(target=serve, name="test-blobs", daemon=True)
    server.start()
    pipe = ctx.socket(zmq.PAIR)
    pipe.linger = 0
    pipe.bind("inproc://syncer-short")
    agreed = Agreed(tmp_path / "agreed.jsonl")
    syncer = Syncer(ctx, "inproc://syncer-short", cfg, None, agreed)
    target = cfg.folders[0].path / "big.bin"
    try:
        syncer.start()
        syncer.submit_snapshot(1, {f.name: f for f in cfg.folders}, {"docs": [entry]})

        def first_report() -> dict | None:
            while pipe.poll(0):
                kind, body = pipe.recv_multipart()
                if kind == b"applied":
                    return orjson.loads(body)
            return None

        report = wait_for(first_report, 20, "the syncer's first report")
        assert cut["done"]
        assert target.exists() or report["pending_files"] == 1, \
            f"big.bin is neither written nor pending, yet reported: {report}"
        wait_for(lambda: target.exists() and target.read_bytes() == content, 20,
                 "big.bin fetched again, whole")
    finally:
        syncer.stop()
        stop.set()
        server.join(5)
        rep.close(0)
        pipe.close(0)
        agreed.close()
        ctx.term()
