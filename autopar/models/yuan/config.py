"""Yuan 2.0 configuration: a frozen, validated value with the published presets."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ..config_checks import (check_choice, check_float, check_float_dtype, check_int, check_model_parallel,
                             check_norm_epsilon, fail)

# Yuan 2.0's released tokenizer has 135040 entries (the ``vocab_size`` of the public
# Yuan2-2B/51B/102B configs, as far as we know; REFERENCE.md does not state it).
YUAN_VOCAB = 135040
RECOMPUTE_GRANULARITIES = ("full", "selective")   # Megatron's --recompute-granularity


@dataclass(frozen=True)
class YuanConfig:
    vocab_size: int = YUAN_VOCAB
    seq_length: int = 4096
    hidden_size: int = 2048
    num_layers: int = 24
    num_heads: int = 32
    ffn_hidden_size: int | None = None  # None -> 4 * hidden_size (REFERENCE: SwiGLU FFN (4H))
    rms_eps: float = 1e-6
    rotary_base: float = 10000.0
    pad_id: int = 0                     # labels equal to it carry no loss (our choice, not Yuan's)
    init_std: float = 0.02
    param_dtype: str = "float32"
    compute_dtype: str = "float32"     # dtype ops compute in; float16/bfloat16: mixed precision (O2)
    # Operator-level parallelism (semi_auto_parallel), Megatron-style like PanGu-α.
    data_parallel: int = 1
    model_parallel: int = 1
    # Non-uniform pipeline: layers per stage, summing to num_layers; Yuan(config) sets the
    # blocks' pipeline_stage from it (autopar.nn.set_pipeline_stages).
    layers_per_stage: tuple[int, ...] | None = None
    # Recompute every block: None, "full" or "selective" (the attention core), as Megatron's
    # --recompute-granularity.
    recompute_granularity: str | None = None

    def __post_init__(self):
        """Check every field (type, then range), then what the model assumes between them;
        errors name the field (:mod:`autopar.models.config_checks`)."""
        for f in ("vocab_size", "seq_length", "hidden_size", "num_layers", "num_heads", "data_parallel",
                  "model_parallel"):
            check_int(self, f)
        if self.ffn_hidden_size is None:
            object.__setattr__(self, "ffn_hidden_size", 4 * self.hidden_size)
        check_int(self, "ffn_hidden_size", expected="a positive int, or None for 4 * hidden_size")
        check_int(self, "pad_id", lo=0)
        check_float(self, "rms_eps", 0.0, lo_open=True)
        check_float(self, "rotary_base", 1.0, lo_open=True,
                    expected="a finite float > 1 (RoPE's base; Yuan 2.0 uses 10000)")
        check_float(self, "init_std", 0.0, lo_open=True)
        check_float_dtype(self, "compute_dtype")
        check_float_dtype(self, "param_dtype")
        check_norm_epsilon(self, "rms_eps")
        if self.hidden_size % self.num_heads:
            fail(self, "hidden_size", f"a multiple of num_heads={self.num_heads}")
        if self.hidden_size % 2:
            fail(self, "hidden_size", "an even number (the LFA convolutions go H -> H/2 -> H)")
        if self.head_dim % 2:
            fail(self, "num_heads", f"a divisor of hidden_size={self.hidden_size} leaving an even head_dim "
                 "(rotary embeddings rotate pairs)")
        if self.pad_id >= self.vocab_size:
            fail(self, "pad_id", f"a token id in [0, {self.vocab_size}) (vocab_size={self.vocab_size})")
        check_model_parallel(self, {"num_heads": self.num_heads, "ffn_hidden_size": self.ffn_hidden_size,
                                    "vocab_size": self.vocab_size})
        self._check_stages()
        if self.recompute_granularity is not None:
            check_choice(self, "recompute_granularity", RECOMPUTE_GRANULARITIES)

    def _check_stages(self) -> None:
        stages = self.layers_per_stage
        if stages is None:
            return
        if not isinstance(stages, tuple) or not stages or not all(
                not isinstance(n, bool) and isinstance(n, int) and n >= 1 for n in stages):
            fail(self, "layers_per_stage", "None or a non-empty tuple of positive ints",
                 "pass e.g. layers_per_stage=(2, 3, 3, 2)")
        if sum(stages) != self.num_layers:
            fail(self, "layers_per_stage", f"layer counts summing to num_layers={self.num_layers} "
                 f"(they sum to {sum(stages)})")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def pipeline_stages(self) -> int:
        return 1 if self.layers_per_stage is None else len(self.layers_per_stage)

    @classmethod
    def preset(cls, name: str, **overrides) -> "YuanConfig":
        if name not in PRESETS:
            raise ValueError(f"YuanConfig.preset: name: expected one of {sorted(PRESETS)}, got {name!r}")
        return dataclasses.replace(PRESETS[name], **overrides)

    def replace(self, **changes) -> "YuanConfig":
        return dataclasses.replace(self, **changes)

    def parameter_count(self) -> int:
        """Exact count of this implementation's parameters (no allocation).

        Per layer: Q, K, V, O (4 H^2); LFA convs H -> H/2 -> H with kernel 2 (2 H^2) and its
        RMSNorm (H); SwiGLU up, gate, down (3 H F); two RMSNorms (2 H). Plus the tied
        embedding (V H) and the final RMSNorm (H)."""
        h, f = self.hidden_size, self.ffn_hidden_size
        per_layer = 4 * h * h + 2 * h * h + h + 3 * h * f + 2 * h
        return self.num_layers * per_layer + self.vocab_size * h + h


def _paper(layers, hidden, heads, **kw) -> YuanConfig:
    return YuanConfig(vocab_size=YUAN_VOCAB, seq_length=4096, hidden_size=hidden, num_layers=layers,
                      num_heads=heads, **kw)


PRESETS: dict[str, YuanConfig] = {
    # Small enough for unit tests and a CPU demo.
    "tiny": YuanConfig(vocab_size=96, seq_length=16, hidden_size=32, num_layers=2, num_heads=4,
                       ffn_hidden_size=128),
    "2B": _paper(24, 2048, 32),
    # REFERENCE.md's example split of 51B over 16 pipeline stages.
    "51B": _paper(42, 8192, 64, layers_per_stage=(2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 2)),
    "102B": _paper(84, 8192, 64),
}
