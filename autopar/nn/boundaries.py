"""Cell- and function-level strategies (MindSpore's ``Cell.shard`` and ``ms.shard``) as
boundary ops recorded while the cell is traced.

A :class:`ShardSpec` holds one strategy per tensor input, per output and per named
parameter, each in ``.shard()``'s spelling for one tensor (a tuple of split counts or a
``Layout`` call). :func:`with_boundaries` wraps a ``construct`` (or any function of
tensors): while tracing, each tensor input passes through a
:class:`~autopar.ops.boundary.ShardBoundary` carrying its strategy before the body runs,
each planned parameter is read first by one, and each output passes through one after.
The planner does the rest (autopar/strategy/sharding_plan.py): boundaries are ops with
user strategies, the ops inside propagate from them. Outside a trace (an eager call on
arrays) the wrapper is the function itself: a strategy says where data lives, not what
it is.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

from ..errors import OpArgError, OpTypeError
from ..ir.strategy import Strategy, normalize_strategy
from ..ir.tracing import current_tracer
from ..ops.boundary import ShardBoundary
from ..runtime.tensor import TensorOps


@dataclass(frozen=True)
class ShardSpec:
    """The strategies of one ``shard`` call: per tensor input, per output (None: no
    out_strategy) and per parameter name."""

    inputs: tuple[Strategy, ...]
    outputs: tuple[Strategy, ...] | None
    parameters: tuple[tuple[str, Strategy], ...]


def _one(value, arg: str, where: str) -> Strategy:
    """One tensor's strategy (``(2, 1)`` or ``layout("dp", "None")``) as a one-input Strategy."""
    try:
        strategy = normalize_strategy((value,))
    except (OpArgError, OpTypeError) as err:
        inner = err.arg.removeprefix("in_strategy").removeprefix("[0]")   # the dim it names, if any
        raise type(err)(arg + inner, err.expected, err.actual, err.fix, where) from None
    if strategy.interleaved is not None and any(d is not None for d in strategy.interleaved):
        # copies are an op's way to run (ops/sharding.py); the ops inside a cell only follow its layouts
        raise OpArgError(arg, "a layout without 'interleaved_parallel' at a cell's boundary", str(value),
                         "put the interleaved layout on the op inside the cell (op.shard)", where)
    return strategy


def _per_tensor(values, arg: str, where: str) -> tuple[Strategy, ...]:
    if not isinstance(values, tuple):
        raise OpTypeError(arg, "a tuple with one strategy per tensor, e.g. ((2, 1),) or (layout('dp', 'None'),)",
                          repr(values), where=where)
    return tuple(_one(v, f"{arg}[{i}]", where) for i, v in enumerate(values))


def shard_spec(where: str, in_strategy, out_strategy=None, parameter_plan=None) -> ShardSpec:
    """Validate a ``shard`` call's arguments (their form; shapes are checked when traced)."""
    outputs = None if out_strategy is None else _per_tensor(out_strategy, "out_strategy", where)
    if parameter_plan is not None and not isinstance(parameter_plan, dict):
        raise OpTypeError("parameter_plan", "a dict {parameter name: strategy}, or None", repr(parameter_plan),
                          where=where)
    params = []
    for name, value in (parameter_plan or {}).items():
        if not isinstance(name, str):
            raise OpTypeError("parameter_plan key", "a parameter name (str)", repr(name), where=where)
        params.append((name, _one(value, f"parameter_plan[{name!r}]", where)))
    return ShardSpec(_per_tensor(in_strategy, "in_strategy", where), outputs, tuple(params))


def find_parameter(params: dict, name: str):
    """The parameter called ``name`` in ``params`` (name -> Parameter): its full name, or
    its name inside the cell (``dense.weight`` for ``blocks.0.dense.weight``); MindSpore's
    ``self.`` prefix is allowed. Unknown or ambiguous names are errors (MindSpore skips
    them with a warning; autopar accepts nothing it then ignores)."""
    key = name[5:] if name.startswith("self.") else name
    hits = [p for full, p in params.items() if full == key or full.endswith("." + key)]
    if len(hits) != 1:
        expected = "the name of one of its parameters: " + ", ".join(sorted(params)) if params else \
            "a parameter name, but the cell has no parameters"
        raise OpArgError(f"parameter_plan[{name!r}]", expected, f"{len(hits)} parameters matching {name!r}")
    return hits[0]


def _bound(x, strategy: Strategy, role: str):
    prim = ShardBoundary(role)
    prim.strategy = strategy
    return prim(x)


def with_boundaries(fn, spec: ShardSpec, params=None):
    """``fn`` with its tensors crossing :class:`ShardBoundary` ops while traced. ``params``
    (a callable giving the cell's name -> Parameter dict, read at trace time when names
    are final) resolves ``spec.parameters``. Errors found while tracing name the cell
    scope they happen in (the tracer adds it)."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if current_tracer() is None:
            return fn(*args, **kwargs)
        tensors = [i for i, a in enumerate(args) if isinstance(a, TensorOps)]
        if len(tensors) != len(spec.inputs):
            raise OpArgError("in_strategy", f"{len(tensors)} strategies, one per tensor input",
                             f"{len(spec.inputs)}", "give each tensor argument one strategy")
        args = list(args)
        for i, strategy in zip(tensors, spec.inputs):
            args[i] = _bound(args[i], strategy, "input")
        table = params() if spec.parameters else {}
        for name, strategy in spec.parameters:
            _bound(find_parameter(table, name), strategy, "parameter")
        result = fn(*args, **kwargs)
        if spec.outputs is None:
            return result
        outs = result if isinstance(result, tuple) else (result,)
        if len(outs) != len(spec.outputs):
            raise OpArgError("out_strategy", f"{len(outs)} strategies, one per output", f"{len(spec.outputs)}")
        outs = tuple(_bound(o, s, "output") for o, s in zip(outs, spec.outputs))
        return outs if isinstance(result, tuple) else outs[0]
    return wrapper
