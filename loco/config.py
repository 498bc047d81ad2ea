"""Structured configuration: dataclasses registered in Hydra's ConfigStore, and validation.

``conf/config.yaml`` and its groups are validated against ``LocoConfig``: an unknown key or a
value of the wrong type is rejected by Hydra/OmegaConf, a bad value by the ``__post_init__``
checks below. Either way :func:`compose` raises :class:`ConfigError` with one line that names
the key and what is allowed. Library classes never see these dataclasses: :mod:`loco.build`
maps them onto plain keyword arguments in one place.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from loco.gossip.options import GossipOptions
from loco.model.moe import MoEOptions
from loco.outer.methods import CONSENSUS
from loco.outer.offset_code import NAMES as OFFSET_CODES
from loco.outer.round import MERGES
from loco.outer.sliced import REDUCES as DILOCO_REDUCES
from loco.outer.sliced import SlicedOptions

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
# outer.phi_lattice_block: powers of two from the frames' size bound's block up
LATTICE_BLOCKS = (256, 512, 1024, 2048, 4096)


class ConfigError(ValueError):
    """A user configuration error; ``str()`` is the single line shown to the user."""


def _choice(key: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise ConfigError(
            f"{key}={value!r} is not allowed; choose one of: {', '.join(map(str, allowed))}"
        )


def _positive(key: str, value: float, zero_ok: bool = False) -> None:
    if value < 0 or (value == 0 and not zero_ok):
        raise ConfigError(f"{key}={value} must be {'>= 0' if zero_ok else '> 0'}")


def _fraction(key: str, value: float, lo_open: bool = False, hi_open: bool = True) -> None:
    ok = (value > 0 if lo_open else value >= 0) and (value < 1 if hi_open else value <= 1)
    if not ok:
        raise ConfigError(
            f"{key}={value} must be in {'(' if lo_open else '['}0, 1{')' if hi_open else ']'}"
        )


# Allowed names come from the library registries (codecs, model sizes, outer methods), in their
# order. Those modules pull in torch; they are imported on first validation (``register()``
# below validates the defaults).
_REGISTRIES = {
    "MODEL_SIZES": ("loco.model", "MODEL_SIZES"),
    "CODECS": ("loco.compress.codecs", "CODECS"),
    "OUTER_METHODS": ("loco.outer.methods", "OUTER_METHODS"),
}


def _names(registry: str) -> tuple[str, ...]:
    """The names of a library registry (``MODEL_SIZES``, ``CODECS`` or ``OUTER_METHODS``)."""
    import importlib

    module, attr = _REGISTRIES[registry]
    return tuple(getattr(importlib.import_module(module), attr))


@dataclass
class MoeConfig(MoEOptions):
    """Mixture-of-experts options (``model.moe.*``, used by the ``moe-*`` sizes): ``experts``
    per MoE layer (one every ``every`` blocks), top-``k`` gating (1: Switch, 2: GShard),
    ``capacity_factor`` (places per expert = factor * k * tokens / experts, at least
    ``min_capacity``; the rest is dropped), the load-balancing and router z-loss coefficients,
    ``residual`` (DeepSpeed-MoE's residual MoE: a dense MLP plus one expert), ``pyramid``
    (experts of the MoE layers in the second half; 0: ``experts``; with ``residual``:
    DeepSpeed-MoE's PR-MoE) and ``ep``, the ranks that share the experts (None: site.nproc; it
    must divide site.nproc and the experts of every layer). Defaults: ``MoEOptions``'."""

    ep: int | None = None

    def __post_init__(self) -> None:
        if self.ep is not None:
            _positive("model.moe.ep", self.ep)
        try:
            super().__post_init__()
        except ValueError as e:
            raise ConfigError(str(e)) from e

    def options(self) -> MoEOptions:
        """The layers' options (these without ``ep``)."""
        return MoEOptions(**{f.name: getattr(self, f.name) for f in fields(MoEOptions)})


@dataclass
class ModelConfig:
    """Model architecture. ``size`` picks a preset; the other fields override it."""

    size: str = "tiny"
    vocab_size: int | None = None  # None: the data's vocabulary (256 for bytes)
    n_layer: int | None = None
    n_head: int | None = None
    d_model: int | None = None
    dropout: float = 0.0
    moe: MoeConfig = field(default_factory=MoeConfig)

    def __post_init__(self) -> None:
        _choice("model.size", self.size, _names("MODEL_SIZES"))
        for k in ("vocab_size", "n_layer", "n_head", "d_model"):
            v = getattr(self, k)
            if v is not None:
                _positive(f"model.{k}", v)
        _fraction("model.dropout", self.dropout)


@dataclass
class DataConfig:
    """Training corpus and its per-site sharding.

    ``source``: ``stdlib`` (the running interpreter's standard library source, bytes),
    ``text`` (a UTF-8 text file at ``path``, bytes) or ``bin`` (a nanoGPT-style uint16 token
    file at ``path``; ``val_path`` optional). ``split``: ``iid`` (chunks dealt to shards at
    random) or ``noniid`` (whole top-level packages per shard). ``tokenizer``: ``bytes``
    (vocabulary 256) or ``bpe`` (a byte-level BPE of ``vocab_size`` tokens, default 8192,
    trained on the text corpus once and cached; not for ``bin``).
    """

    source: str = "stdlib"
    path: str | None = None
    val_path: str | None = None
    val_fraction: float = 0.05
    split: str = "iid"
    num_shards: int = 3
    chunk_tokens: int = 16384
    cache_dir: str | None = None
    tokenizer: str = "bytes"
    vocab_size: int | None = None  # tokenizer=bpe: its vocabulary (None: 8192)

    def __post_init__(self) -> None:
        _choice("data.source", self.source, ("stdlib", "text", "bin"))
        _check_tokenizer(self)
        _choice("data.split", self.split, ("iid", "noniid"))
        if self.source in ("text", "bin") and not self.path:
            raise ConfigError(
                f"data.path is required with data.source={self.source}; set data.path=FILE"
            )
        _fraction("data.val_fraction", self.val_fraction, lo_open=True)
        _positive("data.num_shards", self.num_shards)
        _positive("data.chunk_tokens", self.chunk_tokens)


def _check_tokenizer(d: DataConfig) -> None:
    from loco.data.tokenizer import MAX_VOCAB, MIN_BPE_VOCAB

    _choice("data.tokenizer", d.tokenizer, ("bytes", "bpe"))
    if d.tokenizer == "bytes" and d.vocab_size is not None:
        raise ConfigError(
            f"data.vocab_size={d.vocab_size} is the size of a BPE; add data.tokenizer=bpe or "
            "drop data.vocab_size (byte tokens have 256)"
        )
    if d.tokenizer == "bpe" and d.source == "bin":
        raise ConfigError(
            "data.tokenizer=bpe needs text (data.source=stdlib or text); a .bin file holds "
            "token ids already: drop data.tokenizer"
        )
    if d.vocab_size is not None and not MIN_BPE_VOCAB <= d.vocab_size <= MAX_VOCAB:
        raise ConfigError(
            f"data.vocab_size={d.vocab_size} must be in {MIN_BPE_VOCAB}..{MAX_VOCAB} "
            "(the 256 bytes, some merges; ids are stored in 16 bits)"
        )


@dataclass
class TrainConfig:
    """Inner training loop. ``batch_size`` is sequences per rank per micro-step."""

    steps: int = 600
    batch_size: int = 16
    seq_len: int = 128
    grad_accum: int = 1
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 30
    grad_clip: float = 1.0
    eval_every: int = 100
    eval_batches: int = 8
    seed: int = 1337
    log_every: int = 10
    threads: int = 0  # torch intra-op threads per rank; 0: cores / nproc
    progress: bool = True
    tensorboard: bool = True  # TensorBoard events in <site run dir>/tensorboard/ (rank 0)

    def __post_init__(self) -> None:
        for k in (
            "steps",
            "batch_size",
            "seq_len",
            "grad_accum",
            "eval_every",
            "eval_batches",
            "log_every",
        ):
            _positive(f"train.{k}", getattr(self, k))
        _positive("train.lr", self.lr)
        _fraction("train.min_lr_ratio", self.min_lr_ratio, hi_open=False)
        _positive("train.warmup_steps", self.warmup_steps, zero_ok=True)
        _positive("train.grad_clip", self.grad_clip, zero_ok=True)
        _positive("train.threads", self.threads, zero_ok=True)
        if self.seed < 0:
            raise ConfigError(f"train.seed={self.seed} must be >= 0")


@dataclass
class OptimConfig:
    """Inner optimizer: ``adamw`` or ``sgd`` (with momentum)."""

    name: str = "adamw"
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    momentum: float = 0.9
    nesterov: bool = False

    def __post_init__(self) -> None:
        _choice("optim.name", self.name, ("adamw", "sgd"))
        _positive("optim.weight_decay", self.weight_decay, zero_ok=True)
        _fraction("optim.beta1", self.beta1)
        _fraction("optim.beta2", self.beta2)
        _positive("optim.eps", self.eps)
        _fraction("optim.momentum", self.momentum)


@dataclass
class SiteConfig:
    """One site (data center): its ranks, address, device and data shard."""

    name: str = MISSING
    listen: str = "127.0.0.1:29400"
    nproc: int = 1
    device: str = "cpu"
    shard: int = 0
    peers: list[str] = field(default_factory=list)
    advertise: str = ""  # this machine's host when the site's ranks span machines ('' derives it)

    def __post_init__(self) -> None:
        if self.advertise and not re.fullmatch(r"[A-Za-z0-9._-]{1,253}|\[[0-9A-Fa-f:.]{2,45}\]",
                                               self.advertise):  # fmt: skip
            raise ConfigError(
                f"site.advertise={self.advertise!r} must be this machine's host name or address, "
                "without a port (an IPv6 address in [brackets]), or empty to derive it"
            )
        if not re.fullmatch(r"[a-z][a-z0-9_-]{0,31}", self.name):
            raise ConfigError(f"site.name={self.name!r} must be lowercase letters, digits, - or _")
        m = re.fullmatch(r"(.+):(\d+)", self.listen)
        if not m or not 0 < int(m.group(2)) < 65536:
            raise ConfigError(
                f"site.listen={self.listen!r} must be HOST:PORT with a port in 1..65535"
            )
        _positive("site.nproc", self.nproc)
        _choice("site.device", self.device, ("cpu", "cuda", "auto"))
        _positive("site.shard", self.shard, zero_ok=True)


@dataclass
class ZeroConfig:
    """The ZeRO engine inside a site (stage 0 = replicated, all-reduced gradients)."""

    stage: int = 0
    bucket_mb: float = 25.0
    reduce_dtype: str = "fp32"
    mixed_precision: str = "fp32"
    activation_checkpointing: bool = False
    # false | cpu (ZeRO-Offload, GPU runs; true means cpu) | nvme (ZeRO-Infinity: masters and
    # moments in files under nvme_dir, the step streamed in parts; any device)
    offload: bool | str = False
    nvme_dir: str = ""  # the NVMe tier's folder (scratch files; a local disk for O_DIRECT)
    nvme_part_mb: float = 16.0  # fp32 MiB per streamed part of the tier's optimizer step
    offload_params: str = "none"  # none | nvme: stage 3's parameter shard on the tier too
    collective: str = "auto"  # how stages 1-3 reduce gradients: auto | reduce | allreduce
    prefetch: bool = True  # stage 3 gathers the next block ahead of use
    max_inflight: int = 2  # stage 2-3 gradient buckets in flight

    def __post_init__(self) -> None:
        _choice("zero.stage", self.stage, (0, 1, 2, 3))
        _choice("zero.collective", self.collective, ("auto", "reduce", "allreduce"))
        _positive("zero.max_inflight", self.max_inflight)
        _positive("zero.bucket_mb", self.bucket_mb)
        _choice("zero.reduce_dtype", self.reduce_dtype, ("fp32", "bf16"))
        _choice("zero.mixed_precision", self.mixed_precision, ("fp32", "bf16"))
        mode = self.offload.lower() if isinstance(self.offload, str) else self.offload
        _choice("zero.offload", mode, (False, True, "false", "true", "cpu", "nvme"))
        _positive("zero.nvme_part_mb", self.nvme_part_mb)
        if mode == "nvme" and not self.nvme_dir:
            raise ConfigError(
                "zero.offload=nvme needs zero.nvme_dir=<folder on a local NVMe disk> (scratch)"
            )
        _choice("zero.offload_params", self.offload_params, ("none", "nvme"))
        if self.offload_params == "nvme" and (mode != "nvme" or self.stage != 3):
            raise ConfigError("zero.offload_params=nvme needs zero.stage=3 and zero.offload=nvme")


@dataclass
class OuterConfig(SlicedOptions):
    """The outer step between sites (the updates: loco/outer/methods.py, docs/outer.md).
    ``diloco_reduce``: how DiLoCo's mean travels (``loco.outer.sliced.SlicedOptions``)."""

    method: str = "noloco"
    H: int = 50
    # the lengths of the first rounds, then every round is H: [10,10,10,20] (docs/outer.md)
    H_first: list[int] = field(default_factory=list)
    # the paper's values; conf/outer/noloco.yaml (the default) sets NoLoCo's best measured form
    # (alpha 0.9, gamma 1.0, weights, nesterov, final average), noloco-spec.yaml these
    alpha: float = 0.5
    beta: float = 0.7
    gamma: float = 0.7
    lr: float = 0.7  # diloco outer SGD learning rate
    momentum: float = 0.9  # diloco outer momentum
    # Nesterov look-ahead; null: the method's own (diloco: true, noloco/local: false, the spec)
    nesterov: bool | None = None
    # noloco: where the gamma pull acts: "momentum" (the spec), "weights" (phi directly),
    # "lookahead" (phi directly, toward the mean of the members' phi + c m: a pair ends on one phi)
    # or "stepped" (each member steps on its own delta; the group averages the stepped phis and
    # no delta travels)
    consensus: str = "momentum"
    tau: int = 0  # streaming overlap: inner steps the pull may run behind (0 = blocking)
    mix: float = 0.5
    # how an overlapped round (tau, fragment_tau) lands: "mix" (theta <- mix theta_local +
    # (1 - mix) phi) or "carry" (theta <- phi + the overlap's own inner progress)
    merge: str = "carry"
    # streaming fragments: F pieces of the flat space, one synced every H / F steps (1: rounds)
    fragments: int = 1
    # overlap of one fragment's sync in inner steps, < H / F; null: H / F - 1 (docs/outer.md)
    fragment_tau: int | None = None
    # noloco: the sites pair up in each of the first meet_first rounds, then every meet_every
    # rounds counted back from the last (T, T - meet_every, ...); between, each steps alone
    meet_every: int = 1
    meet_first: int = 0
    join_timeout_s: float = 60.0  # at start, wait this long for every peer site to be live
    phi_lattice: bool = False  # send phi modulo-quantized next to the receiver's phi (~1.1 B/value)
    # lattice grid steps per largest outer-momentum value of a block: larger = finer, narrower
    phi_lattice_window: float = 8.0
    # lattice bits per value (2-8); below 8 the grid follows the partner spread last observed
    phi_lattice_bits: int = 8
    phi_lattice_margin: float = 8.0  # window = margin x the largest partner difference seen
    phi_every: int = 1  # lattice: send phi every N rounds (the others keep their own phi)
    # lattice: the grid over every 256-value block's rotated coordinates (randomized Hadamard)
    phi_lattice_rotate: bool = False
    # lattice: bits of a frame sized by the 8-bit momentum rule's window (no partner seen yet)
    phi_fallback_bits: int = 8
    # noloco: the lattice phi of whole rounds travels by sequential landing (one phi frame
    # per group, the others' offsets back, one landing point: loco/outer/landing.py); with
    # phi_lattice=false, fragments > 1 or phi_every > 1 the two-way exchange runs instead,
    # and other methods move no phi (loco.build.lands)
    phi_landing: bool = False
    phi_landing_bits: int = 8  # the leader's lattice bits under the landing (2-8)
    # the leader's window under the landing: margin x the largest partner difference seen
    phi_landing_margin: float = 8.0
    # history | sketch | scaled (the history's profile at the sketches' distance; phi_sketch.py)
    phi_landing_window: str = "history"
    # sketch: the window also covers this many times the rms difference the sketches estimate
    phi_landing_sketch_margin: float = 5.0
    # the followers' offsets: a loco.compress codec (not none) or normal1/2/3/4 (offset_code.py)
    phi_landing_codec: str = "ternary"
    # the run's last phi_landing_last_meetings meetings (their landings' misses are in the
    # weights the final average starts from): the leader's lattice bits (0: phi_landing_bits)
    # and the offsets' code ("": phi_landing_codec)
    phi_landing_last_bits: int = 0
    phi_landing_last_codec: str = ""
    phi_landing_last_meetings: int = 1
    # values per block of the lattice phi frames, their sketches and the landing's offsets
    phi_lattice_block: int = 256
    final_average: bool = False  # noloco: after the last step, average the weights over all sites
    # the final average's weights as an 8-bit lattice frame (~1.02 B/value a peer); false: raw fp32
    final_lattice: bool = True

    def __post_init__(self) -> None:
        _choice("outer.method", self.method, _names("OUTER_METHODS"))
        _positive("outer.H", self.H)
        _fraction("outer.alpha", self.alpha)
        _positive("outer.beta", self.beta, zero_ok=True)
        _positive("outer.gamma", self.gamma, zero_ok=True)
        _positive("outer.lr", self.lr)
        _fraction("outer.momentum", self.momentum)
        _positive("outer.tau", self.tau, zero_ok=True)
        _fraction("outer.mix", self.mix, hi_open=False)
        _choice("outer.merge", self.merge, MERGES)
        if self.tau >= self.H:
            raise ConfigError(f"outer.tau={self.tau} must be < outer.H={self.H}")
        self._check_fragments()
        self._check_meetings()
        self._check_H_first()
        self._check_diloco_reduce()
        _positive("outer.join_timeout_s", self.join_timeout_s, zero_ok=True)
        for key in ("phi_lattice", "phi_lattice_rotate"):
            if not isinstance(getattr(self, key), bool):
                raise ConfigError(f"outer.{key}={getattr(self, key)!r} must be true or false")
        if self.nesterov is not None and not isinstance(self.nesterov, bool):
            raise ConfigError(f"outer.nesterov={self.nesterov!r} must be true, false or null")
        _choice("outer.consensus", self.consensus, CONSENSUS)
        _positive("outer.phi_lattice_window", self.phi_lattice_window)
        if not 2 <= self.phi_lattice_bits <= 8:
            raise ConfigError(f"outer.phi_lattice_bits={self.phi_lattice_bits} must be in 2..8")
        _positive("outer.phi_lattice_margin", self.phi_lattice_margin)
        if not 2 <= self.phi_fallback_bits <= 8:
            raise ConfigError(f"outer.phi_fallback_bits={self.phi_fallback_bits} must be in 2..8")
        _positive("outer.phi_every", self.phi_every)
        self._check_landing()
        for key in ("final_average", "final_lattice"):
            if not isinstance(getattr(self, key), bool):
                raise ConfigError(f"outer.{key}={getattr(self, key)!r} must be true or false")

    def _check_landing(self) -> None:
        if not isinstance(self.phi_landing, bool):
            raise ConfigError(f"outer.phi_landing={self.phi_landing!r} must be true or false")
        if not 2 <= self.phi_landing_bits <= 8:
            raise ConfigError(f"outer.phi_landing_bits={self.phi_landing_bits} must be in 2..8")
        _positive("outer.phi_landing_margin", self.phi_landing_margin)
        _choice("outer.phi_landing_window", self.phi_landing_window,
                ("history", "sketch", "scaled"))  # fmt: skip
        _positive("outer.phi_landing_sketch_margin", self.phi_landing_sketch_margin)
        codecs = tuple(c for c in _names("CODECS") if c != "none") + tuple(OFFSET_CODES)
        _choice("outer.phi_landing_codec", self.phi_landing_codec, codecs)
        if self.phi_landing_last_bits and not 2 <= self.phi_landing_last_bits <= 8:
            raise ConfigError(f"outer.phi_landing_last_bits={self.phi_landing_last_bits} must "
                              "be 0 (as outer.phi_landing_bits) or in 2..8")  # fmt: skip
        m = self.phi_landing_last_meetings
        if isinstance(m, bool) or not isinstance(m, int) or m < 0:
            raise ConfigError(f"outer.phi_landing_last_meetings={m!r} must be a whole number >= 0")
        if self.phi_landing_last_codec:
            _choice("outer.phi_landing_last_codec", self.phi_landing_last_codec, codecs)
        b = self.phi_lattice_block
        if isinstance(b, bool) or not isinstance(b, int) or b not in LATTICE_BLOCKS:
            raise ConfigError(f"outer.phi_lattice_block={b!r} must be one of {LATTICE_BLOCKS}")

    def _check_meetings(self) -> None:
        from loco.outer.schedule import Meetings

        try:  # the timetable's own checks of its counts
            Meetings(every=self.meet_every, first=self.meet_first)
        except ValueError as e:
            raise ConfigError(str(e)) from e
        if self.meet_every > 1 and (self.method != "noloco" or self.fragments > 1):
            raise ConfigError(f"outer.meet_every={self.meet_every} applies to NoLoCo's whole "
                              "rounds; set outer.method=noloco and outer.fragments=1, or "
                              "outer.meet_every=1")  # fmt: skip

    def _check_H_first(self) -> None:
        from loco.outer.schedule import Schedule

        try:  # the outer loop's own checks of its timetable (H_first against tau, fragments)
            Schedule.make(H=self.H, steps=1, tau=self.tau, final_average=False,
                          fragments=self.fragments, fragment_tau=self.fragment_tau,
                          first=tuple(self.H_first))  # fmt: skip
        except ValueError as e:
            raise ConfigError(str(e)) from e

    def _check_diloco_reduce(self) -> None:
        _choice("outer.diloco_reduce", self.diloco_reduce, DILOCO_REDUCES)

    def _check_fragments(self) -> None:
        _positive("outer.fragments", self.fragments)
        if self.H % self.fragments:
            raise ConfigError(f"outer.fragments={self.fragments} must divide outer.H={self.H} "
                              "(a fragment syncs every H / fragments steps)")  # fmt: skip
        stride = self.H // self.fragments
        if self.fragment_tau is not None and not 0 <= self.fragment_tau < stride:
            raise ConfigError(f"outer.fragment_tau={self.fragment_tau} must be in [0, outer.H / "
                              f"outer.fragments) = [0, {stride})")  # fmt: skip
        if self.fragments > 1 and self.tau:
            raise ConfigError(f"outer.tau={self.tau} overlaps whole rounds; with outer.fragments="
                              f"{self.fragments} set outer.tau=0 and outer.fragment_tau")  # fmt: skip


@dataclass
class CompressionConfig:
    """Codec per outgoing stream: the delta and the slow weights phi."""

    codec: str = "int8"
    phi_codec: str = "none"
    # DiLoCo's sliced reduce: the codec of the slice averages an owner serves (null: ``codec``)
    mean_codec: str | None = None
    mean_error_feedback: bool = False  # the slice owner carries its average's coding error
    # DiLoCo's closing syncs at the last step (a partial last round, fragments' tails): their
    # codec, delta and slice averages, with the residual carried in (null: ``codec``'s)
    closing_codec: str | None = "int8"
    block: int = 256
    scale_dtype: str = "fp32"
    stochastic: bool = False
    error_feedback: bool = True
    ef_decay: float = 1.0  # the residual's weight before each encode (SparseLoCo's beta)
    topk_fraction: float = 0.1
    sparse_k: int = 64  # sparse: values sent per chunk of compression.block values
    sparse_bits: int = 2  # sparse: bits per sent value (sign + magnitude), 1..4

    def __post_init__(self) -> None:
        codecs = _names("CODECS")
        _choice("compression.codec", self.codec, codecs)
        _choice("compression.phi_codec", self.phi_codec, codecs)
        if self.mean_codec is not None:
            _choice("compression.mean_codec", self.mean_codec, codecs)
        if self.closing_codec is not None:
            _choice("compression.closing_codec", self.closing_codec, codecs)
        _positive("compression.block", self.block)
        _choice("compression.scale_dtype", self.scale_dtype, ("fp32", "fp16"))
        _fraction("compression.topk_fraction", self.topk_fraction, lo_open=True, hi_open=False)
        _fraction("compression.ef_decay", self.ef_decay, lo_open=False, hi_open=False)
        used = (self.codec, self.phi_codec, self.mean_codec, self.closing_codec)
        if "topk" in used:
            from loco.compress import make_codec
            from loco.outer.exchange import codec_options

            opts = codec_options(
                "topk",
                block=self.block,
                scale_dtype=self.scale_dtype,
                stochastic=self.stochastic,
                topk_fraction=self.topk_fraction,
            )
            try:
                make_codec("topk", **opts)
            except ValueError as e:
                raise ConfigError(
                    f"compression.block={self.block} with compression.topk_fraction="
                    f"{self.topk_fraction:g} is not a valid top-k layout ({e}); raise "
                    "compression.topk_fraction or lower compression.block"
                ) from None
        if "sparse" in used:
            self._check_sparse()
        if self.stochastic:
            from loco.compress import CODECS

            c = next((c for c in used if c and CODECS[c].deterministic), None)
            if c is not None:
                raise ConfigError(f"compression.stochastic=true does not apply to the {c} codec "
                                  "(it has no rounding); set compression.stochastic=false")  # fmt: skip

    def _check_sparse(self) -> None:
        """The sparse layout of compression.block / sparse_k / sparse_bits, as the codec
        checks it, so that a bad one fails at start-up with one line."""
        from loco.compress import make_codec
        from loco.outer.exchange import codec_options

        if not 1 <= self.sparse_bits <= 4:
            raise ConfigError(f"compression.sparse_bits={self.sparse_bits} must be in 1..4")
        opts = codec_options("sparse", block=self.block, scale_dtype=self.scale_dtype,
                             stochastic=self.stochastic, topk_fraction=self.topk_fraction,
                             sparse_k=self.sparse_k, sparse_bits=self.sparse_bits)  # fmt: skip
        try:
            make_codec("sparse", **opts)
        except ValueError as e:
            raise ConfigError(
                f"compression.block={self.block} with compression.sparse_k={self.sparse_k} is "
                f"not a valid sparse layout ({e}; k is compression.sparse_k, block is "
                "compression.block)"
            ) from None


@dataclass
class GossipConfig(GossipOptions):
    """gRPC between sites (``loco.gossip``). mTLS unless ``insecure`` is set explicitly;
    plaintext on a non-loopback ``site.listen`` also needs ``insecure_public``. The keys and
    their defaults: ``loco.gossip.options.GossipOptions``."""

    def __post_init__(self) -> None:
        for k in (
            "pull_timeout_s",
            "hello_timeout_s",
            "heartbeat_s",
            "dead_after",
            "strikes",
            "ban_rounds",
            "backoff_s",
            "backoff_max_s",
            "parallel_streams",
            "keep_rounds",
            "keepalive_s",
            "max_wait_s",
            "max_streams",
            "max_streams_per_peer",
        ):
            _positive(f"gossip.{k}", getattr(self, k))
        _positive("gossip.max_retries", self.max_retries, zero_ok=True)
        if not 0 < self.chunk_bytes <= 4 << 20:
            raise ConfigError(
                f"gossip.chunk_bytes={self.chunk_bytes} must be in 1..4194304 (4 MiB)"
            )
        _choice("gossip.odd", self.odd, ("triple", "sit_out"))
        _choice("gossip.pairing", self.pairing, ("random", "hypercube"))
        _choice("gossip.membership", self.membership, ("hello", "swim"))


@dataclass
class CheckpointConfig:
    """Checkpoints under ``dir`` (relative to the site's run directory). ``every=0``: off.
    ``optimizer``: save the optimizer moments (and use them on resume); false saves 40% less
    and resumes with fresh moments. Format: docs/checkpoint.md."""

    every: int = 0
    dir: str = "checkpoints"
    keep: int = 2
    optimizer: bool = True

    def __post_init__(self) -> None:
        _positive("checkpoint.every", self.every, zero_ok=True)
        _positive("checkpoint.keep", self.keep)


@dataclass
class JoinConfig:
    """Joining a live run through FetchState (docs/checkpoint.md, "Joining a live run")."""

    serve: bool = True  # after every round publish phi and outer momentum for joining sites
    # also serve (members) / fetch (joiner) master weights and optimizer moments
    inner: bool = False
    auto: bool = True  # resume=none/latest without a checkpoint: join members already past round 0
    timeout_s: float = 300.0  # give up joining after this long (resume=peer: error; auto: fresh)
    fetch_timeout_s: float = 60.0  # deadline of one fetch from one member before trying another

    def __post_init__(self) -> None:
        _positive("join.timeout_s", self.timeout_s)
        _positive("join.fetch_timeout_s", self.fetch_timeout_s)


@dataclass
class WanConfig:
    """Emulated wide-area links between sites (used by ``loco.local``)."""

    name: str = "none"
    rtt_ms: float = 0.0
    jitter_ms: float = 0.0
    bandwidth_mbit: float = 0.0  # 0: unlimited
    loss: float = 0.0

    def __post_init__(self) -> None:
        for k in ("rtt_ms", "jitter_ms", "bandwidth_mbit"):
            _positive(f"wan.{k}", getattr(self, k), zero_ok=True)
        _fraction("wan.loss", self.loss)


@dataclass
class FederationConfig:
    """The sites ``loco.local`` starts on this machine."""

    sites: list[str] = field(default_factory=lambda: ["eu", "us", "asia"])
    nproc: list[int] = field(default_factory=list)  # ranks per site, in order ([]: site.nproc)

    def __post_init__(self) -> None:
        if self.nproc and (len(self.nproc) != len(self.sites) or min(self.nproc) < 1):
            raise ConfigError(
                f"federation.nproc={list(self.nproc)} must give one rank count >= 1 per site of "
                f"federation.sites={list(self.sites)}, or be []"
            )


@dataclass
class LocoConfig:
    run_id: str = "loco"
    resume: str = "none"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    site: SiteConfig | None = None
    zero: ZeroConfig = field(default_factory=ZeroConfig)
    outer: OuterConfig = field(default_factory=OuterConfig)
    compression: CompressionConfig = field(default_factory=CompressionConfig)
    gossip: GossipConfig = field(default_factory=GossipConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    join: JoinConfig = field(default_factory=JoinConfig)
    wan: WanConfig = field(default_factory=WanConfig)
    federation: FederationConfig = field(default_factory=FederationConfig)

    def __post_init__(self) -> None:
        _choice("resume", self.resume, ("none", "latest", "peer"))
        if not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", self.run_id):
            raise ConfigError(
                f"run_id={self.run_id!r} must be 1-64 letters, digits, '.', '-' or '_'"
            )
        _check_public_plaintext(self.gossip, self.site)
        _check_expert_parallel(self.model, self.site)


def _check_expert_parallel(model: ModelConfig, site: SiteConfig | None) -> None:
    """``model.moe.ep`` divides the site's ranks and the experts (MoE sizes only)."""
    if site is None or not model.size.startswith("moe-"):
        return
    ep = model.moe.ep or site.nproc
    if site.nproc % ep or model.moe.experts % ep or model.moe.pyramid % ep:
        raise ConfigError(
            f"model.moe.ep={ep} (unset: site.nproc) must divide site.nproc={site.nproc} and "
            f"model.moe.experts={model.moe.experts}; set model.moe.ep to a common divisor"
        )


def _check_public_plaintext(gossip: GossipConfig, site: SiteConfig | None) -> None:
    """Plaintext gossip (``gossip.insecure``) on a non-loopback ``site.listen`` needs the second
    key ``gossip.insecure_public``: anyone who reaches the port could read and pull the model."""
    if site is None or not gossip.insecure or gossip.insecure_public:
        return
    from loco.gossip.server import is_loopback_host

    if not is_loopback_host(site.listen.rpartition(":")[0]):
        raise ConfigError(
            f"gossip.insecure=true with site.listen={site.listen} (not loopback) would serve "
            "PLAINTEXT, unauthenticated gossip that anyone reaching it can read; use mTLS "
            "(gossip.cert_dir=DIR/<site>, gossip.insecure=false), a 127.0.0.1 address, or add "
            "gossip.insecure_public=true to accept that"
        )


# the sections of LocoConfig; all but train, checkpoint and join are also Hydra config groups
SECTIONS: dict[str, type] = {
    "model": ModelConfig,
    "data": DataConfig,
    "train": TrainConfig,
    "optim": OptimConfig,
    "site": SiteConfig,
    "zero": ZeroConfig,
    "outer": OuterConfig,
    "compression": CompressionConfig,
    "gossip": GossipConfig,
    "checkpoint": CheckpointConfig,
    "join": JoinConfig,
    "wan": WanConfig,
    "federation": FederationConfig,
}


def register() -> None:
    """Register the schema so that ``conf/config.yaml`` (defaults: base_config) is typed."""
    cs = ConfigStore.instance()
    cs.store(name="base_config", node=LocoConfig)
    for group, node in SECTIONS.items():
        if group not in ("train", "checkpoint", "join"):
            cs.store(group=group, name=f"base_{group}", node=node)


register()


def available(group: str) -> list[str]:
    """The option names of a config group (the yaml files in ``conf/<group>/``)."""
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def to_config(cfg: DictConfig) -> LocoConfig:
    """Turn a composed DictConfig into a validated ``LocoConfig`` (runs every check)."""
    try:
        obj = OmegaConf.to_object(cfg)
    except ConfigError:
        raise
    except Exception as e:  # OmegaConf validation errors
        raise ConfigError(explain(e)) from None
    assert isinstance(obj, LocoConfig)
    return obj


def require_site(cfg: LocoConfig) -> None:
    if cfg.site is None:
        raise ConfigError(
            f"no site given; add +site=NAME with NAME one of: {', '.join(available('site'))}"
        )


def explain(e: BaseException) -> str:
    """One line for a Hydra/OmegaConf error: the key, the problem and what is allowed."""
    if isinstance(e, ConfigError):
        return str(e)
    msg = str(e)
    cause = e.__cause__ or e.__context__
    detail = str(cause) if cause is not None else msg
    m = re.search(r"Could not find '([^/']+)/([^']+)'", msg)
    if m:
        group, name = m.groups()
        return f"unknown {group} {name!r}; choose one of: {', '.join(available(group)) or '(none)'}"
    key = re.search(r"full_key: (\S+)", detail)
    key = key.group(1) if key else None
    if key is None:
        m = re.search(r"(?:override|Could not override) '?([\w.]+)", msg)
        key = m.group(1) if m else None
    if re.search(r"Key '[^']+' not in", detail) and key:
        return f"unknown config key '{key}'; {_known_keys_hint(key)}"
    if key:
        return f"bad value for '{key}': {_first_line(detail)}"
    return _first_line(detail)


def _first_line(s: str) -> str:
    return s.strip().splitlines()[0] if s.strip() else "invalid configuration"


def _known_keys_hint(full_key: str) -> str:
    parts = full_key.split(".")
    node: Any = LocoConfig
    for p in parts[:-1]:
        fields = getattr(node, "__dataclass_fields__", {})
        if p not in fields:
            return f"top-level keys are: {', '.join(LocoConfig.__dataclass_fields__)}"
        node = SECTIONS.get(p)
        if node is None:
            break
    keys = list(getattr(node, "__dataclass_fields__", LocoConfig.__dataclass_fields__))
    where = ".".join(parts[:-1]) or "the top level"
    return f"keys of {where} are: {', '.join(keys)}"


def compose(overrides: list[str] | None = None, need_site: bool = True) -> LocoConfig:
    """Compose ``conf/config.yaml`` with ``overrides`` as Hydra would, and validate it.

    Raises :class:`ConfigError` with one line on any problem. Hydra-only overrides
    (``hydra.*``, ``hydra/...``) are ignored here.
    """
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    ov = [o for o in (overrides or []) if not o.lstrip("+~").startswith("hydra")]
    if need_site and not any(re.match(r"\+?site=", o) for o in ov):
        require_site(LocoConfig())
    if GlobalHydra.instance().is_initialized():
        GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
            cfg = hydra_compose(config_name="config", overrides=ov)
    except ConfigError:
        raise
    except Exception as e:
        raise ConfigError(explain(e)) from None
    out = to_config(cfg)
    if need_site:
        require_site(out)
    return out
