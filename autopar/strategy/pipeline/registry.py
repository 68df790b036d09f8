"""The model families the stage search can price, registered by the models themselves.

The planner knows no model by name: a family in ``autopar/models/`` calls
:func:`register_model` when its package is imported, with a builder that turns a preset
name (and config overrides) into a :class:`ModelFamily`. The family tells the planner only
what it prices: how many identical layers it pipelines, and the traced forward graph at a
batch and data x model degrees given as plain integers. How the degrees become the model's
``.shard()`` strategies stays inside the model.

    register_model("pangu_alpha", build)                        # in autopar/models/pangu_alpha
    model_family("pangu_alpha", "200B", compute_dtype="float16")   # in the planner
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from ...errors import format_error
from ...ir.graph import Graph


@dataclass(frozen=True)
class ModelFamily:
    """A model at one preset, as the stage search sees it.

    ``graph(batch, dp, mp, one_layer)`` traces the training forward graph (loss included) on
    ``batch`` sequences with the model's own strategies at data x model degrees ``dp x mp``
    (None: the preset's); ``one_layer`` keeps ONE pipelined layer with the head and tail, the
    graph the stage search prices a stage from. ``check_degrees(dp, mp)`` raises ValueError
    when the model cannot be split so (heads not divisible, ...)."""
    name: str
    layers: int                                              # pipelined identical layers
    graph: Callable[..., Graph]
    check_degrees: Callable[[int, int], None]
    layer_scope: str = "blocks.0."                           # scope of the first pipelined layer


_BUILDERS: dict[str, Callable[..., ModelFamily]] = {}       # name -> builder(preset, **overrides)


def register_model(name: str, builder: Callable[..., ModelFamily]) -> None:
    """Make ``name`` known to the planner (``python -m autopar.plan --model name``)."""
    if not isinstance(name, str) or not name:
        raise TypeError(format_error("register_model", "name", "a non-empty str", repr(name), ""))
    known = _BUILDERS.get(name)
    if known is not None and known is not builder:
        raise ValueError(format_error("register_model", "name", "a name no other family registered",
                                      f"{name!r}, already registered by {known.__module__}",
                                      "give the new family another name"))
    _BUILDERS[name] = builder


def registered_models() -> tuple[str, ...]:
    """Names of the registered families, sorted."""
    return tuple(sorted(_BUILDERS))


def model_family(name: str, preset: str, **overrides) -> ModelFamily:
    """The registered family ``name`` at ``preset``; the builder's ValueError for a bad preset."""
    if name not in _BUILDERS:
        raise ValueError(format_error("model_family", "name", f"one of {list(registered_models())}", repr(name),
                                      "import the model's package (autopar.models) so it registers"))
    return _BUILDERS[name](preset, **overrides)


__all__ = ["ModelFamily", "model_family", "register_model", "registered_models"]
