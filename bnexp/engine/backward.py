"""A stack's training step: its backward pass written out, and the SGD update.

Every gradient is computed by hand from what the forward pass saved (engine/stack.py):
softmax cross-entropy, linear layers, activations, the normaliser with its batch statistics
differentiated, and dropout; then each model takes its SGD step. Like the forward pass,
each model's arithmetic is its own, whatever shares its stack.
"""

from __future__ import annotations

import torch

from bnexp.engine.stack import Stack, bmm, pick, stat_dim, stat_groups
from bnexp.models import ACTIVATION_GRADS


@torch.no_grad()
def train_step(stack: Stack, x: torch.Tensor, y: torch.Tensor, step: torch.Tensor) -> None:
    """One SGD step for every model; step is a 0-d device tensor (graph-capturable)."""
    if stack.kind.clip == "none":
        # learning-rate-scaled gradients
        loss, steps = gradients(stack, x, y, scale=stack.lr, step=step)
    else:  # clipping acts on the plain gradients, before the learning rate
        loss, grads = gradients(stack, x, y, step=step)
        steps = _clipped_steps(stack, grads)
    torch._foreach_sub_(stack.params, steps)
    stack.loss_sum += loss
    # loss - loss is 0 exactly where the loss is finite, NaN where it is NaN or infinite:
    # two operators where isfinite takes four
    newly = (loss - loss).ne(0) & (stack.diverged_at < 0)
    torch.where(newly, step, stack.diverged_at, out=stack.diverged_at)


def gradients(stack: Stack, x: torch.Tensor, y: torch.Tensor,
              scale: torch.Tensor | None = None, step: torch.Tensor | None = None,
              ) -> tuple[torch.Tensor, list]:
    """Per-model mean cross-entropy (M,) and its gradients, in the order of stack.params.

    Every gradient is linear in d loss / d logits, so a per-model scale (M, 1, 1), such as
    the learning rate, applied there scales all of that model's gradients. step numbers
    the training step (dropout masks follow it).
    """
    saved: list = []
    logits = stack.forward(x, train=True, saved=saved, step=step)
    log_p = torch.log_softmax(logits, dim=2)
    target = _targets(stack, y)
    loss = -log_p.gather(2, target).squeeze(2).mean(dim=1)
    # softmax row by row (not exp over the whole tensor): each model's rows alike for any M
    g = torch.softmax(logits, dim=2).scatter_add_(2, target,
                                                   torch.full_like(log_p[..., :1], -1.0))
    n = x.shape[1]
    g = g / n if scale is None else g * (scale / n)  # d loss / d logits
    dw = [None] * (stack.n_hidden + 1)
    dw[-1] = bmm(g.transpose(1, 2), saved[-1][0])
    db = [None] * stack.n_hidden + [g.sum(dim=1, keepdim=True)]
    dgamma, dbeta = [None] * len(stack.gamma), [None] * len(stack.beta)
    dh = bmm(g, stack.w[-1])
    for l in reversed(range(stack.n_hidden)):
        dz = _layer_grads(stack, l, saved[l], dh, db, dgamma, dbeta)
        h_in = saved[l][0]
        dw[l] = bmm(dz.transpose(1, 2), h_in)
        if l > 0:
            dh = bmm(dz, stack.w[l])
    hidden_db = db[:-1] if stack.bias_mask is not False else []
    return loss, (dw + hidden_db + db[-1:] + (dgamma if stack.kind.bn_scale else [])
                  + dbeta)


def _targets(stack: Stack, y: torch.Tensor) -> torch.Tensor:
    """The step's labels (S, B) as each model's own (M, B, 1)."""
    if stack.one_stream is not None:
        return y[stack.one_stream].view(1, -1, 1).expand(stack.m, -1, 1)
    return y.index_select(0, stack.streams).unsqueeze(2)


