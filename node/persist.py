"""Small JSON documents in state_dir, written atomically (temp, fsync, rename)."""
from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson

from . import names

log = logging.getLogger("sbs.persist")


def load(path: Path, default: Any) -> Any:
    try:
        return names.loads(path.read_bytes())
    except FileNotFoundError:
        return default
    except (OSError, orjson.JSONDecodeError) as exc:
        log.error("ignoring unreadable %s: %s", path, exc)
        return default


def load_doc(path: Path, fields: dict[str, Callable[[Any], str | None]],
             then: str = "") -> dict[str, Any]:
    """A JSON object of state_dir with only its fields that pass their check (a check returns
    why not, or None); what is not used is logged, naming the file, the field and why, with
    `then`: what the node does without it. A missing file is {} and says nothing."""
    try:
        doc = names.loads(path.read_bytes())
    except FileNotFoundError:
        return {}
    except (OSError, orjson.JSONDecodeError) as exc:
        log.error("ignoring unreadable %s: %s%s", path, exc, then and f"; {then}")
        return {}
    if not isinstance(doc, dict):
        log.error("ignoring %s: a JSON %s, not an object%s", path, _json_kind(doc),
                  then and f"; {then}")
        return {}
    bad = {k: why for k, check in fields.items() if k in doc and (why := check(doc[k]))}
    if bad:
        log.error("%s: ignoring %s%s", path, ", ".join(f"{k} ({why})" for k, why in bad.items()),
                  then and f"; {then}")
    return {k: v for k, v in doc.items() if k not in bad}


def _json_kind(value: Any) -> str:
    return {list: "list", str: "string", int: "number", float: "number", bool: "boolean",
            type(None): "null"}.get(type(value), type(value).__name__)


def save(path: Path, value: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "wb") as fh:
            fh.write(names.dumps(value, option=orjson.OPT_INDENT_2))
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError:
        _remove_quietly(tmp)  # a half-written temp file on a full disk only takes room
        raise


class Guarded:
    """The node's writes of state_dir documents. One that fails (a full or read-only state
    disk) does not end the node: it is logged once, kept in memory, shown in status, and
    written again by retry() until it succeeds."""

    def __init__(self, retry_every: float = 2.0):
        self.retry_every = retry_every
        self.failing: dict[Path, dict[str, Any]] = {}  # path -> {value, error, since}
        self.next_retry = 0.0
        self.extra: dict[str, Callable[[], str]] = {}  # other writers' errors, by name

    def save(self, path: Path, value: Any) -> bool:
        try:
            save(path, value)
        except OSError as exc:
            was = self.failing.get(path)
            if was is None:
                log.error("cannot write %s: %s (kept in memory, written again when it can be)",
                          path, exc)
            self.failing[path] = {"value": value, "error": str(exc),
                                  "since": was["since"] if was else time.time()}
            _remove_quietly(path.with_name(f".{path.name}.tmp"))  # give back what it took
            return False
        if self.failing.pop(path, None) is not None:
            log.warning("wrote %s again", path)
        return True

    def retry(self, now: float) -> None:
        """Write again what failed (call on the loop's turns; it does nothing most times)."""
        if not self.failing or now < self.next_retry:
            return
        self.next_retry = now + self.retry_every
        for path, failed in list(self.failing.items()):
            self.save(path, failed["value"])

    def status(self) -> dict[str, Any]:
        out = {str(p): {"error": f["error"], "since": f["since"]} for p, f in self.failing.items()}
        for name, error in self.extra.items():
            if why := error():
                out[name] = {"error": why, "since": None}
        return out


def _remove_quietly(path: Path) -> None:
    try:
        path.unlink()
    except OSError:
        pass
