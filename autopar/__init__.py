"""autopar: write a model once as serial Cells; train it on many processes.

The public API, re-exported; nothing else lives here.
"""
from . import nn, ops
from .backend import get_context, set_context
from .dtype import bfloat16, bool_, float16, float32, float64, int32, int64
from .context import (ParallelContext, ParallelMode, get_auto_parallel_context, get_group_size, get_rank,
                      init, parallel_context, reset_auto_parallel_context, set_auto_parallel_context)
from .ir.parallel_layout import Layout
from .nn.shard import shard
from .runtime.compiled import value_and_grad
from .train.checkpoint import (build_searched_strategy, load_checkpoint, load_distributed_checkpoint,
                               load_param_into_net, merge_sliced_parameter, save_checkpoint, transform_checkpoints)

__all__ = ["nn", "ops", "value_and_grad", "float16", "bfloat16", "float32", "float64", "int32", "int64", "bool_",
           "init", "get_rank", "get_group_size", "set_auto_parallel_context", "get_auto_parallel_context",
           "reset_auto_parallel_context", "ParallelContext", "ParallelMode", "parallel_context",
           "save_checkpoint", "load_checkpoint", "load_param_into_net", "load_distributed_checkpoint",
           "set_context", "get_context", "Layout", "shard",
           "build_searched_strategy", "merge_sliced_parameter", "transform_checkpoints"]
__version__ = "0.1.0"
