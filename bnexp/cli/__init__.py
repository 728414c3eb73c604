"""The bnexp command line: run, sweep, validate, runs, plot, report, bn-check and bench.

Each module registers its commands on the one Typer app of cli/common.py.
"""

# Importing a module registers its commands; this order is the order of `bnexp --help`.
from bnexp.cli import train, views, benchmark  # noqa: F401, I001
from bnexp.cli.common import app


def main() -> None:
    app()


__all__ = ["app", "main"]
