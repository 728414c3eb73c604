"""engine/memory.py: a population's memory estimate, what a device has, and populations cut
to fit a budget."""

from __future__ import annotations

import pytest
import torch

from bnexp.config import RunConfig
from bnexp.engine import group_runs, memory

CPU = torch.device("cpu")


def run(**kw) -> RunConfig:
    return RunConfig(**{"experiment": "m", "steps": 20, "eval_every": 10, **kw})


def test_the_estimate_grows_with_networks_width_batch_dtype_and_dropout():
    base = memory.estimate_bytes([run()], CPU)
    assert memory.estimate_bytes([run(), run(seed=1)], CPU) > base
    assert memory.estimate_bytes([run(layers=[784, 200, 200, 200, 10])], CPU) > base
    assert memory.estimate_bytes([run(batch_size=600)], CPU) > base
    assert memory.estimate_bytes([run(dropout=0.5)], CPU) > base
    assert memory.estimate_bytes([run(dtype="float64")], CPU) == 2 * base
    # both networks' parameters at least twice over: values and gradients
    parameters = sum(a * b + b for a, b in zip(run().layers[:-1], run().layers[1:]))
    assert memory.network_bytes(run()) > 2 * 4 * parameters


def test_evaluation_memory_stops_growing_at_a_chunk_per_thread(monkeypatch):
    wide = run(layers=[784, 16000, 10])  # 2 networks per evaluation chunk (EVAL_ELEMENTS)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    one = memory.evaluation_bytes(wide, 1, CPU)
    assert memory.evaluation_bytes(wide, 4, CPU) == 4 * one
    assert memory.evaluation_bytes(wide, 400, CPU) == 4 * one, "two chunks of two at once"
    assert memory.evaluation_bytes(wide, 400, torch.device("cuda")) == 2 * one, "one chunk"


def test_groups_are_cut_to_the_memory_budget():
    runs = [run(lr=0.01 * (i + 1)) for i in range(7)]
    budget = memory.estimate_bytes(runs[:3], CPU)  # three pairs fit, four do not
    groups = group_runs(runs, max_bytes=budget, device=CPU)
    assert [len(g) for g in groups] == [3, 3, 1]
    assert [r for g in groups for r in g] == runs, "in order, none lost"
    assert all(memory.estimate_bytes(g, CPU) <= budget for g in groups)
    assert group_runs(runs, max_bytes=budget - 1, device=CPU)[0] == runs[:2]
    # a run that alone needs more than the budget still trains, alone
    assert group_runs(runs[:2], max_bytes=1, device=CPU) == [runs[:1], runs[1:2]]
    assert group_runs(runs) == [runs], "no budget: one population"


def test_device_memory_is_the_containers_limit_where_that_is_less(tmp_path, monkeypatch):
    physical = memory.device_memory(CPU)
    assert physical is not None and physical > 2**28
    v2, v1 = tmp_path / "v2", tmp_path / "v1"
    (v2 / "box").mkdir(parents=True)
    (v1 / "outer" / "box").mkdir(parents=True)
    monkeypatch.setattr(memory, "CGROUP_MOUNTS", ((v2, "", "memory.max"),
                                                  (v1, "memory", "memory.limit_in_bytes")))
    proc = tmp_path / "cgroup"
    monkeypatch.setattr(memory, "PROC_CGROUP", proc)
    assert memory.device_memory(CPU) == physical, "no such files"
    (v2 / "memory.max").write_text("max\n")
    (v1 / "memory.limit_in_bytes").write_text("9223372036854771712\n")  # v1's "no limit"
    assert memory.device_memory(CPU) == physical
    # the process's own cgroup, below the mount's root
    proc.write_text("4:memory:/outer/box\n0::/box\n")
    (v1 / "outer" / "box" / "memory.limit_in_bytes").write_text(f"{2**30}\n")
    assert memory.device_memory(CPU) == min(physical, 2**30)
    (v2 / "box" / "memory.max").write_text(f"{2**29}\n")
    assert memory.device_memory(CPU) == min(physical, 2**29)
    # a mount that starts below the root of the paths /proc/self/cgroup gives
    proc.write_text("4:memory:/host/slice/outer/box\n")
    (v2 / "box" / "memory.max").write_text("max\n")
    assert memory.device_memory(CPU) == min(physical, 2**30)
    proc.write_text("not a cgroup file")
    assert memory.device_memory(CPU) == physical
    assert memory.population_budget(CPU) == int(memory.device_memory(CPU)
                                                * memory.POPULATION_SHARE)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without a GPU")
def test_a_gpu_this_process_does_not_see_has_no_known_memory():
    assert memory.device_memory(torch.device("cuda")) is None
    assert memory.population_budget(torch.device("cuda")) is None


def test_a_run_is_too_large_only_beyond_all_the_devices_memory():
    big = run(layers=[784, 4000, 4000, 10], batch_size=20000)
    need = memory.estimate_bytes([big], CPU)
    assert memory.too_large(big, CPU, need) is None
    why = memory.too_large(big, CPU, need - 1)
    assert why.startswith("layers [784, 4000, 4000, 10] with batch_size 20000 need about ")
    assert "GiB to train the run's 2 network(s) in float32, more than the" in why
    assert memory.too_large(big, CPU, None) is None, "not known: not refused"


def test_byte_counts_read_as_mib_or_gib():
    assert memory.bytes_text(1) == "1 MiB"
    assert memory.bytes_text(300 * 2**20) == "300 MiB"
    assert memory.bytes_text(3 * 2**30 // 2) == "1.5 GiB"
