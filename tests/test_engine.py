"""The population engine against the reference engine, determinism and divergence."""

import math

import pytest
import torch
from torch.nn import functional as F

from bnexp.config import RunConfig
from bnexp.data import BatchStream
from bnexp.engine import group_runs, train_population, train_reference
from bnexp.engine.common import eval_blocks
from bnexp.engine.population import _build_stacks
from bnexp.models import MLP, initial_weights

CPU = torch.device("cpu")


def run(**kw) -> RunConfig:
    base = dict(experiment="t", steps=300, eval_every=100, device="cpu")
    return RunConfig(**{**base, **kw})


def assert_states_close(a: dict, b: dict, rtol: float, atol: float) -> None:
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=rtol, atol=atol, equal_nan=True,
                                   msg=lambda m, k=key: f"{k}: {m}")


# Whole trajectories: where training is not chaotic, the engines agree step for step for
# hundreds of steps, and the validation curves are equal.
TRAJECTORY_CASES = [("relu", 0.01, 0.05), ("sigmoid", 0.01, 0.05), ("sigmoid", 0.1, 0.05)]


@pytest.mark.parametrize("activation, lr, init_scale", TRAJECTORY_CASES)
def test_population_matches_reference(split, activation, lr, init_scale):
    cfg = run(activation=activation, lr=lr, init_scale=init_scale, steps=300)
    pop = train_population([cfg], split, CPU, keep_states=True)[0]
    ref = train_reference(cfg, split, CPU, keep_states=True)
    for p, r in zip(pop.models, ref.models, strict=True):
        assert p.name == r.name
        assert p.steps == r.steps
        assert p.val_acc == r.val_acc, f"{p.name}: validation curves differ"
        assert p.final_test_acc == r.final_test_acc
        assert p.diverged_step == r.diverged_step
        assert_states_close(p.state, r.state, rtol=1e-3, atol=1e-4)
        torch.testing.assert_close(p.train_loss, r.train_loss, rtol=1e-4, atol=1e-5,
                                   equal_nan=True)


# High learning rates and bad init are chaotic: fp32 rounding differences between any two
# summation orders grow ~30x per step there (measured on this data), so whole trajectories
# of two correct engines part ways. The math is checked instead one step at a time, from
# states taken along the reference engine's own trajectory, including diverged (NaN) ones.
STEP_CASES = [(a, lr, init) for a in ("relu", "sigmoid")
              for lr, init in ((1.0, 0.05), (2.0, 0.05), (0.01, 5.0), (2.0, 5.0))]


def reference_step(model: MLP, lr: float, x: torch.Tensor, y: torch.Tensor) -> None:
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    optimizer.zero_grad()
    F.cross_entropy(model(x), y).backward()
    optimizer.step()


@pytest.mark.parametrize("activation, lr, init_scale", STEP_CASES)
@pytest.mark.parametrize("batch_norm", [False, True], ids=["plain", "bn"])
def test_single_steps_match_reference_along_trajectory(split, activation, lr, init_scale,
                                                       batch_norm):
    cfg = run(activation=activation, lr=lr, init_scale=init_scale, batch_norm=[batch_norm])
    model = MLP(initial_weights(cfg.layers, init_scale, cfg.seed), activation, batch_norm)
    stream = BatchStream(split.train_x.shape[0], cfg.batch_size, cfg.seed, "cpu")
    (stack,), _ = _build_stacks([cfg], CPU)
    step = torch.zeros((), dtype=torch.long)
    for k, idx in enumerate(stream.next_indices(120)):
        x, y = split.train_x[idx], split.train_y[idx]
        if k % 40 == 0:
            state = {n: t.clone() for n, t in model.state_dict().items()
                     if not n.endswith("num_batches_tracked")}
            stack.load_model_state(0, state)
            stack.train_step(x, y, step)
            reference_step(model, lr, x, y)
            expected = {n: model.state_dict()[n] for n in state}
            assert_states_close(stack.model_state(0), expected, rtol=1e-4, atol=1e-5)
            model.eval()
            logits = model(split.val_x).detach()
            model.train()
            # Bad init gives logits in the hundreds: tolerance relative to their scale.
            scale = logits.nan_to_num().abs().max().clamp_min(1.0).item()
            torch.testing.assert_close(stack.forward(split.val_x, train=False)[0].detach(),
                                       logits, rtol=1e-4, atol=1e-5 * scale, equal_nan=True)
        else:
            reference_step(model, lr, x, y)


def test_population_of_many_runs_matches_each_alone(split):
    runs = [run(activation=a, lr=lr, steps=100, eval_every=50)
            for a in ("relu", "sigmoid") for lr in (0.01, 0.1)]
    together = train_population(runs, split, CPU, keep_states=True)
    for cfg, result in zip(runs, together):
        alone = train_population([cfg], split, CPU, keep_states=True)[0]
        for a, b in zip(result.models, alone.models):
            assert a.val_acc == b.val_acc
            assert_states_close(a.state, b.state, rtol=1e-4, atol=1e-5)
    assert together[0].population_size == 8


