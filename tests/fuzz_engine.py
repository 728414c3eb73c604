"""Differential fuzzing of the population engine: a developer's tool, not part of the suite.

    python tests/fuzz_engine.py alone [--cases N] [--seed S]
        Random populations (2 to 6 runs of one population key, most of one kind of stack:
        widths 1 to 100, one to three hidden layers, batches of 1 to 128, every activation,
        init, normaliser and placement, dropout, clipping, tracked units, float32 and
        float64), each trained together and one run of each alone: the run's curves, losses
        and weights must be the same bytes.
    python tests/fuzz_engine.py reference [--cases N] [--seed S]
        One random run at a time in float64 on both engines: the weights must agree to 1e-9 of
        their scale. Training at a large learning rate can be chaotic, so a case that parts
        only after its second step is reported as chaotic, not as a failure; a validation
        accuracy that differs while the weights agree comes from tied logits (a network whose
        output no longer depends on its input) and is reported as a tie.

Every case is a function of its number, so a failure reported as case N is reproduced by
--seed N --cases 1. Exit status 1 where any case failed.
"""

from __future__ import annotations

import argparse
import math
import random
import sys

import torch
from conftest import assert_states_close, synthetic_split
from test_engine import fingerprint

from bnexp.config import RunConfig
from bnexp.engine import train_population, train_reference

CPU = torch.device("cpu")
SHARED = ("layers", "batch_size", "steps", "eval_every", "track_unit", "track_layer", "dtype",
          "group_norm_groups")
# what runs' networks must share to share a stack (shards.stack_kind): shared in most cases,
# since a run whose stack holds it alone could not differ among others
KIND = ("norm", "bn_position", "bn_scale", "clip", "clip_threshold")


def random_run(rng: random.Random, shared: dict | None = None) -> RunConfig:
    """A valid run drawn from every setting the population engine trains; shared fixes the
    settings of the population key (and the group count) to another run's."""
    widths = [rng.choice([1, 2, 3, 5, 7, 10, 20, 40, 100]) for _ in range(rng.randint(1, 3))]
    steps = rng.choice([1, 2, 3, 5, 8])
    settings = dict(
        experiment="fuzz", device="cpu", layers=[784, *widths, 10],
        dtype=rng.choice(["float32", "float64"]),
        activation=rng.choice(["relu", "sigmoid", "tanh", "elu", "leaky_relu"]),
        lr=rng.choice([1e-3, 0.01, 0.1, 0.5, 1.0, 2.0]),
        init=rng.choice(["normal", "xavier_uniform", "xavier_normal", "he_uniform", "he_normal"]),
        init_scale=rng.choice([0.01, 0.05, 1.0, 5.0]),
        steps=steps, eval_every=rng.choice([1, 2, steps, steps + 3]),
        batch_size=rng.choice([1, 2, 3, 7, 60, 128]), seed=rng.choice([0, 1, 2, 2**62]),
        batch_norm=rng.choice([[False, True], [True], [False], [True, False]]),
        norm=rng.choice(["batch", "layer", "group"]),
        group_norm_groups=rng.choice([d for d in (1, 2, 5) if math.gcd(*widths) % d == 0]),
        bn_decay=rng.choice([0.5, 0.9, 0.99]), bn_scale=rng.choice([True, False]),
        bn_position=rng.choice(["before", "after"]), dropout=rng.choice([0.0, 0.0, 0.1, 0.5]),
        clip=rng.choice(["none", "value", "norm"]), clip_threshold=rng.choice([1e-3, 0.1, 1.0]))
    if rng.random() < 0.3:
        layer = rng.randrange(-len(widths), len(widths))
        settings.update(track_layer=layer, track_unit=rng.randrange(widths[layer]))
    settings.update(shared or {})
    if settings["batch_size"] == 1:  # batch norm needs two examples
        settings["batch_norm"] = [False]
    try:
        return RunConfig(**settings)
    except ValueError:  # a normaliser over one unit: the same run with batch norm
        return RunConfig(**{**settings, "norm": "batch"})


def alone_case(rng: random.Random, split) -> str | None:
    """Why one run of a random population differs alone (None where it does not)."""
    first = random_run(rng)
    keys = SHARED + (KIND if rng.random() < 0.8 else ())
    shared = {key: getattr(first, key) for key in keys}
    runs = [first] + [random_run(rng, shared) for _ in range(rng.randint(1, 5))]
    runs = list({run.run_id("cpu"): run for run in runs}.values())
    k = rng.randrange(len(runs))
    together = train_population(runs, split, CPU, keep_states=True)[k]
    alone = train_population([runs[k]], split, CPU, keep_states=True)[0]
    if fingerprint(alone) != fingerprint(together):
        return f"run {k} of {len(runs)} differs alone: {runs[k].result_fields()}"
    return None


def reference_case(rng: random.Random, split) -> str | None:
    """Why a random float64 run differs between the engines (None where it does not)."""
    run = random_run(rng, {"dtype": "float64"})

    def parted(r: RunConfig) -> str | None:
        pop = train_population([r], split, CPU, keep_states=True)[0]
        ref = train_reference(r, split, CPU, keep_states=True)
        for p, q in zip(pop.models, ref.models, strict=True):
            if p.diverged_step != q.diverged_step:
                return f"{p.name} diverges at {p.diverged_step}, reference {q.diverged_step}"
            if p.diverged_step is None:
                try:
                    assert_states_close(p.state, q.state, rel=1e-9)
                except AssertionError as exc:
                    return f"{p.name}: {str(exc).splitlines()[0]}"
                if p.val_acc != q.val_acc:
                    print(f"  tie: {p.name} {p.val_acc} vs {q.val_acc} with the same weights")
        return None

    problem = parted(run)
    if problem and run.steps > 2:
        early = parted(run.model_copy(update={"steps": 2, "eval_every": 1}))
        if early is None:
            print(f"  chaotic: parts after step 2 ({problem})")
            return None
    return f"{problem}: {run.result_fields()}" if problem else None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("mode", choices=["alone", "reference"])
    parser.add_argument("--cases", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0, help="number of the first case")
    args = parser.parse_args()
    torch.set_num_threads(1)
    split = synthetic_split(n_train=600, n_val=120, n_test=120)
    case = alone_case if args.mode == "alone" else reference_case
    failed = 0
    for n in range(args.seed, args.seed + args.cases):
        problem = case(random.Random(n), split)
        if problem:
            failed += 1
            print(f"case {n}: {problem}")
    print(f"{args.cases} cases from {args.seed}, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
