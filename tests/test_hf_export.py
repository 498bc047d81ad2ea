"""``python -m loco.export SOURCE --format hf OUT``: a directory that ``transformers`` loads as
``GPT2LMHeadModel`` computing the loco model's logits, and that ``AutoTokenizer`` reads."""

from __future__ import annotations

import json

import pytest
import torch

from loco.data.tokenizer import byte_tokenizer
from loco.export import export, load_exported
from loco.export import main as export_main
from loco.hf import MARKER
from loco.model.gpt import GPT, GPTConfig

transformers = pytest.importorskip("transformers", reason="the test extra: pip install -e .[test]")

SIZES = {
    "bytes-no-bias": GPTConfig(vocab_size=256, seq_len=16, n_layer=2, n_head=2, d_model=32),
    "bias": GPTConfig(
        vocab_size=300, seq_len=24, n_layer=3, n_head=3, d_model=48, bias=True, mlp_ratio=2
    ),  # fmt: skip
}


def random_gpt(cfg: GPTConfig, seed: int) -> GPT:
    """A GPT whose every weight, norm gain and bias is random (none at its initial 0 or 1), so
    a wrong name, transpose or dropped bias shows in the logits."""
    torch.manual_seed(seed)
    model = GPT(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


def exported(model: GPT, tmp_path, name: str = "hf"):
    """``model`` saved by loco.export, then converted by main() with --format hf."""
    src = export(model, tmp_path / "model.safetensors", {"run_id": "t", "step": 7})
    out = tmp_path / name
    assert export_main([str(src), "--format", "hf", str(out)]) == 0
    return out


@pytest.mark.parametrize("size", sorted(SIZES))
def test_transformers_computes_the_same_logits(size, tmp_path, capsys):
    cfg = SIZES[size]
    model = random_gpt(cfg, seed=len(size))
    out = exported(model, tmp_path)
    assert "parameters" in capsys.readouterr().out
    hf, info = transformers.GPT2LMHeadModel.from_pretrained(out, output_loading_info=True)
    assert not any(info.values()), info  # no missing, unexpected or mismatched weights
    hf.eval()
    assert hf.lm_head.weight.data_ptr() == hf.transformer.wte.weight.data_ptr()  # tied
    torch.manual_seed(0)
    x = torch.randint(0, cfg.vocab_size, (3, cfg.seq_len))
    with torch.no_grad():
        diff = (hf(x).logits - model(x)).abs().max().item()
        short = (hf(x[:, :5]).logits - model(x[:, :5])).abs().max().item()
    print(f"{size}: max |logits difference| {diff:.3g}")
    assert diff <= 1e-4 and short <= 1e-4
    conf = json.loads((out / "config.json").read_text())
    assert conf["n_inner"] == cfg.mlp_ratio * cfg.d_model and conf["n_positions"] == cfg.seq_len
    assert 0 <= conf["eos_token_id"] < cfg.vocab_size and conf["tie_word_embeddings"]
    assert json.loads((out / MARKER).read_text())["gpt_config"]["bias"] == cfg.bias


def test_a_byte_model_carries_a_byte_tokenizer(tmp_path):
    out = exported(random_gpt(SIZES["bytes-no-bias"], 0), tmp_path)
    tok = transformers.AutoTokenizer.from_pretrained(out)
    text = "def f(x):\n    return 'héllo 🙂'\x00\n"
    ids = tok(text)["input_ids"]
    assert ids == list(text.encode()) and tok.decode(ids) == text
    assert "bytes" in (out / "README.md").read_text()
    assert json.loads((out / "config.json").read_text())[
        "eos_token_id"
    ] == byte_tokenizer().byte_id(0)


def test_a_model_without_a_known_tokenizer_has_none(tmp_path):
    out = exported(random_gpt(SIZES["bias"], 0), tmp_path)  # vocabulary 300, no run: unknown
    assert not (out / "tokenizer.json").exists()
    assert json.loads((out / MARKER).read_text())["tokenizer"] is None


def test_an_export_directory_is_replaced_other_directories_are_refused(tmp_path, capsys):
    model = random_gpt(SIZES["bytes-no-bias"], 1)
    out = exported(model, tmp_path)
    first = (out / "model.safetensors").read_bytes()
    with torch.no_grad():
        model.wte.weight.add_(1.0)
    export(model, tmp_path / "model.safetensors")
    assert export_main([str(tmp_path / "model.safetensors"), "--format", "hf", str(out)]) == 0
    assert (out / "model.safetensors").read_bytes() != first  # an earlier export: replaced
    capsys.readouterr()
    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    (tmp_path / "a_file").write_text("x")
    src = str(tmp_path / "model.safetensors")
    mistakes = {
        "not a loco export": [src, "--format", "hf", str(other)],
        "not a directory": [src, "--format", "hf", str(tmp_path / "a_file")],
        "invalid choice": [src, "--format", "onnx", str(tmp_path / "x")],
        "does not exist": [str(tmp_path / "missing"), "--format", "hf"],
        "is an exported file already": [src],
        "not a readable exported model": [str(tmp_path / "a_file"), "--format", "hf"],
    }
    for match, argv in mistakes.items():
        assert status_of(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("loco.export: error: ") and err.count("\n") == 1, err
        assert match in err, err
    assert [p.name for p in other.iterdir()] == ["notes.txt"]
    assert load_exported(src)[0].cfg == model.cfg


def status_of(argv: list[str]) -> int:
    """export's main(argv) status, argparse's own exit included."""
    try:
        return export_main(argv)
    except SystemExit as e:
        return int(e.code or 0)
