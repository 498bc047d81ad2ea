"""Training engines: how a site's ranks turn losses into parameter updates."""

from loco.engine.base import Engine
from loco.engine.plain import PlainEngine

__all__ = ["Engine", "PlainEngine"]
