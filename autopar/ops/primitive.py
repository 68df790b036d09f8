"""The primitive op: one class per op kind, answering the same questions as pure functions.

A primitive instance carries its attributes (``MatMul(transpose_b=True)``) and, after
``.shard()``, the user's strategy. Every op answers:

=====================  ==============================================================
``infer(*specs)``      output shape and dtype (raises :class:`OpArgError` on bad input)
``forward(*xs)``       kernel on (local) arrays, computing with their array module
``vjp(dy, xs, y, specs, needs)``
                       gradient of each input whose ``needs[i]`` is true (else None);
                       ``xs[i]`` is present only for ``i in save_inputs`` and ``y`` only
                       if ``save_output``: autodiff keeps nothing else alive
``flops(specs, out)``  floating-point operations of the forward pass
``bytes_accessed``     bytes read and written by the forward pass
=====================  ==============================================================

Calling a primitive records a node when tracing and runs the kernel eagerly on arrays
(numpy, or CuPy on a GPU) otherwise. Trailing *static* arguments (``Reshape()(x, shape)``) are named in
``static_args`` and become attributes of the node.
"""
from __future__ import annotations

from typing import Any, ClassVar, Sequence

import numpy as np

from ..dtype import is_float
from ..errors import OpArgError, OpTypeError, at_scope, is_int
from ..ir.spec import TensorSpec
from ..ir.strategy import Strategy, normalize_strategy
from .call import apply


