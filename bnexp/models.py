"""The lesson's MLP as an ordinary nn.Module, a batch norm written out by hand, activations,
and the initial weights shared by paired models."""

from __future__ import annotations

import functools

import torch
from torch import nn
from torch.nn import functional as F

BN_EPS = 1e-3  # the lesson's (TensorFlow's) epsilon
BN_DECAY = 0.99  # TF's running-average decay; PyTorch's momentum is 1 - decay
LEAKY_SLOPE = 0.01

ACTIVATION_FNS = {
    "relu": F.relu,
    "sigmoid": torch.sigmoid,
    "tanh": torch.tanh,
    "elu": F.elu,  # alpha = 1
    "leaky_relu": functools.partial(F.leaky_relu, negative_slope=LEAKY_SLOPE),
}

# d activation / d input, from the activation's *output* a (PyTorch's own backward kernels);
# grad_input=out writes it into out (the .grad_input overloads), as a slice of a stack's
# gradient, instead of a new tensor copied there.
_aten = torch.ops.aten
ACTIVATION_GRADS = {
    "relu": lambda g, a, **out: _aten.threshold_backward(g, a, 0.0, **out),
    "sigmoid": lambda g, a, **out: _aten.sigmoid_backward(g, a, **out),
    "tanh": lambda g, a, **out: _aten.tanh_backward(g, a, **out),
    "elu": lambda g, a, **out: _aten.elu_backward(g, 1.0, 1.0, 1.0, True, a, **out),
    "leaky_relu": lambda g, a, **out: _aten.leaky_relu_backward(g, a, LEAKY_SLOPE, True, **out),
}

INIT_SCHEMES = ("normal", "xavier_uniform", "xavier_normal", "he_uniform", "he_normal")

# -- dropout masks as a function of (seed, step, layer, example, unit) -----------------------
# Both engines draw the same masks from this counter-based generator: no generator state, so a
# mask does not depend on the device, on which networks share a population or on where a run
# was resumed, and the whole computation is integer arithmetic that a CUDA graph can replay.

_MASK32 = 0xFFFFFFFF


def _mul32(x, c: int):
    """(x * c) mod 2**32 for x in [0, 2**32) (an int or an int64 tensor); the constant is
    split in halves so that no product leaves int64."""
    return (x * (c & 0xFFFF) + (((x * (c >> 16)) & 0xFFFF) << 16)) & _MASK32


def hash32(x):
    """Chris Wellons' lowbias32: a bijection of 32-bit values with low bias (ints or tensors)."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def dropout_key(seed: int) -> int:
    """A run's dropout key: its seed (below 2**63) folded into 32 bits."""
    return hash32(hash32(seed & _MASK32) ^ (seed >> 32))


def dropout_threshold(p: float) -> int:
    """A unit is kept where its 32-bit draw is at least this: probability 1 - p."""
    return round(p * 2**32)


def dropout_layer_keys(key, step, layer):
    """The key of a training step (1, 2, ...) in hidden layer `layer` (an int, or a tensor
    broadcast against key's shape to get several layers' keys at once)."""
    return hash32(hash32(key ^ step) ^ layer)


def dropout_draws(key, step, layer: int, positions: torch.Tensor) -> torch.Tensor:
    """32-bit draws of a training step (1, 2, ...) in hidden layer `layer`, one per entry of
    positions (broadcast against key's shape, one key per seed); positions numbers the units
    of a batch's examples, 0 .. batch * width - 1."""
    return hash32(dropout_layer_keys(key, step, layer) ^ positions)


def dropout_keep(key, step, layer: int, positions: torch.Tensor, threshold) -> torch.Tensor:
    """Which units dropout keeps: draws at or above the rate's threshold. Networks with the
    same key (the same seed) draw the same masks, as a plain/BN pair does."""
    return dropout_draws(key, step, layer, positions) >= threshold


def dropout_positions(batch: int, width: int, device: torch.device | str) -> torch.Tensor:
    return torch.arange(batch * width, dtype=torch.long, device=device).view(batch, width)


class CounterDropout(nn.Module):
    """Inverted dropout with rate p whose masks come from dropout_keep: the training loop
    sets `step` before each training step's forward pass."""

    def __init__(self, p: float, seed: int):
        super().__init__()
        self.p, self.key, self.threshold = p, dropout_key(seed), dropout_threshold(p)
        self.step = 0

    def forward(self, x: torch.Tensor, layer: int) -> torch.Tensor:
        if not self.training:
            return x
        positions = dropout_positions(x.shape[0], x.shape[1], x.device)
        keep = dropout_keep(self.key, self.step, layer, positions, self.threshold)
        return torch.where(keep, x * (1 / (1 - self.p)), 0.0)


