"""A stack of MLPs: the population engine's math, its parameters and forward pass (the
backward pass, written out, and the SGD step are engine/backward.py).

All models of a population that share a StackKind (normaliser, its place, clipping) form one
``Stack``: their parameters are stacked along a leading model dimension, so one batched matrix
product runs a layer of every model. Within a stack each model has its own activation, its
own normaliser on/off flag, learning rate, BN decay, dropout rate and batch stream (seed):
models are ordered by activation so that each activation is one contiguous slice, and a
per-model mask picks the normalised or the plain branch (both are computed; ``torch.where``
selects exactly, so the branch a model does not take never reaches its numbers, even when it
holds NaN). Dropout masks are drawn once per seed of the stack (models.dropout_draws), each
model keeping the units its rate allows.

Shapes: M models, S batch streams, B examples, layer l maps n_in -> n_out.
  weights                                (M, n_out, n_in)   nn.Linear's layout, torch.bmm over
                                                            the model dimension
  biases, gamma, beta, running mean/var  (M, 1, n_out)
  learning rates, BN momenta, masks      (M, 1, 1)
  a step's batch                         (S, B, n_in), read by each model through its stream

A model's numbers must not depend on how many others share its stack (see
docs/internals.md, "Same config, same numbers: how"). So on the CPU, where the engine runs
its math on one thread:
every product is a per-model matrix of fixed shape (the first layer's batch is broadcast or
gathered per model, never multiplied as one wide GEMM), batched only where MKL gives each
model the bytes of its product alone (bmm); reductions run over contiguous
per-model blocks; softmax is row-wise; and activations are written into a *canvas*, a buffer
whose per-model rows are padded, so that an elementwise kernel walks each model's block as a
row of its own (vectorised body, scalar tail) instead of one population-sized run whose
scalar tail would fall on whichever models come last. Evaluation uses a fixed row count
(engine/members.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch
from torch.nn import functional as F

from bnexp.models import (
    BN_DECAY,
    BN_EPS,
    LEAKY_SLOPE,
    bn_momentum,
    dropout_key,
    dropout_layer_keys,
    dropout_positions,
    dropout_threshold,
    hash32,
)

CANVAS_PAD = 64  # elements after each model's block in a CPU canvas (keeps rows apart, aligned)

ACTIVATIONS_INPLACE = {
    "relu": F.relu_,
    "sigmoid": torch.sigmoid_,
    "tanh": torch.tanh_,
    "elu": F.elu_,  # alpha = 1
    "leaky_relu": lambda t: F.leaky_relu_(t, LEAKY_SLOPE),
}


@dataclass(frozen=True)
class StackKind:
    """What the models of one stack share (everything else may differ per model)."""

    norm: str = "batch"  # the normaliser of the models that have one: batch, layer or group
    position: str = "before"  # the normaliser before or after the activation
    groups: int = 10  # group norm's groups
    bn_scale: bool = True  # False: gamma stays 1
    clip: str = "none"
    clip_threshold: float = 1.0


@dataclass(frozen=True)
class Member:
    """One model of a stack."""

    activation: str
    normalized: bool
    lr: float
    weights: list[torch.Tensor] = field(compare=False)  # nn.Linear layout (out, in)
    stream: int = 0  # which of the population's batch streams the model reads
    bn_decay: float = BN_DECAY
    dropout: float = 0.0  # rate, after each hidden layer's activation (and normaliser)
    seed: int = 0  # the run's: its dropout masks (models.dropout_keep)


ALIGN_BYTES = 16  # MKL's products of blocks starting elsewhere sum in another order


def bmm(a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None = None,
        ) -> torch.Tensor:
    """torch.bmm(a, b), or torch.baddbmm(bias, a, b), over the leading (model) dimension, with
    each model's product computed to the bytes it would have in a stack of its own.

    On the CPU two things change how MKL sums a product: where its matrices lie (a model's
    block that does not start on a 16-byte boundary, as in a stack of 5-unit layers, takes
    other code than the same block alone, which starts on one) and whether it is a lone or a
    batched product where a dimension is 1 (a layer one unit wide, a batch of one example:
    matrix-vector code). So the batched product runs only where neither can differ; else
    each model's product runs alone, on aligned copies of its matrices where they are not.
    CUDA, and a step being compiled, take the batched product.
    """
    if not a.is_cpu or torch.compiler.is_compiling() or _batch_is_exact(a, b):
        return torch.bmm(a, b) if bias is None else torch.baddbmm(bias, a, b)
    products = []
    for i in range(a.shape[0]):
        a_i, b_i = _aligned(a[i:i + 1]), _aligned(b[i:i + 1])
        products.append(torch.bmm(a_i, b_i) if bias is None
                        else torch.baddbmm(bias[i:i + 1], a_i, b_i))
    return products[0] if len(products) == 1 else torch.cat(products)


def _batch_is_exact(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether the batched product gives each model the bytes of its product alone: no
    dimension of 1, and every model's block of a, b and the result aligned."""
    m, r, k = a.shape
    c = b.shape[2]
    return (r > 1 and k > 1 and c > 1 and _blocks_aligned(a) and _blocks_aligned(b)
            and (m == 1 or r * c * a.element_size() % ALIGN_BYTES == 0))


