"""sbs.ini -> one frozen Config. Every error names the file, section and key.

Relative paths resolve against the folder of the ini file, so a pair can run from any
working directory (systemd starts in /).
"""
from __future__ import annotations

import configparser
import re
import shlex
import socket
from dataclasses import dataclass, field
from pathlib import Path

from .filters import Filter

# one rule for names from sbs.ini and names pushed by the peer (they become names on disk)
from .protocol import SENTINEL_NAME_RE, folder_name_problem

ROLES = ("main", "backup")
_HOST_RE = re.compile(r"[A-Za-z0-9.-]{1,253}")


class ConfigError(Exception):
    """A bad sbs.ini: str() is one line naming file, section and key."""

    def __init__(self, file: Path | str, section: str, key: str | None, problem: str):
        self.file, self.section, self.key, self.problem = str(file), section, key, problem
        where = f"[{section}]" + (f" {key}" if key else "")
        super().__init__(f"{file}: {where}: {problem}")


@dataclass(frozen=True)
class EmailConfig:
    enabled: bool = False
    smtp_server: str = "127.0.0.1"
    smtp_port: int = 25
    sender: str = "sbs@example.com"
    receiver: str = "ops@example.com"
    secure: bool = False
    user: str = ""
    password: str = ""
    urls: tuple[str, ...] = field(default_factory=tuple)


# every kind of notification; [notify] kinds chooses which go out (default: all)
NOTIFY_KINDS = (
    "failover", "handover", "standby", "lag", "stall", "disk", "guard", "sentinel", "conflicts",
    "split_brain", "restricted", "config", "maintenance",
)


@dataclass(frozen=True)
class NotifyConfig:
    kinds: frozenset[str] = frozenset(NOTIFY_KINDS)
    lag_after: float = 60.0  # seconds the standby may be out of sync before an alert
    rate_limit: float = 300.0  # seconds between two mails about one condition


@dataclass(frozen=True)
class HealthConfig:
    restarts: int = 0  # hand over when a sentinel restarts more than this in `window` (0: never)
    window: float = 300.0
    check_interval: float = 10.0
    check_timeout: float = 5.0
    checks: tuple[tuple[str, str], ...] = ()  # sentinel name -> check command line


@dataclass(frozen=True)
class ClusterConfig:
    """[cluster]: the optional leader lease in etcd (no dcs: the two-node mode)."""
    dcs: tuple[tuple[str, int], ...] = ()  # etcd endpoints (host, port)
    ttl: float = 10.0
    loop_wait: float = 2.0
    retry_timeout: float = 4.0
    key: str = "/sbs/leader"

    @property
    def enabled(self) -> bool:
        return bool(self.dcs)


@dataclass(frozen=True)
class FolderConfig:
    name: str
    path: Path
    filters: tuple[str, ...] = ("*",)


