"""The file server and the fetch client over real sockets on loopback (no CURVE here: the
security tests cover it): many small files come back in one packed frame, cut by the client
into views; a reply whose lengths do not add up is refused, and a server that does not pack
(an older one) is still understood."""
from __future__ import annotations

import threading

import pytest
import zmq
from sbs.node import protocol
from sbs.node.config import FolderConfig
from sbs.node.content import BlobServer, Fetcher, FetchError, unpack

from tests.pair import free_port_triplet


@pytest.fixture
def served(tmp_path):
    """A BlobServer for folder docs on a free port, and the endpoint to fetch from."""
    docs = tmp_path / "docs"
    docs.mkdir()
    ctx = zmq.Context()
    endpoint = f"tcp://127.0.0.1:{free_port_triplet()}"
    server = BlobServer(ctx, endpoint, None)
    server.set_folders({"docs": FolderConfig("docs", docs)})
    server.start_and_wait()
    try:
        yield ctx, endpoint, docs
    finally:
        server.stop()
        ctx.term()


def items_for(names: list[str], sizes: dict[str, int]) -> list[dict]:
    return [{"f": "docs", "p": n, "o": 0, "n": max(1, sizes.get(n, 1))} for n in names]


def test_many_small_files_come_back_in_one_packed_frame(served):
    ctx, endpoint, docs = served
    want = {f"f{i}": bytes([i]) * (i * 7) for i in range(1, 40)}
    for name, data in want.items():
        (docs / name).write_bytes(data)
    names = [*want, "missing"]
    sizes = {n: len(d) for n, d in want.items()}
    raw = ctx.socket(zmq.DEALER)  # what goes over the wire
    raw.linger = 0
    raw.connect(endpoint)
    raw.send_multipart([b"", *protocol.encode("GET", {"id": 7, "items": items_for(names, sizes),
                                                      "pack": True})])
    assert raw.poll(10_000)
    reply = raw.recv_multipart()[1:]
    raw.close()
    msg = protocol.decode(reply)
    assert msg and msg.body["packed"] is True and len(msg.blobs) == 1
    assert msg.blobs[0] == b"".join(want.values())
    assert msg.body["items"][-1]["n"] == 0 and "err" in msg.body["items"][-1]
    fetcher = Fetcher(ctx, endpoint, None)
    try:
        [(items, metas, blobs)] = list(fetcher.fetch([items_for(names, sizes)]))
    finally:
        fetcher.close()
    got = {item["p"]: bytes(blob) for item, blob in zip(items, blobs, strict=True)}
    assert {n: got[n] for n in want} == want and got["missing"] == b""
    assert metas[-1]["size"] == -1


def fake_server(ctx: zmq.Context, answer) -> tuple[str, threading.Thread]:
    """A REP answering one GET with answer(body): frames of a DATA reply."""
    rep = ctx.socket(zmq.REP)
    rep.linger = 0
    port = rep.bind_to_random_port("tcp://127.0.0.1")

    def run() -> None:
        if rep.poll(10_000):
            msg = protocol.decode(rep.recv_multipart())
            rep.send_multipart(answer(msg.body))
        rep.close()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return f"tcp://127.0.0.1:{port}", thread


def test_a_packed_reply_whose_lengths_do_not_add_up_is_refused():
    ctx = zmq.Context()
    endpoint, thread = fake_server(ctx, lambda body: protocol.encode("DATA", {
        "id": body["id"], "items": [{"size": 3, "n": 3}, {"size": 3, "n": 3}],
        "packed": True}, b"abcdefXX"))
    fetcher = Fetcher(ctx, endpoint, None)
    try:
        with pytest.raises(FetchError, match="do not add up"):
            list(fetcher.fetch([items_for(["a", "b"], {"a": 3, "b": 3})]))
    finally:
        fetcher.close()
        thread.join(10)
        ctx.term()


def test_a_server_that_does_not_pack_is_understood():
    ctx = zmq.Context()
    endpoint, thread = fake_server(ctx, lambda body: protocol.encode("DATA", {
        "id": body["id"], "items": [{"size": 3}, {"size": 2}]}, b"abc", b"de"))
    fetcher = Fetcher(ctx, endpoint, None)
    try:
        [(_, _, blobs)] = list(fetcher.fetch([items_for(["a", "b"], {"a": 3, "b": 2})]))
    finally:
        fetcher.close()
        thread.join(10)
        ctx.term()
    assert [bytes(b) for b in blobs] == [b"abc", b"de"]


def test_unpack_cuts_views_and_refuses_a_frame_of_another_length():
    metas = [{"size": 3, "n": 3}, {"size": -1, "err": "gone", "n": 0}, {"size": 2, "n": 2}]
    views = unpack(memoryview(b"abcde"), metas)
    assert [bytes(v) for v in views] == [b"abc", b"", b"de"]
    assert all(isinstance(v, memoryview) for v in views)
    assert unpack(memoryview(b"abcdef"), metas) is None
    assert unpack(memoryview(b"abcd"), metas) is None
