"""autopar: write a model once as serial Cells; train it on many processes.

The public API, re-exported; nothing else lives here.
"""
from . import nn, ops
from .dtype import bool_, float16, float32, float64, int32, int64
from .runtime.compiled import value_and_grad

__all__ = ["nn", "ops", "value_and_grad", "float16", "float32", "float64", "int32", "int64", "bool_"]
__version__ = "0.1.0"
