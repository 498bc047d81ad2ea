"""SiteComm: the one communicator of a site's ranks, on a real 3-rank gloo group and alone."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from loco.site_comm import SiteComm, small_device
from tests.engine.dist_utils import run_ranks


def _every_call(rank: int, world: int) -> None:
    comm = SiteComm()
    assert (comm.rank, comm.world, comm.multi, comm.backend) == (rank, world, True, "gloo")
    assert comm.small_device == torch.device("cpu")
    assert comm.sum([rank, 1.0]) == [sum(range(world)), float(world)]
    assert comm.mean([float(rank)]) == [sum(range(world)) / world]
    assert comm.min([float(rank), -float(rank)]) == [0.0, -float(world - 1)]
    assert comm.max_int([rank, 7]) == [world - 1, 7]
    x = torch.full((2,), float(rank + 1))
    assert comm.sum_tensor(x) is x and x.tolist() == [6.0, 6.0]
    comm.barrier()
    assert comm.broadcast_object({"r": rank} if rank == 1 else None, src=1) == {"r": 1}
    assert comm.all_gather_object(("r", rank)) == [("r", r) for r in range(world)]
    m = torch.nn.Linear(3, 2)
    with torch.no_grad():
        m.weight.fill_(float(rank))
    comm.broadcast_module(m)
    assert torch.all(m.weight == 0.0)
    # the small calls are not counted; the bulk ones are
    assert comm.stats.total() == 0
    t = torch.ones(4)
    comm.all_reduce(t).wait()
    assert t.tolist() == [3.0] * 4 and comm.stats.bytes == {"all_reduce": 2 * 16}
    # a single-rank view inside a live group communicates nothing
    one = SiteComm.single()
    assert (one.rank, one.world, one.multi) == (0, 1, False)
    assert one.broadcast_object(rank) == rank and one.all_gather_object(rank) == [rank]
    assert one.sum([float(rank)]) == [float(rank)]
    assert dist.is_initialized()


def test_every_collective_on_three_gloo_ranks() -> None:
    run_ranks(_every_call, 3)


def test_without_a_process_group_every_call_returns_its_input() -> None:
    assert not dist.is_initialized()
    comm = SiteComm()
    assert (comm.rank, comm.world, comm.multi, comm.backend) == (0, 1, False, "none")
    assert comm.sum([1.5, 2.0]) == [1.5, 2.0] and comm.mean([3.0]) == [3.0]
    assert comm.min([2.0]) == [2.0] and comm.max_int([4]) == [4]
    comm.barrier()
    assert comm.broadcast_object("x") == "x" and comm.all_gather_object(5) == [5]


def test_the_small_collectives_use_the_gpu_under_nccl_and_the_cpu_otherwise() -> None:
    """NCCL reduces only GPU tensors; gloo and a site of one rank take CPU ones (the NCCL
    group itself: tests/engine/test_cuda.py)."""
    assert small_device("gloo") == small_device("none") == torch.device("cpu")
    assert SiteComm.single().small_device == torch.device("cpu")
    if torch.cuda.is_available():
        assert small_device("nccl") == torch.device("cuda", torch.cuda.current_device())
    else:  # the choice is NCCL's device; without CUDA there is none to choose
        with pytest.raises((RuntimeError, AssertionError)):
            small_device("nccl")
