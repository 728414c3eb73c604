"""CPU shards in worker processes (engine/processes.py): the bytes threads give, dead
networks, resume, and what happens when a worker, or the process that forked it, fails."""

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from contextlib import contextmanager

import pytest
import torch
from test_engine import fingerprint, mixed_runs, run

from bnexp.engine import processes, shards, threads, train_population
from bnexp.engine.common import Interrupted

CPU = torch.device("cpu")
LINUX = pytest.mark.skipif(not processes.can_fork(), reason="workers are forks (Linux)")


@contextmanager
def cpu_threads(n: int):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def train(runs, split, *, workers: bool | None, threads: int = 2, **kw):
    """train_population with its shards in processes (workers) or in threads, on threads."""
    with cpu_threads(threads):
        return train_population(runs, split, CPU, shard_processes=workers, **kw)


def forks(monkeypatch) -> list[int]:
    """The pids of the workers forked from now on, in order."""
    pids, real = [], processes._fork

    def counted(shard, others):
        worker = real(shard, others)
        pids.append(worker.pid)
        return worker

    monkeypatch.setattr(processes, "_fork", counted)
    return pids


def gone(pid: int) -> bool:
    """pid has ended (a zombie not yet reaped by its new parent counts as ended)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except FileNotFoundError:
        return True


def test_shards_become_processes_on_a_cpu_where_enough_steps_are_left():
    pay = processes.processes_pay
    steps = processes.PROCESS_MIN_STEPS
    linux = processes.can_fork()
    assert pay(CPU, 2, steps, compiled=False) == linux
    assert not pay(CPU, 2, steps - 1, compiled=False), "a short run: threads"
    assert pay(CPU, 2, 1, compiled=False, asked=True) == linux
    assert not pay(CPU, 16, 10**6, compiled=False, asked=False)
    assert not pay(CPU, 1, 10**6, compiled=False), "one shard: no worker"
    assert not pay(CPU, 2, 10**6, compiled=True), "a compiled step: a few calls, threads"
    assert not pay(torch.device("cuda"), 2, 10**6, compiled=False, asked=True)


@LINUX
def test_shards_in_processes_give_the_bytes_of_shards_in_threads(split, monkeypatch):
    """Every kind of network, three shards as processes or as threads: the same bytes (the
    state the workers change lives in shared memory, so the parent reads what they wrote)."""
    runs = mixed_runs()
    pids = forks(monkeypatch)
    in_threads = train(runs, split, workers=False, threads=3, keep_states=True)
    in_processes = train(runs, split, workers=True, threads=3, keep_states=True)
    assert len(pids) == 3, "a worker per shard, kept for the whole population"
    assert {(r.shards_in, r.threads) for r in in_threads} == {("threads", 3)}
    assert {(r.shards_in, r.threads) for r in in_processes} == {("processes", 3)}
    for cfg, a, b in zip(runs, in_threads, in_processes, strict=True):
        assert fingerprint(a) == fingerprint(b), cfg
    pair = [run(lr=1.0, steps=60, eval_every=20)]  # the demo's comparison: a core each
    alone = train(pair, split, workers=False, threads=1, keep_states=True)
    apart = train(pair, split, workers=True, threads=2, keep_states=True)
    assert (apart[0].shards_in, apart[0].threads, alone[0].threads) == ("processes", 2, 1)
    assert fingerprint(alone[0]) == fingerprint(apart[0])
    assert all(gone(pid) for pid in pids), "every worker ends with its population"


@LINUX
def test_a_shard_whose_networks_died_gets_a_new_worker(split, monkeypatch):
    """Dead networks leave the step (the parent splits their stack): the shard's worker is
    replaced by a fork that holds the new stacks, and the numbers stay those of threads."""
    runs = [run(lr=1e6, init_scale=5.0, steps=100, eval_every=20),  # both die
            run(lr=0.1, steps=100, eval_every=20),
            run(lr=0.1, steps=100, eval_every=20, seed=1, dropout=0.3)]
    pids = forks(monkeypatch)
    in_threads = train(runs, split, workers=False, keep_states=True)
    in_processes = train(runs, split, workers=True, keep_states=True)
    assert len(pids) > 2, "a shard got a new worker when its networks died"
    assert in_processes[0].models[0].diverged_step is not None
    for a, b in zip(in_threads, in_processes, strict=True):
        assert fingerprint(a) == fingerprint(b)
    # the demo's case: a shard's only network dies; the shard gets no new worker
    pids.clear()
    runs = [run(lr=1e6, init_scale=5.0, steps=100, eval_every=20, batch_norm=[False]),
            run(lr=0.1, steps=100, eval_every=20, batch_norm=[True])]
    in_threads = train(runs, split, workers=False, keep_states=True)
    in_processes = train(runs, split, workers=True, keep_states=True)
    assert len(pids) == 2 and in_processes[0].models[0].diverged_step is not None
    for a, b in zip(in_threads, in_processes, strict=True):
        assert fingerprint(a) == fingerprint(b)


@LINUX
def test_a_population_stopped_in_processes_resumes_to_the_same_bytes(split):
    """Ctrl-C's first press: the block ends, the checkpoint holds what the workers trained,
    and resuming (in processes or threads) gives the uninterrupted bytes."""
    runs = [run(lr=1e6, init_scale=5.0, steps=100, eval_every=20, batch_norm=[False]),
            run(lr=0.1, steps=100, eval_every=20, dropout=0.2)]
    whole = train(runs, split, workers=False, keep_states=True)
    stop, saved = threading.Event(), {}

    def at_step(r, models) -> None:
        if models[0].steps[-1] == 60:
            stop.set()

    with pytest.raises(Interrupted):
        train(runs, split, workers=True, on_evaluate=at_step, stop=stop,
              on_checkpoint=lambda r, data: saved.update({r: data}))
    assert [saved[r]["step"] for r in range(len(runs))] == [60, 60]
    for workers in (True, False):
        resumed = train(runs, split, workers=workers, keep_states=True,
                        resume=[saved[r] for r in range(len(runs))])
        assert [fingerprint(r) for r in resumed] == [fingerprint(r) for r in whole]
        first = resumed[0]  # the times before the checkpoint: in the totals, not this call's
        assert 0 < first.resumed_train_time_s < first.train_time_s
        assert 0 < first.resumed_eval_time_s < first.eval_time_s


def long_pair() -> list:
    # 50,000 steps in one block: half a minute or more on any CPU, never reached here
    return [run(steps=50_000, eval_every=50_000)]


@LINUX
def test_a_killed_worker_fails_its_population_at_once(split, monkeypatch):
    pids = forks(monkeypatch)

    def kill_last_worker() -> None:  # its answer is awaited beside the first's, not after
        deadline = time.monotonic() + 60
        while len(pids) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.5)
        os.kill(pids[-1], signal.SIGKILL)

    signalled, real_kill = [], os.kill

    def recorded(pid, signum):
        signalled.append(pid)
        real_kill(pid, signum)

    monkeypatch.setattr(os, "kill", recorded)
    threading.Thread(target=kill_last_worker, daemon=True).start()
    start = time.perf_counter()
    with pytest.raises(processes.WorkerFailed, match=r"shard 1 was killed by SIGKILL \(signal 9\): "
                       "out of memory, or killed by another process"):
        train(long_pair(), split, workers=True)
    assert time.perf_counter() - start < 10
    assert all(gone(pid) for pid in pids), "the other worker is stopped too"
    # once reaped, the dead worker's pid may be another process's: never signalled again
    assert signalled.count(pids[-1]) == 1 and signalled.count(pids[0]) == 1


@LINUX
def test_a_worker_killed_between_blocks_fails_its_population_naming_the_signal(
        split, monkeypatch):
    pids = forks(monkeypatch)

    def kill_while_idle(r, models) -> None:  # the parent evaluates: the workers wait
        if models[0].steps[-1] == 20:
            os.kill(pids[0], signal.SIGKILL)
            while not gone(pids[0]):
                time.sleep(0.01)

    with pytest.raises(processes.WorkerFailed, match=r"shard 0 was killed by SIGKILL"):
        train([run(steps=60, eval_every=20)], split, workers=True, on_evaluate=kill_while_idle)
    assert all(gone(pid) for pid in pids)


@LINUX
def test_a_worker_that_hangs_inside_a_block_is_stopped_and_fails_its_population(
        split, monkeypatch):
    """A worker that finishes no step for STALL_S (a fork hazard its start did not show) is
    killed and its population fails, rather than the sweep waiting for ever."""
    pids = forks(monkeypatch)
    real = shards.Shard.step_all

    def step_all(shard) -> None:
        if int(shard.step) == 25:  # some steps into its block
            time.sleep(3600)
        real(shard)

    monkeypatch.setattr(shards.Shard, "step_all", step_all)  # the forks inherit it
    monkeypatch.setattr(processes, "STALL_S", 1.0)
    monkeypatch.setattr(processes, "STALL_POLL_S", 0.1)
    start = time.perf_counter()
    with pytest.raises(processes.WorkerFailed, match=r"the worker process training shard \d "
                       r"finished no step for 1 s \(hung\) and was stopped"):
        train(long_pair(), split, workers=True)
    assert time.perf_counter() - start < 30
    assert len(pids) == 2 and all(gone(pid) for pid in pids), "the other worker too"


@LINUX
def test_a_slow_worker_that_keeps_stepping_is_not_taken_for_hung(split, monkeypatch):
    """The watch is on steps, not on blocks: slow steps, each well within STALL_S, make a
    block longer than it, and the population trains to the same bytes."""
    runs = [run(steps=30, eval_every=30), run(steps=30, eval_every=30, lr=0.5)]
    in_threads = train(runs, split, workers=False, keep_states=True)
    real = shards.Shard.step_all

    def step_all(shard) -> None:  # a block of 3 s, a step 20 times within the bound
        time.sleep(0.1)
        real(shard)

    monkeypatch.setattr(shards.Shard, "step_all", step_all)
    monkeypatch.setattr(processes, "STALL_S", 2.0)
    monkeypatch.setattr(processes, "STALL_POLL_S", 0.05)
    trained = train(runs, split, workers=True, keep_states=True)
    assert {r.shards_in for r in trained} == {"processes"}
    for a, b in zip(in_threads, trained, strict=True):
        assert fingerprint(a) == fingerprint(b)


@LINUX
def test_an_exception_in_a_worker_is_raised_by_the_population(split, monkeypatch):
    def broken(self, n_steps, abandoned):
        raise FloatingPointError("the step broke")

    monkeypatch.setattr(shards.Shard, "train_block", broken)  # the forks inherit it
    with pytest.raises(processes.WorkerFailed, match="FloatingPointError: the step broke") as e:
        train([run(steps=40, eval_every=20)], split, workers=True)
    # the worker's own traceback comes along: where in the step it raised
    assert "in broken" in e.value.remote_traceback
    assert e.value.remote_traceback.rstrip().endswith("FloatingPointError: the step broke")
    from bnexp.sweep import failure_traceback  # what a failed run's failed.json keeps

    kept = failure_traceback(e.value)
    assert kept.index("in _answer") < kept.index("In the worker process:") < kept.index(
        "in broken")


def hang_at_start(monkeypatch, tmp_path, times: int) -> None:
    """The first `times` workers forked from now on hang before they are ready, as a fork
    that inherited a lock held by another thread does in its first matrix product."""
    real = shards.Shard.rehearse

    def rehearse(shard) -> None:
        for n in range(times):
            try:  # the marker says this hang is taken; each fork takes the next
                os.close(os.open(tmp_path / f"hang{n}", os.O_CREAT | os.O_EXCL))
            except FileExistsError:
                continue
            time.sleep(3600)
        real(shard)

    monkeypatch.setattr(shards.Shard, "rehearse", rehearse)  # the forks inherit it
    monkeypatch.setattr(processes, "WORKER_START_S", 1.0)


@LINUX
@pytest.mark.parametrize("hangs, shards_in, forked, said", [
    (1, "processes", 3, "did not start within 1 s; forking it again"),
    (2, "threads", 2, "the shards train as threads instead")])
def test_a_worker_that_hangs_as_it_starts_is_killed_and_forked_again_then_threads_train(
        split, monkeypatch, tmp_path, caplog, hangs, shards_in, forked, said):
    """One hang: the worker is killed and forked again. Two (the shard's worker and its
    second fork): the population trains as threads. The same bytes either way."""
    runs = [run(steps=40, eval_every=20), run(steps=40, eval_every=20, lr=0.5)]
    in_threads = train(runs, split, workers=False, keep_states=True)
    pids = forks(monkeypatch)
    hang_at_start(monkeypatch, tmp_path, times=hangs)
    trained = train(runs, split, workers=True, keep_states=True)
    assert {r.shards_in for r in trained} == {shards_in}
    assert len(pids) == forked and all(gone(pid) for pid in pids), "the hung ones killed"
    assert said in caplog.text
    for a, b in zip(in_threads, trained, strict=True):
        assert fingerprint(a) == fingerprint(b)


@LINUX
def test_threads_gone_waits_for_a_threads_end_for_the_system():
    release, ids = threading.Event(), []

    def body() -> None:
        ids.append(threading.get_native_id())
        release.wait()

    thread = threading.Thread(target=body, daemon=True)
    thread.start()
    try:
        while not ids:
            time.sleep(0.001)
        assert not threads.threads_gone(ids, timeout=0.2), "still running"
    finally:
        release.set()
        thread.join()
    assert threads.threads_gone(ids, timeout=5.0)
    assert not os.path.exists(f"/proc/self/task/{ids[0]}")


def test_leaving_a_shard_pool_waits_for_its_threads_to_end(monkeypatch):
    """Before a worker is forked: a pool thread Python has joined may still be freeing
    MKL's buffers under MKL's lock (threads.threads_gone)."""
    waited = []
    monkeypatch.setattr(threads, "threads_gone", lambda ids: waited.append(sorted(ids)))
    with threads.shard_pool(2) as pool:
        barrier = threading.Barrier(2)  # both threads busy at once: two threads ran
        ran = sorted(set(pool.map(lambda _: (barrier.wait(), threading.get_native_id())[1],
                                  range(2))))
    assert waited == [ran] and len(ran) == 2


class _Signalled(Exception):
    pass


@LINUX
def test_an_exception_while_workers_train_a_block_stops_them_at_once(split, monkeypatch):
    """Ctrl-C's second press raises KeyboardInterrupt in the parent while its workers are
    inside a block: the workers are killed (the population is given up; its checkpoint on
    disk is from before), not waited for. Here another signal raises half a second in."""
    if threading.current_thread() is not threading.main_thread():
        pytest.skip("signals reach the main thread only")
    pids = forks(monkeypatch)

    def handler(signum, frame):
        raise _Signalled

    def send() -> None:
        deadline = time.monotonic() + 60
        while len(pids) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.5)
        raised_at.append(time.perf_counter())
        os.kill(os.getpid(), signal.SIGUSR1)

    raised_at: list[float] = []
    before = signal.signal(signal.SIGUSR1, handler)
    try:
        threading.Thread(target=send, daemon=True).start()
        with pytest.raises(_Signalled):
            train(long_pair(), split, workers=True)
    finally:
        signal.signal(signal.SIGUSR1, before)
    assert raised_at and time.perf_counter() - raised_at[0] < 5.0
    assert len(pids) == 2 and all(gone(pid) for pid in pids)


WORKERS_OF_A_KILLED_PARENT = textwrap.dedent("""
    import sys, torch
    sys.path.insert(0, {tests!r})
    from conftest import synthetic_split
    from bnexp.config import RunConfig
    from bnexp.engine import processes, train_population

    real = processes._fork
    def announced(shard, others):
        worker = real(shard, others)
        print(worker.pid, flush=True)
        return worker
    processes._fork = announced
    torch.set_num_threads(2)
    train_population([RunConfig(experiment="t", steps=50_000, eval_every=50_000)],
                     synthetic_split(), torch.device("cpu"), shard_processes=True)
