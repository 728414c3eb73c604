"""CPU shards in processes of their own: the cores used without Python's lock in the way.

A shard's thread holds Python's GIL while it dispatches its step's operators (83 for a stack of
plain networks, 140 for BN), so shards that are threads of one process spend their steps
handing that lock to each other: on 2 cores a relu pair took 16.1 s for 10,000 steps as two
threads against 13.0 s as one. As two processes the same pair trains in about the time of its
slower network. Each worker is a fork of the training process that holds one shard: the
state its steps change (parameters, running averages, loss sums, divergence steps, the step
counters) and the block of batch indices are moved into shared memory first, so the parent
evaluates and checkpoints the very tensors its workers train, and the data is the parent's,
shared copy-on-write. The arithmetic is the shard's own, one thread each, so a run's numbers
are the same bytes as with threads.

A worker trains a block when told to and says when it is done; it ignores Ctrl-C and
SIGTERM (the parent decides: stop at the next evaluation, or give up), dies with the parent
(PR_SET_PDEATHSIG), never writes to a file or the terminal, and leaves with os._exit, so
nothing it inherited (another thread's lock, a buffered stream) is touched. A shard whose
stacks change (dead networks leaving the step) gets a new worker.
"""

from __future__ import annotations

import logging
import os
import resource
import signal
import sys
import time
import traceback
import warnings
from collections.abc import Callable, Sequence
from multiprocessing import Pipe
from multiprocessing.connection import Connection, wait

import torch

from bnexp.lifeline import die_with_parent

# Steps a population must still train for its shards to become processes by default. A fork
# and its shared memory cost milliseconds, and the parent's first writes after it copy the
# pages it shares with its workers (its first evaluation then takes longer); measured on 2
# cores, `bnexp run experiments/relu_lr1.yaml --steps 500`: 0.4 s of training in processes,
# 0.6 s in one thread. Below that nothing is worth the workers.
PROCESS_MIN_STEPS = 500
# How long a new worker may take to say it is ready (it then has made its first matrix
# products): milliseconds normally, seconds on a loaded machine. One that does not is killed
# and forked again, then the population trains as threads (see _serve).
WORKER_START_S = 30.0
# How long a worker inside a block may go without finishing a step before it is taken for
# hung (a fork hazard the start's rehearsal did not catch), killed, and its population failed
# with its checkpoint kept (`--retry-failed` resumes it): far beyond any step (the largest
# population, 4,096 networks of ~26 MFLOP a step, all in one worker: about 2 s at the ~57
# GFLOP/s of one core), and counted in polls of at most STALL_POLL_S each, so a machine
# suspended or a process stopped (Ctrl-Z) meanwhile adds one poll, not its pause.
STALL_S = 600.0
STALL_POLL_S = 1.0
log = logging.getLogger(__name__)
_STOPS = {signal.SIGINT, signal.SIGTERM}


class WorkerFailed(RuntimeError):
    """A shard's worker process raised, or died (killed, out of memory).

    remote_traceback: the worker's own traceback where it raised (the parent's traceback
    ends at the pipe); exit_code: where it died, its reaped exit code (negative: the signal
    that ended it)."""

    def __init__(self, message: str, remote_traceback: str | None = None,
                 exit_code: int | None = None) -> None:
        super().__init__(message)
        self.remote_traceback = remote_traceback
        self.exit_code = exit_code


def can_fork() -> bool:
    """Workers are forks: Linux only (fork elsewhere is unsafe or missing)."""
    return sys.platform.startswith("linux") and hasattr(os, "fork")


def processes_pay(device: torch.device, shards: int, steps_left: int, compiled: bool,
                  asked: bool | None = None) -> bool:
    """Whether a population's shards train in processes: on a CPU that can fork, for more
    than one shard of an uncompiled step (a compiled step makes a few calls per step, so its
    threads hardly wait for the GIL), where asked (True) or, by default (None), where at
    least PROCESS_MIN_STEPS steps are left."""
    if asked is False or device.type != "cpu" or shards < 2 or compiled or not can_fork():
        return False
    return asked is True or steps_left >= PROCESS_MIN_STEPS


