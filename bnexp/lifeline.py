"""Worker processes that do not outlive the process that started them.

A worker that ignores SIGINT and SIGTERM (its parent decides when it stops) would otherwise
be left running, or waiting on its queue for ever, once a `kill` or `kill -9` of the parent
alone ended the parent: Linux kills it with the parent (PR_SET_PDEATHSIG).
"""

from __future__ import annotations

import ctypes
import os
import signal

_PR_SET_PDEATHSIG = 1


def die_with_parent(parent: int) -> None:
    """Have this process killed (SIGKILL) when the thread that started it ends, where the
    system offers that (Linux); exit at once where parent has already gone. parent: its pid,
    read by the parent (os.getpid()) before it started this process."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent:  # it died before prctl took effect (we were adopted)
        os._exit(1)