def _blocks_aligned(t: torch.Tensor) -> bool:
    """Whether every model's block of t (M, r, c) starts on an ALIGN_BYTES boundary."""
    return (t.data_ptr() % ALIGN_BYTES == 0
            and (t.shape[0] == 1 or t.stride(0) * t.element_size() % ALIGN_BYTES == 0))


def _aligned(t: torch.Tensor) -> torch.Tensor:
    """t, or a copy of it with the same strides at a fresh (aligned) address."""
    return t if t.data_ptr() % ALIGN_BYTES == 0 else t.clone()


def pick(mask, a: torch.Tensor, b) -> torch.Tensor:
    """a where the model's mask is set, else b; mask True means every model (callers skip the
    computation altogether where the mask is False)."""
    return a if mask is True else torch.where(mask, a, b)


class Stack:
    """Models of one StackKind; parameter tensors carry a model dimension."""

    def __init__(self, members: list[Member], kind: StackKind, device: torch.device,
                 dtype: torch.dtype = torch.float32):
        self.m = len(members)
        self.kind = kind
        self.members = [replace(m, weights=[]) for m in members]  # not the initial weights
        self.device = torch.device(device)
        # 0 for a compiled step: Inductor writes no strided out= buffers (and its kernels
        # do not keep models apart anyway)
        self.canvas_pad = CANVAS_PAD if self.device.type == "cpu" else 0
        self.n_hidden = len(members[0].weights) - 1
        self.slices = _activation_slices([m.activation for m in members])
        flags = [m.normalized for m in members]
        self.norm_mask = _mask(flags, device)
        # The hidden bias is redundant only where batch norm directly follows the linear.
        bias_free = kind.norm == "batch" and kind.position == "before"
        self.bias_mask = _mask([not (f and bias_free) for f in flags], device)
        streams = [m.stream for m in members]
        self.one_stream = streams[0] if len(set(streams)) == 1 else None
        self.streams = torch.tensor(streams, dtype=torch.long, device=device)
        # (out, in) as nn.Linear: the weight gradients dz^T h come out in this layout, and
        # MKL computes the first layer's (784 x 100) that way ~15 % faster than h^T dz
        self.w = [torch.stack([m.weights[l] for m in members]).to(device, dtype)
                  for l in range(self.n_hidden + 1)]
        hidden = [w.shape[1] for w in self.w[:-1]]

        def full(width: int, value: float) -> torch.Tensor:
            return torch.full((self.m, 1, width), value, device=device, dtype=dtype)

        self.b = [full(n, 0.0) for n in hidden] + [full(self.w[-1].shape[1], 0.0)]
        normed = self.norm_mask is not False
        self.gamma = [full(n, 1.0) for n in hidden] if normed else []
        self.beta = [full(n, 0.0) for n in hidden] if normed else []
        running = normed and kind.norm == "batch"
        self.running_mean = [full(n, 0.0) for n in hidden] if running else []
        self.running_var = [full(n, 1.0) for n in hidden] if running else []
        hidden_b = self.b[:-1] if self.bias_mask is not False else []
        self.params = (self.w + hidden_b + self.b[-1:] + (self.gamma if kind.bn_scale else [])
                       + self.beta)
        self.lr = torch.tensor([m.lr for m in members], dtype=dtype,
                               device=device).view(self.m, 1, 1)
        # Running averages move by 1 - decay toward each batch's statistics.
        self.momentum = torch.tensor([bn_momentum(m.bn_decay) for m in members], dtype=dtype,
                                     device=device).view(self.m, 1, 1)
        # Dropout, where any model has it: draws once per seed among the stack's models, a
        # keep threshold and scale per model (rate 0 keeps every unit and scales by exactly
        # 1, so its numbers are untouched).
        self.dropout = any(m.dropout > 0 for m in members)
        if self.dropout:
            def per_model(values: list, kind: torch.dtype) -> torch.Tensor:
                return torch.tensor(values, dtype=kind, device=device).view(self.m, 1, 1)

            seeds = list(dict.fromkeys(m.seed for m in members))
            self.drop_keys = torch.tensor([dropout_key(seed) for seed in seeds],
                                          dtype=torch.long, device=device).view(-1, 1, 1)
            self.drop_seed_of = (None if len(seeds) == 1 else torch.tensor(
                [seeds.index(m.seed) for m in members], dtype=torch.long, device=device))
            self.drop_threshold = per_model([dropout_threshold(m.dropout) for m in members],
                                            torch.long)
            self.drop_scale = per_model([1 / (1 - m.dropout) for m in members], dtype)
        self.loss_sum = torch.zeros(self.m, device=device, dtype=dtype)
        self.diverged_at = torch.full((self.m,), -1, dtype=torch.long, device=device)

    # -- pieces of a layer --------------------------------------------------------------

    def _canvas(self, like: torch.Tensor) -> torch.Tensor:
        """An empty (M, B, n) tensor; on the CPU each model's block is a padded row."""
        m, b, n = like.shape
        buf = torch.empty(m, b * n + self.canvas_pad, dtype=like.dtype, device=like.device)
        return buf[:, :b * n].unflatten(1, (b, n))

    def _activate_(self, a: torch.Tensor) -> torch.Tensor:
        for name, lo, hi in self.slices:
            ACTIVATIONS_INPLACE[name](a[lo:hi])
        return a

    def _normalize(self, v: torch.Tensor, l: int, train: bool,
                   ) -> tuple[torch.Tensor, torch.Tensor]:
        """(v_hat, 1/std): v normalised per model by the stack's normaliser."""
        dim = stat_dim(self.kind)
        if self.kind.norm == "batch" and not train:
            centred, var = v - self.running_mean[l], self.running_var[l]
            inv_std = torch.rsqrt(var + BN_EPS)
            return centred * inv_std, inv_std
        g = stat_groups(v, self.kind)
        mean = g.mean(dim=dim, keepdim=True)
        centred = g - mean
        var = (centred * centred).mean(dim=dim, keepdim=True)  # biased, for normalising
        if self.kind.norm == "batch":
            n = v.shape[1]
            # Running averages use the unbiased variance, as nn.BatchNorm1d does.
            self.running_mean[l].lerp_(mean, self.momentum)
            self.running_var[l].lerp_(var * (n / (n - 1)), self.momentum)
        inv_std = torch.rsqrt(var + BN_EPS)
        return (centred * inv_std).reshape(v.shape), inv_std

    def _affine(self, v_hat: torch.Tensor, l: int, out: torch.Tensor | None = None,
                ) -> torch.Tensor:
        return torch.addcmul(self.beta[l], v_hat, self.gamma[l], out=out)

    def _dropout_draws(self, step: torch.Tensor, batch: int) -> list[torch.Tensor]:
        """The step's 32-bit dropout draws of every hidden layer, (S, B, n) each, once per
        seed: models.dropout_draws in fewer operators (the layers' keys in one pass, and
        where the hidden layers are equally wide, as in the lesson, their draws in one)."""
        device = self.drop_keys.device
        layers = torch.arange(self.n_hidden, dtype=torch.long, device=device)
        keys = dropout_layer_keys(self.drop_keys, step, layers.view(-1, 1, 1, 1))  # (L, S, 1, 1)
        widths = [w.shape[1] for w in self.w[:-1]]
        if len(set(widths)) == 1:
            return list(hash32(keys ^ dropout_positions(batch, widths[0], device)).unbind(0))
        return [hash32(keys[l] ^ dropout_positions(batch, n, device))
                for l, n in enumerate(widths)]

    def _dropout_keep(self, draws: torch.Tensor) -> torch.Tensor:
        """Each model's dropout mask (M, B, n) from its seed's draws (S, B, n)."""
        draws = (draws.expand(self.m, -1, -1) if self.drop_seed_of is None
                 else draws.index_select(0, self.drop_seed_of))
        return draws >= self.drop_threshold

    # -- forward and backward -----------------------------------------------------------

    def _inputs(self, x: torch.Tensor) -> torch.Tensor:
        """The step's batches (S, B, n) as each model's own (M, B, n)."""
        if self.one_stream is not None:  # broadcast, not copied (the same bytes, see tests)
            return x[self.one_stream:self.one_stream + 1].expand(self.m, -1, -1)
        return x.index_select(0, self.streams)

    def forward(self, x: torch.Tensor, train: bool, saved: list | None = None,
                probe: tuple[int, int] | None = None, probed: list | None = None,
                step: torch.Tensor | None = None) -> torch.Tensor:
        """x (S, B, n_in), the batch of each stream -> logits (M, B, n_classes).

        With saved, each hidden layer appends what the backward pass needs:
        (layer input, v_hat, 1/std, activation output, dropout mask or None). With
        probe=(layer, unit), probed receives that unit's activation input, shape (M, B).
        Dropout applies in training: step is then the training step's number (1, 2, ...).
        """
        h = self._inputs(x)
        before = self.kind.position == "before"
        normed = self.norm_mask is not False
        draws = self._dropout_draws(step, x.shape[1]) if train and self.dropout else None
        for l in range(self.n_hidden):
            z = bmm(h, self.w[l].transpose(1, 2))
            a = self._canvas(z)
            v_hat = inv_std = None
            # Models add their bias; it stays zero where BN follows (its gradient is zero).
            if before and normed:
                biased = z if self.bias_mask is False else z + self.b[l]
                v_hat, inv_std = self._normalize(biased, l, train)
                if self.norm_mask is True:
                    self._affine(v_hat, l, out=a)
                else:
                    torch.where(self.norm_mask, self._affine(v_hat, l), biased, out=a)
            else:
                torch.add(z, self.b[l], out=a)
            if probe is not None and probe[0] == l:
                probed.append(a[:, :, probe[1]].clone())
            self._activate_(a)
            out = a
            if not before and normed:
                v_hat, inv_std = self._normalize(a, l, train)
                out = pick(self.norm_mask, self._affine(v_hat, l), a)
            keep = None
            if train and self.dropout:
                keep = self._dropout_keep(draws[l])
                out = torch.where(keep, out * self.drop_scale, 0.0)
            if saved is not None:
                saved.append((h, v_hat, inv_std, a, keep))
            h = out
        if saved is not None:
            saved.append((h, None, None, None, None))
        # logits^T = w h^T: MKL's batched products are 2 to 4 times slower when they write
        # only 10 columns (the classes) than when they write 10 rows
        logits_t = bmm(self.w[-1], h.transpose(1, 2), self.b[-1].transpose(1, 2))
        return logits_t.transpose(1, 2).contiguous()

    def state_tensors(self) -> list[torch.Tensor]:
        """Every tensor a training step changes."""
        return (self.w + self.b + self.gamma + self.beta + self.running_mean
                + self.running_var + [self.loss_sum, self.diverged_at])


def stat_groups(v: torch.Tensor, kind: StackKind) -> torch.Tensor:
    """v viewed so that the normaliser's statistics are means over the last dim but one
    (batch norm: the examples) or the last dim (layer, group norm: a group's units)."""
    if kind.norm == "group":
        return v.unflatten(2, (kind.groups, -1))
    return v


def stat_dim(kind: StackKind) -> int:
    return 1 if kind.norm == "batch" else -1


def _activation_slices(names: list[str]) -> list[tuple[str, int, int]]:
    """(activation, lo, hi) for each run of equal activations; each must occur in one run."""
    slices: list[tuple[str, int, int]] = []
    for i, name in enumerate(names):
        if slices and slices[-1][0] == name:
            slices[-1] = (name, slices[-1][1], i + 1)
        else:
            slices.append((name, i, i + 1))
    if len({s[0] for s in slices}) != len(slices):
        raise ValueError("models of one activation must be contiguous in a stack")
    return slices


def _mask(flags: list[bool], device: torch.device):
    """True or False where every model agrees, else a (M, 1, 1) bool tensor."""
    if all(flags):
        return True
    if not any(flags):
        return False
    return torch.tensor(flags, device=device).view(-1, 1, 1)