class Primitive:
    """Base class of every op. Subclasses set the class variables and override the rules."""

    n_inputs: ClassVar[int | None] = 1          # None: variadic (Concat, AddN)
    static_args: ClassVar[tuple[str, ...]] = ()  # trailing call arguments that are attributes
    save_inputs: ClassVar[tuple[int, ...] | str] = "all"  # what vjp reads: indices or "all"/"none"
    save_output: ClassVar[bool] = False
    nondiff_inputs: ClassVar[tuple[int, ...]] = ()  # inputs that never get a gradient (labels, masks)
    needs_rng: ClassVar[bool] = False             # forward/vjp take key=RngKey (dropout)
    # forward takes checks=list inside a Program: checks of input values that a device defers
    # to the end of the run (rowwise.check_range) instead of waiting for the device at once
    checks_values: ClassVar[bool] = False
    # memory views: "alias" -- the output views its input (a reshape); "strided" -- a strided
    # view (a transpose) that the next contiguous reader copies once. The cost model charges
    # an alias no bytes and a strided view that one copy.
    view: ClassVar[str] = ""
    # MindSpore's out_strategy: whether the op's output may be laid out apart from its
    # inputs (a contraction's partial sum reduce-scattered); other ops reject one
    takes_out_strategy: ClassVar[bool] = False

    def __init__(self, **attrs: Any):
        self.attrs: dict[str, Any] = attrs
        self.strategy: Strategy | None = None
        self.recompute_mode: bool | None = None     # None: as its cell says (Cell.recompute)

    # ---- identity ---------------------------------------------------------------------
    @property
    def kind(self) -> str:
        return type(self).__name__

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.attrs.items())
        shard = f".shard({self.strategy})" if self.strategy else ""
        return f"{self.kind}({args}){shard}"

    def with_attrs(self, **more: Any) -> "Primitive":
        """A copy with extra attributes (the static call arguments), same strategy and
        recompute mark."""
        new = object.__new__(type(self))
        new.attrs = {**self.attrs, **more}
        new.strategy = self.strategy
        new.recompute_mode = getattr(self, "recompute_mode", None)
        return new

    # ---- user API ---------------------------------------------------------------------
    def shard(self, in_strategy, out_strategy=None) -> "Primitive":
        """Record the user's strategy (MindSpore's ``op.shard``); returns the op. Each
        strategy is a tuple of split-count tuples, or of MindSpore 2.x layouts
        (``autopar.Layout((2, 4), ("dp", "mp"))("dp", "None")``), one per tensor;
        ``out_strategy`` only on ops with :attr:`takes_out_strategy` (checked at plan time)."""
        try:
            self.strategy = normalize_strategy(in_strategy, out_strategy)
        except (OpArgError, OpTypeError) as err:
            raise at_scope(err, f"{self.kind}.shard") from None
        return self

    def recompute(self, mode: bool = True) -> "Primitive":
        """MindSpore's ``op.recompute()``: rebuild this op's output for backward instead of
        keeping it (``mode=False``: keep it even inside a recomputed cell); returns the op."""
        if not isinstance(mode, bool):
            raise OpTypeError("mode", "a bool", repr(mode))
        self.recompute_mode = mode
        return self

    def __call__(self, *args):
        return apply(self, args)

    def bind(self, args: Sequence) -> tuple[tuple, dict[str, Any]]:
        """Split call arguments into tensor inputs and static attributes."""
        n_static = len(self.static_args)
        if n_static == 0:
            return tuple(args), {}
        n_tensor = len(args) - n_static
        if self.n_inputs is not None and n_tensor != self.n_inputs:
            raise OpArgError("arguments", f"{self.n_inputs} tensor(s) then {', '.join(self.static_args)}",
                             f"{len(args)} argument(s)")
        return tuple(args[:n_tensor]), dict(zip(self.static_args, args[n_tensor:]))

    # ---- rules (override) -------------------------------------------------------------
    def infer(self, *specs: TensorSpec) -> TensorSpec:
        raise NotImplementedError(f"{self.kind}.infer")

    def forward(self, *xs: np.ndarray) -> np.ndarray:
        raise NotImplementedError(f"{self.kind}.forward")

    def vjp(self, dy: np.ndarray, xs: Sequence, y, specs: Sequence[TensorSpec],
            needs: Sequence[bool]) -> tuple:
        raise NotImplementedError(f"{self.kind} has no gradient rule")

    def flops(self, specs: Sequence[TensorSpec], out: TensorSpec) -> int:
        return out.size

    def vjp_flops(self, specs: Sequence[TensorSpec], out: TensorSpec, needs: Sequence[bool]) -> int:
        """FLOPs of the backward pass: by default one forward's worth per input gradient."""
        return self.flops(specs, out) * sum(bool(n) for n in needs)

    def bytes_accessed(self, specs: Sequence[TensorSpec], out: TensorSpec) -> int:
        if self.view == "alias":
            return 0
        return sum(s.nbytes for s in specs) + out.nbytes

    # ---- sharding ---------------------------------------------------------------------
    def indexing(self, specs: Sequence[TensorSpec], out: TensorSpec):
        """Einsum-style letters of the op (``autopar.ops.sharding.Indexing``) from
        which every layout rule follows; None: no sharding rule (the op runs replicated)."""
        return None

    def local(self, sharding, rank: int, specs: Sequence[TensorSpec], out: TensorSpec,
              comm_for=None) -> "Primitive":
        """The primitive to run on ``rank``'s shards under ``sharding`` (global ``specs``):
        static shapes localized, offsets bound, and for ops that reduce over a split dim
        inside their kernel, ``comm_for(mesh, axes)``: this rank's communicator along those
        mesh axes (made at lower time). Default: the op itself."""
        return self

    # ---- memory: what lowering may reuse ----------------------------------------------
    fresh_output: ClassVar[bool] = False  # forward returns a new array that aliases no input
    fresh_grads: ClassVar[bool] = False   # vjp returns new arrays that alias nothing

    def output_is_fresh(self) -> bool:
        return self.fresh_output

    def grads_are_fresh(self) -> bool:
        return self.fresh_grads

    def inplace_inputs(self, specs: Sequence[TensorSpec], out: TensorSpec) -> tuple[int, ...]:
        """Inputs whose buffer :meth:`forward_inplace` may overwrite with the output."""
        return ()

    def forward_inplace(self, j: int, *xs: np.ndarray) -> np.ndarray:
        """Like forward, writing the result into ``xs[j]`` (lowering proved it dead)."""
        raise NotImplementedError(f"{self.kind}.forward_inplace")

    # ---- helpers for rules ------------------------------------------------------------
    def saved_input_indices(self, n: int) -> tuple[int, ...]:
        if self.save_inputs == "all":
            return tuple(range(n))
        if self.save_inputs == "none":
            return ()
        return tuple(self.save_inputs)

    def check_n_inputs(self, specs: Sequence[TensorSpec]) -> None:
        if self.n_inputs is not None and len(specs) != self.n_inputs:
            raise OpArgError("inputs", f"{self.n_inputs} tensor input(s)", f"{len(specs)}")


def check_float(spec: TensorSpec, arg: str) -> None:
    if not is_float(spec.dtype):   # numpy floats and bfloat16 (kind 'V')
        raise OpArgError(f"{arg} dtype", "a float dtype", np.dtype(spec.dtype).name,
                         "cast it first with ops.Cast()(x, autopar.float32)")


def normalize_axis(axis: int, ndim: int, arg: str = "axis") -> int:
    if not is_int(axis):
        raise OpArgError(arg, "an int", repr(axis))
    if not -ndim <= axis < max(ndim, 1):
        raise OpArgError(arg, f"an axis in [{-ndim}, {ndim})", str(axis))
    return int(axis) % max(ndim, 1)


def normalize_axes(axis, ndim: int, arg: str = "axis") -> tuple[int, ...]:
    """() or None means all axes, as in MindSpore's reductions."""
    if axis is None or axis == ():
        return tuple(range(ndim))
    if isinstance(axis, (int, np.integer)):
        axis = (axis,)
    axes = tuple(sorted(normalize_axis(a, ndim, arg) for a in axis))
    if len(set(axes)) != len(axes):
        raise OpArgError(arg, "distinct axes", repr(axis))
    return axes