def _init_(w: torch.Tensor, scheme: str, scale: float, g: torch.Generator) -> torch.Tensor:
    """Fill w (nn.Linear layout: fan_in = columns) by scheme; scale applies to 'normal' only."""
    if scheme == "normal":
        return w.normal_(0.0, 1.0, generator=g).mul_(scale)
    if scheme == "xavier_uniform":  # U(-a, a), a = sqrt(6 / (fan_in + fan_out))
        return nn.init.xavier_uniform_(w, generator=g)
    if scheme == "xavier_normal":  # N(0, 2 / (fan_in + fan_out))
        return nn.init.xavier_normal_(w, generator=g)
    if scheme == "he_uniform":  # U(-a, a), a = sqrt(6 / fan_in)
        return nn.init.kaiming_uniform_(w, nonlinearity="relu", generator=g)
    if scheme == "he_normal":  # N(0, 2 / fan_in)
        return nn.init.kaiming_normal_(w, nonlinearity="relu", generator=g)
    raise ValueError(f"unknown initialisation {scheme!r}")


def initial_weights(layers: tuple[int, ...], init_scale: float, seed: int,
                    scheme: str = "normal") -> list[torch.Tensor]:
    """Initial weights drawn by one seeded generator, in nn.Linear layout (out, in).

    Every model built from the same (layers, scheme, seed) starts from the same draws, so the
    variants of a comparison start from identical weights.
    """
    generator = torch.Generator().manual_seed(seed)
    return [_init_(torch.empty(n_out, n_in), scheme, init_scale, generator)
            for n_in, n_out in zip(layers[:-1], layers[1:])]