""")


@LINUX
def test_workers_die_with_the_process_that_forked_them():
    """kill -9 of a sweep leaves no worker training on (PR_SET_PDEATHSIG)."""
    script = WORKERS_OF_A_KILLED_PARENT.format(tests=os.path.dirname(__file__))
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        pids = [int(parent.stdout.readline()) for _ in range(2)]
        time.sleep(0.3)
        assert not any(gone(pid) for pid in pids), "training"
    finally:
        parent.kill()
        parent.wait()
    deadline = time.monotonic() + 10
    while not all(gone(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert all(gone(pid) for pid in pids)


@LINUX
def test_where_workers_cannot_start_the_shards_train_as_threads(split, monkeypatch, caplog):
    """No shared memory left (a container's 64 MB /dev/shm): a warning, then threads, the
    same bytes."""
    runs = [run(lr=0.5, steps=60, eval_every=20), run(activation="sigmoid", steps=60,
                                                      eval_every=20)]
    in_threads = train(runs, split, workers=False, keep_states=True)

    def full(self):
        raise RuntimeError("unable to allocate shared memory(shm) for file </torch_1_2>")

    monkeypatch.setattr(torch.Tensor, "share_memory_", full)
    with caplog.at_level("WARNING"):
        fallen_back = train(runs, split, workers=True, keep_states=True)
    assert "worker processes could not start (RuntimeError: unable to allocate shared " \
           "memory" in caplog.text and caplog.text.count("could not start") == 1
    assert {r.shards_in for r in fallen_back} == {"threads"}
    for a, b in zip(in_threads, fallen_back, strict=True):
        assert fingerprint(a) == fingerprint(b)


TRAINED_AS_PID_1 = textwrap.dedent("""
    import os, sys, torch
    sys.path.insert(0, {tests!r})
    from conftest import synthetic_split
    from bnexp.config import RunConfig
    from bnexp.engine import train_population
    assert os.getpid() == 1
    torch.set_num_threads(2)
    result = train_population([RunConfig(experiment="t", steps=40, eval_every=20)],
                              synthetic_split(), torch.device("cpu"), shard_processes=True)
    print(result[0].shards_in)
""")


def _can_be_pid_1() -> bool:
    try:
        return subprocess.run(["unshare", "-pf", "--mount-proc", "true"],
                              capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@LINUX
@pytest.mark.skipif(not _can_be_pid_1(), reason="needs unshare (a PID namespace)")
def test_workers_of_a_training_process_that_is_pid_1_train():
    """`docker run image bnexp run ...` makes bnexp PID 1: its workers' parent is then 1,
    which must not read as an orphan's."""
    script = TRAINED_AS_PID_1.format(tests=os.path.dirname(__file__))
    done = subprocess.run(["unshare", "-pf", "--mount-proc", sys.executable, "-c", script],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["processes"]


@pytest.mark.parametrize("workers", [False, pytest.param(True, marks=LINUX)])
def test_a_population_s_stacks_are_freed_when_it_returns(split, monkeypatch, workers):
    """No reference cycle keeps a population's stacks (their tensors; in worker processes
    an open shared-memory file each) alive until Python's cycle collector happens to run: a
    long sweep on 16 cores would otherwise hold hundreds of files per finished population."""
    import gc
    import weakref

    from bnexp.engine.stack import Stack

    made, real_init = [], Stack.__init__

    def tracked(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        made.append(weakref.ref(self))

    monkeypatch.setattr(Stack, "__init__", tracked)
    runs = [run(lr=1e6, init_scale=5.0, steps=60, eval_every=20),  # dies: stacks split
            run(lr=0.1, steps=60, eval_every=20, dropout=0.2)]
    gc.collect()
    gc.disable()
    try:
        train(runs, split, workers=workers)
        alive = sum(ref() is not None for ref in made)
        files = shared_memory_files()
    finally:
        gc.enable()
    assert len(made) > 2 and alive == 0, f"{alive} of {len(made)} stacks outlived training"
    assert files == [], "every shared-memory file is closed"


def shared_memory_files() -> list[str]:
    """The shared-memory files this process holds open (torch's, Linux)."""
    files = []
    for fd in os.listdir("/proc/self/fd") if os.path.isdir("/proc/self/fd") else []:
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:  # closed meanwhile (the listing's own)
            continue
        if "torch_" in target:
            files.append(target)
    return files


@LINUX
def test_workers_start_under_a_low_limit_of_open_files(split):
    """Every tensor in shared memory holds a file open: a population of many kinds on three
    shards needs hundreds, more than a soft limit of 64 (1,024 is common) allows; the
    training process raises its soft limit to the hard one first."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 4096:
        pytest.skip(f"a hard limit of {hard} open files")
    resource.setrlimit(resource.RLIMIT_NOFILE, (64, hard))
    try:
        result = train(mixed_runs(), split, workers=True, threads=3)
        raised = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert {r.shards_in for r in result} == {"processes"} and raised > 64
