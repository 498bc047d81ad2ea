"""The inner training loop of one rank of a site.

Per step: ``grad_accum`` micro-batches (forward, loss / grad_accum, ``engine.backward``), then
``engine.step(lr)`` with the warmup + cosine learning rate. Every ``log_every`` steps the train
loss is averaged over the site's ranks (so it is the mean over the site's global batch) and
written with the learning rate, gradient norm and tokens/s; every ``eval_every`` steps the
validation loss (and bits per byte for byte tokens) is measured on fixed held-out batches.
A NaN/Inf loss or gradient norm stops training with :class:`~loco.errors.TrainingError`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

import torch

from loco.data.sampler import SiteData
from loco.engine.base import StepEngine
from loco.errors import TrainingError
from loco.metrics import MetricsWriter
from loco.progress import Progress
from loco.site_comm import SiteComm


def lr_schedule(
    step: int, *, lr: float, steps: int, warmup_steps: int, min_lr_ratio: float
) -> float:
    """Linear warmup over ``warmup_steps`` (step 0 gets lr/warmup), then cosine to lr*min_lr_ratio."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    span = max(1, steps - warmup_steps)
    t = min(1.0, (step - warmup_steps) / span)
    return lr * (min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t)))


def check_finite(step: int, loss: float, grad_norm: float, lr: float) -> None:
    """Raise :class:`TrainingError` (one line) when step ``step``'s loss or gradient norm is
    NaN/Inf: the weights are (or are about to be) ruined, so training stops rather than go on.
    The gradient norm is the site's (the same on every rank, and NaN when any rank's loss is),
    so every rank stops at the same step."""
    if math.isfinite(loss) and math.isfinite(grad_norm):
        return
    raise TrainingError(
        f"step {step}: training diverged (loss {loss:g}, gradient norm {grad_norm:g} at lr "
        f"{lr:g}: not finite); lower train.lr or resume from an earlier checkpoint"
    )


