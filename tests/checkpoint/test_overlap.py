"""An overlapped snapshot (``save(overlap=True)`` then ``fence()``) holds the values at the
save: work queued before it is included, changes after the fence are not."""

from __future__ import annotations

import pytest
import torch

from loco.checkpoint import CheckpointWriter, latest_checkpoint, load_full

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=CUDA)])
def test_overlapped_snapshot_is_the_state_at_save(tmp_path, device):
    n = 3 << 20
    x = torch.randn(n, generator=torch.Generator().manual_seed(0)).to(device)
    want = x.cpu() * 2
    meta = {"layout": {"hash": "t", "numel": n, "params": []}}
    w = CheckpointWriter(tmp_path, meta=meta)
    for step in (1, 2):  # the second save reuses the staging buffer
        x.mul_(2)  # queued work (asynchronous on a GPU) that the snapshot must include
        w.save(step, {"master": x}, range=(0, n), manifest={"streams": ["master"]}, overlap=True)
        w.fence()
        x.add_(1.0)  # the next optimizer step, after the fence
        w.wait()
        assert torch.equal(load_full(latest_checkpoint(tmp_path))["master"], want)
        want = (want + 1.0) * 2
