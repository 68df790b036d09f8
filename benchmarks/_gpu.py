"""What the GPU benchmarks share (gpu_check.py, gpu_step.py): whether a GPU is there, what it
is, a device sync, and PanGu-α nets with fast host-drawn weights and fixed token batches."""
from __future__ import annotations

import numpy as np

from autopar.models.pangu_alpha import PanguAlphaWithLoss


def gpu_status() -> str | None:
    """None when CuPy sees a GPU, else why the GPU parts are skipped."""
    try:
        import cupy
    except ImportError as err:
        return f"CuPy is not installed ({err}); pip install -e \".[gpu]\""
    try:
        n = cupy.cuda.runtime.getDeviceCount()
    except Exception as err:   # no driver, no device
        return f"CuPy sees no GPU ({type(err).__name__}: {err})"
    return None if n else "CuPy sees no GPU"


def describe_gpu() -> str:
    import cupy
    props = cupy.cuda.runtime.getDeviceProperties(0)
    name = props["name"].decode() if isinstance(props["name"], bytes) else props["name"]
    return f"{name}, CuPy {cupy.__version__}, CUDA runtime {cupy.cuda.runtime.runtimeGetVersion()}"


def sync() -> None:
    import cupy
    cupy.cuda.Device().synchronize()


def fast_weights(net, seed: int = 0) -> dict[str, np.ndarray]:
    """Host weights for every parameter from numpy's fast generator (the counter-based
    initializer takes minutes for 350M parameters on one core): N(0, 0.02) matrices and
    tables, LayerNorm gains 1, biases and shifts 0."""
    rng = np.random.default_rng(seed)
    out = {}
    for p in net.trainable_params():
        if p.name.endswith("gamma"):
            out[p.name] = np.ones(p.shape, p.dtype)
        elif p.name.endswith(("beta", "bias")):
            out[p.name] = np.zeros(p.shape, p.dtype)
        else:
            out[p.name] = (rng.standard_normal(p.shape, dtype=np.float32) * 0.02).astype(p.dtype)
    return out


def build(config, weights: dict | None):
    net = PanguAlphaWithLoss(config)
    if weights is not None:
        for p in net.trainable_params():
            p.set_data(weights[p.name])
    return net


def ids_for(config, batch: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, config.vocab_size, (batch, config.seq_length + 1)).astype(np.int32)   # (B, S+1)
