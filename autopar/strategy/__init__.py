"""Meshes, layouts, strategies, cost model and searches (the plan side of autopar)."""
from ..ir.strategy import Strategy, normalize_strategy

__all__ = ["Strategy", "normalize_strategy"]