class _Worker:
    def __init__(self, pid: int, conn: Connection, stacks: list) -> None:
        self.pid, self.conn, self.stacks = pid, conn, stacks
        self.exit_code: int | None = None  # once reaped (its pid may then be another's)
        self.reaped = False

    def stop(self) -> None:
        """Gone at once: its block, if any, is abandoned (the parent is giving up on it)."""
        self.conn.close()
        if not self.reaped:
            os.kill(self.pid, signal.SIGKILL)  # our unreaped child: its pid is still its own
            self.reap()

    def reap(self) -> int | None:
        """Wait for it to end; its exit code (negative: the signal that ended it)."""
        if not self.reaped:
            try:
                _, status = os.waitpid(self.pid, 0)
                self.exit_code = os.waitstatus_to_exitcode(status)
            except ChildProcessError:
                pass
            self.reaped = True
        return self.exit_code


class ShardProcesses:
    """One forked worker per shard; train_block(n) trains every shard's next n steps.

    Where workers cannot start (no shared memory left, as in a container's 64 MB /dev/shm;
    fork refused), the shards train as threads instead (in_threads), with a warning: the
    same bytes, more slowly."""

    def __init__(self, shards: Sequence = ()) -> None:
        self.shards = shards  # set once the population's shards are built
        self._workers: dict[int, _Worker] = {}
        self.unavailable: str | None = None  # why the workers could not start

    def __enter__(self) -> ShardProcesses:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        while self._workers:
            self._workers.popitem()[1].stop()

    def train_block(self, n_steps: int, in_threads: Callable[[int], None]) -> None:
        if self.unavailable is None:
            try:
                self._start()
            except (OSError, RuntimeError) as exc:  # before any step of this block
                self.close()
                self.unavailable = f"{type(exc).__name__}: {exc}"
                log.warning("training: worker processes could not start (%s); the shards "
                            "train as threads instead (the same numbers, more slowly)",
                            self.unavailable)
        if self.unavailable is not None:
            in_threads(n_steps)
            return
        for worker in self._workers.values():
            try:
                worker.conn.send(n_steps)
            except OSError:  # it died since its last block: its answer below says how
                pass
        waiting = dict(self._workers)
        stalls = _Stalls({i: self.shards[i].step for i in waiting})
        while waiting:  # any worker's failure at once, not after the others' blocks
            ready = wait([worker.conn for worker in waiting.values()], timeout=STALL_POLL_S)
            for i, worker in list(waiting.items()):
                if worker.conn in ready:
                    _answer(worker, i)
                    del waiting[i]
            hung = stalls.hung(waiting)
            if hung is not None:
                waiting[hung].stop()
                del self._workers[hung]
                raise WorkerFailed(f"the worker process training shard {hung} finished no "
                                   f"step for {STALL_S:g} s (hung) and was stopped")

    def _start(self) -> None:
        """A worker for every shard without one, or whose stacks changed (dead networks
        left the step); none for a shard all of whose networks left."""
        for i, shard in enumerate(self.shards):
            worker = self._workers.get(i)
            if worker is not None and worker.stacks != shard.stacks:
                self._workers.pop(i).stop()
                worker = None
            if worker is None and shard.stacks:
                self._workers[i] = _started(shard, i, [w.conn for w in self._workers.values()])


class _Stalls:
    """How long each worker of a block has gone without finishing a step (shard.step, in
    shared memory, moves at every step), counted in polls of at most STALL_POLL_S."""

    def __init__(self, steps: dict[int, torch.Tensor]) -> None:
        self._steps = steps
        self._seen = {i: int(step) for i, step in steps.items()}
        self._still = dict.fromkeys(steps, 0.0)
        self._last = time.monotonic()

    def hung(self, waiting: dict) -> int | None:
        """The first worker still waited for that has stalled for STALL_S, else None."""
        now = time.monotonic()
        elapsed, self._last = min(now - self._last, STALL_POLL_S), now
        for i in waiting:
            step = int(self._steps[i])
            self._still[i] = 0.0 if step != self._seen[i] else self._still[i] + elapsed
            self._seen[i] = step
            if self._still[i] >= STALL_S:
                return i
        return None


def _more_open_files() -> None:
    """Let this process open as many files as its hard limit allows: each tensor in shared
    memory holds one open (torch's file_descriptor strategy), a few hundred for a population
    of many kinds on 16 cores, and the common soft limit is 1,024."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else 1 << 20
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError):  # above the kernel's cap: keep what there is
            pass


def _shared(shard) -> None:
    """Move what the shard's steps change, and the block they read, into shared memory."""
    for t in shard.shared_state():
        t.share_memory_()


