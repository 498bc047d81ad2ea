"""Outer optimizers between sites: NoLoCo, DiLoCo and the local baseline."""

from loco.outer.methods import DiLoCo, Local, NoLoCo, OuterState, OuterStep, build_outer

__all__ = ["DiLoCo", "Local", "NoLoCo", "OuterState", "OuterStep", "build_outer"]
