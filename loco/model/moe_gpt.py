"""The GPT with mixture-of-experts MLPs (``model=moe-tiny``, ``model=moe-small``).

Blocks ``every-1, 2*every-1, ...`` (every other block by default) have an :class:`MoELayer` in
place of the dense MLP; everything else is :class:`~loco.model.gpt.GPT`. With k = 1 a token
uses as many parameters as in the dense model of the same size (its active parameters).

The training loss: ``forward(idx, targets)`` returns the cross-entropy whose *value* is the
dense model's (so train losses compare across models) and whose *gradient* also carries every
MoE layer's ``aux_coef * aux + z_coef * z`` (added as ``reg - reg.detach()``, exactly 0.0).
:meth:`train_metrics` returns and resets the routing figures since its last call.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import torch

from loco.model.gpt import GPT, SIZES, Block, GPTConfig
from loco.model.moe import Experts, MoELayer, MoEOptions
from loco.site_comm import SiteComm

# name -> (dense architecture); the experts come from MoEOptions
MOE_SIZES: dict[str, dict[str, int]] = {
    "moe-tiny": dict(SIZES["tiny"]),
    "moe-small": dict(SIZES["small"]),
}


class MoEBlock(Block):
    """A pre-norm block whose MLP is an :class:`MoELayer`."""

    def __init__(self, cfg: GPTConfig, opts: MoEOptions) -> None:
        super().__init__(cfg)
        self.mlp = MoELayer(cfg, opts)


class MoEGPT(GPT):
    """:class:`GPT` with MoE MLPs; ``ep`` ranks of the site share the experts (see
    :meth:`bind_site`)."""

    def __init__(self, cfg: GPTConfig, opts: MoEOptions, ep: int | None = None) -> None:
        super().__init__(cfg)
        self.moe, self.ep = opts, ep
        for i in range(opts.every - 1, cfg.n_layer, opts.every):
            self.blocks[i] = MoEBlock(cfg, opts.for_block(i, cfg.n_layer))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        super().reset_parameters()
        for layer in self.moe_layers():
            # the expert's output projection scaled like the dense one (GPT-2's residual rule)
            layer.experts.proj_weight.normal_(0.0, 0.02 / (2 * self.cfg.n_layer) ** 0.5)

    def moe_layers(self) -> list[MoELayer]:
        return [b.mlp for b in self.blocks if isinstance(b, MoEBlock)]

    def bind_site(self, comm: SiteComm) -> None:
        """Set the site's ranks: ``ep`` of them (None: all) share the experts, in consecutive
        groups. Collective (the groups are created on every rank)."""
        ep = comm.world if self.ep is None else self.ep
        if ep < 1 or comm.world % ep:
            raise ValueError(
                f"model.moe.ep={ep} must divide site.nproc={comm.world}; set model.moe.ep to a "
                "divisor of it"
            )
        for layer in self.moe_layers():
            if layer.opts.experts % ep:
                raise ValueError(
                    f"model.moe.ep={ep} must divide the experts of every MoE layer "
                    f"({layer.opts.experts})"
                )
        group = comm.subgroup(ep)
        for layer in self.moe_layers():
            layer.bind(comm, group)

    def num_params(self) -> int:
        """Distinct parameters, every expert counted (a ZeRO stage-3 engine leaves a rank's
        stacked expert parameters holding only its own experts: ``expert_rows``)."""
        seen: set[int] = set()
        n = 0
        for module in self.modules():
            for p in module.parameters(recurse=False):
                if id(p) not in seen:
                    seen.add(id(p))
                    whole = isinstance(module, Experts) and p.shape[0] != module.experts
                    n += p.numel() * module.experts // p.shape[0] if whole else p.numel()
        return n

    def expert_rows(self, world: int) -> dict[str, list[tuple[int, int]]]:
        """The experts each of the site's ``world`` ranks computes, per stacked parameter
        (``{name: [(lo, hi) per rank]}``; empty when every rank computes every expert). The
        ZeRO engine keeps only a rank's own at stage 3 (``loco.engine.experts``)."""
        out: dict[str, list[tuple[int, int]]] = {}
        for name, module in self.named_modules():
            if not isinstance(module, Experts) or module.comm.world == 1:
                continue
            rows = [module.rows(r) for r in range(world)]
            for pname, p in module.named_parameters(recurse=False):
                if p.requires_grad:
                    out[f"{name}.{pname}"] = rows
        return out

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        out = super().forward(idx, targets)
        regs = [m.regulariser for m in self.moe_layers() if m.regulariser is not None]
        if targets is None or not regs:
            return out
        reg = torch.stack(regs).sum().to(out.dtype)
        return out + (reg - reg.detach())

    def train_metrics(self) -> dict[str, float]:
        """The site's routing since the last call, over the MoE layers: ``moe_aux_loss`` and
        ``moe_z_loss`` (means per layer forward), ``moe_drop_frac`` (dropped / assignments)
        and ``moe_load_<e>`` (expert e's share of the kept assignments; 1/E when balanced)."""
        layers = self.moe_layers()
        width = max(m.tally.numel() for m in layers)  # pyramid: layers of different widths
        tally = torch.stack([torch.nn.functional.pad(m.tally.cpu(), (0, width - m.tally.numel()))
                             for m in layers]).sum(dim=0)  # fmt: skip
        for m in layers:
            m.tally.zero_()
        calls, assigned, kept = float(tally[4]), float(tally[3]), tally[5:]
        if calls == 0:
            return {}
        out = {
            "moe_aux_loss": float(tally[0]) / calls,
            "moe_z_loss": float(tally[1]) / calls,
            "moe_drop_frac": float(tally[2]) / assigned,
        }
        total = max(1.0, float(kept.sum()))
        out.update({f"moe_load_{e}": v / total for e, v in enumerate(kept.tolist())})
        return out


