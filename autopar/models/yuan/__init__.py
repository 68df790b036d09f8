"""Yuan 2.0: decoder with Localized Filtering-based Attention (LFA), SwiGLU, RMSNorm,
rotary positions and a tied head (REFERENCE.md, "Yuan 2.0")."""
from ...strategy.pipeline.registry import register_model
from ..planning import traced_family
from .config import YuanConfig
from .model import Yuan, YuanWithLoss

register_model("yuan", traced_family("yuan", YuanConfig, YuanWithLoss, lambda c: c.num_layers,
                                     lambda c: c.replace(num_layers=1, layers_per_stage=None)))

__all__ = ["YuanConfig", "Yuan", "YuanWithLoss"]
