"""The bnexp command line: run, sweep, validate, runs, plot, report, bn-check and bench.

Each module registers its commands on the one Typer app of cli/common.py.
"""

# Importing a module registers its commands; this order is the order of `bnexp --help`.
from bnexp.cli import train, views, benchmark  # noqa: F401, I001
from bnexp.cli.common import app


def main() -> None:
    try:
        app()
    finally:
        import gc

        # The interpreter's last garbage collection, skipped: it would walk every object
        # torch's modules made (0.6 to 0.9 s of every command that imports torch, measured on
        # a 2-core machine); files are closed and written by then, and the memory goes with
        # the process.
        gc.freeze()


__all__ = ["app", "main"]
