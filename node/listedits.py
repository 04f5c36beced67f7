"""The pair's folder and sentinel lists: one copy for both nodes, numbered by edits.

An edit of `[folders]` or `[sentinels]` in either node's sbs.ini (seen at start, at
`sbs-tools reload` or on SIGHUP) becomes the pair's lists, stamped with a generation one above
the highest either node has seen, the wall time and the node's name. The newest stamp wins;
each node keeps the pair's copy in state_dir/pair.json, says its stamp in every PING, and sends
the whole lists (LISTS) to a peer whose stamp is older. The receiver adopts, persists and logs
them; a primary applies them at once (scanner and sentinels).

An edit is told apart from an unchanged file by a fingerprint of the names, filters and
commands the node last read from its own sbs.ini (paths are per node and do not count).
Only these sections (and [email], [notify], [health], [checks]) change without a restart;
any other key that differs is named in a refusal and nothing changes.
"""
from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, fields
from typing import Any

import orjson

from .config import Config

# what a reload may change; everything else in Config needs a restart
HOT = frozenset({"folders", "sentinels", "email", "notify", "health"})
# Config field -> the ini section and key it comes from, for the refusal
_WHERE = {"curve": "security", "secret_key": "security", "peer_public_key": "security",
          "pin_sentinels": "security"}


@dataclass(frozen=True, order=True)
class Stamp:
    gen: int = 0
    at: float = 0.0
    by: str = ""

    def wire(self) -> dict[str, Any]:
        # in every PING: spelled out, dataclasses.asdict deep-copies field by field
        return {"gen": self.gen, "at": self.at, "by": self.by}

    def describe(self) -> str:
        if not self.by:
            return f"generation {self.gen}"
        when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(self.at))
        return f"generation {self.gen} (edited on {self.by} at {when})"


def stamp_from(body: Any) -> Stamp | None:
    """A Stamp from JSON (a PING field, pair.json), or None when it is not one."""
    if not isinstance(body, dict):
        return None
    gen, at, by = body.get("gen"), body.get("at"), body.get("by")
    if not isinstance(gen, int) or isinstance(gen, bool) or not 0 <= gen < 2**53:
        return None
    if not isinstance(at, int | float) or isinstance(at, bool) or not 0 <= at < 1e11:
        return None
    if not isinstance(by, str) or len(by) > 64:
        return None
    return Stamp(gen, float(at), by)


def fingerprint(folders: dict[str, list[str]], sentinels: dict[str, str]) -> str:
    """Names, filters and commands; not paths (they differ between the nodes)."""
    doc = {"folders": {n: list(f) for n, f in folders.items()}, "sentinels": dict(sentinels)}
    return hashlib.sha256(orjson.dumps(doc, option=orjson.OPT_SORT_KEYS)).hexdigest()[:32]


def own_lists(cfg: Config) -> dict[str, Any]:
    """This node's sbs.ini lists in pair.json's shape."""
    return {
        "folders": {f.name: list(f.filters) for f in cfg.folders},
        "paths": {f.name: str(f.path) for f in cfg.folders},
        "sentinels": dict(cfg.sentinels),
    }


def own_fingerprint(cfg: Config) -> str:
    own = own_lists(cfg)
    return fingerprint(own["folders"], own["sentinels"])


def pair_fingerprint(pair: dict[str, Any]) -> str | None:
    if pair.get("folders") is None or pair.get("sentinels") is None:
        return None
    return fingerprint(pair["folders"], pair["sentinels"])


def restart_keys(old: Config, new: Config) -> list[str]:
    """'[section] key' for every setting that differs and needs a restart."""
    out = []
    for f in fields(Config):
        if f.name in HOT or f.name == "file":
            continue
        if getattr(old, f.name) != getattr(new, f.name):
            out.append(f"[{_WHERE.get(f.name, 'node')}] {f.name}")
    return out


def changes(old: dict[str, Any], new: dict[str, Any]) -> str:
    """'folders +a -b ~c; sentinels +x' between two pair.json-shaped lists."""
    parts = []
    for what in ("folders", "sentinels"):
        a, b = old.get(what) or {}, new.get(what) or {}
        words = ([f"+{n}" for n in sorted(set(b) - set(a))]
                 + [f"-{n}" for n in sorted(set(a) - set(b))]
                 + [f"~{n}" for n in sorted(set(a) & set(b)) if a[n] != b[n]])
        if words:
            parts.append(f"{what} {' '.join(words)}")
    return "; ".join(parts) or "no change in names, filters or commands"
