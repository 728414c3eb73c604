"""The lesson's MLP as an ordinary nn.Module, and the initial weights shared by paired models."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

BN_EPS = 1e-3  # the lesson's (TensorFlow's) epsilon
BN_MOMENTUM = 0.01  # TF's running-average decay 0.99 is PyTorch's momentum 1 - 0.99

ACTIVATION_FNS = {"relu": F.relu, "sigmoid": torch.sigmoid}


def initial_weights(layers: tuple[int, ...], init_scale: float, seed: int) -> list[torch.Tensor]:
    """Weights drawn from N(0, init_scale^2) by one seeded generator, in nn.Linear layout.

    Every model built from the same (layers, seed) starts from the same standard-normal
    draws, so the plain and BN variants of a comparison start from identical weights.
    """
    generator = torch.Generator().manual_seed(seed)
    return [
        torch.randn(n_out, n_in, generator=generator) * init_scale
        for n_in, n_out in zip(layers[:-1], layers[1:])
    ]


class MLP(nn.Module):
    """Linear -> [BatchNorm1d] -> activation per hidden layer; a plain linear output layer.

    With batch norm the hidden linears have no bias: BN's beta takes its place.
    """

    def __init__(self, weights: list[torch.Tensor], activation: str, batch_norm: bool):
        super().__init__()
        self.activation = ACTIVATION_FNS[activation]
        n_hidden = len(weights) - 1
        self.linears = nn.ModuleList(
            nn.Linear(w.shape[1], w.shape[0], bias=not (batch_norm and i < n_hidden))
            for i, w in enumerate(weights)
        )
        self.norms = nn.ModuleList(
            nn.BatchNorm1d(w.shape[0], eps=BN_EPS, momentum=BN_MOMENTUM)
            for w in weights[:-1]
        ) if batch_norm else None
        with torch.no_grad():
            for linear, w in zip(self.linears, weights):
                linear.weight.copy_(w)
                if linear.bias is not None:
                    linear.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, linear in enumerate(self.linears[:-1]):
            z = linear(x)
            if self.norms is not None:
                z = self.norms[i](z)
            x = self.activation(z)
        return self.linears[-1](x)
