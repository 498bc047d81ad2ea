"""Round payloads of one rank: encode this rank's delta and phi, decode a partner's.

A rank publishes its whole shard and pulls exactly its own range (:mod:`loco.outer.shard_range`,
the geometry, the plain frames and the assembly of segments; :mod:`loco.outer.range_pull`, the
pull side: checked decoding, the lattice's counts). A stream with codec ``none``
travels raw fp32 (the partner's server slices it exactly); any other codec travels as a
self-describing ``loco.compress`` frame per owner shard, which the puller decodes and slices.

Every member of a group uses the DECODED values of every member, its own included, so all
members compute bit-identical means (the spec's step 3). The delta stream keeps an
error-feedback residual when its codec is lossy and ``error_feedback`` is on.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from loco.compress import ErrorFeedback, decode, encode
from loco.errors import TrainingError
from loco.outer import lattice, offset_code, phi_sketch
from loco.outer.range_pull import LatticeTally, RangePulls
from loco.outer.shard_range import LATTICE_BLOCK, LOSSLESS

STREAMS = ("delta", "phi")
SKETCH_STREAM = "phisk"  # the landing's phi sketch (loco.outer.phi_sketch)
__all__ = ["LATTICE_BLOCK", "LOSSLESS", "SKETCH_STREAM", "STREAMS", "LatticeTally", "Outgoing",
           "RangePayloads", "codec_options"]  # fmt: skip


def codec_options(codec: str, *, block: int, scale_dtype: str, stochastic: bool,
                  topk_fraction: float, sparse_k: int = 64,
                  sparse_bits: int = 2) -> dict[str, object]:  # fmt: skip
    """The ``loco.compress`` keyword options of ``codec`` from the ``compression.*`` keys
    (sparse: ``block`` is the chunk, ``sparse_k`` / ``sparse_bits`` its k and bits)."""
    rounding = "stochastic" if stochastic else "nearest"
    if codec == "none":
        return {}
    if codec == "bf16":
        return {"rounding": rounding}
    opts: dict[str, object] = {"block": block, "scale_dtype": scale_dtype, "rounding": rounding}
    if codec == "topk":
        opts["k"] = max(1, min(block, round(topk_fraction * block)))
    if codec == "sparse":
        opts.update(k=sparse_k, bits=sparse_bits)
    return opts


@dataclass
class Outgoing:
    """What this rank published for one round, and its own decoded values on ``[lo, hi)``."""

    round: int
    delta: torch.Tensor  # decoded own delta (what the partner will see)
    phi: torch.Tensor  # decoded own phi
    buffers: tuple  # the published buffers (kept alive until the round is evicted)
    nbytes: int  # payload bytes one puller of the whole shard receives


class RangePayloads(RangePulls):
    """Encode and decode the ``delta`` and ``phi`` streams of one rank's range.

    Args:
        shard: ``(slo, shi)``, the rank's shard of the padded flat vector (what it publishes).
        owned: ``(lo, hi)``, the shard clipped to the model's P (what it pulls and updates).
        codec, phi_codec: ``loco.compress`` codec names (``none``: raw fp32).
        delta_options, phi_options: codec options (see :func:`codec_options`).
        mean_codec, mean_options: the codec of the slice averages DiLoCo's sliced reduce
            serves (:mod:`loco.outer.sliced`) and its options; None: ``codec`` and
            ``delta_options`` (the options of another codec need ``mean_options``).
        mean_error_feedback: an owner keeps its slice average's coding error for the next.
        error_feedback: keep the delta stream's residual between rounds (lossy codecs).
        ef_decay: scale the kept residual by this before each round's encode (1: keep it all).
        seed: stochastic-rounding seed of the delta stream.
        flat_size: the padded flat size P' (bounds a received frame's length).
        phi_lattice: send phi with :mod:`loco.outer.lattice` (~1.09 bytes per value, decoded
            next to the receiver's own phi; with a partner of another rank count a block
            across a rank edge fails).
        phi_lattice_window: the lattice's grid steps per largest momentum value of a block
            (8-bit frames).
        phi_lattice_bits: lattice bits per value (2-8); the grid follows the partner spread
            last observed (:class:`loco.outer.spread.Spread`) times ``phi_lattice_margin``;
            before any observation the frame is 8-bit with the momentum rule.
        phi_every: send phi every this many rounds (rounds 1, 1 + N, ...); the other rounds
            publish a frame without values and keep their own phi (lattice only).
        phi_sketch_margin: under the landing's sketch windows, a block's window covers this
            many times the rms difference the followers' sketches estimate (at least).
        phi_lattice_rotate: lay the lattice grid over every block's rotated coordinates
            (:mod:`loco.outer.block_rotation`): windows cover a block's rms, not its largest
            value.
        phi_fallback_bits: the bits of a frame sized by the momentum rule (nothing observed
            for this group): its window stays the 8-bit rule's, cut into fewer steps.
        phi_lattice_block: values per block of the phi frames, their sketches and the
            landing's offsets (a power of two; the final average keeps ``LATTICE_BLOCK``): a
            block costs 6 bytes of the leader's frame and 4 of a follower's offsets and sketch.
    """

    def __init__(
        self,
        *,
        shard: tuple[int, int],
        owned: tuple[int, int],
        codec: str = "int8",
        phi_codec: str = "none",
        delta_options: dict[str, object] | None = None,
        phi_options: dict[str, object] | None = None,
        mean_codec: str | None = None,
        mean_options: dict[str, object] | None = None,
        mean_error_feedback: bool = False,
        error_feedback: bool = True,
        ef_decay: float = 1.0,
        seed: int = 0,
        flat_size: int | None = None,
        phi_lattice: bool = False,
        phi_lattice_window: float = 8.0,
        phi_lattice_bits: int = 8,
        phi_lattice_margin: float = 8.0,
        phi_every: int = 1,
        phi_sketch_margin: float = 5.0,
        phi_lattice_rotate: bool = False,
        phi_fallback_bits: int = 8,
        phi_lattice_block: int = LATTICE_BLOCK,
    ) -> None:
        super().__init__(shard, owned, flat_size, codec=codec,
                         phi_codec="lattice" if phi_lattice else phi_codec,
                         delta_options=delta_options, phi_options=phi_options)  # fmt: skip
        self.lattice_window = phi_lattice_window
        self.lattice_rotate, self.fallback_bits = phi_lattice_rotate, phi_fallback_bits
        self.lattice_bits, self.lattice_margin = phi_lattice_bits, phi_lattice_margin
        self.phi_every, self.sketch_margin = phi_every, phi_sketch_margin
        if phi_lattice_block < LATTICE_BLOCK or phi_lattice_block & (phi_lattice_block - 1):
            # the pulls' size bounds are the LATTICE_BLOCK frames': a smaller block exceeds them
            raise ValueError(f"phi_lattice_block={phi_lattice_block}: use a power of two "
                             f">= {LATTICE_BLOCK}")  # fmt: skip
        self.lattice_block = phi_lattice_block
        self.mean_codec = mean_codec or codec
        self.mean_options = dict(self.delta_options if mean_options is None else mean_options)
        self.mean_error_feedback = mean_error_feedback
        self.landing = None  # loco.outer.landing.Landing with outer.phi_landing (build.py)
        self._sketch_signs: torch.Tensor | None = None
        self._own_sketch: torch.Tensor | None = None  # per block, of the round's coded phi
        self.ef = (
            ErrorFeedback(
                codec, self.shi - self.slo, seed=seed, decay=ef_decay, **self.delta_options
            )
            if error_feedback and codec not in LOSSLESS
            else None
        )

    def warm_up(self) -> None:
        """Encode and decode a few values with both codecs (loads the compiled kernels)."""
        for codec, opts in ((self.codec, self.delta_options), (self.phi_codec, self.phi_options),
                            (self.mean_codec, self.mean_options)):  # fmt: skip
            if codec not in LOSSLESS and codec != "lattice":
                decode(encode(torch.zeros(512), codec, **opts))

    def encode_plain(self, x: torch.Tensor, codec: str):
        """``x`` on ``[lo, hi)`` in ``codec`` (a ``loco.compress`` codec, or one of
        :data:`loco.outer.offset_code.NAMES`) without error feedback: (buffer, label, own
        decoded values on ``[lo, hi)``)."""
        if not bool(torch.isfinite(x).all()):
            raise TrainingError("a landing offset holds NaN/Inf; refusing to publish it")
        if codec in offset_code.NAMES:
            buf, val = offset_code.encode(self._padded(x), offset_code.NAMES[codec],
                                          block=self.lattice_block)  # fmt: skip
            return buf, codec, val[: self.numel]
        return self._encode(x, codec, self._options(codec), None)

    def _encode(self, x: torch.Tensor, codec: str, opts: dict, ef: ErrorFeedback | None):
        """(published buffer, codec label, own decoded values on [lo, hi))"""
        full = self._padded(x)
        if codec in LOSSLESS:
            return full.numpy(), "raw", full[: self.numel].clone()
        buf = ef.encode(full) if ef is not None else encode(full, codec, **opts)
        return buf, codec, decode(buf)[: self.numel]

    def encode(self, round: int, delta: torch.Tensor, phi: torch.Tensor,
               momentum: torch.Tensor | None = None,
               group: tuple[str, ...] | None = None,
               send_delta: bool = True) -> tuple[Outgoing, dict]:  # fmt: skip
        """Encode both streams. Returns the record and ``{stream: (buffer, codec label)}`` to
        publish. ``group``: this site's partners this round, sorted (None: not known; the same
        group as before lets a pair with one phi keep a narrow window, :class:`Spread`).
        ``send_delta`` false: no delta stream (the record keeps the exact delta).
        TrainingError if ``delta`` or ``phi`` holds NaN/Inf (never shipped)."""
        if not bool(torch.isfinite(delta).all()) or not bool(torch.isfinite(phi).all()):
            raise TrainingError("the local delta or phi holds NaN/Inf; refusing to publish it")
        with self._lock:
            self.spread.regroup(group)
        streams: dict = {}
        if send_delta:
            dbuf, dlab, dval = self._encode(delta, self.codec, self.delta_options, self.ef)
            streams["delta"] = (dbuf, dlab)
        else:
            dbuf, dval = b"", delta.detach().float().cpu().clone()
        if self.sketched:  # the phi frame waits for the partners' sketches (leader only)
            ref = self._padded(phi)
            self._ref = ref
            self._own_sketch = phi_sketch.sketch(ref, self._signs(), self.lattice_block)
            sbuf = phi_sketch.frame(self._own_sketch, ref.numel(), self.lattice_block)
            nbytes = memoryview(dbuf).nbytes + len(sbuf)
            out = Outgoing(round, dval, ref[: self.numel].clone(), (dbuf, sbuf), nbytes)
            return out, {**streams, SKETCH_STREAM: (sbuf, "sketch")}
        if self.phi_codec == "lattice":
            pbuf, pval = self._encode_lattice(round, phi, momentum)
            plab = "lattice"
        else:
            pbuf, plab, pval = self._encode(phi, self.phi_codec, self.phi_options, None)
        nbytes = memoryview(dbuf).nbytes + memoryview(pbuf).nbytes
        out = Outgoing(round, dval, pval, (dbuf, pbuf), nbytes)
        return out, {**streams, "phi": (pbuf, plab)}

    @property
    def sketched(self) -> bool:
        """Whether the landing's leader sizes its phi window from the followers' sketches
        (``outer.phi_landing_window=sketch|scaled``): the phi frame is then encoded by
        :meth:`encode_leader` after the round's group is known, not by :meth:`encode`."""
        window = getattr(self.landing, "window", "") if self.landing is not None else ""
        return window in ("sketch", "scaled")

    def _signs(self) -> torch.Tensor:
        if self._sketch_signs is None:
            self._sketch_signs = phi_sketch.signs(self.slo, self.shi - self.slo)
        return self._sketch_signs

    def own_blocks(self, expanded: torch.Tensor, own: torch.Tensor | None = None,
                   block: int | None = None) -> torch.Tensor:  # fmt: skip
        """A partner's sketch pulled on ``[lo, hi)`` (per value), per block of this rank's
        lattice grid (``block`` values; None: the phi frames'): the value at each block's start
        (blocks that start outside ``[lo, hi)`` get this rank's own sketch, ``own`` or the
        landing's: no difference there)."""
        own = own if own is not None else self._own_sketch
        assert own is not None
        block = block or self.lattice_block
        starts = torch.arange(own.numel()) * block + self.slo - self.lo
        inside = (starts >= 0) & (starts < self.numel)
        out = own.clone()
        out[inside] = expanded[starts[inside]]
        return out

    def encode_leader(self, round: int, momentum: torch.Tensor | None,
                      sketches: list[torch.Tensor] | None) -> tuple[bytes, torch.Tensor]:  # fmt: skip
        """The landing leader's lattice frame of the phi :meth:`encode` sketched: each block's
        window covers ``sketch_margin`` times the rms difference the followers' per-block
        ``sketches`` (:meth:`own_blocks`) estimate and ``lattice_margin`` times the largest
        difference seen on the block before (the tails a rms misses), whichever is wider; by
        the history rule alone when ``sketches`` is None. Returns the frame and the own decoded
        values on [lo, hi)."""
        assert self._ref is not None and self._own_sketch is not None
        phi = self._ref[: self.numel]
        if not sketches:
            return self._encode_lattice(round, phi, momentum)
        if self.landing.window == "scaled":  # the history's profile at this round's distance
            with self._lock:
                shape = self.spread.shape
            own = self._own_sketch
            rescale = None if shape is None else (
                lambda spread: phi_sketch.scaled_spread(spread, shape, own, sketches))  # fmt: skip
            return self._encode_lattice(round, phi, momentum, rescale=rescale)
        mom = self._padded(momentum if momentum is not None else torch.zeros(self.numel))
        steps = phi_sketch.steps_from_sketches(self._ref, self._own_sketch, sketches,
                                               self._bits(round), self.lattice_block,
                                               self.sketch_margin, mom)  # fmt: skip
        return self._encode_lattice(round, phi, momentum, at_least=steps)

    def _bits(self, round: int) -> int:
        """The lattice bits of ``round``'s frame: the landing's last meetings may have more."""
        return self.landing.bits_at(round, self.lattice_bits) if self.landing else self.lattice_bits

    def _encode_lattice(self, round: int, phi: torch.Tensor, momentum: torch.Tensor | None,
                        at_least: torch.Tensor | None = None,
                        rescale: Callable[[torch.Tensor], torch.Tensor | None] | None = None,
                        ) -> tuple[bytes, torch.Tensor]:  # fmt: skip
        """The lattice frame of ``phi`` for ``round`` and own decoded values on [lo, hi). The
        grid step per block follows the partner spread seen (``rescale``: a function of its
        profile, even a stale one, that sizes the window instead unless it returns None);
        ``at_least``: no finer than these steps (alone when no spread was seen)."""
        ref = self._padded(phi)
        self._ref = ref
        if (round - 1) % self.phi_every:
            return lattice.skip_frame(ref.numel()), ref[: self.numel].clone()
        with self._lock:
            spread = self.spread.estimate()
            profile = self.spread.profile() if rescale is not None else None
        if profile is not None:  # else the history rule
            scaled = rescale(profile)
            spread = scaled if scaled is not None else spread
        bits, steps, block = self._bits(round), at_least, self.lattice_block
        mom = self._padded(momentum if momentum is not None else torch.zeros_like(phi))
        if spread is not None and spread.numel() == -(-ref.numel() // block):
            cap = lattice.window_cap(ref, mom, block)
            steps = lattice.steps_for_spread(ref, spread, bits, block, self.lattice_margin, cap)
            if at_least is not None:  # the wider of the two windows
                steps = torch.maximum(steps, at_least)
        elif steps is None:
            bits = self.fallback_bits  # nothing observed: the momentum rule's window
        buf, full = lattice.encode(ref, mom, block=block, window=self.lattice_window,
                                   bits=bits, steps=steps, rotate=self.lattice_rotate)  # fmt: skip
        return buf, full[: self.numel].clone()

    # ------------------------------------------------------------------ pulling

    def state_dict(self) -> dict[str, object]:
        return {"ef": self.ef.state_dict() if self.ef is not None else None}

    def load_state_dict(self, state: dict[str, object]) -> None:
        if self.ef is not None and state.get("ef") is not None:
            self.ef.load_state_dict(state["ef"])  # type: ignore[arg-type]
