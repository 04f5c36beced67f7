"""Key files: keygen writes secrets to a new 0600 file renamed into place."""
from __future__ import annotations

import os
import stat

import zmq.auth

from node import security


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
