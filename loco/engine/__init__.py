"""Training engines: how a site's ranks turn losses into parameter updates."""

from loco.engine.base import Engine, FlatEngine, StepEngine
from loco.engine.flat import FlatLayout
from loco.engine.zero import ZeroEngine

__all__ = ["Engine", "FlatEngine", "FlatLayout", "StepEngine", "ZeroEngine"]