@dataclass(frozen=True)
class Config:
    file: Path
    name: str
    local: str
    peer: str
    port: int
    period: float = 5.0
    rescan_cycle: float = 300.0
    strict: bool = False
    role: str = "main"
    state_dir: Path = Path(".sbs")
    heartbeat: float = 0.5
    dead_after: float = 1.5
    trash_days: float = 7.0
    handover_timeout: float = 30.0
    curve: bool = True
    secret_key: Path | None = None
    peer_public_key: Path | None = None
    # a secondary runs on takeover only the sentinel commands its own sbs.ini names
    pin_sentinels: bool = False
    email: EmailConfig = field(default_factory=EmailConfig)
    notify: NotifyConfig = field(default_factory=NotifyConfig)
    health: HealthConfig = field(default_factory=HealthConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    folders: tuple[FolderConfig, ...] = ()
    sentinels: tuple[tuple[str, str], ...] = ()

    @property
    def control_port(self) -> int:
        return self.port

    @property
    def bus_port(self) -> int:
        return self.port + 1

    @property
    def blob_port(self) -> int:
        return self.port + 2


class _Section:
    """Typed getters over one section that raise ConfigError naming the key."""

    def __init__(self, parser: configparser.ConfigParser, file: Path, section: str):
        self.file, self.section = file, section
        self.items = dict(parser.items(section)) if parser.has_section(section) else {}

    def error(self, key: str | None, problem: str) -> ConfigError:
        return ConfigError(self.file, self.section, key, problem)

    def text(self, key: str, default: str | None = None, *, required: bool = False) -> str:
        value = self.items.get(key, "").strip()
        if value:
            return value
        if required:
            raise self.error(key, "is required")
        return default if default is not None else ""

    def integer(self, key: str, default: int, lo: int, hi: int) -> int:
        raw = self.items.get(key, "").strip()
        if not raw:
            return default
        try:
            value = int(raw)
        except ValueError:
            raise self.error(key, f"{raw!r} is not a whole number") from None
        if not lo <= value <= hi:
            raise self.error(key, f"{value} is out of range {lo}..{hi}")
        return value

    def number(self, key: str, default: float, lo: float, hi: float) -> float:
        raw = self.items.get(key, "").strip()
        if not raw:
            return default
        try:
            value = float(raw)
        except ValueError:
            raise self.error(key, f"{raw!r} is not a number") from None
        if not lo <= value <= hi:
            raise self.error(key, f"{value} is out of range {lo}..{hi}")
        return value

    def boolean(self, key: str, default: bool) -> bool:
        raw = self.items.get(key, "").strip().lower()
        if not raw:
            return default
        if raw in ("1", "yes", "true", "on"):
            return True
        if raw in ("0", "no", "false", "off"):
            return False
        raise self.error(key, f"{raw!r} is not true or false")

    def path(self, key: str, base: Path, default: str | None = None) -> Path | None:
        raw = self.text(key, default or "")
        if not raw:
            return None
        p = _expand(self, key, raw)
        return p if p.is_absolute() else (base / p)


def _expand(sec: _Section, key: str, raw: str) -> Path:
    try:
        return Path(raw).expanduser()
    except RuntimeError as exc:  # "~nosuchuser/...", or "~" with no home directory
        raise sec.error(key, f"cannot expand {raw!r}: {exc}") from None


def _address(sec: _Section, key: str, *, required: bool) -> str:
    value = sec.text(key, required=required)
    if value and (any(c.isspace() for c in value) or ":" in value or "/" in value):
        raise sec.error(key, f"{value!r} is not a host name or IPv4 address")
    return value


def load(file: Path | str) -> Config:
    """Read and validate sbs.ini. Raises ConfigError; never a traceback for bad input."""
    file = Path(file)
    parser = configparser.ConfigParser(
        inline_comment_prefixes=(";", "#"), interpolation=None, strict=True
    )
    parser.optionxform = str  # folder and sentinel names keep their case
    try:
        with open(file, encoding="utf-8") as fh:
            parser.read_file(fh)
    except FileNotFoundError:
        raise ConfigError(file, "node", None, "configuration file not found") from None
    except (configparser.Error, UnicodeDecodeError, OSError) as exc:
        first = str(exc).splitlines()[0]
        raise ConfigError(file, "node", None, f"cannot parse: {first}") from None
    base = file.resolve().parent
    known = {"node", "security", "email", "notify", "health", "checks", "cluster", "folders",
             "sentinels"}
    for section in parser.sections():
        if section not in known:
            raise ConfigError(file, section, None, f"unknown section (known: {sorted(known)})")

    node = _Section(parser, file, "node")
    _reject_unknown(node, {
        "name", "local", "peer", "port", "period", "rescan_cycle", "strict", "role", "state_dir",
        "heartbeat", "dead_after", "trash_days", "handover_timeout",
    })
    name = node.text("name", socket.gethostname())
    if not name.replace("-", "").replace("_", "").replace(".", "").isalnum():
        raise node.error("name", f"{name!r}: use letters, digits, '-', '_' or '.'")
    role = node.text("role", "main")
    if role not in ROLES:
        raise node.error("role", f"{role!r} is not one of {', '.join(ROLES)}")
    heartbeat = node.number("heartbeat", 0.5, 0.01, 60)
    dead_after = node.number("dead_after", 1.5, 0.05, 600)
    if dead_after < 2 * heartbeat:
        raise node.error(
            "dead_after", f"{dead_after} must be at least twice heartbeat ({heartbeat})"
        )
    state_dir = node.path("state_dir", base, f".sbs/{name}")
    if state_dir.exists() and not state_dir.is_dir():
        raise node.error("state_dir", f"{state_dir} is not a folder")

    sec = _Section(parser, file, "security")
    _reject_unknown(sec, {"curve", "secret_key", "peer_public_key", "pin_sentinels"})
    curve = sec.boolean("curve", True)
    secret_key = sec.path("secret_key", base)
    peer_public_key = sec.path("peer_public_key", base)
    if curve:
        for key, value in (("secret_key", secret_key), ("peer_public_key", peer_public_key)):
            if value is None:
                raise sec.error(key, "is required when curve = true")
            if not value.is_file():
                raise sec.error(key, f"key file {value} does not exist")
        _check_key_file(sec, "secret_key", secret_key, secret=True)
        _check_key_file(sec, "peer_public_key", peer_public_key, secret=False)

    return Config(
        file=file,
        name=name,
        local=_address(node, "local", required=True),
        peer=_address(node, "peer", required=True),
        port=node.integer("port", 4445, 1, 65533),
        period=node.number("period", 5.0, 0.1, 86400),
        rescan_cycle=node.number("rescan_cycle", 300.0, 0.1, 86400),
        strict=node.boolean("strict", False),
        role=role,
        state_dir=state_dir,
        heartbeat=heartbeat,
        dead_after=dead_after,
        trash_days=node.number("trash_days", 7.0, 0, 3650),
        handover_timeout=node.number("handover_timeout", 30.0, 0.1, 3600),
        curve=curve,
        secret_key=secret_key,
        peer_public_key=peer_public_key,
        pin_sentinels=sec.boolean("pin_sentinels", False),
        email=_email(parser, file),
        notify=_notify(parser, file),
        health=_health(parser, file),
        cluster=_cluster(parser, file),
        folders=_folders(parser, file, base),
        sentinels=_sentinels(parser, file),
    )


def _cluster(parser: configparser.ConfigParser, file: Path) -> ClusterConfig:
    sec = _Section(parser, file, "cluster")
    _reject_unknown(sec, {"dcs", "ttl", "loop_wait", "retry_timeout", "key"})
    raw = sec.text("dcs")
    endpoints = []
    if raw:
        if not raw.startswith("etcd://"):
            raise sec.error("dcs", f"{raw!r}: expected etcd://HOST:PORT[,HOST:PORT...]")
        for part in raw[len("etcd://"):].split(","):
            host, _, port = part.strip().rpartition(":")
            if not host or not _HOST_RE.fullmatch(host) or not port.isdigit() or not (
                    0 < int(port) < 65536):
                raise sec.error("dcs", f"{part.strip()!r} is not HOST:PORT")
            endpoints.append((host, int(port)))
    ttl = sec.number("ttl", 10.0, 1.0, 3600)
    loop_wait = sec.number("loop_wait", 2.0, 0.1, 3600)
    retry_timeout = sec.number("retry_timeout", 4.0, 0.1, 3600)
    if loop_wait + 2 * retry_timeout > ttl:
        # Patroni's rule: a leader that renews every loop_wait and gives each attempt
        # retry_timeout still renews twice within ttl before its key can expire
        raise sec.error("ttl", f"{ttl} is less than loop_wait + 2 * retry_timeout "
                        f"({loop_wait} + 2 * {retry_timeout})")
    key = sec.text("key", "/sbs/leader")
    if not key.startswith("/") or any(c.isspace() for c in key):
        raise sec.error("key", f"{key!r}: an absolute key without spaces, e.g. /sbs/leader")
    return ClusterConfig(dcs=tuple(endpoints), ttl=ttl, loop_wait=loop_wait,
                         retry_timeout=retry_timeout, key=key)


def _reject_unknown(sec: _Section, allowed: set[str]) -> None:
    for key in sec.items:
        if key not in allowed:
            raise sec.error(key, f"unknown key (known: {', '.join(sorted(allowed))})")


def _check_key_file(sec: _Section, key: str, path: Path, *, secret: bool) -> None:
    import zmq.auth

    try:
        public, secret_part = zmq.auth.load_certificate(str(path))
    except Exception as exc:  # zmq.auth raises ValueError/OSError/IndexError on bad files
        raise sec.error(key, f"{path} is not a ZeroMQ certificate: {exc}") from None
    if not public or (secret and not secret_part):
        what = "a secret key (NAME.key_secret)" if secret else "a public key"
        raise sec.error(key, f"{path} does not hold {what}")


def _email(parser: configparser.ConfigParser, file: Path) -> EmailConfig:
    sec = _Section(parser, file, "email")
    _reject_unknown(sec, {
        "enabled", "smtp_server", "smtp_port", "sender", "receiver", "secure", "user",
        "password", "urls",
    })
    cfg = EmailConfig(
        enabled=sec.boolean("enabled", False),
        smtp_server=sec.text("smtp_server", "127.0.0.1"),
        smtp_port=sec.integer("smtp_port", 25, 1, 65535),
        sender=sec.text("sender", "sbs@example.com"),
        receiver=sec.text("receiver", "ops@example.com"),
        secure=sec.boolean("secure", False),
        user=sec.text("user", ""),
        password=sec.text("password", ""),
        urls=tuple(sec.text("urls", "").split()),
    )
    for key in ("sender", "receiver"):
        if cfg.enabled and "@" not in getattr(cfg, key):
            raise sec.error(key, f"{getattr(cfg, key)!r} is not an email address")
    return cfg


def _notify(parser: configparser.ConfigParser, file: Path) -> NotifyConfig:
    sec = _Section(parser, file, "notify")
    _reject_unknown(sec, {"kinds", "lag_after", "rate_limit"})
    words = sec.text("kinds", "all").replace(",", " ").split()
    kinds = set(NOTIFY_KINDS) if words == ["all"] else set(words)
    if words != ["all"] and (unknown := kinds - set(NOTIFY_KINDS)):
        raise sec.error("kinds", f"unknown kind(s) {', '.join(sorted(unknown))} "
                                 f"(known: all, {', '.join(NOTIFY_KINDS)})")
    return NotifyConfig(
        kinds=frozenset(kinds),
        lag_after=sec.number("lag_after", 60.0, 1, 86400),
        rate_limit=sec.number("rate_limit", 300.0, 0, 86400),
    )


def _health(parser: configparser.ConfigParser, file: Path) -> HealthConfig:
    sec = _Section(parser, file, "health")
    _reject_unknown(sec, {"restarts", "window", "check_interval", "check_timeout"})
    checks = _Section(parser, file, "checks")
    for name, command in checks.items.items():
        if not SENTINEL_NAME_RE.fullmatch(name):
            raise checks.error(name, "not a sentinel name")
        try:
            if not shlex.split(command):
                raise checks.error(name, "needs a command line")
        except ValueError as exc:
            raise checks.error(name, f"cannot parse command: {exc}") from None
    return HealthConfig(
        restarts=sec.integer("restarts", 0, 0, 10_000),
        window=sec.number("window", 300.0, 1, 86400),
        check_interval=sec.number("check_interval", 10.0, 0.1, 86400),
        check_timeout=sec.number("check_timeout", 5.0, 0.1, 3600),
        checks=tuple(checks.items.items()),
    )


def _folders(parser: configparser.ConfigParser, file: Path, base: Path) -> tuple[FolderConfig, ...]:
    sec = _Section(parser, file, "folders")
    folders = []
    for name, raw in sec.items.items():
        if problem := folder_name_problem(name):
            raise sec.error(name, problem)
        try:
            words = shlex.split(raw)
        except ValueError as exc:
            raise sec.error(name, f"cannot parse {raw!r}: {exc}") from None
        if not words:
            raise sec.error(name, "needs a path")
        path = _expand(sec, name, words[0])
        filters = tuple(words[1:]) or ("*",)
        try:
            Filter(filters)  # what the scanner builds once this node is primary
        except (ValueError, re.error) as exc:
            raise sec.error(name, f"bad filter: {exc}") from None
        folders.append(FolderConfig(
            name=name,
            path=path if path.is_absolute() else base / path,
            filters=filters,
        ))
    paths = [f.path.resolve() for f in folders]
    for i, p in enumerate(paths):
        for j, q in enumerate(paths):
            if i != j and (p == q or q in p.parents):
                raise sec.error(folders[i].name, f"{p} overlaps folder {folders[j].name!r}")
    return tuple(folders)


def _sentinels(parser: configparser.ConfigParser, file: Path) -> tuple[tuple[str, str], ...]:
    sec = _Section(parser, file, "sentinels")
    out = []
    for name, command in sec.items.items():
        if not SENTINEL_NAME_RE.fullmatch(name):
            raise sec.error(name, "a sentinel name is 1-251 letters, digits, '_', '.' or '-', "
                                  "starting with a letter or digit")
        try:
            argv = shlex.split(command)
        except ValueError as exc:
            raise sec.error(name, f"cannot parse command: {exc}") from None
        if not argv:
            raise sec.error(name, "needs a command line")
        out.append((name, command))
    return tuple(out)
