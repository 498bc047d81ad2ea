"""Subword tokens (``data.tokenizer=bpe``): training, round trips, the caches, hostile files,
bits per byte, and a real run exported to Hugging Face and sampled."""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from loco.data import SiteData
from loco.data import tokenizer as T
from loco.data.corpus import bpe_corpus, load_corpus, text_corpus
from loco.trainer import Trainer
from tests.workers import ROOT, run_worker

WORDS = ("the model trains on text while sites gossip over the network and average their "
         "weights every round déjà vu naïve 東京 🙂 def return self").split()  # fmt: skip


def make_text(n_words: int, seed: int = 0) -> str:
    rng = random.Random(seed)
    lines, line = [], []
    for _ in range(n_words):
        line.append(rng.choice(WORDS))
        if rng.random() < 0.1:
            lines.append(" ".join(line) + ("." if rng.random() < 0.5 else ":"))
            line = []
    return "\n".join(lines) + "\n"


def random_text(rng: random.Random, n: int) -> str:
    """Any code points but surrogates: controls, NUL, combining marks, astral planes."""
    out = []
    for _ in range(n):
        cp = rng.choice([rng.randrange(0, 128), rng.randrange(128, 0xD800),
                         rng.randrange(0xE000, 0x110000)])  # fmt: skip
        out.append(chr(cp))
    return "".join(out)


@pytest.fixture(scope="module")
def bpe() -> T.Tokenizer:
    return T.train_bpe([make_text(4000)], 400)


def test_byte_alphabet_is_the_one_of_the_tokenizers_library():
    from tokenizers.pre_tokenizers import ByteLevel

    alpha = T.byte_alphabet()
    assert len(set(alpha)) == 256 and set(alpha) == set(ByteLevel.alphabet())
    split = ByteLevel(add_prefix_space=False, use_regex=False)
    for b in range(128):
        assert split.pre_tokenize_str(chr(b))[0][0] == alpha[b]
    assert split.pre_tokenize_str("é")[0][0] == alpha[0xC3] + alpha[0xA9]


def test_bpe_round_trips_any_text_and_every_byte(bpe):
    assert 256 < bpe.vocab_size <= 400 and bpe.token_bytes.max() > 1
    rng = random.Random(1)
    for n in (0, 1, 7, 300, 3000):
        text = random_text(rng, n)
        ids = bpe.encode(text)
        assert bpe.decode_bytes(ids) == text.encode("utf-8")
        assert bpe.decode(ids) == text
        assert int(bpe.token_bytes[ids].sum()) == len(text.encode("utf-8"))
    common = make_text(300, seed=7)
    assert len(bpe.encode(common)) < 0.6 * len(common.encode())  # merges do compress
    # any byte string, valid UTF-8 or not, is a sequence of single-byte tokens
    raw = bytes(range(256)) + os.urandom(500)
    assert bpe.decode_bytes(bpe.byte_id(b) for b in raw) == raw
    assert bpe.decode([bpe.byte_id(0xE6)]) == "\ufffd"  # a cut UTF-8 sequence
    # the file format round-trips what tokens mean
    again = T.from_json(bpe.to_json())
    assert again.sha256 == bpe.sha256 and again.encode(common) == bpe.encode(common)


def test_byte_tokens_are_the_bytes():
    tok = T.byte_tokenizer()
    text = "héllo\x00 🙂"
    assert tok.encode(text) == list(text.encode()) and tok.vocab_size == 256
    assert tok.decode(tok.encode(text)) == text and (tok.token_bytes == 1).all()
    assert tok.backend().encode(text).ids == list(text.encode())  # the HF file's ids too


def test_training_is_deterministic(bpe):
    assert T.train_bpe([make_text(4000)], 400).sha256 == bpe.sha256
    with pytest.raises(T.TokenizerError, match="257..65536"):
        T.train_bpe(["abc"], 256)


def _doc(bpe: T.Tokenizer) -> dict:
    return json.loads(bpe.to_json())


def _edit(fn):
    def make(bpe):
        d = _doc(bpe)
        fn(d)
        return json.dumps(d).encode()

    return make


