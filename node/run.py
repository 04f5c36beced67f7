"""The node's own process, without the command-line machinery.

`sbs-node start` (node/cli.py) hands its arguments to ``main`` here, in the same process, so
the node never carries typer and the pydantic it loads to coerce arguments (~15 MB a node
would keep for as long as it runs) and starts without them (~0.15 s less to a running node).
``python -m sbs.node.run --config PATH`` runs a node the same way.
"""
from __future__ import annotations

import argparse
import faulthandler
import logging
import signal
import sys
import threading
from pathlib import Path

from .config import ConfigError, load
from .fdio import LIBC
from .names import readable
from .proctree import become_subreaper

# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_ARENA_MAX = -1, -3, -8


def tune_malloc() -> bool:
    """Keep freed chunk buffers in the heap instead of handing them back to the kernel.

    File content moves in 1 MiB chunks (a few dozen alive at once). With glibc's defaults each
    one may be a fresh mmap or a heap that is trimmed and grown again, so every chunk faults in
    new pages; on a VM whose host backs memory lazily that was a third of a 1 GiB transfer
    (bench/README.md). Allocations up to 4 MiB come from the heap and up to 64 MiB of freed
    memory stays there.

    One malloc arena for every thread (glibc gives each new thread an arena of its own, up to
    8 per core): what one thread frees another reuses, instead of each arena keeping its own
    free memory. At 100,000 files that was ~10 MB less peak on the primary and ~15 MB on the
    secondary; the 1 GiB copy ran as fast (bench/README.md). Called before any thread starts.
    A libc without mallopt (musl) keeps its defaults."""
    mallopt = getattr(LIBC, "mallopt", None)
    if mallopt is None:
        return False
    return (bool(mallopt(_M_MMAP_THRESHOLD, 4 << 20))
            and bool(mallopt(_M_TRIM_THRESHOLD, 64 << 20)) and bool(mallopt(_M_ARENA_MAX, 1)))


_PR_SET_NAME = 15  # prctl(2)

# How long a thread may hold the GIL while another waits for it (CPython's default: 5 ms).
# The node's threads mostly make short system calls, each of which lets the GIL go and must
# take it back: behind a thread busy in Python (a scan, a hash cache being loaded, the syncer
# booking a batch) every one of them waited up to 5 ms. At 1 ms a secondary writing 100,000
# small files on a journalled ext4 took ~8 % less time (bench/README.md), and a restarted
# node heard its peer's answer 60-90 ms after its start instead of ~250 ms while a 100,000-file
# hash cache loaded in another thread.
SWITCH_INTERVAL = 0.001


def name_os_threads() -> bool:
    """Give every thread started from now on its Python name in the kernel too (the first 15
    bytes: sbs-syncer, sbs-lane_0, sbs-blobs, ...), so ``top -H``, ``ps -L``, py-spy
    and /proc/PID/task/*/comm tell the node's threads apart; before Python 3.14 they all
    carry the interpreter's name. False when it cannot be done here (no prctl, or a Python
    whose threads no longer start through Thread._bootstrap_inner)."""
    start = getattr(threading.Thread, "_bootstrap_inner", None)
    if start is None:
        return False
    if getattr(start, "names_os_thread", False):
        return True  # done already
    prctl = getattr(LIBC, "prctl", None)
    if prctl is None:
        return False

    def bootstrap_inner(self: threading.Thread) -> None:
        prctl(_PR_SET_NAME, self.name.encode("utf-8", "replace")[:15], 0, 0, 0)
        start(self)

    bootstrap_inner.names_os_thread = True  # type: ignore[attr-defined]
    threading.Thread._bootstrap_inner = bootstrap_inner  # type: ignore[attr-defined]
    return True


class ReadableFormatter(logging.Formatter):
    """Each byte of a file name that is not UTF-8 as \\xNN, as sbs-tools shows it (else
    stderr writes the surrogate Python holds it as, \\udcNN)."""

    def format(self, record: logging.LogRecord) -> str:
        return readable(super().format(record))


def run(config: Path, verbose: bool) -> int:
    """Run the node until SIGTERM/SIGINT: 0 clean stop, 1 runtime failure, 2 bad config."""
    # `kill -USR1 <pid>` writes every thread's stack to stderr (the node's log) and the node
    # goes on: what a node that seems stuck is doing, without stopping it
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    try:
        cfg = load(config)
    except ConfigError as exc:
        print(f"sbs-node: configuration error: {exc}", file=sys.stderr)
        return 2
    fmt = f"%(asctime)s {cfg.name} %(name)s %(levelname)s %(message)s"
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format=fmt,
                        stream=sys.stderr)
    for handler in logging.getLogger().handlers:  # a name that is not UTF-8 as \xNN
        handler.setFormatter(ReadableFormatter(fmt))
    logging.getLogger("asyncio").setLevel(logging.WARNING)
    log = logging.getLogger("sbs.node")
    if not tune_malloc():
        log.debug("mallopt unavailable: default malloc tuning")
    sys.setswitchinterval(SWITCH_INTERVAL)
    if not become_subreaper(getattr(LIBC, "prctl", None)):
        log.warning("not a child subreaper (no prctl here): a process a sentinel daemonises "
                    "goes to init once its parent exits, out of the node's reach")
    if not name_os_threads():
        log.debug("threads keep the interpreter's name in the kernel (no prctl here)")
    from .node import Node, NodeError
    from .tree import raise_fd_limit

    raise_fd_limit()  # the tree walk holds one fd per level of a deep tree
    try:
        node = Node(cfg)
    except NodeError as exc:
        log.error("%s", exc)
        return 1
    try:
        return node.run()
    except Exception:
        log.exception("node failed")
        return 1


def main(argv: list[str] | None = None, prog: str = "python -m sbs.node.run") -> int:
    ap = argparse.ArgumentParser(prog=prog,
                                 description="run one SBS node (what `sbs-node start` runs)")
    ap.add_argument("--config", "-c", type=Path, default=Path("sbs.ini"))
    ap.add_argument("--verbose", "-v", action="store_true")
    args = ap.parse_args(argv)
    return run(args.config, args.verbose)


if __name__ == "__main__":
    sys.exit(main())
