"""A checkpoint never splits an overlapped outer round: one due while a round is in flight is
taken at the first step after the round merged (real model, engine, data; world size 1)."""

from __future__ import annotations

from loco import build
from loco.config import compose
from loco.site_comm import SiteComm
from loco.trainer import Trainer


def make_trainer(steps: int, **kw) -> Trainer:
    """A real one-rank trainer on a 1-layer model (no eval, no logging in the window)."""
    cfg = compose(["+site=eu", "model.n_layer=1", "model.d_model=32", "model.n_head=2",
                   "train.batch_size=2", "train.seq_len=16", "train.threads=1"])  # fmt: skip
    corpus = build.corpus_from(cfg)
    engine = build.engine_from(cfg, build.model_from(cfg, corpus))
    data = build.data_from(cfg, corpus, SiteComm.single())
    return Trainer(engine=engine, data=data, steps=steps, lr=1e-3, warmup_steps=1,
                   min_lr_ratio=1.0, grad_accum=1, eval_every=100, eval_batches=1, log_every=100,
                   seq_len=16, eval_at_end=False, **kw)  # fmt: skip


def test_checkpoint_waits_for_the_round_in_flight():
    in_flight = set(range(5, 8))  # a round started at step 5, merged at step 8 (tau = 3)
    done_steps: list[int] = []
    trainer = make_trainer(12, checkpoint_ready=lambda: trainer.step not in in_flight)
    saved: list[int] = []
    trainer.on_step_end = done_steps.append
    trainer.fit(0, checkpoint=saved.append, ckpt_every=5)
    assert done_steps == list(range(1, 13))
    # due at 5 (in flight: taken at 8, when the round merged) and at 10 (no round: on time)
    assert saved == [8, 10]


def test_checkpoint_on_time_without_rounds():
    trainer = make_trainer(9)
    saved: list[int] = []
    trainer.fit(0, checkpoint=saved.append, ckpt_every=3)
    assert saved == [3, 6, 9]
