"""Populations as Ray tasks: a sweep spread over the CPUs and GPUs of a Ray cluster.

The driver (the `bnexp sweep` process) plans, locks every run folder it will train, and
submits one task per population; each task loads its data, resumes every run of its
population from the checkpoints on disk, trains, and writes the run folders with the same
atomic writes as a local sweep. The results folder must be one every node sees (a shared
filesystem): it is the single source of truth. A worker killed mid-task is retried by Ray
(MAX_RETRIES), and the retry resumes from the last checkpoint the killed attempt wrote; a
driver killed and started again skips what finished and resumes the rest.
"""

from __future__ import annotations

import functools
import os
import socket
import time
import traceback
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

INSTALL_HINT = "pip install 'bnexp[ray]'"
MAX_RETRIES = 3  # attempts after a worker process dies (a task that raises is not retried)
# A population of this many networks or more asks for a whole GPU; smaller ones a fraction
# (several share a GPU), never below MIN_GPU_FRACTION.
GPU_NETWORKS = 1024
MIN_GPU_FRACTION = 0.125
# ray.init waits without end on an address where nothing listens, or where something that is
# not Ray does: a probe goes first. Ray's GCS (and its client server behind ray://) are gRPC
# servers: sent HTTP/2's client preface and an empty SETTINGS frame, they answer with a
# SETTINGS frame (a 9-byte header whose type byte is 4).
PROBE_TIMEOUT_S = 5.0
HTTP2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes([0, 0, 0, 4, 0, 0, 0, 0, 0])


class Unreachable(Exception):
    """No Ray cluster to join at the address given (the message says why, for the user)."""


class NodeUnfit(RuntimeError):
    """A task landed on a node that cannot train its population (no GPU for a cuda run)."""


@dataclass(frozen=True)
class Cluster:
    cpus: float
    gpus: float
    seconds: float  # connecting (or starting the local instance) took


_joined: Cluster | None = None  # the cluster this process joined (ray.init happens once)


def available() -> bool:
    import importlib.util

    return importlib.util.find_spec("ray") is not None


def resources(networks: int, device: str, cluster_gpus: float) -> dict[str, float]:
    """What a population's task asks Ray for: a GPU share by its size, or one CPU."""
    if device.startswith("cuda") and cluster_gpus > 0:
        share = min(1.0, max(MIN_GPU_FRACTION, networks / GPU_NETWORKS))
        return {"num_gpus": share, "num_cpus": 1}
    return {"num_cpus": 1}


