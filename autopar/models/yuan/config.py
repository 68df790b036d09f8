"""Yuan 2.0 configuration: a frozen, validated value with the published presets."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

# Yuan 2.0's released tokenizer has 135040 entries (the ``vocab_size`` of the public
# Yuan2-2B/51B/102B configs, as far as we know; REFERENCE.md does not state it).
YUAN_VOCAB = 135040


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
    compute_dtype: str = "float32"
    # Operator-level parallelism (semi_auto_parallel), Megatron-style like PanGu-α.
    data_parallel: int = 1
    model_parallel: int = 1
    # Non-uniform pipeline: layers per stage, summing to num_layers; Yuan(config) sets the
    # blocks' pipeline_stage from it (autopar.nn.set_pipeline_stages).
    layers_per_stage: tuple[int, ...] | None = None

    def __post_init__(self):
        def bad(field, expected, fix=""):
            msg = f"YuanConfig: {field}: expected {expected}, got {getattr(self, field)!r}"
            raise ValueError(msg + (f"; {fix}" if fix else ""))

        def positive_int(v):
            return not isinstance(v, bool) and isinstance(v, int) and v >= 1

        if self.ffn_hidden_size is None:
            object.__setattr__(self, "ffn_hidden_size", 4 * self.hidden_size)
        for f in ("vocab_size", "seq_length", "hidden_size", "num_layers", "num_heads", "ffn_hidden_size",
                  "data_parallel", "model_parallel"):
            if not positive_int(getattr(self, f)):
                bad(f, "a positive int")
        if self.hidden_size % self.num_heads:
            bad("hidden_size", f"a multiple of num_heads={self.num_heads}")
        if self.hidden_size % 2:
            bad("hidden_size", "an even number (the LFA convolutions go H -> H/2 -> H)")
        if self.head_dim % 2:
            bad("num_heads", f"a divisor of hidden_size={self.hidden_size} leaving an even head_dim "
                "(rotary embeddings rotate pairs)")
        if not self.rms_eps > 0:
            bad("rms_eps", "a positive float")
        if not self.rotary_base > 0:
            bad("rotary_base", "a positive float")
        if not 0 <= self.pad_id < self.vocab_size:
            bad("pad_id", f"a token id in [0, {self.vocab_size})")
        for f in ("compute_dtype", "param_dtype"):
            if np.dtype(getattr(self, f)).kind != "f":
                bad(f, "a float dtype name such as 'float32'")
        mp = self.model_parallel
        if self.num_heads % mp or self.ffn_hidden_size % mp or self.vocab_size % mp:
            bad("model_parallel", f"a divisor of num_heads={self.num_heads}, ffn_hidden_size="
                f"{self.ffn_hidden_size} and vocab_size={self.vocab_size}")
        if self.layers_per_stage is not None:
            stages = self.layers_per_stage
            if not isinstance(stages, tuple) or not stages or not all(positive_int(n) for n in stages):
                bad("layers_per_stage", "None or a non-empty tuple of positive ints",
                    "pass e.g. layers_per_stage=(2, 3, 3, 2)")
            if sum(stages) != self.num_layers:
                bad("layers_per_stage", f"layer counts summing to num_layers={self.num_layers} "
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