def _fork(shard, others: list[Connection]) -> _Worker:
    _more_open_files()  # before the shared tensors open theirs
    _shared(shard)
    parent, child = Pipe()
    # Ctrl-C and SIGTERM wait (blocked) until the worker ignores them: the parent decides
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, _STOPS)
    me = os.getpid()
    try:
        with warnings.catch_warnings():  # Python 3.12+ warns of forking with threads running:
            warnings.simplefilter("ignore", DeprecationWarning)  # the child uses none of theirs
            pid = os.fork()
        if pid == 0:
            _worker(child, [parent, *others], shard, blocked, me)  # never returns
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
    child.close()
    return _Worker(pid, parent, list(shard.stacks))


class WorkerHung(RuntimeError):
    """A new worker did not say it was ready in time (it was killed)."""


def _started(shard, index: int, others: list[Connection]) -> _Worker:
    """A worker for the shard that has said it is ready; a hung one is forked again once.
    RuntimeError where none starts (the caller trains the shards as threads)."""
    try:
        return _await_start(_fork(shard, others), index)
    except WorkerHung as exc:
        log.warning("training: %s; forking it again", exc)
    return _await_start(_fork(shard, others), index)


def _await_start(worker: _Worker, index: int) -> _Worker:
    """The worker, once it has said it is ready; WorkerHung where it does not in time (it is
    killed: it has changed nothing yet), RuntimeError where it dies first."""
    try:
        ready = worker.conn.poll(WORKER_START_S)
    except BaseException:  # a second Ctrl-C while it starts: it is not ours to keep
        worker.stop()
        raise
    if not ready:
        worker.stop()
        raise WorkerHung(f"the worker process for shard {index} did not start within "
                         f"{WORKER_START_S:g} s")
    try:
        worker.conn.recv()
    except (EOFError, OSError):
        raise RuntimeError(f"the worker process for shard {index} "
                           f"{_how_it_ended(worker.reap())} as it started") from None
    return worker


def _worker(conn: Connection, inherited: list[Connection], shard, mask, parent: int) -> None:
    """The forked worker's life: serve the parent, then leave without running anything it
    inherited (atexit handlers, other threads' locks, buffered streams)."""
    code = 1
    try:
        for signum in _STOPS:
            signal.signal(signum, signal.SIG_IGN)
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        for other in inherited:
            other.close()
        die_with_parent(parent)
        _serve(conn, shard)
        code = 0
    finally:
        os._exit(code)


def _serve(conn: Connection, shard) -> None:
    """Train blocks until the parent closes the pipe (or dies)."""
    torch.set_num_threads(1)
    # The step's forward products on zeros before it says it is ready: a fork that inherited
    # a lock of MKL's held by another thread of the parent (engine/threads.py: threads_gone)
    # spins in its first product, here, where the parent's timeout catches it, rather than
    # in a block, where nothing would.
    shard.rehearse()
    conn.send(("ready", None, None))
    never = _Never()
    while True:
        try:
            n_steps = conn.recv()
        except (EOFError, OSError):
            return
        try:
            shard.train_block(n_steps, never)
        except BaseException as exc:  # noqa: BLE001 - reported to the parent, which raises
            conn.send(("failed", f"{type(exc).__name__}: {exc}", traceback.format_exc()))
            return
        conn.send(("done", None, None))


class _Never:
    """An abandoned flag that is never set: the parent stops a worker by killing it."""

    def is_set(self) -> bool:
        return False


def _answer(worker: _Worker, index: int) -> None:
    """The worker's answer for the block; WorkerFailed where it raised or died."""
    try:
        status, message, remote = worker.conn.recv()
    except (EOFError, OSError):
        code = worker.reap()
        raise WorkerFailed(f"the worker process training shard {index} "
                           f"{_how_it_ended(code)}", exit_code=code) from None
    if status != "done":
        raise WorkerFailed(message, remote)


def _how_it_ended(code: int | None) -> str:
    """A reaped worker's exit code (negative: the signal that ended it) in words."""
    if code is None or code >= 0:
        return f"exited with code {code}"
    how = f"was killed by {_signal_name(-code)} (signal {-code})"
    if code == -signal.SIGKILL:  # what the kernel's out-of-memory killer sends
        how += ": out of memory, or killed by another process"
    return how


def _signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return "a signal"
