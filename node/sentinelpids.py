"""The sentinels' pid file in state_dir: which processes this run started (with their start
times and the boot), so the next run of the node can kill what a crash left behind: each
sentinel's process group, and each process of it outside that group ("group": false).

Used by Sentinels only, from the node's loop.
"""

from __future__ import annotations

import json
import logging
import os
import signal
from pathlib import Path

from .proctree import boot_id
from .proctree import read as read_proc

log = logging.getLogger(__name__)

PIDS_FILE = "sentinels.pids.json"


class PidsFile:
    """Writes state_dir/sentinels.pids.json when the set of live children changes, and cleans
    up after a previous run. See the module docstring."""

    def __init__(self, state_dir: Path) -> None:
        self._state_dir = Path(state_dir)
        self._written: list[dict] | None = None
        self.error = ""  # why the pid file could not be written last time ("" if it was)

    def forget(self) -> None:
        """Write it again at the next sync(), changed or not."""
        self._written = None

    def sync(self, children: list[tuple[str, int, int | None, bool]]) -> None:
        """Record `children` (name, pid, start ticks, leads its group) unless that is what the
        file holds."""
        pids = sorted(
            ({"name": name, "pid": pid, "start_ticks": ticks, "group": group}
             for name, pid, ticks, group in children),
            key=lambda entry: entry["pid"],
        )
        if pids == self._written:
            return
        path = self._state_dir / PIDS_FILE
        tmp = path.with_name(f".{PIDS_FILE}.{os.getpid()}.tmp")
        record = {"node_pid": os.getpid(), "boot_id": boot_id(), "children": pids}
        try:
            self._state_dir.mkdir(parents=True, exist_ok=True)
            tmp.write_text(json.dumps(record, indent=1))
            os.replace(tmp, path)  # atomic: a reader sees the old or the new list, never half
        except OSError as exc:
            # (a full state disk) tried again at the next change or poll(): the loop's turn
            if not self.error:
                log.error("cannot record sentinel pids in %s: %s", path, exc)
            self.error = f"{path}: {exc}"
            try:
                tmp.unlink()
            except OSError:
                pass
            return
        if self.error:
            log.warning("sentinel pids recorded in %s again", path)
            self.error = ""
        self._written = pids

    def kill_leftovers(self) -> list[int]:
        """SIGKILL every process recorded by a previous run of this node that is still alive
        and provably the same process (same boot, same start time). Returns them."""
        path = self._state_dir / PIDS_FILE
        try:
            record = json.loads(path.read_text())
            children = record["children"] if record.get("boot_id") == boot_id() else []
        except FileNotFoundError:
            return []
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            log.warning("ignoring unreadable %s: %s", path, exc)
            return []
        if not isinstance(children, list):
            log.warning("ignoring %s: its children are not a list", path)
            return []
        if odd := sum(1 for entry in children if not isinstance(entry, dict)):
            log.warning("%s: ignoring %d entries that are not objects", path, odd)
        killed = []
        for entry in (e for e in children if isinstance(e, dict)):
            pid, ticks = entry.get("pid"), entry.get("start_ticks")
            if not isinstance(pid, int) or pid <= 1 or pid == os.getpid():
                continue
            if ticks is None or start_ticks(pid) != ticks:
                continue  # gone, or the pid now belongs to an unrelated process
            try:
                if entry.get("group", True):  # a session leader: its group id is its pid
                    os.killpg(pid, signal.SIGKILL)
                else:
                    os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                continue
            except PermissionError as exc:
                log.error("cannot kill leftover sentinel pid %d: %s", pid, exc)
                continue
            log.warning("killed leftover sentinel %s (pid %d) of a previous run",
                        entry.get("name"), pid)
            killed.append(pid)
        self._written = None  # rewrite: the file now describes this run
        return killed


def start_ticks(pid: int) -> int | None:
    """Start time of `pid` in clock ticks after boot (field 22 of /proc/<pid>/stat)."""
    proc = read_proc(pid)
    return None if proc is None else proc.ticks
