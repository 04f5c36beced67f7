"""sbs-node: run one node in the foreground (systemd-friendly)."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import typer

from .config import ConfigError, load
from .run import run, tune_malloc  # noqa: F401  (tune_malloc: where tests look)

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
        load(config)  # a bad config is told here, in typer's process, and exits 2
    except ConfigError as exc:
        print(f"sbs-node: configuration error: {exc}", file=sys.stderr)
        raise typer.Exit(2) from None
    # The node runs in a lean interpreter (node/run.py): the same pid, without typer
    argv = [sys.executable, "-m", "sbs.node.run", "--config", str(config)]
    if verbose:
        argv.append("--verbose")
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execv(sys.executable, argv)
    except OSError as exc:  # no exec here: run in this process instead
        print(f"sbs-node: cannot exec {sys.executable} ({exc}); running in this process",
              file=sys.stderr)
    raise typer.Exit(run(config, verbose))


def main() -> None:
    app()


if __name__ == "__main__":
    main()
