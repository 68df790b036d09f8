"""Published closed forms the tests check the cost model against (used by tests only).

Each is a formula from a paper, with its units in the name, kept beside the tests rather
than in :mod:`autopar.strategy.formulas` because the cost model itself never calls them: it
counts the bytes of the traced graph instead, and the tests assert that its counts agree
with these forms where they apply (Korthikanti et al. 2022 for activations, Rajbhandari et al. 2020 for ZeRO,
Shoeybi et al. 2019 for Megatron's all-reduces).
"""
from __future__ import annotations

# --- Activation memory constants (bytes per s·b·h, 16-bit training, Korthikanti et al.). ---
ACTIVATION_BYTES_PER_SBH = 34           # bytes per s·b·h of the non-attention-score tensors
ACTIVATION_ATTENTION_BYTES_PER_AS2B = 5  # bytes per a·s²·b of attention scores/softmax/dropout

# --- ZeRO memory constants (bytes per parameter, mixed-precision Adam). ---
FP16_PARAM_BYTES = 2                    # 16-bit weights, bytes/parameter
FP16_GRAD_BYTES = 2                     # 16-bit gradients, bytes/parameter
ADAM_STATE_BYTES = 12                   # K: fp32 master weights, momentum, variance, bytes/param

# --- Megatron tensor-parallel all-reduces per transformer layer (count). ---
MEGATRON_ALLREDUCES_FORWARD = 2         # one after attention, one after the MLP
MEGATRON_ALLREDUCES_BACKWARD = 2        # the conjugate ones in the backward pass


def activation_bytes_per_layer(s: int, b: int, h: int, a: int) -> float:
    """Activation memory (bytes) one transformer layer keeps for backward, no recompute, no
    tensor/sequence parallelism, 16-bit training (Korthikanti et al. 2022):
    s·b·h·(34 + 5·a·s/h)."""
    return float(s * b * h * (ACTIVATION_BYTES_PER_SBH
                              + ACTIVATION_ATTENTION_BYTES_PER_AS2B * a * s / h))


def zero_memory_bytes(psi: float, n: int, stage: int, K: int = ADAM_STATE_BYTES) -> float:
    """Model-state memory (bytes) per data-parallel rank with ZeRO (Rajbhandari et al. 2020),
    Ψ = ``psi`` parameters, N = ``n`` ranks, K bytes of optimizer state per parameter:

        stage 0 (plain): (2 + 2 + K)·Ψ         stage 1: 4Ψ + K·Ψ/N
        stage 2: 2Ψ + (2 + K)·Ψ/N              stage 3: (2 + 2 + K)·Ψ/N"""
    if psi < 0:
        raise ValueError(f"zero_memory_bytes: psi must be >= 0, got {psi!r}")
    if n < 1:
        raise ValueError(f"zero_memory_bytes: n must be >= 1, got {n!r}")
    weights, grads = FP16_PARAM_BYTES * psi, FP16_GRAD_BYTES * psi
    states = K * psi
    if stage == 0:
        return float(weights + grads + states)
    if stage == 1:
        return float(weights + grads + states / n)
    if stage == 2:
        return float(weights + (grads + states) / n)
    if stage == 3:
        return float((weights + grads + states) / n)
    raise ValueError(f"zero_memory_bytes: stage must be 0 (plain), 1, 2 or 3, got {stage!r}")


def megatron_tp_comm_bytes_per_layer(b: int, s: int, h: int, bytes_per_element: int = 2) -> float:
    """Bytes all-reduced per transformer layer per micro-batch under Megatron tensor parallelism:
    2 forward + 2 backward all-reduces, each of the (b, s, h) activations."""
    return float((MEGATRON_ALLREDUCES_FORWARD + MEGATRON_ALLREDUCES_BACKWARD)
                 * b * s * h * bytes_per_element)