class ManualBatchNorm(nn.Module):
    """Batch normalisation written out (Ioffe & Szegedy, Algorithm 1 and 2).

    Training: normalise with the batch's mean and (biased) variance, and move the population
    averages toward the batch's, population = decay * population + (1 - decay) * batch (the
    variance unbiased, as nn.BatchNorm1d keeps it). Inference: normalise with the population
    averages. Names match nn.BatchNorm1d, so the two load each other's state.
    """

    def __init__(self, n: int, eps: float = BN_EPS, decay: float = BN_DECAY, scale: bool = True):
        super().__init__()
        self.eps, self.decay = eps, decay
        self.weight = nn.Parameter(torch.ones(n), requires_grad=scale)  # gamma
        self.bias = nn.Parameter(torch.zeros(n))  # beta
        self.register_buffer("running_mean", torch.zeros(n))
        self.register_buffer("running_var", torch.ones(n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            mean = x.mean(dim=0)
            var = ((x - mean) ** 2).mean(dim=0)
            n = x.shape[0]
            if n > 1:  # one example has no variance to learn from
                with torch.no_grad():
                    self.running_mean.mul_(self.decay).add_((1 - self.decay) * mean)
                    self.running_var.mul_(self.decay).add_((1 - self.decay) * var * n / (n - 1))
        else:
            mean, var = self.running_mean, self.running_var
        x_hat = (x - mean) / torch.sqrt(var + self.eps)
        return self.weight * x_hat + self.bias


def bn_momentum(decay: float) -> float:
    """PyTorch's momentum for a TF-style decay, without float noise (0.99 -> 0.01 exactly)."""
    return round(1 - decay, 12)


def make_norm(n: int, kind: str = "batch", impl: str = "torch", decay: float = BN_DECAY,
              scale: bool = True, groups: int = 10, spatial: bool = False) -> nn.Module:
    """The normaliser of n features (channels where spatial): batch, layer or group norm."""
    if kind == "batch" and impl == "manual" and not spatial:
        return ManualBatchNorm(n, BN_EPS, decay, scale)
    if kind == "batch":
        cls = nn.BatchNorm2d if spatial else nn.BatchNorm1d
        norm = cls(n, eps=BN_EPS, momentum=bn_momentum(decay))
    elif kind == "layer":  # per example over all features (and positions)
        norm = nn.GroupNorm(1, n, eps=BN_EPS) if spatial else nn.LayerNorm(n, eps=BN_EPS)
    else:
        norm = nn.GroupNorm(groups, n, eps=BN_EPS)
    norm.weight.requires_grad_(scale)
    return norm


class MLP(nn.Module):
    """Linear -> [batch norm] -> activation per hidden layer; a plain linear output layer.

    With batch norm the hidden linears have no bias: BN's beta takes its place. Options beyond
    the lesson: BN after the activation instead of before, and dropout after each hidden layer
    (masks drawn by dropout_keep from dropout_seed; set self.dropout.step while training).
    """

    def __init__(self, weights: list[torch.Tensor], activation: str, batch_norm: bool,
                 bn_impl: str = "torch", bn_decay: float = BN_DECAY, bn_scale: bool = True,
                 bn_position: str = "before", dropout: float = 0.0, norm: str = "batch",
                 groups: int = 10, dropout_seed: int = 0):
        super().__init__()
        self.activation = ACTIVATION_FNS[activation]
        self.bn_after = bn_position == "after"
        n_hidden = len(weights) - 1
        # The linear's bias is redundant only where batch norm directly follows it.
        redundant = batch_norm and norm == "batch" and not self.bn_after
        self.linears = nn.ModuleList(
            nn.Linear(w.shape[1], w.shape[0], bias=not (redundant and i < n_hidden))
            for i, w in enumerate(weights)
        )
        self.norms = nn.ModuleList(
            make_norm(w.shape[0], norm, bn_impl, bn_decay, bn_scale, groups)
            for w in weights[:-1]
        ) if batch_norm else None
        self.dropout = CounterDropout(dropout, dropout_seed) if dropout > 0 else None
        with torch.no_grad():
            for linear, w in zip(self.linears, weights):
                linear.weight.copy_(w)
                if linear.bias is not None:
                    linear.bias.zero_()

    def forward(self, x: torch.Tensor, probe: tuple[int, int] | None = None,
                probed: list | None = None) -> torch.Tensor:
        """Logits; with probe=(layer, unit), probed receives that unit's activation input."""
        for i, linear in enumerate(self.linears[:-1]):
            z = linear(x)
            if self.norms is not None and not self.bn_after:
                z = self.norms[i](z)
            if probe is not None and probe[0] == i:
                probed.append(z[:, probe[1]].detach())
            x = self.activation(z)
            if self.norms is not None and self.bn_after:
                x = self.norms[i](x)
            if self.dropout is not None:
                x = self.dropout(x, i)
        return self.linears[-1](x)


def initial_conv_weights(channels: tuple[int, int], init_scale: float, seed: int,
                         scheme: str = "normal") -> list[torch.Tensor]:
    """ConvNet weights (two 5x5 convolutions, one linear), drawn like initial_weights."""
    generator = torch.Generator().manual_seed(seed)
    shapes = [(channels[0], 1, 5, 5), (channels[1], channels[0], 5, 5), (10, channels[1] * 16)]
    return [_init_(torch.empty(shape), scheme, init_scale, generator) for shape in shapes]


class ConvNet(nn.Module):
    """conv 5x5 -> [norm] -> activation -> max-pool 2, twice, then one linear layer.

    Batch norm here is nn.BatchNorm2d: each channel is normalised over batch, height and width.
    """

    def __init__(self, weights: list[torch.Tensor], activation: str, batch_norm: bool,
                 bn_decay: float = BN_DECAY, bn_scale: bool = True, norm: str = "batch",
                 groups: int = 10):
        super().__init__()
        self.activation = ACTIVATION_FNS[activation]
        redundant = batch_norm and norm == "batch"
        self.convs = nn.ModuleList(nn.Conv2d(w.shape[1], w.shape[0], 5, bias=not redundant)
                                   for w in weights[:2])
        self.norms = nn.ModuleList(
            make_norm(w.shape[0], norm, "torch", bn_decay, bn_scale, groups, spatial=True)
            for w in weights[:2]) if batch_norm else None
        self.linear = nn.Linear(weights[2].shape[1], 10)
        with torch.no_grad():
            for module, w in zip([*self.convs, self.linear], weights):
                module.weight.copy_(w)
                if module.bias is not None:
                    module.bias.zero_()

    def forward(self, x: torch.Tensor, probe=None, probed=None) -> torch.Tensor:
        x = x.view(-1, 1, 28, 28)
        for i, conv in enumerate(self.convs):
            z = conv(x)
            if self.norms is not None:
                z = self.norms[i](z)
            x = F.max_pool2d(self.activation(z), 2)
        return self.linear(x.flatten(1))