class Trainer:
    """Runs steps ``[start, steps)`` on one rank; every rank of the site runs the same calls."""

    def __init__(
        self,
        *,
        engine: StepEngine,
        data: SiteData,
        steps: int,
        lr: float,
        warmup_steps: int = 0,
        min_lr_ratio: float = 0.1,
        grad_accum: int = 1,
        eval_every: int = 100,
        eval_batches: int = 8,
        eval_at_end: bool = True,
        log_every: int = 10,
        seq_len: int,
        round_every: int = 0,
        round_of: Callable[[int], int] | None = None,
        device: torch.device | str = "cpu",
        comm: SiteComm | None = None,
        metrics: MetricsWriter | None = None,
        progress: Progress | None = None,
        on_step_end: Callable[[int], None] | None = None,
        before_step: Callable[[], None] | None = None,
        checkpoint_ready: Callable[[], bool] | None = None,
    ) -> None:
        """``on_step_end(done)`` runs after each optimizer step, before that step's logging and
        evaluation (the outer rounds plug in here, so an eval at a round boundary sees the
        averaged weights). ``before_step()`` runs after the backward passes, right before the
        optimizer step (an overlapped checkpoint snapshot is fenced here). A checkpoint that falls
        due while ``checkpoint_ready()`` is False (an overlapped outer round in flight) is taken
        at the first step after it turns True, so a checkpoint never splits a round."""
        self.engine, self.data = engine, data
        self.model = engine.model
        self.steps, self.grad_accum, self.seq_len = steps, grad_accum, seq_len
        self.sched = dict(lr=lr, steps=steps, warmup_steps=warmup_steps, min_lr_ratio=min_lr_ratio)
        self.eval_every, self.eval_batches, self.log_every = eval_every, eval_batches, log_every
        self.eval_at_end = eval_at_end
        self.round_every = round_every
        self.round_of = round_of  # the round a step is in (records); None: step // round_every
        self.device = torch.device(device)
        self.comm = comm if comm is not None else SiteComm()
        self.metrics, self.progress = metrics, progress
        self.on_step_end = on_step_end
        self.before_step = before_step
        self.checkpoint_ready = checkpoint_ready
        self.hook_seconds = 0.0  # wall time spent in on_step_end (outer rounds)
        self.step = 0  # optimizer steps completed
        self.history: list[dict[str, Any]] = []

    def _round(self, step: int) -> int:
        if self.round_of is not None:
            return self.round_of(step)
        return step // self.round_every if self.round_every else 0

    def _site_mean(self, values: list[float]) -> list[float]:
        return self.comm.mean(values)

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Mean validation loss over ``eval_batches`` fixed batches of the site's ranks."""
        was_training = self.model.training
        self.model.eval()
        total, nbytes, ntokens = 0.0, 0, 0
        for i in range(self.eval_batches):
            x, y = self.data.val_batch(i)
            total += float(self.model(x.to(self.device), y.to(self.device)))
            nbytes, ntokens = nbytes + self.data.text_bytes(y), ntokens + y.numel()
        self.model.train(was_training)
        # every rank scores as many tokens: the site's bytes per token is the mean of its ranks'
        loss, per_token = self._site_mean([total / self.eval_batches, nbytes / ntokens])
        out = {"loss": loss}
        if per_token > 0:  # tokens of text (bytes, BPE): bits per byte of that text
            out["bpb"] = loss / (math.log(2) * per_token)
        else:
            out["bits_per_token"] = loss / math.log(2)
        return out

    def train_step(self, step: int) -> tuple[float, float, float]:
        """One optimizer step; returns (this rank's mean micro-batch loss, lr, grad norm)."""
        lr = lr_schedule(step, **self.sched)
        loss_sum = torch.zeros((), device=self.device)
        for k in range(self.grad_accum):
            x, y = self.data.train_batch(step, k)
            loss = self.model(x.to(self.device), y.to(self.device))
            self.engine.backward(loss / self.grad_accum)
            loss_sum += loss.detach()
        if self.before_step is not None:
            self.before_step()
        norm = self.engine.step(lr)
        return float(loss_sum) / self.grad_accum, lr, norm

    def _log_train(self, done: int, losses: list[float], lr: float, norm: float, tps: float,
                   tokens_per_step: int) -> None:  # fmt: skip
        """One ``train`` record: the site's mean loss over the window and this rank's rates."""
        (site_loss,) = self._site_mean([sum(losses) / len(losses)])
        rec = dict(loss=site_loss, lr=lr, grad_norm=norm, tokens_per_s=tps,
                   tokens=done * tokens_per_step)  # fmt: skip
        routing = getattr(self.model, "train_metrics", None)  # MoE models: the site's routing
        if routing is not None:
            rec.update(routing())
        self.history.append({"step": done, "kind": "train", **rec})
        if self.metrics:
            self.metrics.log("train", step=done, round=self._round(done), **rec)
        if self.progress:
            self.progress.update(done, loss=site_loss, lr=lr, **{"tok/s": tps})

    def _log_eval(self, done: int, tokens_per_step: int) -> float:
        """Evaluate, record an ``eval`` line; returns the validation loss."""
        ev = self.evaluate()
        self.history.append({"step": done, "kind": "eval", **ev})
        if self.metrics:
            self.metrics.log("eval", step=done, round=self._round(done),
                             tokens=done * tokens_per_step, **ev)  # fmt: skip
        if self.progress:
            figs = "  ".join(f"{k} {v:.4f}" for k, v in ev.items())
            self.progress.message(f"eval step {done}: val {figs}")
        return ev["loss"]

    def fit(
        self, start: int = 0, checkpoint: Callable[[int], None] | None = None, ckpt_every: int = 0
    ) -> dict[str, Any]:
        """Train from step ``start`` to ``steps``; returns a summary with the final eval."""
        self.step = start
        self.model.train()
        tokens_per_step = self.data.global_rows * self.seq_len
        window_t, window_steps = time.perf_counter(), 0
        last_eval: float | None = None
        losses: list[float] = []
        ckpt_due = False
        for step in range(start, self.steps):
            loss, lr, norm = self.train_step(step)
            check_finite(step + 1, loss, norm, lr)
            self.step = step + 1
            losses.append(loss)
            window_steps += 1
            done = self.step
            if self.on_step_end is not None:
                # before logging and eval: a round that ends at this step is in the eval
                t0 = time.perf_counter()
                self.on_step_end(done)
                self.hook_seconds += time.perf_counter() - t0
            if done % self.log_every == 0 or done == self.steps:
                tps = window_steps * tokens_per_step / max(time.perf_counter() - window_t, 1e-9)
                self._log_train(done, losses, lr, norm, tps, tokens_per_step)
                losses, window_steps = [], 0
                window_t = time.perf_counter()
            if done % self.eval_every == 0 or (self.eval_at_end and done == self.steps):
                t0 = time.perf_counter()
                last_eval = self._log_eval(done, tokens_per_step)
                window_t += time.perf_counter() - t0  # eval time is not training throughput
            ckpt_due = ckpt_due or bool(ckpt_every and done % ckpt_every == 0)
            if checkpoint is not None and ckpt_due:
                if self.checkpoint_ready is None or self.checkpoint_ready():
                    t0 = time.perf_counter()
                    checkpoint(done)
                    window_t += time.perf_counter() - t0
                    ckpt_due = False
        if self.progress:
            self.progress.close()
        return {"steps": self.step, "val_loss": last_eval, "tokens": self.step * tokens_per_step}
