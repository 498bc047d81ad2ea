"""Outer optimizers between sites: NoLoCo, DiLoCo and the local baseline."""

from loco.outer.methods import (
    OUTER_METHODS,
    DiLoCo,
    Local,
    NoLoCo,
    OuterState,
    OuterStep,
    build_outer,
)

__all__ = ["OUTER_METHODS", "DiLoCo", "Local", "NoLoCo", "OuterState", "OuterStep", "build_outer"]
