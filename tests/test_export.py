"""Export and sampling from a real run's checkpoint: ``loco.export``, ``loco.sample``."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from loco import build
from loco.config import compose
from loco.export import export, from_checkpoint, load_exported, load_model
from loco.sample import main as sample_main
from loco.site_comm import SiteComm
from tests.workers import run_worker

ROOT = Path(__file__).resolve().parent.parent
ARGS = [
    "+site=eu", "model.n_layer=2", "model.d_model=64", "model.n_head=2", "train.batch_size=8",
    "train.seq_len=32", "outer=local", "train.steps=120", "train.eval_every=120",
    "train.eval_batches=2", "train.lr=3e-3", "train.warmup_steps=5", "train.progress=false",
    "train.threads=1", "checkpoint.every=120",
]  # fmt: skip


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("trained")
    p = run_worker(ARGS, d)
    assert p.returncode == 0, p.stderr[-2000:]
    return d


def test_exported_model_gives_the_trained_models_validation_loss(run, tmp_path):
    model, meta = from_checkpoint(run)
    assert meta["step"] == 120
    st = export(model, tmp_path / "m.safetensors", meta)
    pt = export(model, tmp_path / "m.pt", meta)
    a, info = load_exported(st)
    b, _ = load_exported(pt)
    assert json.loads(info["gpt_config"])["n_head"] == 2 and info["step"] == "120"
    assert a.head.weight is a.wte.weight  # still tied after loading
    # the run's final eval: the same fixed validation batches through the exported model
    cfg = compose(ARGS)
    data = build.data_from(cfg, build.corpus_from(cfg), SiteComm.single())
    with torch.no_grad():
        losses = [float(a(*data.val_batch(i))) for i in range(cfg.train.eval_batches)]
        x, _ = data.val_batch(0)
        assert torch.equal(a(x), b(x)) and torch.equal(a(x), model(x))
    want = json.loads((run / "summary.json").read_text())["val_loss"]
    # one fp32 forward in another process: equal up to summation order (~1e-7 relative)
    assert sum(losses) / len(losses) == pytest.approx(want, rel=1e-5)


def test_sample_prints_text_greedy_is_deterministic(run, tmp_path, capsys):
    out = tmp_path / "m.safetensors"
    p = subprocess.run([sys.executable, "-m", "loco.export", str(run), str(out)], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)  # fmt: skip
    assert p.returncode == 0 and out.exists(), p.stderr

    def sample(*args: str) -> str:
        assert sample_main([str(out), "--prompt", "def ", "--tokens", "80", *args]) == 0
        return capsys.readouterr().out

    greedy = sample("--temperature", "0")
    assert greedy.startswith("def ") and len(greedy) > 60
    assert sample("--temperature", "0", "--seed", "5") == greedy  # greedy ignores the seed
    drawn = sample("--temperature", "0.8", "--top-k", "40", "--seed", "0")
    assert sample("--temperature", "0.8", "--top-k", "40", "--seed", "0") == drawn
    # the run directory works as well as the exported file, through the real entry point
    p = subprocess.run([sys.executable, "-m", "loco.sample", str(run), "--prompt", "def ",
                        "--tokens", "80", "--temperature", "0"], cwd=ROOT, capture_output=True,
                       text=True, timeout=120)  # fmt: skip
    assert p.returncode == 0 and p.stdout == greedy, p.stderr


def test_no_checkpoint_is_one_clear_error(tmp_path):
    with pytest.raises(ValueError, match="no checkpoint under .*checkpoint.every"):
        load_model(tmp_path)
