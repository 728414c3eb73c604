"""The population engine: many MLPs trained at once as stacked tensors on one batch stream.

Models that share activation and BN flag form a ``Stack``: their parameters are stacked along
a leading model dimension, so one batched matrix product runs a layer of every model. The
first layer reads the same mini-batch for every model, so it is a single ordinary matrix
product against all models' first-layer weights side by side.

Shapes: M models, B examples, layer l maps n_in -> n_out.
  first-layer weight  (n_in, M, n_out)   one GEMM: (B, n_in) @ (n_in, M * n_out)
  other weights       (M, n_in, n_out)   torch.bmm over the model dimension
  biases, gamma, beta, running mean/var  (M, 1, n_out)
  learning rates      (M, 1, 1)

Nothing in the training loop reads a value back to the host: losses, the divergence step
and the running loss sum stay on the device and are read at evaluation time only.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from bnexp.config import RunConfig
from bnexp.data import BatchStream, Split
from bnexp.engine.capture import capture_step, sync
from bnexp.engine.common import ModelResult, Progress, RunResult, eval_blocks, variant_name
from bnexp.models import ACTIVATION_FNS, BN_EPS, BN_MOMENTUM, initial_weights

EVAL_ELEMENTS = 1 << 25  # activations per evaluation chunk (128 MiB of fp32)


class Stack:
    """Models sharing activation and BN flag; parameter tensors carry a model dimension."""

    def __init__(self, weights: list[list[torch.Tensor]], lrs: list[float], activation: str,
                 batch_norm: bool, device: torch.device):
        self.m = len(weights)
        self.activation = ACTIVATION_FNS[activation]
        self.activation_name = activation
        self.batch_norm = batch_norm
        self.n_hidden = len(weights[0]) - 1
        # nn.Linear stores (out, in); the stack stores (in, out) so that x @ w needs no transpose.
        per_layer = [torch.stack([w[l].t() for w in weights]) for l in range(self.n_hidden + 1)]
        self.w = [per_layer[0].permute(1, 0, 2).contiguous()] + per_layer[1:]
        self.w = [w.to(device) for w in self.w]
        widths = [w.shape[-1] for w in self.w]

        def zeros(width: int) -> torch.Tensor:
            return torch.zeros(self.m, 1, width, device=device)

        hidden = widths[:-1]
        # BN models have no hidden-layer bias: beta takes its place.
        self.b = ([] if batch_norm else [zeros(n) for n in hidden]) + [zeros(widths[-1])]
        self.gamma = [torch.ones(self.m, 1, n, device=device) for n in hidden] if batch_norm else []
        self.beta = [zeros(n) for n in hidden] if batch_norm else []
        self.running_mean = [zeros(n) for n in hidden] if batch_norm else []
        self.running_var = [torch.ones_like(m) for m in self.running_mean]
        self.params = self.w + self.b + self.gamma + self.beta
        self.lr = torch.tensor(lrs, dtype=torch.float32, device=device).view(self.m, 1, 1)
        self.loss_sum = torch.zeros(self.m, device=device)
        self.diverged_at = torch.full((self.m,), -1, dtype=torch.long, device=device)

    def _norm(self, z: torch.Tensor, l: int, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Batch norm over the example dimension, per model and unit: (z_hat, 1/std)."""
        if train:
            mean = z.mean(dim=1, keepdim=True)
            centred = z - mean
            var = (centred * centred).mean(dim=1, keepdim=True)  # biased, for normalising
            n = z.shape[1]
            # Running averages use the unbiased variance, as nn.BatchNorm1d does.
            self.running_mean[l].lerp_(mean, BN_MOMENTUM)
            self.running_var[l].lerp_(var * (n / (n - 1)), BN_MOMENTUM)
        else:
            centred, var = z - self.running_mean[l], self.running_var[l]
        inv_std = torch.rsqrt(var + BN_EPS)
        return centred * inv_std, inv_std

    def _linear(self, h: torch.Tensor, l: int) -> torch.Tensor:
        if l > 0:
            return torch.bmm(h, self.w[l])
        # The first layer reads the same batch for every model: one GEMM for all of them.
        w0 = self.w[0]
        return (h @ w0.view(w0.shape[0], -1)).view(h.shape[0], self.m, -1).transpose(0, 1)

    def forward(self, x: torch.Tensor, train: bool, saved: list | None = None) -> torch.Tensor:
        """x (B, n_in) shared by all models -> logits (M, B, n_classes).

        With saved, each hidden layer appends what the backward pass needs:
        (layer input, z_hat, 1/std, activation output).
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
            a = self.activation(z)
            if saved is not None:
                saved.append((h, z_hat, inv_std, a))
            h = a
        if saved is not None:
            saved.append((h, None, None, None))
        return torch.baddbmm(self.b[-1], h, self.w[-1])

    def _activation_grad(self, grad: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        if self.activation_name == "sigmoid":
            return grad * (1 - a) * a
        # PyTorch's own ReLU backward (one fused kernel; a NaN passes the gradient, as in nn.ReLU).
        return torch.ops.aten.threshold_backward(grad, a, 0.0)

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
        g = torch.exp(log_p).scatter_add_(2, target, torch.full_like(log_p[..., :1], -1.0))
        g = g / x.shape[0] if scale is None else g * (scale / x.shape[0])  # d loss / d logits
        h_last = saved[-1][0]
        dw = [None] * (self.n_hidden + 1)
        dw[-1] = torch.bmm(h_last.transpose(1, 2), g)
        db_out = g.sum(dim=1, keepdim=True)
        db, dgamma, dbeta = [], [], []
        dh = torch.bmm(g, self.w[-1].transpose(1, 2))
        for l in reversed(range(self.n_hidden)):
            h_in, z_hat, inv_std, a = saved[l]
            dz = self._activation_grad(dh, a)
            if self.batch_norm:
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
                flat = dz.transpose(0, 1).reshape(x.shape[0], -1)
                dw[0] = (x.t() @ flat).view(self.w[0].shape)
        return loss, dw + db + [db_out] + dgamma + dbeta

    @torch.no_grad()
    def train_step(self, x: torch.Tensor, y: torch.Tensor, step: torch.Tensor) -> None:
        """One SGD step for every model; step is a 0-d device tensor (graph-capturable)."""
        loss, steps = self.gradients(x, y, scale=self.lr)  # learning-rate-scaled gradients
        torch._foreach_sub_(self.params, steps)
        self.loss_sum += loss
        newly = ~torch.isfinite(loss) & (self.diverged_at < 0)
        self.diverged_at.copy_(torch.where(newly, step, self.diverged_at))

    def state_tensors(self) -> list[torch.Tensor]:
        """Every tensor a training step changes."""
        return (self.params + self.running_mean + self.running_var
                + [self.loss_sum, self.diverged_at])

    @torch.no_grad()
    def correct(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Inference-mode count of correct predictions per model, batched over the population."""
        widest = max(w.shape[-1] for w in self.w)
        rows = max(1, EVAL_ELEMENTS // (self.m * widest))
        correct = torch.zeros(self.m, dtype=torch.long, device=x.device)
        for start in range(0, x.shape[0], rows):
            logits = self.forward(x[start:start + rows], train=False)
            correct += (logits.argmax(dim=2) == y[start:start + rows]).sum(dim=1)
        return correct

    def model_state(self, i: int) -> dict[str, torch.Tensor]:
        """Model i's parameters and BN statistics, named as in models.MLP's state_dict."""
        return {k: v.detach().cpu().clone() for k, v in self._named_views(i).items()}

    @torch.no_grad()
    def load_model_state(self, i: int, state: dict[str, torch.Tensor]) -> None:
        """Set model i from a state named as in models.MLP's state_dict (inverse of model_state)."""
        for key, target in self._named_views(i).items():
            target.copy_(state[key])

    def _named_views(self, i: int) -> dict[str, torch.Tensor]:
        views = {f"linears.{l}.weight": w.t() for l, w in
                 enumerate([self.w[0][:, i]] + [w[i] for w in self.w[1:]])}
        biases = self.b if not self.batch_norm else [None] * self.n_hidden + self.b
        views.update({f"linears.{l}.bias": b[i, 0] for l, b in enumerate(biases) if b is not None})
        for l in range(len(self.gamma)):
            views[f"norms.{l}.weight"] = self.gamma[l][i, 0]
            views[f"norms.{l}.bias"] = self.beta[l][i, 0]
            views[f"norms.{l}.running_mean"] = self.running_mean[l][i, 0]
            views[f"norms.{l}.running_var"] = self.running_var[l][i, 0]
        return views


def _build_stacks(runs: list[RunConfig], device: torch.device):
    """Stacks keyed by (activation, batch_norm), and each model's (stack, index) by run."""
    members: dict[tuple[str, bool], list[tuple[int, RunConfig]]] = {}
    for r, run in enumerate(runs):
        for bn in run.batch_norm:
            members.setdefault((run.activation, bn), []).append((r, run))
    stacks, where = [], {}
    for (activation, bn), group in members.items():
        weights = [initial_weights(run.layers, run.init_scale, run.seed) for _, run in group]
        stack = Stack(weights, [run.lr for _, run in group], activation, bn, device)
        for i, (r, _) in enumerate(group):
            where[(r, bn)] = (stack, i)
        stacks.append(stack)
    return stacks, where


def _step_function(stacks: list[Stack], split: Split, block: torch.Tensor, k: torch.Tensor,
                   step: torch.Tensor):
    """One training step of every stack, reading batch k of the block of batch indices.

    The counters k and step live on the device, so a captured step replays unchanged.
    """
    def step_all() -> None:
        batch_idx = block.index_select(0, k).view(-1)
        x = split.train_x.index_select(0, batch_idx)
        y = split.train_y.index_select(0, batch_idx)
        k.add_(1)
        step.add_(1)
        for stack in stacks:
            stack.train_step(x, y, step)
    return step_all


def train_population(runs: list[RunConfig], split: Split, device: torch.device,
                     progress: Progress | None = None, keep_states: bool = False,
                     cuda_graph: bool = True, resume: list[dict] | None = None,
                     on_checkpoint: Callable[[int, dict], None] | None = None,
                     ) -> list[RunResult]:
    """Train every model of runs (which share a population key) together.

    resume holds one checkpoint per run, all taken at the same step; on_checkpoint(r, data)
    receives run r's checkpoint at the first evaluation after every checkpoint_every steps
    and at the end. A resumed population continues bit for bit as if never interrupted.
    """
    first = runs[0]
    start = time.perf_counter()
    stacks, where = _build_stacks(runs, device)
    n_models = sum(s.m for s in stacks)
    stream = BatchStream(split.train_x.shape[0], first.batch_size, first.seed, device)
    step = torch.zeros((), dtype=torch.long, device=device)
    k = torch.zeros(1, dtype=torch.long, device=device)
    block = torch.zeros(min(first.eval_every, first.steps), first.batch_size, dtype=torch.long,
                        device=device)
    step_all = _step_function(stacks, split, block, k, step)
    state = [t for stack in stacks for t in stack.state_tensors()]
    graph = capture_step(step_all, state + [k, step], device) if cuda_graph else None
    results = [[ModelResult(variant_name(bn)) for bn in run.batch_norm] for run in runs]

    def evaluate(done: int, n_block: int) -> None:
        accs = [_accuracies(s, split.val_x, split.val_y) for s in stacks]
        losses = [(s.loss_sum / max(n_block, 1)).tolist() for s in stacks]
        for s in stacks:
            s.loss_sum.zero_()
        for (r, bn), (stack, i) in where.items():
            j = stacks.index(stack)
            loss = losses[j][i] if n_block else float("nan")
            results[r][run_variant(runs[r], bn)].record(done, accs[j][i], loss)

    done, train_time = 0, 0.0
    if resume:
        done, train_time = _restore(resume, runs, stacks, where, results, stream)
        step.fill_(done)
    else:
        evaluate(0, 0)
    next_checkpoint = done + first.checkpoint_every
    for n_block in _remaining_blocks(first, done):
        block[:n_block].copy_(stream.next_indices(n_block))
        k.zero_()
        tick = time.perf_counter()
        for _ in range(n_block):
            if graph is not None:
                graph.replay()
            else:
                step_all()
        sync(device)
        train_time += time.perf_counter() - tick
        done += n_block
        evaluate(done, n_block)
        if on_checkpoint and (done >= next_checkpoint or done == first.steps):
            for r, data in enumerate(_checkpoints(runs, stacks, where, results, stream, done,
                                                  train_time)):
                on_checkpoint(r, data)
            next_checkpoint = done + first.checkpoint_every
        if progress:
            progress(n_block * n_models)
    _finish(runs, stacks, where, results, split, keep_states)
    wall = time.perf_counter() - start
    execution = "cuda-graph" if graph is not None else "eager"
    return [RunResult(run, str(device), "population", results[r], wall, n_models, execution,
                      train_time_s=train_time)
            for r, run in enumerate(runs)]


def _remaining_blocks(run: RunConfig, done: int) -> list[int]:
    blocks = eval_blocks(run.steps, run.eval_every)
    passed = 0
    while done > 0:
        done -= blocks[passed]
        passed += 1
    if done != 0:
        raise ValueError("a checkpoint must lie on an evaluation step")
    return blocks[passed:]


CHECKPOINT_FORMAT = 1


def _checkpoints(runs, stacks, where, results, stream: BatchStream, done: int,
                 train_time: float) -> list[dict]:
    """One checkpoint per run: its models' states and metrics, the stream, the step."""
    diverged = {id(s): s.diverged_at.tolist() for s in stacks}
    stream_state = stream.state()
    out = [{"format": CHECKPOINT_FORMAT, "step": done, "train_time_s": train_time,
            "stream": stream_state, "models": {}} for _ in runs]
    for (r, bn), (stack, i) in where.items():
        model = results[r][run_variant(runs[r], bn)]
        out[r]["models"][model.name] = {
            "state": stack.model_state(i), "diverged_at": diverged[id(stack)][i],
            "steps": list(model.steps), "val_acc": list(model.val_acc),
            "train_loss": list(model.train_loss),
        }
    return out


def _restore(resume: list[dict], runs, stacks, where, results, stream: BatchStream,
             ) -> tuple[int, float]:
    steps = {c["step"] for c in resume}
    if len(steps) != 1 or any(c.get("format") != CHECKPOINT_FORMAT for c in resume):
        raise ValueError("runs of one population must resume from one step and format")
    stream.load_state(resume[0]["stream"])
    for (r, bn), (stack, i) in where.items():
        saved = resume[r]["models"][variant_name(bn)]
        stack.load_model_state(i, saved["state"])
        stack.diverged_at[i] = saved["diverged_at"]
        model = results[r][run_variant(runs[r], bn)]
        model.steps, model.val_acc = list(saved["steps"]), list(saved["val_acc"])
        model.train_loss = list(saved["train_loss"])
    return steps.pop(), resume[0]["train_time_s"]


def _accuracies(stack: Stack, x: torch.Tensor, y: torch.Tensor) -> list[float]:
    return [c / x.shape[0] for c in stack.correct(x, y).tolist()]


def run_variant(run: RunConfig, bn: bool) -> int:
    return run.batch_norm.index(bn)


def _finish(runs, stacks, where, results, split: Split, keep_states: bool) -> None:
    tests = [_accuracies(s, split.test_x, split.test_y) for s in stacks]
    diverged = [s.diverged_at.tolist() for s in stacks]
    for (r, bn), (stack, i) in where.items():
        k = stacks.index(stack)
        model = results[r][run_variant(runs[r], bn)]
        model.final_val_acc = model.val_acc[-1]
        model.final_test_acc = tests[k][i]
        model.diverged_step = diverged[k][i] if diverged[k][i] >= 0 else None
        if keep_states:
            model.state = stack.model_state(i)
