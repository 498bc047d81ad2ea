"""Training engines: how a site's ranks turn losses into parameter updates."""

from loco.engine.base import Engine
from loco.engine.flat import FlatLayout
from loco.engine.plain import PlainEngine
from loco.engine.zero import ZeroEngine

__all__ = ["Engine", "FlatLayout", "PlainEngine", "ZeroEngine"]
