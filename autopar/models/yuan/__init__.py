"""Yuan 2.0: decoder with Localized Filtering-based Attention (LFA), SwiGLU, RMSNorm,
rotary positions and a tied head (REFERENCE.md, "Yuan 2.0")."""
from .config import YuanConfig
from .model import Yuan, YuanWithLoss

__all__ = ["YuanConfig", "Yuan", "YuanWithLoss"]
