"""Fixtures of the compression tests: the two backends (compiled kernels, pure-torch reference)."""

from __future__ import annotations

import pytest

import loco.compress as lc
from loco.compress import codecs as codecs_mod
from loco.compress import reference as ref

from .helpers import ext_or_skip


@pytest.fixture(params=["ext", "ref"])
def backend(request, monkeypatch) -> str:
    """Run the test once on the compiled kernels and once on the pure-torch reference."""
    if request.param == "ext":
        ext_or_skip()
    else:
        monkeypatch.setattr(codecs_mod, "_backend", lambda device, codec_id: ref)
        monkeypatch.setattr(lc, "ext_ops", lambda: None)
    return request.param