def connect(address: str | None) -> Cluster:
    """Join the cluster at address ("auto", "HOST:PORT" or "ray://HOST:PORT"), or start a local
    instance (None); once per process. Unreachable where there is no cluster to join."""
    global _joined
    import ray

    if _joined is not None and ray.is_initialized():
        return _joined
    started = time.perf_counter()
    if address not in (None, "auto"):
        _probe(address)
    # Ray runs workers at niceness 15 so that other work on a node comes first; on a busy
    # machine that starved a local sweep (a 20 s sweep took 270 s beside two busy loops). A
    # local instance is this sweep's own: its workers compete like a local sweep's process.
    # A cluster keeps its own setting (RAY_worker_niceness when `ray start` runs).
    system = {"worker_niceness": 0} if address is None else None
    # Ray tells every driver that a future version will stop hiding GPUs from tasks that ask
    # for none; a population on the cpu never touches one either way.
    warnings.filterwarnings("ignore", message="Tip: In future versions of Ray",
                            category=FutureWarning)
    try:
        ray.init(address=address, include_dashboard=False, log_to_driver=False,
                 ignore_reinit_error=True, configure_logging=False, _system_config=system,
                 runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})
    except (ConnectionError, ValueError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise Unreachable(f"--address {address}: {reason}") from None
    resources = ray.cluster_resources()
    _joined = Cluster(resources.get("CPU", 0), resources.get("GPU", 0),
                      time.perf_counter() - started)
    return _joined


def _probe(address: str) -> None:
    """Unreachable unless something accepts a TCP connection at address's host and port."""
    host, _, port = address.removeprefix("ray://").rpartition(":")
    host = host.strip("[]")  # [::1]:6379
    if not host or not port.isdigit():
        raise Unreachable(f"--address {address}: expected auto, HOST:PORT or ray://HOST:PORT")
    try:
        with socket.create_connection((host, int(port)), timeout=PROBE_TIMEOUT_S) as conn:
            if _tls():  # the preface would have to go through TLS: the TCP check must do
                return
            conn.sendall(HTTP2_PREFACE)
            head = _receive(conn, 9)
    except OSError as exc:  # refused, unreachable, or silent (timed out)
        raise Unreachable(f"--address {address}: no Ray cluster answers there "
                          f"({exc.strerror or exc or type(exc).__name__}); start one with "
                          "`ray start --head` or check the address") from None
    if len(head) < 9 or head[3] != 4:
        raise Unreachable(f"--address {address}: something answers there, but not a Ray "
                          "cluster (it does not speak gRPC); give the head's GCS port (6379 "
                          "unless `ray start --head --port` chose another)")


def _receive(conn: socket.socket, n: int) -> bytes:
    """Up to n bytes: fewer only where the peer closes first."""
    data = b""
    while len(data) < n:
        part = conn.recv(n - len(data))
        if not part:
            break
        data += part
    return data


def _tls() -> bool:
    """Whether Ray connections use TLS here (RAY_USE_TLS, as Ray reads it)."""
    return os.environ.get("RAY_USE_TLS", "0").lower() in ("1", "true")


def node_problem(device: str, dtype: str) -> str | None:
    """Why this node cannot train a population planned for device and dtype, or None: the
    driver planned it for the cluster's GPUs, not for the node the task landed on."""
    import torch

    if device.startswith("cuda") and not torch.cuda.is_available():
        return f"node {socket.gethostname()}: torch sees no CUDA GPU, and the run asks for cuda"
    if dtype == "tf32":
        from bnexp.engine.precision import tf32_problem

        if problem := tf32_problem(torch.device(device)):
            return f"node {socket.gethostname()}: dtype tf32 {problem}"
    return None


@functools.cache
def _split(dataset: str, data_dir: str, device: str):
    import torch

    from bnexp.data import load_split

    return load_split(dataset, Path(data_dir), torch.device(device))


def train_population_task(planned: list, out: str, data_dir: str, compile_step: bool,
                          tensorboard: bool) -> list:
    """In a Ray worker: train one population's runs from their checkpoints on disk (a retry
    resumes where the killed attempt left off) and write them; their Outcomes."""
    import torch

    from bnexp import sweep

    torch.set_num_threads(1)  # one CPU per task, as asked of Ray
    first = planned[0]
    if problem := node_problem(str(first.device), first.run.dtype):
        raise NodeUnfit(problem)  # every run of the population fails with this line
    root = Path(out)
    folders = [sweep.results.run_folder(root, p.run, str(p.device)) for p in planned]
    for folder in folders:  # the driver holds the locks: only a dead attempt left these
        sweep.results.remove_stale_temp_files(folder)
    splits = {(first.run.dataset, str(first.device)):
              _split(first.run.dataset, data_dir, str(first.device))}
    n_train = sweep.training_images(splits, first.run)
    ready = [(p, sweep.usable_checkpoint(folder, p, n_train))
             for p, folder in zip(planned, folders)]
    outcomes: list = []
    options = sweep.TrainOptions(compile_step=compile_step, tensorboard=tensorboard)
    for batch in sweep.batches(ready):  # checkpoints of one population share a step
        try:
            sweep.execute_batch(batch, root, splits, None, outcomes, lambda o: None, options)
        except sweep.BatchFailed:
            pass
    for outcome in outcomes:  # states are for analyses, already written: keep replies small
        if outcome.result is not None:
            for model in outcome.result.models:
                model.state = None
    return outcomes


def execute_batches(batches: list, out: Path, data_dir: Path, fail_fast: bool, progress,
                    outcomes: list, report: Callable, options, notice: Callable[[str], None],
                    address: str | None) -> None:
    """Run every population as a Ray task (see the module's docstring); outcomes in order of
    completion. Ctrl-C (options.stop) cancels what has not finished: its checkpoints stay."""
    import ray

    from bnexp import sweep
    from bnexp.engine.common import Interrupted

    if not batches:
        return
    cluster = connect(address)
    notice(f"ray: connected in {cluster.seconds:.1f} s ({cluster.cpus:g} CPUs, "
           f"{cluster.gpus:g} GPUs)")
    task = ray.remote(max_retries=MAX_RETRIES)(train_population_task)
    pending: dict = {}
    for batch in batches:
        planned = [p for p, _ in batch]
        networks = sum(len(p.run.batch_norm) for p in planned)
        ref = task.options(**resources(networks, str(planned[0].device), cluster.gpus)).remote(
            planned, str(out), str(data_dir), options.compile_step, options.tensorboard)
        pending[ref] = (planned, networks * planned[0].run.steps)
    total, finished, shown = len(pending), 0, None
    submitted = time.time()
    counted = dict.fromkeys(pending, 0)  # network-steps of each population already on the bar
    while pending:
        seen = {ref: _reached(planned, out, submitted) for ref, (planned, _) in pending.items()}
        running = sum(reached is not None for reached in seen.values())
        for ref, reached in seen.items():
            if progress and reached and reached > counted[ref]:
                progress(reached - counted[ref])
                counted[ref] = reached
        counts = f"ray: {finished} done, {running} running, {len(pending) - running} queued"
        if options.status and counts != shown:
            options.status(counts)
            shown = counts
        if options.stop is not None and options.stop.is_set():
            for ref in pending:
                ray.cancel(ref, force=True)
            raise Interrupted(None, checkpointed=True)
        done, _ = ray.wait(list(pending), num_returns=1, timeout=0.5)
        for ref in done:
            planned, work = pending.pop(ref)
            finished += 1
            failed = _collect(ref, planned, out, outcomes, report, sweep)
            if progress:
                progress(max(work - counted.pop(ref), 0))
            notice(f"ray: population {finished}/{total} {'failed' if failed else 'done'} "
                   f"({len(planned)} run(s)); {len(pending)} queued or running")
            if failed and fail_fast:
                for other in pending:
                    ray.cancel(other, force=True)
                return
    if options.status:
        options.status(f"ray: {finished} done, 0 running, 0 queued")


def _reached(planned: list, out: Path, since: float) -> int | None:
    """The network-steps a population's task has reached, as the shared folder shows them, or
    None while it has not started: a task writes its runs' metrics.csv at every evaluation
    (a resumed run: first at its checkpoint's step)."""
    from bnexp import results
    from bnexp.readback import DamagedRun, read_metrics

    reached = None
    for p in planned:
        folder = results.run_folder(out, p.run, str(p.device))
        try:
            if (folder / "metrics.csv").stat().st_mtime < since:  # not this sweep's task's
                continue
        except OSError:
            continue
        reached = reached or 0
        try:
            curves = read_metrics(folder)
        except DamagedRun:  # only its header so far
            continue
        reached += max(curve["step"][-1] for curve in curves.values()) * len(p.run.batch_norm)
    return reached


def _collect(ref, planned: list, out: Path, outcomes: list, report, sweep) -> bool:
    """The task's outcomes into outcomes (a task that died: its runs failed); any failed?"""
    import ray

    try:
        found = ray.get(ref)
    except Exception as exc:  # the task raised, or died more often than Ray retries
        cause = getattr(exc, "cause", None)  # a task's own exception, inside Ray's
        detail = (str(cause) if isinstance(cause, NodeUnfit)  # the line, no traceback
                  else traceback.format_exception_only(type(exc), exc)[-1].strip()[:500])
        trace = None if isinstance(cause, NodeUnfit) else str(exc)  # Ray's: the task's own
        found = []
        for p in planned:
            sweep.results.write_failure(sweep.results.run_folder(out, p.run, str(p.device)),
                                        p.run, detail, trace)
            found.append(sweep.Outcome(p, "failed", error=detail))
    for outcome in found:
        outcomes.append(outcome)
        report(outcome)
    return any(o.status == "failed" for o in found)
