"""ZeRO stages 0-3 over the flat parameter space (arXiv 1910.02054; offload: 2101.06840).

One engine class, :class:`ZeroEngine`, for every stage. What each rank holds (P = flat numel,
N = ranks in the group, [lo, hi) = this rank's shard):

=====  ===================  =====================  ============================  =============
stage  compute parameters   gradients              fp32 master + optimizer state  extra buffers
=====  ===================  =====================  ============================  =============
0      full                 full                   full (replicated)              none
1      full                 full                   shard                          none
2      full                 shard                  shard                          buckets
3      one block at a time  shard                  shard                          2 units
=====  ===================  =====================  ============================  =============

Communication phases of one optimizer step (``grad_accum`` micro-batches, then ``step``):

1. **Forward** (stage 3 only, see ``stage3.py``): before the model runs, each rank broadcasts
   its piece of the root unit (embeddings, final norm) and of block 0; before block k runs,
   block k+1 is prefetched the same way, and block k's parameters are freed when it returns.
2. **Backward**: a post-accumulate-grad hook per parameter moves its gradient into a bucket (a
   contiguous range of the flat space, filled in reverse layer order; in stage 3 a bucket is one
   block). A full bucket is launched, strictly in bucket order, as an asynchronous SUM: an
   all-reduce (stage 0), or one ``reduce`` to each owning rank (stages 1-3; the general,
   uneven-range form of a reduce-scatter), while autograd goes on with earlier layers. Stage 3
   re-gathers block k (prefetching k-1) when the gradient reaches its output, and frees it
   when its gradients are in. Stages 0 and 1 accumulate micro-batches locally and communicate
   only in the last micro-batch's backward; stages 2 and 3 reduce every micro-batch into the
   fp32 gradient shard (at most ``max_inflight`` buckets in flight).
3. **Step**: divide the summed gradient by N (never ``ReduceOp.AVG``), one scalar all-reduce
   for the global norm, clip, run the flat optimizer on this rank's range (the whole vector
   in stage 0), then stages 1-2 all-gather the updated shards into the full compute
   parameters. Stage 3 has nothing to gather: the next forward broadcasts from the masters.

A group of one rank runs the same code without any collective.

Expert parallelism (``loco.engine.experts``; X expert values, ``ep`` ranks per expert group):
at stages 1 and 3, and at stages 0 and 2 where it saves memory, a rank's compute parameters
hold only the expert rows it computes (``P - X + X/ep``); stage 1 then keeps the fp32 gradient
shard (``P/N``) and reduces into it every micro-batch as stage 2 does (``grad_stage``); stage 0
keeps its fp32 masters, gradient and moments on ``space`` (``loco.engine.replica``: the dense
part replicated, each expert value on its shard's owner) and reduces every micro-batch too.
The flat space, the shards and everything on them are unchanged.

Mixed precision: with ``compute_dtype="bf16"`` the model's parameters are bf16 (views into the
engine's buffers) and the fp32 masters live in the engine; ``reduce_dtype`` picks the dtype of
the gradient buckets on the wire. Gradients are accumulated in fp32.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from loco.engine.base import OptimOptions
from loco.engine.buckets import GradBuckets, plan_groups
from loco.engine.experts import expert_rows, publish_compact
from loco.engine.flat import FlatLayout
from loco.engine.optim_range import build_optim_range
from loco.engine.options import check_offload_backend, check_options, offload_mode
from loco.engine.recompute import checkpoint_blocks
from loco.engine.replica import replica_space
from loco.engine.stage3 import unit_of
from loco.engine.state_dict import full_state_dict, load_rank_state_dict, rank_state_dict
from loco.engine.storage import build_storage
from loco.site_comm import SiteComm


class ZeroEngine:
    """ZeRO-sharded training of one model on the ranks of one process group.

    Implements the ``Engine`` Protocol of ``loco.engine.base`` (both seams, every stage).
    Build it on every rank of the site (``comm``) with the same model architecture; parameters are
    broadcast from site rank 0 first. The engine takes over the model's trainable parameters
    (they become views into its buffers); frozen parameters stay as they are, replicated and
    never communicated.

    Args:
        model: the model (a ``GPT`` or any module; stage 3 shards per ``model.blocks``).
        optim: ``adamw`` or ``sgd``, with ``lr``, ``weight_decay``, ``betas``, ``eps``,
            ``momentum``, ``nesterov`` as in ``base.OptimOptions``.
        grad_clip: clip the global gradient norm to this value; 0 disables.
        comm: the site's ranks (``loco.site_comm.SiteComm``); None: the default group, or a
            single rank when torch.distributed is not initialized.
        stage: 0, 1, 2 or 3 (see the module docstring).
        grad_accum: micro-batches per optimizer step; ``backward`` is called this many times
            before each ``step`` (stages 0-1 communicate only in the last one).
        bucket_mb: size of a gradient bucket in MiB of ``reduce_dtype`` (stages 0-2).
        reduce_dtype: ``fp32`` or ``bf16``: the dtype gradients travel in.
        compute_dtype: ``fp32`` or ``bf16``: the dtype of the model's parameters and
            activations; the master weights and optimizer state are always fp32.
        activation_checkpointing: recompute each block of ``model.blocks`` in backward.
        offload: ``false``, ``cpu`` (``True``) or ``nvme``. ``cpu``: the fp32 masters and
            optimizer state in pinned host memory, the step on the CPU (ZeRO-Offload; GPU runs
            only, ignored with a warning on a CPU run). ``nvme``: masters and moments in files
            under ``nvme_dir``, the step streamed through them in parts (ZeRO-Infinity,
            ``loco.engine.tier``), on any device.
        nvme_dir: the NVMe tier's folder (``offload=nvme``); its files are scratch.
        nvme_part_mb: MiB of fp32 values per streamed part of the tier's step.
        offload_params: ``none`` or ``nvme`` (stage 3 with ``offload=nvme``): this rank's shard
            of the compute parameters lives on the tier too; each block's own pieces are read
            from it at every gather, the next block's prefetched in forward and backward order.
        collective: ``auto``, ``reduce`` or ``allreduce``: how stages 1-3 reduce a bucket.
        prefetch: stage 3: gather the next block while the current one computes.
        max_inflight: stages 2-3: buckets in flight before the oldest is waited for.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        optim: str = "adamw",
        lr: float = 1e-3,
        weight_decay: float = OptimOptions.weight_decay,
        betas: tuple[float, float] = OptimOptions.betas,
        eps: float = OptimOptions.eps,
        momentum: float = OptimOptions.momentum,
        nesterov: bool = OptimOptions.nesterov,
        grad_clip: float = 0.0,
        comm: SiteComm | None = None,
        stage: int = 2,
        grad_accum: int = 1,
        bucket_mb: float = 25.0,
        reduce_dtype: str = "fp32",
        compute_dtype: str = "fp32",
        activation_checkpointing: bool = False,
        offload: bool | str = False,
        nvme_dir: str = "",
        nvme_part_mb: float = 16.0,
        offload_params: str = "none",
        collective: str = "auto",
        prefetch: bool = True,
        max_inflight: int = 2,
    ) -> None:
        self.compute_dtype, self.reduce_dtype = check_options(stage, grad_accum, bucket_mb,
            max_inflight, grad_clip, compute_dtype, reduce_dtype)  # fmt: skip
        self.model, self.stage = model, stage
        self.grad_accum, self.grad_clip = grad_accum, grad_clip
        self.comm = comm if comm is not None else SiteComm()
        self.world, self.rank = self.comm.world, self.comm.rank
        self.collective = self.comm.resolve(collective)
        self.prefetch, self.max_inflight = prefetch, max_inflight
        self.device = next(model.parameters()).device
        self.offload_mode, self.opt_device = offload_mode(offload, self.device, nvme_dir)
        self.offload = offload = self.offload_mode == "cpu"
        check_offload_backend(self.offload_mode, stage, self.comm.backend, self.world)
        self.comm.broadcast_module(model)
        self.layout = FlatLayout(model)
        self.numel, self.padded = self.layout.numel, self.layout.padded_numel(self.world)
        self.lo, self.hi = self.layout.shard_range(self.rank, self.world)
        self.flat_range = self.layout.owned_range(self.rank, self.world)
        self.opt_lo, self.opt_hi = (0, self.padded) if stage == 0 else (self.lo, self.hi)
        self.rows = expert_rows(model, self.layout, self.comm, stage=stage, device=self.device,
                                offload_params=offload_params,
                                offload=self.offload_mode,
                                compute_dtype=self.compute_dtype)  # fmt: skip
        self.space = replica_space(self.layout, self.rows) if stage == 0 else None
        self.opt_hi = self.space.size if self.space else self.opt_hi  # its buffers' positions
        st = build_storage(model, self.layout, self.comm, stage=stage, padded=self.padded,
                           opt_range=(self.opt_lo, self.opt_hi), shard=(self.lo, self.hi),
                           compute_dtype=self.compute_dtype, device=self.device, offload=offload,
                           nvme=self.offload_mode == "nvme", prefetch=prefetch,
                           rows=self.rows, space=self.space)  # fmt: skip
        self.flat_param, self.shards, self.grad = st.flat_param, st.shards, st.grad
        self.compact = st.compact
        self.grad_stage = 2 if stage < 2 and self.compact is not None else stage
        """The stage whose gradient handling runs: stages 0-1 with expert rows reduce into
        their fp32 gradient every micro-batch as stage 2 does (see the module docstring)."""
        options = OptimOptions(weight_decay, betas, eps, momentum, nesterov)
        self._range = build_optim_range(optim=optim, options=options, layout=self.layout,
            opt_range=(self.opt_lo, self.opt_hi), storage=st, device=self.device,
            opt_device=self.opt_device, offload=offload, nvme_dir=nvme_dir, rank=self.rank,
            nvme_part_mb=nvme_part_mb, offload_params=offload_params, lo=self.lo,
            compute_dtype=self.compute_dtype)  # fmt: skip
        self.optimizer, self.master = self._range.optimizer, self._range.master
        self.host_step, self.tier_step = self._range.host_step, self._range.tier_step
        self._handles: list[Any] = self._wire_gradients(bucket_mb)
        if activation_checkpointing:
            checkpoint_blocks(self.model, in_group=self.comm.multi)

    def _wire_gradients(self, bucket_mb: float) -> list[Any]:
        """The gradient buckets (one per block in stage 3) and a post-accumulate-grad hook per
        parameter that fills them (and stage 3's gather hooks); return the hook handles."""
        if self.stage == 3:
            assert self.shards is not None
            groups = [list(u.params) for u in reversed(self.shards.units) if u.params]
        else:
            groups = plan_groups(
                self.layout, max(1, int(bucket_mb * 2**20 / self.reduce_dtype.itemsize))
            )
        self.buckets = GradBuckets(layout=self.layout, groups=groups, comm=self.comm,
                                   grad=self.grad, lo=0 if self.grad_stage < 2 else self.lo,
                                   stage=self.grad_stage,
                                   collective="allreduce" if self.space else self.collective,
                                   reduce_dtype=self.reduce_dtype, max_inflight=self.max_inflight,
                                   rows=self.rows, space=self.space)  # fmt: skip
        self._micro = 0
        hook = self._grad_hook
        handles = [p.register_post_accumulate_grad_hook(functools.partial(hook, i))
                   for i, p in enumerate(self.layout.params)]  # fmt: skip
        return handles + (self.shards.install() if self.shards is not None else [])

    # ---------------------------------------------------------------- gradients

    def _comm_now(self) -> bool:
        """Stages 2-3 reduce every micro-batch; stages 0-1 only the last one."""
        return self.grad_stage >= 2 or self._micro >= self.grad_accum

    @torch.no_grad()
    def _grad_hook(self, i: int, p: torch.Tensor) -> None:
        g = p.grad
        p.grad = None
        if g is None:
            return
        self.buckets.add(i, g)
        if self._comm_now() and self.buckets.mark_ready(i) and self.shards is not None:
            self.shards.free(self.shards.units[unit_of(self.model, self.layout.specs[i].name)])

    @property
    def overlapped_buckets(self) -> int:
        """Buckets launched from inside backward (before autograd finished), since the start."""
        return self.buckets.overlapped

    def backward(self, loss: torch.Tensor) -> None:
        """Backpropagate one micro-batch's loss (already divided by ``grad_accum``).

        Collective in the last micro-batch (stages 0-1) or every micro-batch (stages 2-3):
        every rank of the group must call it.
        """
        if self._micro >= self.grad_accum:
            raise ValueError(
                f"backward() called {self._micro + 1} times without step(); grad_accum is "
                f"{self.grad_accum}: call step() after every grad_accum backward() calls"
            )
        self._micro += 1
        loss.backward()
        if self._comm_now():
            self.buckets.flush()
        if self.shards is not None:
            self.shards.free_all()

    # ---------------------------------------------------------------- step

    @torch.no_grad()
    def step(self, lr: float) -> float:
        """Average, clip and apply the accumulated gradients; return the norm before clipping.

        Collective: every rank of the group must call it.
        """
        if self._micro == 0:
            raise ValueError("step() called before any backward(); call backward(loss) first")
        if not self._comm_now():  # fewer micro-batches than grad_accum: reduce what we have
            self._micro = self.grad_accum
            self.buckets.flush()
        grad = self.grad[self.opt_lo : self.opt_hi] if self.grad_stage < 2 else self.grad
        if self.world > 1:
            grad.div_(self.world)
        part = grad if self.space is None else self.space.shard(grad)  # replicas: the shards'
        sq = torch.linalg.vector_norm(part).square()  # no P-sized temporary
        if self.world > 1 and (self.stage > 0 or self.space is not None):
            sq = self.comm.sum_tensor(sq)
        norm = sq.sqrt()
        if self.grad_clip > 0:
            grad.mul_(torch.clamp(self.grad_clip / (norm + 1e-6), max=1.0))
        up = None
        if self.flat_param is not None and self.compact is None:
            up = self.flat_param[self.opt_lo : self.opt_hi]
        self._publish(uploaded=self._range.step(grad, lr, up))
        self.grad.zero_()
        self._micro = 0
        return float(norm)

    @torch.no_grad()
    def _publish(self, uploaded: bool = False) -> None:
        """Make the compute parameters match the fp32 masters (collective in stages 1-2);
        ``uploaded``: the step already wrote this rank's range of them."""
        if self.shards is not None:
            self.shards.free_all()
            return
        fp = self.flat_param
        assert fp is not None
        if self.compact is not None:  # stages 0-2, expert rows: no shard is contiguous in fp
            publish_compact(fp, self.master, self.lo, self.compact, self.comm, self.space)
            return
        if not uploaded and self.master.data_ptr() != fp[self.opt_lo :].data_ptr():
            fp[self.opt_lo : self.opt_hi].copy_(self.master, non_blocking=self.offload)
        if self.stage > 0 and self.world > 1:
            self.comm.all_gather_shards(fp, self.lo, self.hi)

    @contextlib.contextmanager
    def gathered(self) -> Iterator[nn.Module]:
        """Keep every parameter materialized inside the block (stage 3; a no-op otherwise).

        For code that does not go through ``model.forward`` (``model.generate``, exports).
        Collective in stage 3: every rank enters and leaves it together. No backward inside.
        """
        if self.shards is None:
            yield self.model
            return
        with self.shards.gathered():
            yield self.model

    # ---------------------------------------------------------------- flat-range API

    @property
    def layout_hash(self) -> str:
        """``layout.hash``: equal on two engines iff their flat spaces line up."""
        return self.layout.hash

    def master_range(self) -> torch.Tensor:
        """A writable fp32 view of the master weights on ``flat_range`` (global [lo, hi)).

        After writing, every rank of the group must call :meth:`sync_params`.
        """
        lo, hi = self.flat_range
        base = self._range_base
        return self._range.masters()[lo - base : hi - base]

    def optim_state_range(self) -> dict[str, torch.Tensor]:
        """Writable fp32 views of the optimizer state on ``flat_range`` (``exp_avg`` and
        ``exp_avg_sq`` for AdamW, ``momentum`` for SGD); the step count is ``optim_step``."""
        lo, hi, base = *self.flat_range, self._range_base
        return {k: v[lo - base : hi - base] for k, v in self._range.state().items()}

    @property
    def _range_base(self) -> int:
        """The global index at position 0 of the optimizer's buffers, for this rank's shard."""
        return self.opt_lo if self.space is None else self.lo - self.space.window

    @property
    def optim_step(self) -> int:
        """The optimizer's step count (read and write; the same on every rank)."""
        return self.optimizer.step_count

    @optim_step.setter
    def optim_step(self, n: int) -> None:
        self.optimizer.step_count = int(n)

    @torch.no_grad()
    def sync_params(self, optim_state: bool = False) -> None:
        """Propagate writes to ``master_range`` (and, with ``optim_state``, to the optimizer
        state) to the compute parameters of every rank. Collective."""
        opt = self._range
        if self.space is not None and self.world > 1:  # replicated: the dense values only
            self.space.sync([opt.masters()] + (list(opt.state().values()) if optim_state else []),
                            self.comm)  # fmt: skip
        elif self.stage == 0 and self.world > 1:
            tensors = [opt.masters()] + (list(opt.state().values()) if optim_state else [])
            for t in tensors:  # replicated state: all-gather every rank's range
                self.comm.all_gather_into(t, t[self.lo : self.hi].clone()).wait()
        opt.commit(optim_state)  # nvme: staged writes to the tier, the masters to the compute copy
        self._publish()

    @torch.no_grad()
    def gather_full(self) -> torch.Tensor:
        """The full fp32 flat vector (length P) on every rank, on the CPU. Collective."""
        master = self._range.masters()
        if (self.stage == 0 and self.space is None) or self.world == 1:
            return master[: self.numel].detach().float().cpu().clone()
        shard = (master if self.space is None else self.space.shard(master)).to(self.device)
        out = torch.empty(self.padded, dtype=torch.float32, device=self.device)
        self.comm.all_gather_into(out, shard).wait()
        return out[: self.numel].cpu()

    @torch.no_grad()
    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """``model.state_dict()`` with fp32 master values, full on every rank. Collective."""
        return full_state_dict(self)

    def state_dict(self) -> dict[str, Any]:
        """This rank's sharded state: masters and optimizer state on ``flat_range``."""
        return rank_state_dict(self, world=self.world, rank=self.rank)

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Load a ``state_dict`` saved by the same rank of a same-layout group. Collective."""
        load_rank_state_dict(self, state)

    def close(self) -> None:
        """Remove the engine's hooks (the model keeps its current parameter views)."""
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._range.close()  # the tier's files are scratch
