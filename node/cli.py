"""sbs-node: run one node in the foreground (systemd-friendly)."""
from __future__ import annotations

import ctypes
import ctypes.util
import logging
import sys
from pathlib import Path

import typer

from .config import ConfigError, load

app = typer.Typer(add_completion=False, help="SBS node: one half of a hot-standby pair.")


# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


def tune_malloc() -> bool:
    """Keep freed chunk buffers in the heap instead of handing them back to the kernel.

    File content moves in 1 MiB chunks (a few dozen alive at once). With glibc's defaults each
    one may be a fresh mmap or a heap that is trimmed and grown again, so every chunk faults in
    new pages; on a VM whose host backs memory lazily that was a third of a 1 GiB transfer
    (bench/README.md). Allocations up to 4 MiB come from the heap and up to 64 MiB of freed
    memory stays there. Peak memory does not change. A libc without mallopt (musl) keeps its
    defaults."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, 4 << 20)) and bool(mallopt(_M_TRIM_THRESHOLD, 64 << 20))


@app.callback()
def _root() -> None:
    """SBS node."""  # keeps `start` a subcommand (typer collapses single-command apps)


@app.command()
def start(
    config: Path = typer.Option(Path("sbs.ini"), "--config", "-c", help="path to sbs.ini"),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="debug logging"),
) -> None:
    """Run this node until SIGTERM/SIGINT. Exit 0 clean stop, 1 runtime failure, 2 bad config."""
    try:
        cfg = load(config)
    except ConfigError as exc:
        print(f"sbs-node: configuration error: {exc}", file=sys.stderr)
        raise typer.Exit(2) from None
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format=f"%(asctime)s {cfg.name} %(name)s %(levelname)s %(message)s",
        stream=sys.stderr,
    )
    logging.getLogger("asyncio").setLevel(logging.WARNING)
    if not tune_malloc():
        logging.getLogger("sbs.node").debug("mallopt unavailable: default malloc tuning")
    from .node import Node, NodeError
    from .tree import raise_fd_limit

    raise_fd_limit()  # the tree walk holds one fd per level of a deep tree

    try:
        node = Node(cfg)
    except NodeError as exc:
        logging.getLogger("sbs.node").error("%s", exc)
        raise typer.Exit(1) from None
    try:
        code = node.run()
    except Exception:
        logging.getLogger("sbs.node").exception("node failed")
        raise typer.Exit(1) from None
    raise typer.Exit(code)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
