"""sbs-node: run one node in the foreground (systemd-friendly)."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import typer

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
    # The node runs in a lean interpreter (node/run.py): the same pid, without typer. This
    # process imports nothing else: the config is read (and a bad one told, exit 2) there.
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
    from .run import run

    raise typer.Exit(run(config, verbose))


def main() -> None:
    app()


if __name__ == "__main__":
    main()
