"""sbs-node: run one node in the foreground (systemd-friendly).

``sbs-node start [--config PATH] [--verbose]``, the line a supervisor runs on every start and
failover, is read by node/run.py's small argparse parser in this process, which then runs the
node: typer (~40 ms to import, and the pydantic it loads, ~15 MB a node would carry) and a
second interpreter start are not on the path to a running node. Everything else (``--help``,
``start --help``, a mistyped command) goes to typer.
"""
from __future__ import annotations

import sys
from pathlib import Path

_HELP = {"--help", "-h"}


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if args[:1] == ["start"] and not _HELP.intersection(args):
        from .run import main as run_node

        sys.exit(run_node(args[1:], prog="sbs-node start"))
    _typer_app()(args=args)


def _typer_app():
    import typer  # only for help and a mistyped line

    app = typer.Typer(add_completion=False, help="SBS node: one half of a hot-standby pair.")

    @app.callback()
    def _root() -> None:
        """SBS node."""  # keeps `start` a subcommand (typer collapses single-command apps)

    @app.command()
    def start(
        config: Path = typer.Option(Path("sbs.ini"), "--config", "-c", help="path to sbs.ini"),
        verbose: bool = typer.Option(False, "--verbose", "-v", help="debug logging"),
    ) -> None:
        """Run this node until SIGTERM/SIGINT. Exit 0 clean stop, 1 runtime failure, 2 bad
        config."""
        from .run import run  # main() runs a plain start itself; typer only shows help

        raise typer.Exit(run(config, verbose))

    return app


if __name__ == "__main__":
    main()
