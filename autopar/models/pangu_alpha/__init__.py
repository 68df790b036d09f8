"""PanGu-α: causal decoder with a top query layer and a tied head (REFERENCE.md)."""
from ...strategy.pipeline.registry import register_model
from ..planning import traced_family
from .config import PanguAlphaConfig
from .model import PanguAlpha, PanguAlphaWithLoss, random_order

# the planner pipelines the num_layers - 1 blocks; the query layer rides on the last stage
register_model("pangu_alpha", traced_family("pangu_alpha", PanguAlphaConfig, PanguAlphaWithLoss,
                                            lambda c: c.num_layers - 1, lambda c: c.replace(num_layers=2)))

__all__ = ["PanguAlphaConfig", "PanguAlpha", "PanguAlphaWithLoss", "random_order"]
