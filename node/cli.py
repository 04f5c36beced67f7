"""sbs-node: run one node in the foreground (systemd-friendly)."""
from __future__ import annotations

import logging
import sys
from pathlib import Path

import typer

from .config import ConfigError, load

app = typer.Typer(add_completion=False, help="SBS node: one half of a hot-standby pair.")


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
    from .node import Node, NodeError

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
