"""PanGu-α configuration: a frozen, validated value with the published presets."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ..config_checks import (check_bool, check_choice, check_float, check_float_dtype, check_int,
                             check_model_parallel, check_norm_epsilon, fail)

LAYER_ORDERS = ("final_ln_then_query", "query_then_final_ln")
RECOMPUTE_GRANULARITIES = ("full", "selective")   # Megatron's --recompute-granularity


@dataclass(frozen=True)
class PanguAlphaConfig:
    vocab_size: int = 40000
    seq_length: int = 1024
    hidden_size: int = 2560
    num_layers: int = 32            # decoder blocks + the query layer
    num_heads: int = 32
    ffn_hidden_size: int = 10240
    dropout_rate: float = 0.1
    eod_id: int = 8                 # <eod> in the released vocabulary
    pad_id: int = 6                 # <pad>; labels equal to it carry no loss
    eod_reset: bool = False         # restart positions and block attention at each EOD
    compute_dtype: str = "float32"  # dtype ops compute in; float16/bfloat16: mixed precision (O2)
    param_dtype: str = "float32"
    layernorm_epsilon: float = 1e-5
    init_std: float = 0.02
    # Released 2.6B/13B weights: blocks -> final LN -> query layer -> head. The 200B pipeline
    # model: blocks -> query layer -> final LN -> head.
    layer_order: str = "final_ln_then_query"
    # Operator-level parallelism (semi_auto_parallel): the strategies of REFERENCE.md.
    data_parallel: int = 1
    model_parallel: int = 1
    vocab_emb_dp: bool = True       # word table replicated (True) or split over vocabulary
    # Megatron's --sequence-parallel: with model_parallel > 1, the LayerNorms, dropouts and
    # residual adds run on sequence shards (B, S/mp, H); the row-parallel all-reduces become
    # reduce-scatters and the column-parallel inputs all-gathers (no effect at mp = 1).
    sequence_parallel: bool = False
    # With sequence_parallel: the column-parallel inputs' all-gathers run again in backward
    # instead of their (B, S, H) outputs being kept (Megatron's way): those activations / mp
    # too, for one more all-gather per column-parallel input per step.
    sequence_parallel_regather: bool = False
    # Recompute every layer: None (keep activations), "full" (whole layers, each keeps its
    # input) or "selective" (only the attention core's (B, N, S, S) tensors are rebuilt).
    recompute_granularity: str | None = None

    def __post_init__(self):
        """Check every field (type, then range), then what the model assumes between them;
        errors name the field (:mod:`autopar.models.config_checks`)."""
        for f in ("vocab_size", "seq_length", "hidden_size", "num_heads", "ffn_hidden_size",
                  "data_parallel", "model_parallel"):
            check_int(self, f)
        check_int(self, "num_layers", expected="an int >= 1 (it counts the query layer)")
        for f in ("eod_id", "pad_id"):
            check_int(self, f, lo=0)
        check_float(self, "dropout_rate", 0.0, 1.0)
        check_float(self, "layernorm_epsilon", 0.0, lo_open=True)
        check_float(self, "init_std", 0.0, lo_open=True)
        check_bool(self, "eod_reset")
        check_bool(self, "vocab_emb_dp")
        check_bool(self, "sequence_parallel")
        check_bool(self, "sequence_parallel_regather")
        check_float_dtype(self, "compute_dtype")
        check_float_dtype(self, "param_dtype")
        check_norm_epsilon(self, "layernorm_epsilon")
        check_choice(self, "layer_order", LAYER_ORDERS)
        if self.recompute_granularity is not None:
            check_choice(self, "recompute_granularity", RECOMPUTE_GRANULARITIES)
        if self.hidden_size % self.num_heads:
            fail(self, "hidden_size", f"a multiple of num_heads={self.num_heads}")
        for f in ("eod_id", "pad_id"):
            if getattr(self, f) >= self.vocab_size:
                fail(self, f, f"a token id in [0, {self.vocab_size}) (vocab_size={self.vocab_size})")
        check_model_parallel(self, {"num_heads": self.num_heads, "hidden_size": self.hidden_size,
                                    "ffn_hidden_size": self.ffn_hidden_size})
        if not self.vocab_emb_dp and self.vocab_size % self.model_parallel:
            fail(self, "vocab_emb_dp", f"True, or a vocab_size divisible by model_parallel={self.model_parallel}")
        if self.sequence_parallel and self.seq_length % self.model_parallel:
            fail(self, "sequence_parallel", f"False, or a seq_length divisible by model_parallel="
                 f"{self.model_parallel} (seq_length={self.seq_length})",
                 "turn sequence_parallel off or pick a model_parallel that divides seq_length")
        if self.sequence_parallel_regather and not self.sequence_parallel:
            fail(self, "sequence_parallel_regather", "False unless sequence_parallel=True (it re-gathers the "
                 "sequence shards that sequence parallel makes)", "set sequence_parallel=True too, or leave it False")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def num_blocks(self) -> int:
        return self.num_layers - 1

    @classmethod
    def preset(cls, name: str, **overrides) -> "PanguAlphaConfig":
        if name not in PRESETS:
            raise ValueError(f"PanguAlphaConfig.preset: name: expected one of {sorted(PRESETS)}, got {name!r}")
        return dataclasses.replace(PRESETS[name], **overrides)

    def replace(self, **changes) -> "PanguAlphaConfig":
        return dataclasses.replace(self, **changes)

    def parameter_count(self) -> int:
        """Exact count of this implementation's parameters (no allocation)."""
        h, f, layers = self.hidden_size, self.ffn_hidden_size, self.num_layers
        per_layer = 4 * (h * h + h) + (h * f + f) + (f * h + h) + 4 * h  # attention, FFN, two LayerNorms
        return layers * per_layer + self.vocab_size * h + 2 * self.seq_length * h + 2 * h


def _paper(layers, hidden, ffn, heads) -> PanguAlphaConfig:
    return PanguAlphaConfig(vocab_size=40000, seq_length=1024, hidden_size=hidden, num_layers=layers,
                            num_heads=heads, ffn_hidden_size=ffn)


PRESETS: dict[str, PanguAlphaConfig] = {
    # Small enough for unit tests and a CPU demo.
    "tiny": PanguAlphaConfig(vocab_size=96, seq_length=16, hidden_size=32, num_layers=3, num_heads=4,
                             ffn_hidden_size=128, dropout_rate=0.0),
    "350M": _paper(24, 1024, 4096, 16),
    "1.3B": _paper(16, 2560, 10240, 32),
    "2.6B": _paper(32, 2560, 10240, 32),
    "13B": _paper(40, 5120, 20480, 40),
    "200B": _paper(64, 16384, 65536, 128).replace(layer_order="query_then_final_ln"),
}