HOSTILE = {
    "not json": (lambda b: b.to_json()[:-9], "not JSON"),
    "a list": (lambda b: b"[1, 2]", "not a loco tokenizer"),
    "other format": (_edit(lambda d: d.update(format="x")), "not a loco tokenizer"),
    "future version": (_edit(lambda d: d.update(version=2)), "reads version 1"),
    "checksum": (_edit(lambda d: d["merges"].reverse()), "checksum"),  # well formed, other ranks
    "bad char": (_edit(lambda d: d["vocab"].__setitem__(300, "\u4e00")), "byte-alphabet"),
    "empty token": (_edit(lambda d: d["vocab"].__setitem__(300, "")), "byte-alphabet"),
    "no byte": (_edit(lambda d: d["vocab"].__setitem__(0, d["vocab"][300])), "repeats"),
    "bad merge": (_edit(lambda d: d["merges"].__setitem__(0, ["a", "zzz"])), "merge"),
    "merge shape": (_edit(lambda d: d["merges"].__setitem__(0, "a b")), "merge"),
    "vocab type": (_edit(lambda d: d.update(vocab={"a": 1})), "list of"),
    "too big": (lambda b: b" " * (T.MAX_FILE_BYTES + 1), "over the"),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_a_hostile_file_is_one_clear_error(bpe, case, tmp_path):
    make, match = HOSTILE[case]
    data = make(bpe)
    with pytest.raises(T.TokenizerError, match=match):
        T.from_json(data)
    if case != "too big":
        (tmp_path / "t.json").write_bytes(data)
        with pytest.raises(T.TokenizerError, match=match) as e:
            T.load(tmp_path / "t.json")
        assert "\n" not in str(e.value)


def test_the_cache_is_reused_and_a_corrupt_one_rebuilt(tmp_path):
    calls = []

    def texts():
        calls.append(1)
        return [make_text(2000)]

    tok = T.cached_bpe(tmp_path, "k", 300, texts)
    path = tmp_path / "k.bpe300.json"
    stamp = path.stat().st_mtime_ns
    again = T.cached_bpe(tmp_path, "k", 300, texts)
    assert len(calls) == 1 and path.stat().st_mtime_ns == stamp and again.sha256 == tok.sha256
    for bad in (b"{trunc", path.read_bytes().replace(b'"merges": [', b'"merges": [["a", "b"], ')):
        path.write_bytes(bad)
        rebuilt = T.cached_bpe(tmp_path, "k", 300, texts)
        assert rebuilt.sha256 == tok.sha256 and T.load(path).sha256 == tok.sha256
    assert len(calls) == 3
    # a file trained for another size, renamed into place, is not trusted either
    T.cached_bpe(tmp_path, "k", 290, texts)
    shutil.copy(tmp_path / "k.bpe290.json", path)
    assert T.cached_bpe(tmp_path, "k", 300, texts).sha256 == tok.sha256 and len(calls) == 5


def test_bpe_corpus_keeps_documents_and_caches_its_tokens(tmp_path):
    txt = tmp_path / "book.txt"
    txt.write_text(make_text(6000))
    c = load_corpus("text", str(txt), cache_dir=str(tmp_path / "cache"), tokenizer="bpe",
                    bpe_vocab=400)  # fmt: skip
    assert c.tokens.dtype == np.uint16 and c.vocab_size == c.tokenizer.vocab_size <= 400
    assert c.docs[-1].end == len(c.tokens) and int(c.tokens.max()) < c.vocab_size
    assert c.tokenizer.decode_bytes(c.tokens) == txt.read_bytes()
    files = sorted((tmp_path / "cache").iterdir())
    stamps = [f.stat().st_mtime_ns for f in files]
    again = bpe_corpus(text_corpus(txt), tmp_path / "cache", 400)
    assert np.array_equal(again.tokens, c.tokens) and again.tokenizer.sha256 == c.tokenizer.sha256
    assert [f.stat().st_mtime_ns for f in sorted((tmp_path / "cache").iterdir())] == stamps
    with pytest.raises(ValueError, match="no tokenizer"):
        load_corpus("bin", str(txt), tokenizer="bpe")


class ConstantLoss(torch.nn.Module):
    def __init__(self, loss: float) -> None:
        super().__init__()
        self.loss = loss

    def forward(self, x, y):
        return torch.tensor(self.loss)


def _eval(corpus, loss: float) -> tuple[dict, SiteData]:
    data = SiteData(corpus, site="eu", shard=0, num_shards=1, split="iid", chunk_tokens=512,
                    val_fraction=0.2, seq_len=32, batch_size=3, grad_accum=1, rank=0, world=1,
                    seed=0)  # fmt: skip
    engine = SimpleNamespace(model=ConstantLoss(loss))
    tr = Trainer(engine=engine, data=data, steps=1, lr=0.1, eval_batches=4, seq_len=32)
    return tr.evaluate(), data


def test_bits_per_byte_divide_by_the_bytes_the_tokens_stand_for(tmp_path):
    txt = tmp_path / "book.txt"
    txt.write_text(make_text(6000))
    corpus = bpe_corpus(text_corpus(txt), tmp_path, 400)
    L = 1.75  # nats per token (exact in fp32)
    ev, data = _eval(corpus, L)
    ys = [data.val_batch(i)[1] for i in range(4)]
    n_tokens = sum(y.numel() for y in ys)
    n_bytes = sum(len(corpus.tokenizer.decode_bytes(y.flatten().tolist())) for y in ys)
    assert n_bytes > 1.5 * n_tokens  # BPE tokens stand for more than a byte each
    assert ev["bpb"] == pytest.approx(L * n_tokens / (n_bytes * math.log(2)), rel=1e-12)
    ev, _ = _eval(text_corpus(txt), L)  # bytes: one byte per token
    assert ev["bpb"] == pytest.approx(L / math.log(2), rel=1e-12)


RUN = [
    "+site=eu", "data=text", "data.tokenizer=bpe", "data.vocab_size=512", "data.num_shards=1",
    "data.chunk_tokens=1024", "model.n_layer=1", "model.d_model=32", "model.n_head=2",
    "train.batch_size=2", "train.seq_len=32", "train.steps=4", "train.eval_every=4",
    "train.eval_batches=2", "train.progress=false", "train.threads=1", "outer=local",
    "checkpoint.every=4",
]  # fmt: skip


def _cli(module: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)  # fmt: skip


def test_a_bpe_run_exports_to_hugging_face_and_samples(tmp_path, capsys):
    from transformers import AutoTokenizer, GPT2LMHeadModel

    from loco.export import from_checkpoint
    from loco.sample import main as sample_main

    txt = tmp_path / "book.txt"
    txt.write_text(make_text(30000))
    run = tmp_path / "run"
    p = run_worker([*RUN, f"data.path={txt}", f"data.cache_dir={tmp_path / 'cache'}"], run,
                   timeout=120)  # fmt: skip
    assert p.returncode == 0, p.stderr[-2000:]
    tok = T.load(run / T.RUN_FILE)
    assert tok.kind == "bpe" and 256 < tok.vocab_size <= 512
    evals = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    ev = [r for r in evals if r["kind"] == "eval"][-1]
    assert ev["bpb"] < ev["loss"] / math.log(2) / 1.5  # per byte: several bytes per token

    out = tmp_path / "hf"
    p = _cli("loco.export", str(run), "--format", "hf", str(out))
    assert p.returncode == 0, p.stderr
    hf_tok = AutoTokenizer.from_pretrained(out)
    text = random_text(random.Random(3), 200) + make_text(50, seed=9)
    ids = hf_tok(text)["input_ids"]
    assert ids == tok.encode(text) and hf_tok.decode(ids) == text
    model, _ = from_checkpoint(run)
    hf = GPT2LMHeadModel.from_pretrained(out).eval()
    x = torch.tensor([tok.encode(make_text(40, seed=5))[:32]])
    with torch.no_grad():
        assert (hf(x).logits - model(x)).abs().max() <= 1e-4

    def sample(src: Path) -> str:
        assert sample_main([str(src), "--prompt", "the model", "--tokens", "30",
                            "--temperature", "0"]) == 0  # fmt: skip
        return capsys.readouterr().out

    greedy = sample(run)
    assert greedy.startswith("the model") and len(greedy) > len("the model") + 30
    # the exported file carries the tokenizer: it samples the same anywhere
    p = _cli("loco.export", str(run), str(tmp_path / "m.safetensors"))
    assert p.returncode == 0, p.stderr
    lone = tmp_path / "elsewhere"
    lone.mkdir()
    shutil.move(tmp_path / "m.safetensors", lone / "m.safetensors")
    assert sample(lone / "m.safetensors") == greedy
    # without the run's tokenizer file a checkpoint is one clear error, or takes --tokenizer
    (run / T.RUN_FILE).rename(tmp_path / "tok.json")
    p = _cli("loco.sample", str(run), "--temperature", "0")
    assert p.returncode == 2 and p.stderr.count("\n") == 1, p.stderr
    assert p.stderr.startswith("loco.sample: error:") and "--tokenizer" in p.stderr
    assert sample_main([str(run), "--prompt", "the model", "--tokens", "30", "--temperature",
                        "0", "--tokenizer", str(tmp_path / "tok.json")]) == 0  # fmt: skip
    assert capsys.readouterr().out == greedy
