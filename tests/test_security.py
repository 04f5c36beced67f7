"""Key files: keygen writes secrets to a new 0600 file renamed into place."""
from __future__ import annotations

import os
import stat

import zmq.auth
from sbs.node import security


def test_keygen_over_an_old_secret_writes_a_new_0600_file(tmp_path, monkeypatch):
    old = tmp_path / "alpha.key_secret"
    old.write_text("old secret\n")
    old.chmod(0o644)
    held = open(old)  # a process that opened the old, world-readable file
    os.umask(0)  # the widest umask: only the code keeps the secret 0600
    seen = []
    real_replace = os.replace

    def watch(src, dst, *a, **kw):  # the mode of every file at the moment it becomes visible
        seen.append((os.fspath(dst), stat.S_IMODE(os.lstat(src).st_mode)))
        return real_replace(src, dst, *a, **kw)

    monkeypatch.setattr(os, "replace", watch)
    try:
        public, secret = security.keygen(tmp_path, "alpha")
    finally:
        os.umask(0o022)
    assert held.read() == "old secret\n"  # the held file never sees the new secret
    held.close()
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    assert (str(secret), 0o600) in seen and (str(public), 0o644) in seen
    pub, sec = zmq.auth.load_certificate(str(secret))
    assert sec is not None and zmq.auth.load_certificate(str(public)) == (pub, None)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["alpha.key", "alpha.key_secret"]


def test_the_zap_handler_admits_known_keys_with_their_user_id_and_refuses_the_rest():
    """A real CURVE server on loopback behind security.ZapHandler: a client with an allowed
    key gets through and its messages carry that key as User-Id; a stranger's never arrive;
    a malformed ZAP request is answered 400 and the handler goes on answering."""
    import zmq

    ctx = zmq.Context()
    server_pub, server_sec = zmq.curve_keypair()
    known_pub, known_sec = zmq.curve_keypair()
    stranger_pub, stranger_sec = zmq.curve_keypair()
    zap = security.ZapHandler(ctx, {known_pub})
    socks = []

    def sock(kind):
        s = ctx.socket(kind)
        s.linger = 0
        socks.append(s)
        return s

    try:
        srv = sock(zmq.ROUTER)
        srv.curve_server, srv.curve_secretkey, srv.curve_publickey = True, server_sec, server_pub
        port = srv.bind_to_random_port("tcp://127.0.0.1")

        def client(pub, sec):
            c = sock(zmq.DEALER)
            c.curve_publickey, c.curve_secretkey, c.curve_serverkey = pub, sec, server_pub
            c.connect(f"tcp://127.0.0.1:{port}")
            return c

        client(stranger_pub, stranger_sec).send(b"from a stranger")
        client(known_pub, known_sec).send(b"from a friend")
        assert srv.poll(10_000), "the known client's message never arrived"
        frames = srv.recv_multipart(copy=False)
        assert frames[-1].bytes == b"from a friend"
        assert security.sender_key(frames[-1]) == known_pub.decode()
        assert not srv.poll(500)  # the stranger's never comes

        ask = sock(zmq.REQ)  # libzmq's side of ZAP, played by hand
        ask.connect(security.ZAP_ENDPOINT)
        for request, status in (([b"1.0", b"7"], b"400"),
                                ([b"9.9", b"8", b"", b"1.2.3.4", b"", b"CURVE", b"x" * 32],
                                 b"400"),
                                ([b"1.0", b"9", b"", b"1.2.3.4", b"", b"NULL"], b"400"),
                                ([b"1.0", b"10", b"", b"1.2.3.4", b"", b"CURVE",
                                  zmq.utils.z85.decode(known_pub)], b"200")):
            ask.send_multipart(request)
            assert ask.poll(5_000)
            reply = ask.recv_multipart()
            assert reply[:3] == [b"1.0", request[1], status], reply
        assert reply[4] == known_pub  # User-Id: the z85 key
    finally:
        zap.stop()
        for s in socks:
            s.close()
        ctx.term()