def build_moe_model(size: str, *, vocab_size: int, seq_len: int, dropout: float = 0.0,
                    moe: MoEOptions | None = None, ep: int | None = None,
                    **overrides: int | None) -> MoEGPT:  # fmt: skip
    """Build a named MoE size; ``overrides`` replace any architecture field."""
    if size not in MOE_SIZES:
        raise ValueError(f"unknown MoE model size {size!r}; choose one of {', '.join(MOE_SIZES)}")
    arch = {**MOE_SIZES[size], **{k: v for k, v in overrides.items() if v is not None}}
    cfg = GPTConfig(vocab_size=vocab_size, seq_len=seq_len, dropout=dropout, **arch)
    return MoEGPT(cfg, moe or MoEOptions(), ep=ep)


def _routing_options(options: Mapping[str, Any] | None) -> dict[str, Any]:
    """The fields of ``options`` (a run's ``model.moe`` or an export's metadata, untrusted)
    that :class:`MoEOptions` takes."""
    known = {f.name for f in dataclasses.fields(MoEOptions)}
    if options is not None and not isinstance(options, Mapping):
        raise ValueError("the model's MoE options are not a mapping; re-export it")
    return {k: v for k, v in (options or {}).items() if k in known}


def model_of_state(
    cfg: GPTConfig, state: Mapping[str, torch.Tensor], options: Mapping[str, Any] | None
) -> GPT:
    """An empty model for the weights ``state``: :class:`MoEGPT` when they hold experts, else
    :class:`GPT`. The experts, their blocks and the residual MoE come from the names and
    shapes; the gating (``k``, ...) from ``options``. Raises ValueError on a mismatch."""
    moe_blocks = sorted(
        int(name.split(".")[1]) for name in state if name.endswith(".mlp.experts.fc_weight")
    )
    if not moe_blocks:
        return GPT(cfg)
    experts = int(state[f"blocks.{moe_blocks[0]}.mlp.experts.fc_weight"].shape[0])
    last = int(state[f"blocks.{moe_blocks[-1]}.mlp.experts.fc_weight"].shape[0])
    every = moe_blocks[0] + 1
    kw = {**_routing_options(options), "experts": experts, "every": every,
          "residual": f"blocks.{moe_blocks[0]}.mlp.coef.weight" in state,
          "pyramid": last if last != experts else 0}  # fmt: skip
    try:
        opts = MoEOptions(**kw)
    except (TypeError, ValueError) as e:
        raise ValueError(f"the model's MoE options are not valid ({str(e)[:120]})") from None
    if moe_blocks != list(range(every - 1, cfg.n_layer, every)):
        raise ValueError(f"MoE layers in blocks {moe_blocks[:8]} do not follow every={every}")
    return MoEGPT(cfg, opts)
