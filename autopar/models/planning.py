"""A model family as the stage search prices it (``autopar.strategy.pipeline.registry``).

The decoders here share the planner's view: a config with presets, a loss cell fed int32
token ids of ``seq_length + 1`` (inputs and shifted labels), ``data_parallel`` and
``model_parallel`` fields that set the model's own ``.shard()`` strategies, and a stack of
identical pipelined layers. :func:`traced_family` turns that into the builder each family
registers, so the planner passes degrees as integers and never sees a config.
"""
from __future__ import annotations

from collections.abc import Callable

import numpy as np

from ..ir.spec import TensorSpec
from ..runtime.trace import trace
from ..strategy.pipeline.registry import ModelFamily


def traced_family(name: str, config_type, loss_type, pipelined_layers: Callable[[object], int],
                  one_layer: Callable[[object], object]) -> Callable[..., ModelFamily]:
    """The builder ``(preset, **overrides) -> ModelFamily`` of a decoder family:
    ``pipelined_layers(config)`` counts its identical layers, ``one_layer(config)`` is the
    config keeping one of them with the head and tail."""

    def build(preset: str, **overrides) -> ModelFamily:
        config = config_type.preset(preset, **overrides)

        def with_degrees(dp: int | None, mp: int | None, one: bool):
            cfg = one_layer(config) if one else config
            return cfg.replace(data_parallel=cfg.data_parallel if dp is None else dp,
                               model_parallel=cfg.model_parallel if mp is None else mp)

        def graph(batch: int, dp: int | None = None, mp: int | None = None, one_layer: bool = False):
            cfg = with_degrees(dp, mp, one_layer)
            ids = TensorSpec((batch, cfg.seq_length + 1), np.dtype(np.int32))
            return trace(loss_type(cfg), (ids,), {}).graph

        def check_degrees(dp: int, mp: int) -> None:
            with_degrees(dp, mp, False)          # the config's checks raise ValueError

        return ModelFamily(name, pipelined_layers(config), graph, check_degrees)

    return build


__all__ = ["traced_family"]
