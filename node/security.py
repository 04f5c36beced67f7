"""CURVE on every socket: who may connect, how our sockets present themselves, and which key
may send which command.

A node accepts exactly two client keys: the peer's public key and its own (the operator's
tools on the same host read the node's secret key file, as a root-owned systemd service's
tools would). Everything else is refused by the ZAP handler before a single message arrives.
Each message then carries the key that sent it (ZAP's User-Id): peer commands are obeyed only
from the peer's key, operator commands only from the node's own (least privilege: holding the
peer's key is not holding the operator's).
"""
from __future__ import annotations

import logging
import os
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

from .config import Config

log = logging.getLogger("sbs.security")


@dataclass(frozen=True)
class Keys:
    public: bytes
    secret: bytes
    peer_public: bytes


def load_keys(cfg: Config) -> Keys | None:
    if not cfg.curve:
        return None
    public, secret = zmq.auth.load_certificate(str(cfg.secret_key))
    peer_public, _ = zmq.auth.load_certificate(str(cfg.peer_public_key))
    return Keys(public=public, secret=secret, peer_public=peer_public)


_CERT = """#   ****  Generated {when} by sbs-tools keygen  ****
#   ZeroMQ CURVE {kind}
#   Edit this file only with care: zmq.auth.load_certificate reads it.

metadata
curve
    public-key = "{public}"
"""


def _write_new(path: Path, text: str, mode: int) -> None:
    """Write `path` as a new file created with `mode` and renamed into place: a process holding
    the old file open keeps reading the old content, and the new one is never readable by
    anyone `mode` excludes, not even for a moment (no write-then-chmod)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    try:
        os.fchmod(fd, mode)  # the umask may only have narrowed it; make it exactly `mode`
        os.write(fd, text.encode())
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        tmp.unlink(missing_ok=True)
        raise
    os.close(fd)
    try:
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def keygen(directory: Path, name: str) -> tuple[Path, Path]:
    """NAME.key and NAME.key_secret in zmq.auth's certificate format (the secret one 0600)."""
    directory.mkdir(parents=True, exist_ok=True)
    public, secret = zmq.curve_keypair()
    when = datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    pub_path, sec_path = directory / f"{name}.key", directory / f"{name}.key_secret"
    text = _CERT.format(when=when, kind="public certificate", public=public.decode())
    _write_new(pub_path, text, 0o644)
    text = _CERT.format(when=when, kind="**secret** certificate", public=public.decode())
    _write_new(sec_path, text + f'    secret-key = "{secret.decode()}"\n', 0o600)
    return pub_path, sec_path


class _Allowed:
    """ZAP credentials provider: a fixed set of client public keys."""

    def __init__(self, keys: set[bytes]):
        self.keys = keys

    def callback(self, domain: str, key: bytes) -> bool:
        allowed = key in self.keys  # pyzmq hands over the z85 form, as load_certificate returns
        if not allowed:
            log.warning("refused a CURVE client with an unknown key")
        return allowed


# what the peer sends a node; every other control command is the operator's (sbs-tools)
PEER_COMMANDS = frozenset({"PING", "HANDOVER", "ASK_HANDOVER", "SNAPSHOT", "ACK", "TOKENS"})


def sender_key(frame: zmq.Frame) -> str | None:
    """The z85 public key a message came with (ZAP's User-Id), None without CURVE."""
    try:
        return frame.get("User-Id")
    except (zmq.ZMQError, UnicodeDecodeError):
        return None


def refusal(command: str, key: str | None, keys: Keys | None) -> str | None:
    """Why `key` may not send `command`, or None when it may. Without CURVE there are no keys
    to tell apart: whoever reaches the port may send anything (see the README)."""
    if keys is None:
        return None
    if command in PEER_COMMANDS:
        return None if key == keys.peer_public.decode() else f"{command} needs the peer's key"
    return None if key == keys.public.decode() else f"{command} needs this node's own key"


def pinned_sentinels(pushed: dict[str, str], own: dict[str, str]) -> dict[str, str]:
    """With [security] pin_sentinels: of the sentinels the peer pushed, only those this node's
    sbs.ini defines with the same command; every other one is logged and refused (a peer-key
    holder chooses the commands a takeover runs, unless they are pinned here)."""
    kept = {}
    for name, command in pushed.items():
        if own.get(name) == command:
            kept[name] = command
        else:
            log.error("refused sentinel %r pushed by the peer: %s (pin_sentinels = true)",
                      name[:64], "not in this node's sbs.ini" if name not in own
                      else "its command differs from this node's sbs.ini")
    return kept


def start_authenticator(ctx: zmq.Context, keys: Keys | None) -> ThreadAuthenticator | None:
    if keys is None:
        return None
    auth = ThreadAuthenticator(ctx, log=logging.getLogger("sbs.zap"))
    auth.start()
    allowed = _Allowed({keys.public, keys.peer_public})
    auth.configure_curve_callback("*", credentials_provider=allowed)
    return auth


def serve(sock: zmq.Socket, keys: Keys | None) -> None:
    """Make `sock` a CURVE server (before bind)."""
    if keys is not None:
        sock.curve_secretkey = keys.secret
        sock.curve_publickey = keys.public
        sock.curve_server = True


def client(sock: zmq.Socket, keys: Keys | None, server_public: bytes | None = None) -> None:
    """Make `sock` a CURVE client of the peer (or of `server_public`) (before connect)."""
    if keys is not None:
        sock.curve_secretkey = keys.secret
        sock.curve_publickey = keys.public
        sock.curve_serverkey = server_public or keys.peer_public
