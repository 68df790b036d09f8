"""PanGu-α: causal decoder with a top query layer and a tied head (REFERENCE.md)."""
from .config import PanguAlphaConfig
from .model import PanguAlpha, PanguAlphaWithLoss, random_order

__all__ = ["PanguAlphaConfig", "PanguAlpha", "PanguAlphaWithLoss", "random_order"]
