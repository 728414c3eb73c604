"""A stack of MLPs: the population engine's math, forward and backward written out.

Models that share activation, BN flag and clipping form a ``Stack``: their parameters are
stacked along a leading model dimension, so one batched matrix product runs a layer of every
model.

Shapes: M models, B examples, layer l maps n_in -> n_out.
  weights                                (M, n_in, n_out)   torch.bmm over the model dimension
  biases, gamma, beta, running mean/var  (M, 1, n_out)
  learning rates, BN momenta             (M, 1, 1)

A model's numbers must not depend on how many others share its stack (see README,
"Same config, same numbers"). So on the CPU, where the engine runs its math on one thread:
every activation tensor is contiguous per model (a reduction over the batch then sums each
model's values in one fixed order); every product is a per-model matrix of fixed shape, also
in the first layer, whose shared batch is broadcast rather than multiplied as one wide GEMM;
and the activations whose vectorised and scalar kernels round differently (sigmoid, tanh, elu)
are applied to each model's block alone, so that no model's values fall into the scalar tail
of a population-sized tensor. Evaluation uses a fixed number of rows per product.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

from bnexp.models import ACTIVATION_FNS, ACTIVATION_GRADS, BN_DECAY, BN_EPS, bn_momentum

EVAL_ELEMENTS = 1 << 25  # activations per evaluation chunk (128 MiB of fp32)
EVAL_ROWS = 1000  # examples per evaluation product: fixed, so a model's logits never depend on M
# Activations whose CPU kernels round the vectorised body and the scalar tail differently.
PER_MODEL_ACTIVATIONS = {"sigmoid": torch.sigmoid_, "tanh": torch.tanh_,
                         "elu": torch.nn.functional.elu_}
PERCENTILES = (0.15, 0.50, 0.85)  # of a tracked unit's input, as in the BN paper's Figure 1


@dataclass(frozen=True)
class StackKind:
    """What the models of one stack share (everything else may differ per model)."""

    activation: str
    batch_norm: bool
    bn_scale: bool = True  # False: gamma stays 1
    clip: str = "none"
    clip_threshold: float = 1.0


class Stack:
    """Models of one StackKind; parameter tensors carry a model dimension."""

    def __init__(self, weights: list[list[torch.Tensor]], lrs: list[float], kind: StackKind,
                 device: torch.device, bn_decays: list[float] | None = None,
                 dtype: torch.dtype = torch.float32):
        self.m = len(weights)
        self.kind = kind
        self.activation = ACTIVATION_FNS[kind.activation]
        self.activation_grad = ACTIVATION_GRADS[kind.activation]
        self.batch_norm = kind.batch_norm
        self.n_hidden = len(weights[0]) - 1
        # nn.Linear stores (out, in); the stack stores (in, out) so that x @ w needs no transpose.
        self.w = [torch.stack([w[l].t() for w in weights]).to(device, dtype)
                  for l in range(self.n_hidden + 1)]
        widths = [w.shape[-1] for w in self.w]
        self.per_model_activation = (PER_MODEL_ACTIVATIONS.get(kind.activation)
                                     if torch.device(device).type == "cpu" else None)

        def zeros(width: int) -> torch.Tensor:
            return torch.zeros(self.m, 1, width, device=device, dtype=dtype)

        hidden = widths[:-1]
        bn = self.batch_norm
        # BN models have no hidden-layer bias: beta takes its place.
        self.b = ([] if bn else [zeros(n) for n in hidden]) + [zeros(widths[-1])]
        self.gamma = [torch.ones(self.m, 1, n, device=device, dtype=dtype)
                      for n in hidden] if bn else []
        self.beta = [zeros(n) for n in hidden] if bn else []
        self.running_mean = [zeros(n) for n in hidden] if bn else []
        self.running_var = [torch.ones_like(m) for m in self.running_mean]
        learned_gamma = self.gamma if kind.bn_scale else []
        self.params = self.w + self.b + learned_gamma + self.beta
        self.lr = torch.tensor(lrs, dtype=dtype, device=device).view(self.m, 1, 1)
        decays = bn_decays or [BN_DECAY] * self.m
        # Running averages move by 1 - decay toward each batch's statistics.
        self.momentum = torch.tensor([bn_momentum(d) for d in decays], dtype=dtype,
                                     device=device).view(self.m, 1, 1)
        self.loss_sum = torch.zeros(self.m, device=device, dtype=dtype)
        self.diverged_at = torch.full((self.m,), -1, dtype=torch.long, device=device)

    def _norm(self, z: torch.Tensor, l: int, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Batch norm over the example dimension, per model and unit: (z_hat, 1/std)."""
        if train:
            mean = z.mean(dim=1, keepdim=True)
            centred = z - mean
            var = (centred * centred).mean(dim=1, keepdim=True)  # biased, for normalising
            n = z.shape[1]
            # Running averages use the unbiased variance, as nn.BatchNorm1d does.
            self.running_mean[l].lerp_(mean, self.momentum)
            self.running_var[l].lerp_(var * (n / (n - 1)), self.momentum)
        else:
            centred, var = z - self.running_mean[l], self.running_var[l]
        inv_std = torch.rsqrt(var + BN_EPS)
        return centred * inv_std, inv_std

    def _linear(self, h: torch.Tensor, l: int) -> torch.Tensor:
        if l > 0:
            return torch.bmm(h, self.w[l])
        # The first layer reads the same batch (B, n_in) for every model: broadcast, not copied.
        return torch.bmm(h.expand(self.m, -1, -1), self.w[0])

    def _activate(self, z: torch.Tensor) -> torch.Tensor:
        if self.per_model_activation is None:
            return self.activation(z)
        a = z.clone()
        for block in a.unbind(0):  # each model's (B, n) block alone: same rounding for any M
            self.per_model_activation(block)
        return a

    def forward(self, x: torch.Tensor, train: bool, saved: list | None = None,
                probe: tuple[int, int] | None = None, probed: list | None = None,
                ) -> torch.Tensor:
        """x (B, n_in) shared by all models -> logits (M, B, n_classes).

        With saved, each hidden layer appends what the backward pass needs:
        (layer input, z_hat, 1/std, activation output). With probe=(layer, unit), probed
        receives that unit's activation input, shape (M, B).
        """
        h = x
        for l in range(self.n_hidden):
            z = self._linear(h, l)
            z_hat = inv_std = None
            if self.batch_norm:
                z_hat, inv_std = self._norm(z, l, train)
                z = z_hat * self.gamma[l] + self.beta[l]
            else:
                z = z + self.b[l]
            if probe is not None and probe[0] == l:
                probed.append(z[:, :, probe[1]])
            a = self._activate(z)
            if saved is not None:
                saved.append((h, z_hat, inv_std, a))
            h = a
        if saved is not None:
            saved.append((h, None, None, None))
        return torch.baddbmm(self.b[-1], h, self.w[-1])

    def gradients(self, x: torch.Tensor, y: torch.Tensor, scale: torch.Tensor | None = None,
                  ) -> tuple[torch.Tensor, list]:
        """Per-model mean cross-entropy (M,) and its gradients, in the order of self.params.

        The backward pass is written out: softmax cross-entropy, linear layers, activations
        and batch norm (with batch statistics, so the mean and variance are differentiated).
        Every gradient is linear in d loss / d logits, so a per-model scale (M, 1, 1), such as
        the learning rate, applied there scales all of that model's gradients.
        """
        saved: list = []
        logits = self.forward(x, train=True, saved=saved)
        log_p = torch.log_softmax(logits, dim=2)
        target = y.view(1, -1, 1).expand(self.m, -1, 1)
        loss = -log_p.gather(2, target).squeeze(2).mean(dim=1)
        # softmax row by row (not exp over the whole tensor): each model's rows alike for any M
        g = torch.softmax(logits, dim=2).scatter_add_(2, target,
                                                       torch.full_like(log_p[..., :1], -1.0))
        g = g / x.shape[0] if scale is None else g * (scale / x.shape[0])  # d loss / d logits
        h_last = saved[-1][0]
        dw = [None] * (self.n_hidden + 1)
        dw[-1] = torch.bmm(h_last.transpose(1, 2), g)
        db_out = g.sum(dim=1, keepdim=True)
        db, dgamma, dbeta = [], [], []
        dh = torch.bmm(g, self.w[-1].transpose(1, 2))
        for l in reversed(range(self.n_hidden)):
            h_in, z_hat, inv_std, a = saved[l]
            dz = self.activation_grad(dh, a)
            if self.batch_norm:
                if self.kind.bn_scale:
                    dgamma.insert(0, (dz * z_hat).sum(dim=1, keepdim=True))
                dbeta.insert(0, dz.sum(dim=1, keepdim=True))
                dz_hat = dz * self.gamma[l]
                dz = inv_std * (dz_hat - dz_hat.mean(dim=1, keepdim=True)
                                - z_hat * (dz_hat * z_hat).mean(dim=1, keepdim=True))
            else:
                db.insert(0, dz.sum(dim=1, keepdim=True))
            if l > 0:
                dw[l] = torch.bmm(h_in.transpose(1, 2), dz)
                dh = torch.bmm(dz, self.w[l].transpose(1, 2))
            else:
                dw[0] = torch.bmm(x.t().expand(self.m, -1, -1), dz)
        return loss, dw + db + [db_out] + dgamma + dbeta

    @torch.no_grad()
    def train_step(self, x: torch.Tensor, y: torch.Tensor, step: torch.Tensor) -> None:
        """One SGD step for every model; step is a 0-d device tensor (graph-capturable)."""
        if self.kind.clip == "none":
            loss, steps = self.gradients(x, y, scale=self.lr)  # learning-rate-scaled gradients
        else:  # clipping acts on the plain gradients, before the learning rate
            loss, grads = self.gradients(x, y)
            steps = self._clipped_steps(grads)
        torch._foreach_sub_(self.params, steps)
        self.loss_sum += loss
        newly = ~torch.isfinite(loss) & (self.diverged_at < 0)
        self.diverged_at.copy_(torch.where(newly, step, self.diverged_at))

    def _clipped_steps(self, grads: list[torch.Tensor]) -> list[torch.Tensor]:
        """lr * clipped gradient, as torch.nn.utils.clip_grad_value_ / clip_grad_norm_."""
        t = self.kind.clip_threshold
        if self.kind.clip == "value":
            return [g.clamp(-t, t) * self.lr for g in grads]
        squares = torch.zeros(self.m, device=grads[0].device, dtype=grads[0].dtype)
        for g in grads:
            squares += (g * g).sum(dim=(1, 2))
        coef = (t / (squares.sqrt() + 1e-6)).clamp(max=1.0).view(self.m, 1, 1) * self.lr
        return [g * coef for g in grads]

    def state_tensors(self) -> list[torch.Tensor]:
        """Every tensor a training step changes."""
        return (self.params + self.running_mean + self.running_var
                + [self.loss_sum, self.diverged_at])

    @torch.no_grad()
    def correct(self, x: torch.Tensor, y: torch.Tensor, probe: tuple[int, int] | None = None,
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Inference-mode correct predictions per model, batched over the population; with a
        probe, also the 15/50/85th percentiles of that unit's activation input, (M, 3)."""
        widest = max([x.shape[1]] + [w.shape[-1] for w in self.w])
        per_chunk = max(1, EVAL_ELEMENTS // (EVAL_ROWS * widest))
        counts, percentiles = [], []
        for lo in range(0, self.m, per_chunk):
            part = self._models(lo, min(lo + per_chunk, self.m))
            correct = torch.zeros(part.m, dtype=torch.long, device=x.device)
            probed: list[torch.Tensor] = []
            for start in range(0, x.shape[0], EVAL_ROWS):
                rows = slice(start, start + EVAL_ROWS)
                logits = part.forward(x[rows], train=False, probe=probe, probed=probed)
                correct += (logits.argmax(dim=2) == y[rows]).sum(dim=1)
            counts.append(correct)
            if probed:
                q = torch.tensor(PERCENTILES, device=x.device, dtype=x.dtype)
                percentiles.append(torch.quantile(torch.cat(probed, dim=1), q, dim=1).t())
        return torch.cat(counts), (torch.cat(percentiles) if percentiles else None)

    def _models(self, lo: int, hi: int) -> Stack:
        """Models lo..hi-1 as a stack of their own, sharing this stack's tensors (for inference)."""
        part = copy.copy(self)
        part.m = hi - lo
        for name in ("w", "b", "gamma", "beta", "running_mean", "running_var"):
            setattr(part, name, [t[lo:hi] for t in getattr(self, name)])
        return part

    def model_state(self, i: int) -> dict[str, torch.Tensor]:
        """Model i's parameters and BN statistics, named as in models.MLP's state_dict."""
        return {k: v.detach().cpu().clone() for k, v in self._named_views(i).items()}

    @torch.no_grad()
    def load_model_state(self, i: int, state: dict[str, torch.Tensor]) -> None:
        """Set model i from a state named as in models.MLP's state_dict (inverse of model_state)."""
        for key, target in self._named_views(i).items():
            target.copy_(state[key])

    def _named_views(self, i: int) -> dict[str, torch.Tensor]:
        views = {f"linears.{l}.weight": w[i].t() for l, w in enumerate(self.w)}
        biases = self.b if not self.batch_norm else [None] * self.n_hidden + self.b
        views.update({f"linears.{l}.bias": b[i, 0] for l, b in enumerate(biases) if b is not None})
        for l in range(len(self.gamma)):
            views[f"norms.{l}.weight"] = self.gamma[l][i, 0]
            views[f"norms.{l}.bias"] = self.beta[l][i, 0]
            views[f"norms.{l}.running_mean"] = self.running_mean[l][i, 0]
            views[f"norms.{l}.running_var"] = self.running_var[l][i, 0]
        return views
