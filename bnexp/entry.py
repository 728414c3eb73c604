"""The `bnexp` command's entry point, kept free of imports: a Ctrl-C while the command line
loads (its first fifth of a second) exits with 130 and no traceback, as one after it does."""

import sys


def main() -> None:
    try:
        from bnexp.cli import main as command_line
    except KeyboardInterrupt:
        sys.exit(130)
    command_line()