def test_paired_models_start_from_identical_weights():
    w_plain = initial_weights((784, 100, 10), 0.05, seed=3)
    w_bn = initial_weights((784, 100, 10), 0.05, seed=3)
    assert all(torch.equal(a, b) for a, b in zip(w_plain, w_bn))
    plain, bn = MLP(w_plain, "relu", False), MLP(w_bn, "relu", True)
    assert torch.equal(plain.linears[0].weight, bn.linears[0].weight)
    assert bn.linears[0].bias is None and plain.linears[0].bias is not None
    assert bn.linears[-1].bias is not None, "the output layer keeps its bias"
    assert bn.norms[0].eps == 1e-3 and bn.norms[0].momentum == 0.01
    std = torch.cat([w.flatten() for w in initial_weights((784, 100, 10), 5.0, 0)]).std()
    assert 4.9 < std < 5.1


@pytest.mark.parametrize("engine", ["population", "reference"])
def test_same_seed_is_bit_identical(split, engine):
    cfg = run(activation="sigmoid", lr=0.5, steps=120, eval_every=40)
    train = train_population if engine == "population" else (
        lambda runs, *a, **k: [train_reference(runs[0], *a, **k)])
    a = train([cfg], split, CPU, keep_states=True)[0]
    b = train([cfg], split, CPU, keep_states=True)[0]
    for ma, mb in zip(a.models, b.models):
        assert ma.val_acc == mb.val_acc
        assert [str(x) for x in ma.train_loss] == [str(x) for x in mb.train_loss]
        for key in ma.state:
            assert torch.equal(ma.state[key], mb.state[key]), key


def test_different_seeds_differ(split):
    a = train_population([run(seed=0, steps=50, eval_every=50)], split, CPU, keep_states=True)
    b = train_population([run(seed=1, steps=50, eval_every=50)], split, CPU, keep_states=True)
    assert not torch.equal(a[0].models[0].state["linears.0.weight"],
                           b[0].models[0].state["linears.0.weight"])


def test_divergence_is_recorded_and_isolated(split):
    healthy = run(lr=0.1, steps=60, eval_every=20)
    exploding = run(lr=1e6, init_scale=5.0, steps=60, eval_every=20)
    stable = run(lr=0.05, init_scale=5.0, steps=60, eval_every=20)
    together = train_population([exploding, healthy], split, CPU, keep_states=True)
    # The same population shape with a stable neighbour: the healthy model's numbers must be
    # bit-identical, whatever its neighbour does.
    alone = train_population([stable, healthy], split, CPU, keep_states=True)[1]
    bad = together[0].models[0]
    assert bad.name == "plain" and bad.diverged_step is not None and 1 <= bad.diverged_step <= 60
    assert math.isnan(bad.train_loss[-1])
    assert 0.0 <= bad.final_val_acc <= 1.0
    for a, b in zip(together[1].models, alone.models):
        assert a.diverged_step is None
        assert a.val_acc == b.val_acc
        assert_states_close(a.state, b.state, rtol=0, atol=0)
    ref = train_reference(exploding, split, CPU)
    assert ref.models[0].diverged_step == bad.diverged_step


def test_eval_schedule():
    assert eval_blocks(1000, 500) == [500, 500]
    assert eval_blocks(1100, 500) == [500, 500, 100]
    assert eval_blocks(30, 500) == [30]
    result = train_population([run(steps=30, eval_every=500)], synthetic(), CPU)[0]
    assert result.models[0].steps == [0, 30]


def synthetic():
    from conftest import synthetic_split
    return synthetic_split(n_train=200, n_val=50, n_test=50)


def test_grouping_keeps_populations_homogeneous():
    runs = [run(seed=0), run(seed=1), run(seed=0, lr=0.5), run(seed=0, batch_size=30)]
    groups = group_runs(runs)
    assert [len(g) for g in groups] == [2, 1, 1]
    assert groups[0] == [runs[0], runs[2]]


def test_bn_learns_at_a_learning_rate_that_stalls_plain(split):
    plain, bn = train_population([run(lr=0.5, steps=200)], split, CPU)[0].models
    assert bn.final_val_acc > 0.95
    assert plain.final_val_acc < 0.5


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu(split):
    cfg = run(activation="relu", lr=0.1, steps=200, eval_every=100)
    cpu = train_population([cfg], split, CPU, keep_states=True)[0]
    for graph in (True, False):
        gpu = train_population([cfg], split.to("cuda"), torch.device("cuda"), keep_states=True,
                               cuda_graph=graph)[0]
        assert gpu.execution == ("cuda-graph" if graph else "eager")
        for a, b in zip(cpu.models, gpu.models):
            assert_states_close(a.state, b.state, rtol=1e-3, atol=1e-4)
            assert abs(a.final_val_acc - b.final_val_acc) <= 0.01


def test_large_groups_are_split_into_populations():
    runs = [run(lr=0.01 * (i + 1)) for i in range(5)]  # 10 networks
    groups = group_runs(runs, max_networks=4)
    assert [len(g) for g in groups] == [2, 2, 1]
    assert [r for g in groups for r in g] == runs
