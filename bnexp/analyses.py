"""Looks inside batch norm: train vs inference mode, and the hand-written layer vs PyTorch's."""

from __future__ import annotations

import copy

import torch
from torch import nn

from bnexp.config import RunConfig
from bnexp.data import Split
from bnexp.engine.common import RunResult
from bnexp.engine.precision import cuda_precision
from bnexp.models import BN_EPS, MLP, ManualBatchNorm, bn_momentum, initial_weights

SINGLE_EXAMPLES = 200  # the lesson predicts 200 test images one at a time


def _predict_one_at_a_time(model: MLP, x: torch.Tensor) -> list[int]:
    return [int(model(x[i:i + 1]).argmax(dim=1)) for i in range(x.shape[0])]


@torch.no_grad()
def inference_modes(run: RunConfig, state: dict[str, torch.Tensor], split: Split) -> dict:
    """Predict test images one at a time with batch statistics (training mode) and with the
    population statistics (inference mode), and the full test set both ways.

    With batch statistics a single example normalises to zero, so every hidden unit outputs
    its beta and the network predicts one class whatever the image. The hand-written BN layer
    is used because nn.BatchNorm1d refuses a batch of one in training mode.
    """
    weights = initial_weights(run.layers, run.init_scale, run.seed, run.init)
    model = MLP(weights, run.activation, True, "manual", run.bn_decay, run.bn_scale,
                run.bn_position).to(split.test_x.device)
    model.load_state_dict(state)
    x, y = split.test_x, split.test_y
    trained = copy.deepcopy(model).train()  # a throwaway copy: a batch would update its stats
    model.eval()
    single_train = _predict_one_at_a_time(trained, x[:SINGLE_EXAMPLES])
    single_infer = _predict_one_at_a_time(model, x[:SINGLE_EXAMPLES])
    labels = y[:SINGLE_EXAMPLES].tolist()

    def accuracy(predictions: list[int]) -> float:
        return sum(p == t for p, t in zip(predictions, labels)) / len(labels)

    return {
        "examples": len(labels),
        "labels": labels,
        "batch_statistics": {"predictions": single_train, "accuracy": accuracy(single_train)},
        "population_statistics": {"predictions": single_infer,
                                  "accuracy": accuracy(single_infer)},
        "full_test_set": {
            "batch_statistics_accuracy": (trained(x).argmax(1) == y).float().mean().item(),
            "population_statistics_accuracy": (model(x).argmax(1) == y).float().mean().item(),
        },
    }


def run_analyses(result: RunResult, split: Split) -> dict[str, dict]:
    """Every analysis the run asks for, on its final models (result must hold states)."""
    out = {}
    with cuda_precision(result.config.dtype, split.test_x.device):
        for name in result.config.analyses:
            if name == "inference_modes":
                bn = [m for m in result.models if m.name == "bn"]
                if bn:
                    out[name] = inference_modes(result.config, bn[0].state, split)
    return out


def compare_batch_norms(batch: int = 60, features: int = 100, steps: int = 5,
                        decay: float = 0.99, seed: int = 0,
                        dtype: torch.dtype = torch.float32) -> dict[str, float]:
    """Largest absolute differences between ManualBatchNorm and nn.BatchNorm1d over a few
    training steps on random data (in dtype): outputs, gradients, running statistics,
    inference."""
    g = torch.Generator().manual_seed(seed)
    manual = ManualBatchNorm(features, BN_EPS, decay).to(dtype)
    torch_bn = nn.BatchNorm1d(features, eps=BN_EPS, momentum=bn_momentum(decay)).to(dtype)
    with torch.no_grad():  # a non-trivial gamma and beta
        gamma, beta = torch.rand(features, generator=g) + 0.5, torch.randn(features, generator=g)
        for bn in (manual, torch_bn):
            bn.weight.copy_(gamma)
            bn.bias.copy_(beta)
    worst = dict.fromkeys(["output", "input_grad", "gamma_grad", "beta_grad", "running_mean",
                           "running_var", "inference_output"], 0.0)
    for _ in range(steps):
        x = (torch.randn(batch, features, generator=g) * 3 + 1).to(dtype)
        upstream = torch.randn(batch, features, generator=g).to(dtype)
        outs = []
        for bn in (manual, torch_bn):
            xi = x.clone().requires_grad_()
            bn.zero_grad()
            out = bn(xi)
            out.backward(upstream)
            outs.append((out.detach(), xi.grad, bn.weight.grad, bn.bias.grad))
        (o1, gx1, gg1, gb1), (o2, gx2, gg2, gb2) = outs
        pairs = {"output": (o1, o2), "input_grad": (gx1, gx2), "gamma_grad": (gg1, gg2),
                 "beta_grad": (gb1, gb2), "running_mean": (manual.running_mean,
                                                          torch_bn.running_mean),
                 "running_var": (manual.running_var, torch_bn.running_var)}
        for key, (a, b) in pairs.items():
            worst[key] = max(worst[key], (a - b).abs().max().item())
    manual.eval()
    torch_bn.eval()
    with torch.no_grad():
        x = torch.randn(batch, features, generator=g).to(dtype)
        worst["inference_output"] = (manual(x) - torch_bn(x)).abs().max().item()
    return worst
