"""Cell: the MindSpore-style building block. Write ``construct``; call the cell.

Names. Assigning a Parameter or a Cell to an attribute registers it. As in MindSpore,
a child's parameter names are prefixed with its attribute name when the child is
assigned, so after ``self.blocks = CellList([...])`` a weight is called
``blocks.0.attention.dense1.weight``. Wrappers with ``auto_prefix = False``
(WithLossCell, TrainOneStepCell) leave the names of what they wrap unchanged. A
parameter shared by two cells (a tied embedding) keeps the name of its first owner.

Calling. Inside a trace, calling a cell runs its ``construct`` under its scope. Outside,
the call traces ``construct`` once per input signature, compiles a program and runs it on
numpy inputs, returning numpy outputs.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Iterator

import numpy as np

from ..errors import OpArgError, at_scope, check_int, format_error
from ..ir.tracing import current_tracer
from ..runtime.compiled import run_forward
from .boundaries import find_parameter, shard_spec, with_boundaries
from .parameter import Parameter


class Cell:
    auto_prefix = True

    def __init__(self):
        object.__setattr__(self, "_params", OrderedDict())
        object.__setattr__(self, "_cells", OrderedDict())
        object.__setattr__(self, "_compiled", {})
        object.__setattr__(self, "training", False)
        object.__setattr__(self, "_pipeline_stage", None)
        object.__setattr__(self, "is_recompute", None)    # None: as the enclosing cell says
        object.__setattr__(self, "recompute_comm", True)  # its mp_comm_recompute (see recompute)

    # ---- registration ----------------------------------------------------------------
    def __setattr__(self, name: str, value) -> None:
        if "_params" not in self.__dict__:
            raise AttributeError(f"{type(self).__name__}: call super().__init__() before assigning {name!r}")
        if isinstance(value, Parameter):
            if getattr(value, "_owner", None) is None:
                value._owner = self
                value.name = value.name or name
            self._params[name] = value
        elif isinstance(value, Cell):
            if self.auto_prefix:
                value._prefix_names(name + ".")
            self._cells[name] = value
        object.__setattr__(self, name, value)

    def _prefix_names(self, prefix: str) -> None:
        for cell in self._unique_cells():
            for p in cell._params.values():
                if p._owner is cell:
                    p.name = prefix + p.name

    def _unique_cells(self) -> list["Cell"]:
        seen, order, stack = set(), [], [self]
        while stack:
            c = stack.pop()
            if id(c) in seen:
                continue
            seen.add(id(c))
            order.append(c)
            stack.extend(reversed(list(c._cells.values())))
        return order

    def named_cells(self, prefix: str = "") -> Iterator[tuple[str, "Cell"]]:
        """(scope path, cell) for this cell and every descendant, each once, depth first."""
        seen: set[int] = set()

        def walk(cell: Cell, path: str):
            if id(cell) in seen:
                return
            seen.add(id(cell))
            yield path, cell
            for name, child in cell._cells.items():
                child_path = (f"{path}.{name}" if path else name) if cell.auto_prefix else path
                yield from walk(child, child_path)

        yield from walk(self, prefix)

    def cells(self) -> list["Cell"]:
        return list(self._cells.values())

    def parameters_dict(self) -> "OrderedDict[str, Parameter]":
        """Every parameter of this cell and its descendants, by name, each once."""
        out: OrderedDict[str, Parameter] = OrderedDict()
        seen: set[int] = set()
        for _, cell in self.named_cells():
            for p in cell._params.values():
                if id(p) in seen:
                    continue
                seen.add(id(p))
                if p.name in out:
                    raise ValueError(f"{type(self).__name__}: two different parameters are named {p.name!r}; "
                                     "give one of them another name")
                out[p.name] = p
        return out

    def get_parameters(self) -> list[Parameter]:
        return list(self.parameters_dict().values())

    def trainable_params(self) -> list[Parameter]:
        return [p for p in self.parameters_dict().values() if p.requires_grad]

    def init_parameters_data(self, seed: int | None = None) -> "Cell":
        """Materialize every parameter (optionally after choosing a new init seed)."""
        for p in self.get_parameters():
            if seed is not None and p.init is not None:
                p.init_seed = seed
                p.drop_data()
            p.data  # noqa: B018 - materializes
        return self

    def parameter_count(self) -> int:
        return sum(p.size for p in self.get_parameters())

    # ---- modes -----------------------------------------------------------------------
    def set_train(self, mode: bool = True) -> "Cell":
        for c in self._unique_cells():
            object.__setattr__(c, "training", mode)
        return self

    def recompute(self, mode: bool = True, *, mp_comm_recompute: bool = True,
                  parallel_optimizer_comm_recompute: bool = False, recompute_slice_activation: bool = False) -> "Cell":
        """Drop this cell's activations after forward and recompute them for backward
        (MindSpore's ``Cell.recompute()``). ``mode=False`` marks the cell kept: inside a
        recomputed cell, its ops' outputs are saved as usual. The innermost explicit mark
        wins, and an op's own (``Primitive.recompute``) beats every cell's. A cell never
        marked (``is_recompute`` None) follows the cell around it.

        ``mp_comm_recompute`` (MindSpore's default True): the model-parallel redistributions
        feeding the recomputed ops run again in the backward pass; False keeps their outputs
        saved instead (less communication, more memory). MindSpore's
        ``parallel_optimizer_comm_recompute`` and ``recompute_slice_activation`` are taken at
        their default (False) only: True is a ValueError saying why."""
        where = f"{type(self).__name__}.recompute"
        for arg, value in (("mode", mode), ("mp_comm_recompute", mp_comm_recompute),
                           ("parallel_optimizer_comm_recompute", parallel_optimizer_comm_recompute),
                           ("recompute_slice_activation", recompute_slice_activation)):
            if not isinstance(value, (bool, np.bool_)):
                raise TypeError(format_error(where, arg, "True or False", repr(value)))
        if parallel_optimizer_comm_recompute:
            raise ValueError(format_error(where, "parallel_optimizer_comm_recompute", "False (autopar does not "
                                          "support True)", "True", "optimizer-parallel weights are whole through "
                                          "the step below optimizer_level 'level3', and level3 gathers them again "
                                          "for every backward use: set parallel_optimizer_config instead"))
        if recompute_slice_activation:
            raise ValueError(format_error(where, "recompute_slice_activation", "False (autopar does not support "
                                          "True)", "True", "saved activations stay in their op's layout"))
        object.__setattr__(self, "is_recompute", bool(mode))
        object.__setattr__(self, "recompute_comm", bool(mp_comm_recompute))
        return self

    def shard(self, in_strategy, out_strategy=None, parameter_plan=None) -> "Cell":
        """MindSpore's ``Cell.shard``: the layouts of this cell's tensor inputs, outputs and
        named parameters, one strategy each (``(2, 1)`` or ``layout("dp", "None")``); the
        ops inside without their own strategy follow by propagation. Recorded as boundary
        ops when traced (autopar/nn/boundaries.py); honoured in semi_auto_parallel and
        auto_parallel. Returns the cell."""
        where = f"{type(self).__name__}.shard"
        spec = shard_spec(where, in_strategy, out_strategy, parameter_plan)
        for name, _ in spec.parameters:    # unknown names fail now, not at the first trace
            try:
                find_parameter(self.parameters_dict(), name)
            except OpArgError as err:
                raise at_scope(err, where) from None
        object.__setattr__(self, "construct", with_boundaries(type(self).construct.__get__(self), spec,
                                                              self.parameters_dict))
        self._compiled.clear()             # programs traced before the strategy was set
        return self

    @property
    def pipeline_stage(self) -> int | None:
        return self._pipeline_stage

    @pipeline_stage.setter
    def pipeline_stage(self, stage: int) -> None:
        stage = check_int(f"{type(self).__name__}", "pipeline_stage", stage, 0)
        object.__setattr__(self, "_pipeline_stage", stage)

    # ---- calling ---------------------------------------------------------------------
    def construct(self, *args, **kwargs):
        raise NotImplementedError(f"{type(self).__name__}.construct")

    def __call__(self, *args, **kwargs):
        tracer = current_tracer()
        if tracer is not None:
            with tracer.cell_scope(self):
                return self.construct(*args, **kwargs)
        return run_forward(self, args, kwargs)

    def __repr__(self) -> str:
        lines = [f"{type(self).__name__}("]
        for name, child in self._cells.items():
            body = repr(child).replace("\n", "\n  ")
            lines.append(f"  ({name}): {body}")
        if len(lines) == 1:
            return f"{type(self).__name__}()"
        return "\n".join(lines + [")"])


class CellList(Cell):
    """A list of cells named 0, 1, 2, ... (``blocks.0.attention``)."""

    def __init__(self, cells=()):
        super().__init__()
        self._list: list[Cell] = []
        for c in cells:
            self.append(c)

    def append(self, cell: Cell) -> None:
        if not isinstance(cell, Cell):
            raise TypeError(f"CellList: expected a Cell, got {type(cell).__name__}")
        setattr(self, str(len(self._list)), cell)
        self._list.append(cell)

    def __getitem__(self, i):
        return self._list[i]

    def __len__(self) -> int:
        return len(self._list)

    def __iter__(self):
        return iter(self._list)


class SequentialCell(CellList):
    def construct(self, x):
        for cell in self._list:
            x = cell(x)
        return x
