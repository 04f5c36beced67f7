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
import threading
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import zmq
import zmq.auth
from zmq.utils import z85

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


ZAP_ENDPOINT = "inproc://zeromq.zap.01"  # where libzmq asks (ZeroMQ RFC 27)
_ZAP_VERSION = b"1.0"


def _zap_reply(rid: bytes, status: bytes, text: bytes, user_id: bytes = b"") -> list[bytes]:
    """A ZAP reply: version, request id, status, text, User-Id, metadata (none)."""
    return [_ZAP_VERSION, rid, status, text, user_id, b""]


class ZapHandler:
    """The ZAP handler (ZeroMQ RFC 27) of a node's CURVE servers: a thread answering libzmq's
    question about every CURVE client that completes a handshake, 200 with the client's z85
    key as User-Id when the key is one of ``allowed``, 400 otherwise (nothing of a refused
    client ever reaches a socket). Bound before any server socket, so no handshake finds the
    context without one. pyzmq's ThreadAuthenticator did the same from an asyncio loop that
    brought asyncio and ssl into every node (~8 MB)."""

    def __init__(self, ctx: zmq.Context, allowed: set[bytes]):
        self.allowed = frozenset(allowed)
        self._sock = ctx.socket(zmq.REP)
        self._sock.linger = 0
        self._sock.bind(ZAP_ENDPOINT)
        control = f"inproc://sbs-zap-stop-{id(self)}"
        self._stop = ctx.socket(zmq.PAIR)
        self._stop.linger = 0
        self._stop.bind(control)
        self._control = ctx.socket(zmq.PAIR)
        self._control.linger = 0
        self._control.connect(control)
        self._thread = threading.Thread(target=self._run, name="sbs-zap", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        poller = zmq.Poller()
        poller.register(self._sock, zmq.POLLIN)
        poller.register(self._control, zmq.POLLIN)
        try:
            while True:
                ready = dict(poller.poll())
                if self._control in ready:
                    return
                frames = self._sock.recv_multipart()
                try:
                    reply = self.answer(frames)
                except Exception:  # a REP socket must answer, whatever the request was
                    log.exception("ZAP request could not be read: refused")
                    reply = _zap_reply(frames[1] if len(frames) > 1 else b"", b"400",
                                       b"bad request")
                self._sock.send_multipart(reply)
        finally:
            self._sock.close()
            self._control.close()

    def answer(self, frames: list[bytes]) -> list[bytes]:
        """The reply to one ZAP request: version, request id, status, text, User-Id, metadata."""
        rid = frames[1] if len(frames) > 1 else b""
        if len(frames) < 6 or frames[0] != _ZAP_VERSION:
            log.warning("refused a malformed ZAP request (%d frames)", len(frames))
            return _zap_reply(rid, b"400", b"malformed request")
        address, mechanism, credentials = frames[3], frames[5], frames[6:]
        if mechanism == b"CURVE" and len(credentials) == 1 and len(credentials[0]) == 32:
            key = z85.encode(credentials[0])
            if key in self.allowed:
                log.debug("admitted a CURVE client with key %s... from %s",
                          key[:8].decode(), address.decode("ascii", "replace")[:64])
                return _zap_reply(rid, b"200", b"OK", key)
            log.warning("refused a CURVE client with an unknown key (from %s)",
                        address.decode("ascii", "replace")[:64])
            return _zap_reply(rid, b"400", b"unknown key")
        log.warning("refused a %s client: only CURVE with a known key is accepted",
                    mechanism.decode("ascii", "replace")[:16])
        return _zap_reply(rid, b"400", b"CURVE only")

    def stop(self) -> None:
        if self._thread.is_alive():
            self._stop.send(b"stop")
            self._thread.join(5)
        self._stop.close()


# what the peer sends a node; every other control command is the operator's (sbs-tools)
PEER_COMMANDS = frozenset({"PING", "HANDOVER", "ASK_HANDOVER", "SNAPSHOT", "ACK", "TOKENS",
                           "LISTS"})


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


def start_authenticator(ctx: zmq.Context, keys: Keys | None) -> ZapHandler | None:
    """The ZAP handler admitting the peer's key and the node's own (its operator's tools)."""
    if keys is None:
        return None
    return ZapHandler(ctx, {keys.public, keys.peer_public})


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