def _layer_grads(stack: Stack, l: int, saved: tuple, dh: torch.Tensor, db: list,
                 dgamma: list, dbeta: list) -> torch.Tensor:
    """Hidden layer l's backward pass from d loss / d output: fills db, dgamma, dbeta
    and returns d loss / d (linear output)."""
    _, v_hat, inv_std, a, keep = saved
    mask = stack.norm_mask
    normed = mask is not False
    if keep is not None:  # through the dropout that followed the layer
        dh = torch.where(keep, dh * stack.drop_scale, 0.0)

    def affine_grads(d: torch.Tensor) -> torch.Tensor:
        sum_dv = (d * v_hat).sum(dim=1, keepdim=True)
        sum_d = d.sum(dim=1, keepdim=True)
        dgamma[l] = pick(mask, sum_dv, 0.0)
        dbeta[l] = pick(mask, sum_d, 0.0)
        if stack.kind.norm == "batch":
            return _batch_norm_grad(d, v_hat, inv_std, stack.gamma[l], sum_d, sum_dv)
        return _normalize_grad(stack, d * stack.gamma[l], v_hat, inv_std)

    if stack.kind.position == "before":
        dz = _activation_grad(stack, dh, a)
        if normed:
            dz = pick(mask, affine_grads(dz), dz)
    else:
        da = pick(mask, affine_grads(dh), dh) if normed else dh
        dz = _activation_grad(stack, da, a)
    if stack.bias_mask is not False:  # else no network of the stack has this bias
        db[l] = pick(stack.bias_mask, dz.sum(dim=1, keepdim=True), 0.0)
    return dz


def _activation_grad(stack: Stack, g: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """d loss / d activation input from d loss / d output g and the output a, by slice."""
    if len(stack.slices) == 1:
        return ACTIVATION_GRADS[stack.slices[0][0]](g, a)
    out = torch.empty_like(g)
    for name, lo, hi in stack.slices:  # each slice's kernel writes its part of out
        ACTIVATION_GRADS[name](g[lo:hi], a[lo:hi], grad_input=out[lo:hi])
    return out


def _normalize_grad(stack: Stack, d_hat: torch.Tensor, v_hat: torch.Tensor,
                    inv_std: torch.Tensor) -> torch.Tensor:
    """d loss / d v from d loss / d v_hat, with the statistics differentiated."""
    dim = stat_dim(stack.kind)
    d, h = stat_groups(d_hat, stack.kind), stat_groups(v_hat, stack.kind)
    out = inv_std * (d - d.mean(dim=dim, keepdim=True)
                     - h * (d * h).mean(dim=dim, keepdim=True))
    return out.reshape(d_hat.shape)


def _batch_norm_grad(d: torch.Tensor, v_hat: torch.Tensor, inv_std: torch.Tensor,
                     gamma: torch.Tensor, sum_d: torch.Tensor, sum_dv: torch.Tensor,
                     ) -> torch.Tensor:
    """_normalize_grad(d * gamma, ...) for batch norm, from the sums over the batch that
    gamma's and beta's gradients already hold (gamma is constant over the batch, so
    mean(d * gamma) = gamma * sum_d / B and mean(d * gamma * v_hat) = gamma * sum_dv / B):
    three passes over the activations instead of eight."""
    n = d.shape[1]
    centred = torch.addcmul(d - sum_d / n, v_hat, sum_dv / n, value=-1)
    return centred * (gamma * inv_std)


def _clipped_steps(stack: Stack, grads: list[torch.Tensor]) -> list[torch.Tensor]:
    """lr * clipped gradient, as torch.nn.utils.clip_grad_value_ / clip_grad_norm_."""
    t = stack.kind.clip_threshold
    if stack.kind.clip == "value":
        return [g.clamp(-t, t) * stack.lr for g in grads]
    squares = torch.zeros(stack.m, device=grads[0].device, dtype=grads[0].dtype)
    for g in grads:
        squares += (g * g).sum(dim=(1, 2))
    coef = (t / (squares.sqrt() + 1e-6)).clamp(max=1.0).view(stack.m, 1, 1) * stack.lr
    return [g * coef for g in grads]
