"""`sweep --executor ray` against a real Ray cluster on this machine (loopback only).

Skipped without the `ray` extra, and in parallel test workers (make test-threads): one
cluster at a time on a small machine.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import holds, results_of
from typer.testing import CliRunner

from bnexp import ray_executor
from bnexp.cli import app

pytest.importorskip("ray")
pytestmark = pytest.mark.skipif("PYTEST_XDIST_WORKER" in os.environ,
                                reason="one Ray cluster at a time: not in parallel workers")

# Three populations (batch sizes) of two runs each, a checkpoint every 100 steps.
GRID = ("name: r\nsteps: 400\neval_every: 100\ncheckpoint_every: 100\ndevice: cpu\n"
        "grid:\n  lr: [0.05, 0.5]\n  batch_size: [40, 50, 60]\n")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def cluster(tiny_mnist):
    port = free_port()
    # Ray starts its workers at niceness 15, so that other work on a node comes first: on a
    # busy 2-core machine a population then crawled (270 s instead of 34 s for this module's
    # sweep, measured with two busy loops beside it). At 0 they compete like the local sweep,
    # and the verdict does not hang on the machine's load.
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "BNEXP_DATA_DIR": str(tiny_mnist),
           "RAY_worker_niceness": "0"}
    ray = [sys.executable, "-m", "ray.scripts.scripts"]
    # One GPU declared whatever the machine has: a cluster with GPUs for a driver that sees none
    # (test_a_driver_without_a_gpu_plans_for_the_clusters); runs on the cpu never ask for it.
    subprocess.run([*ray, "start", "--head", f"--port={port}", "--num-cpus=2", "--num-gpus=1",
                    "--node-ip-address=127.0.0.1", "--include-dashboard=false",
                    "--disable-usage-stats"], check=True, env=env, capture_output=True)
    try:
        yield f"127.0.0.1:{port}"
    finally:
        subprocess.run([*ray, "stop", "--force"], env=env, capture_output=True)


@pytest.fixture(scope="module")
def grid(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("grid") / "r.yaml"
    path.write_text(GRID)
    return path


@pytest.fixture(scope="module")
def local(grid, tiny_mnist, tmp_path_factory) -> dict:
    """The same grid swept by the local executor: what every Ray sweep must reproduce."""
    out = tmp_path_factory.mktemp("local")
    result = CliRunner().invoke(app, ["sweep", str(grid), "--out", str(out), "--data-dir",
                                      str(tiny_mnist)])
    assert result.exit_code == 0, result.output
    found = results_of(out)
    assert len(found) == 6
    return found


def ray_sweep(grid: Path, out: Path, address: str, tiny_mnist: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "bnexp", "sweep", str(grid), "--out", str(out), "--executor",
         "ray", "--address", address], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        env={**os.environ, "BNEXP_DATA_DIR": str(tiny_mnist), "RAY_USAGE_STATS_ENABLED": "0"})


def wait_until(condition, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not holds(condition):  # a folder listed as it vanishes is read again
        assert time.monotonic() < deadline, "no progress"
        time.sleep(0.05)


def test_ray_sweep_equals_the_local_one(cluster, grid, local, tiny_mnist, tmp_path):
    proc = ray_sweep(grid, tmp_path / "ray", cluster, tiny_mnist)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr.decode()[-2000:]
    assert "6 done, 0 skipped, 0 failed" in stdout.decode()
    text = " ".join(stderr.decode().split())
    assert "ray: population 3/3 done" in text
    assert "ray: 3 done, 0 running, 0 queued" in text, "the progress view's last state"
    assert results_of(tmp_path / "ray") == local


def task_pids() -> list[int]:
    """Ray workers executing a population (Ray titles them ray::<function>)."""
    out = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True).stdout
    return [int(line.split()[0]) for line in out.splitlines()
            if "ray::train_population_task" in line and "IDLE" not in line]


def test_a_killed_worker_is_retried_and_resumes(cluster, grid, local, tiny_mnist, tmp_path):
    out = tmp_path / "ray"
    proc = ray_sweep(grid, out, cluster, tiny_mnist)
    wait_until(lambda: any(out.rglob("checkpoint.pt")) and task_pids())
    killed = task_pids()[0]
    os.kill(killed, signal.SIGKILL)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr.decode()[-2000:]
    assert results_of(out) == local, "resumed from its checkpoint to the same bytes"


def test_a_killed_driver_resumes_on_the_next_sweep(cluster, grid, local, tiny_mnist, tmp_path):
    out = tmp_path / "ray"
    proc = ray_sweep(grid, out, cluster, tiny_mnist)
    wait_until(lambda: any(out.rglob("checkpoint.pt")))
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    again = ray_sweep(grid, out, cluster, tiny_mnist)
    stdout, stderr = again.communicate(timeout=300)
    assert again.returncode == 0, stderr.decode()[-2000:]
    assert results_of(out) == local


def test_a_driver_without_a_gpu_plans_for_the_clusters(cluster, tiny_mnist, tmp_path):
    """device auto resolves against the cluster's GPUs, not the driver's: a CPU-only head node
    plans a cuda run (its run id, its folder), which trains where the node has a GPU and
    otherwise fails with one line that names the node."""
    path = tmp_path / "g.yaml"
    path.write_text("name: g\nsteps: 20\neval_every: 10\ndevice: auto\n")
    env = {**os.environ, "BNEXP_DATA_DIR": str(tiny_mnist), "RAY_USAGE_STATS_ENABLED": "0",
           "CUDA_VISIBLE_DEVICES": ""}  # the driver sees no GPU, on any machine
    ran = subprocess.run([sys.executable, "-m", "bnexp", "sweep", str(path), "--out",
                          str(tmp_path / "o"), "--executor", "ray", "--address", cluster],
                         capture_output=True, text=True, env=env, timeout=300)
    if ran.returncode == 0:  # the node has a GPU: the run trained there
        (summary,) = (tmp_path / "o" / "g").glob("*/summary.json")
        assert json.loads(summary.read_text())["device"].startswith("cuda")
    else:
        assert ran.returncode == 1, ran.stderr
        text = " ".join(ran.stdout.split())
        assert "1 failed" in text and "torch sees no CUDA GPU, and the run asks for cuda" in text
        assert "Traceback" not in ran.stderr and "File " not in text, "one line"


def test_executor_errors_are_one_line(tmp_path, monkeypatch):
    path = tmp_path / "e.yaml"
    path.write_text("name: e\n")
    runner = CliRunner()
    bad = runner.invoke(app, ["sweep", str(path), "--executor", "dask"])
    assert bad.exit_code == 2
    assert bad.stderr.strip() == "error: --executor dask: expected local or ray"
    alone = runner.invoke(app, ["sweep", str(path), "--address", "auto"])
    assert alone.stderr.strip() == "error: --address auto: only with --executor ray"
    for address, why in ((f"127.0.0.1:{free_port()}", "no Ray cluster answers there"),
                         ("nowhere", "expected auto, HOST:PORT or ray://HOST:PORT")):
        unreachable = runner.invoke(app, ["sweep", str(path), "--executor", "ray", "--address",
                                          address, "--out", str(tmp_path / "o")])
        assert unreachable.exit_code == 2, unreachable.output
        assert unreachable.stderr.startswith(f"error: --address {address}: {why}")
        assert len(unreachable.stderr.strip().splitlines()) == 1
        assert not (tmp_path / "o").exists(), "nothing planned, locked or written"
    monkeypatch.setattr(ray_executor, "available", lambda: False)
    missing = runner.invoke(app, ["sweep", str(path), "--executor", "ray"])
    assert missing.exit_code == 2
    assert missing.stderr.strip() == ("error: --executor ray: ray is not installed "
                                      "(pip install 'bnexp[ray]')")


def test_a_port_that_is_not_ray_is_a_one_line_error(tmp_path, monkeypatch):
    """ray.init waited without end where a port answered that was not Ray's: an HTTP server
    (answers, not in gRPC) and a server that accepts and says nothing (times out)."""
    import threading

    def serve(reply: bytes | None) -> str:
        server = socket.create_server(("127.0.0.1", 0))

        def answer() -> None:
            conn, _ = server.accept()
            if reply is not None:
                conn.recv(1024)
                conn.sendall(reply)
                conn.close()
            else:
                time.sleep(3)
                conn.close()
            server.close()

        threading.Thread(target=answer, daemon=True).start()
        return f"127.0.0.1:{server.getsockname()[1]}"

    monkeypatch.setattr(ray_executor, "PROBE_TIMEOUT_S", 0.5)
    path = tmp_path / "e.yaml"
    path.write_text("name: e\n")
    for reply, why in ((b"HTTP/1.0 400 Bad Request\r\n\r\n", "something answers there, "
                        "but not a Ray cluster (it does not speak gRPC)"),
                       (None, "no Ray cluster answers there (timed out)")):
        address = serve(reply)
        started = time.monotonic()
        result = CliRunner().invoke(app, ["sweep", str(path), "--executor", "ray", "--address",
                                          address, "--out", str(tmp_path / "o")])
        assert result.exit_code == 2, result.output
        assert result.stderr.startswith(f"error: --address {address}: {why}"), result.stderr
        assert len(result.stderr.strip().splitlines()) == 1
        assert time.monotonic() - started < 30
        assert not (tmp_path / "o").exists()


def test_a_local_instance_runs_its_workers_unniced(monkeypatch):
    """Ray's default niceness 15 starved a sweep on a busy machine: the instance a sweep
    starts itself runs workers at 0; a cluster it joins keeps its own setting."""
    import ray

    asked = []

    def init(**kwargs):
        asked.append(kwargs.get("_system_config"))
        raise RuntimeError("stop here")

    monkeypatch.setattr(ray, "init", init)
    monkeypatch.setattr(ray_executor, "_probe", lambda address: None)
    for address in (None, "127.0.0.1:1"):
        with pytest.raises(RuntimeError, match="stop here"):
            ray_executor.connect(address)
    assert asked == [{"worker_niceness": 0}, None]


def test_the_bar_follows_running_populations_on_the_shared_folder(tmp_path):
    """Progress of a population's task, read from its runs' metrics.csv: None before this
    sweep's task wrote them, then the last step of each run times its networks."""
    from bnexp import results, sweep
    from bnexp.config import RunConfig

    runs = [RunConfig(experiment="p", lr=lr, device="cpu") for lr in (0.1, 0.2)]
    planned = sweep.plan(runs, tmp_path)
    folders = [results.run_folder(tmp_path, p.run, str(p.device)) for p in planned]
    header = "step,model,val_acc,train_acc,train_loss\n"
    folders[0].mkdir(parents=True)
    (folders[0] / "metrics.csv").write_text(header + "0,plain,0.1,0.1,nan\n")
    os.utime(folders[0] / "metrics.csv", (1, 1))  # an earlier attempt's rows
    assert ray_executor._reached(planned, tmp_path, since=time.time() - 5) is None
    (folders[0] / "metrics.csv").write_text(header)
    assert ray_executor._reached(planned, tmp_path, since=time.time() - 5) == 0, "started"
    rows = [f"{s},{m},0.5,0.5,0.3\n" for m in ("plain", "bn") for s in (0, 500, 1000)]
    (folders[0] / "metrics.csv").write_text(header + "".join(rows))
    folders[1].mkdir(parents=True)
    (folders[1] / "metrics.csv").write_text(header + "".join(rows[:2] + rows[3:5]))
    assert ray_executor._reached(planned, tmp_path, since=time.time() - 5) == 2 * 1000 + 2 * 500
