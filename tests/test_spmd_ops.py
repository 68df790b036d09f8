"""Every op under every candidate strategy on 1, 2, 4 and 8 in-process ranks: the sharded
loss, forward output and input gradients equal serial ones (float64, rtol 1e-6).

Each case is a one-op cell, ``loss = sum(op(*inputs) * probe)``:

* float inputs the op differentiates are Parameters, so every one gets a gradient; integer
  and bool inputs (ids, labels, masks) and inputs of ops with no gradient are constants;
* ``probe`` is a Parameter shaped like the output, so ``d loss / d probe`` is the op's
  forward output itself (the raw tensor, not only a sum of it) and ``d loss / d out`` is
  ``probe``: a non-uniform dy;
* inputs are arange-like (``(arange * 0.37 + 0.11 k) % 1.3 - 0.6``, k per input): every
  element differs from its neighbours, so a misplaced shard shows.

The op's strategy comes from ``candidates(prim.indexing(specs, out), shapes, N)``: all of
them when there are at most ``MAX_STRATEGIES``, else a spread that includes the most split
one. The loss and probe ops take propagated shardings. Every rank's gradient shard must be
its block of the serial gradient (checked per rank, so a wrong replica shows too), and the
program must run the op under exactly the requested strategy. No communication may happen
on one rank or under the all-ones strategy.

No sharding rule yet (``indexing`` returns None; they run replicated, checked on 2 ranks):
BroadcastTo, Tile, OneHot, Gather with axis != 0.

Cases that fail because of a framework bug are listed in ``KNOWN_BUGS`` with the bug, and
run as strict xfails: the suite stays green, the bug visible, and a fix must remove them.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Callable

import numpy as np
import pytest

import autopar
from autopar import nn, ops
from autopar.comm import run_in_process
from autopar.ir.mesh import Mesh
from autopar.ir.spec import spec_of
from autopar.ops.primitive import Primitive
from autopar.ops.sharding import candidates, from_strategy
from autopar.runtime.sharded_program import ShardedGradProgram

RANKS = (1, 2, 4, 8)
MAX_STRATEGIES = 6
RTOL, ATOL = 1e-6, 1e-12


def arange_like(shape, k: int = 0, low: float = -0.6) -> np.ndarray:
    """Distinct, non-monotone values in [low, low + 1.3); ``k`` shifts them per input."""
    n = math.prod(shape)
    return np.asarray((np.arange(n, dtype=np.float64).reshape(shape) * 0.37 + 0.11 * k) % 1.3 + low)


def pos(shape, k: int = 0) -> np.ndarray:
    """Arange-like values in [0.4, 1.7): the domain of Log, Sqrt, Rsqrt, Pow, RealDiv."""
    return arange_like(shape, k, low=0.4)


@dataclass(frozen=True, eq=False)
class Case:
    """One op applied to fixed inputs: ``make()(*inputs, *static)``."""

    name: str
    make: Callable[[], Primitive]
    inputs: tuple
    static: tuple = ()
    tuple_input: bool = False          # Concat takes one tuple of tensors

    def call_args(self, tensors) -> tuple:
        return ((tuple(tensors),) if self.tuple_input else tuple(tensors)) + tuple(self.static)

    def is_param(self, i: int, prim: Primitive) -> bool:
        a = self.inputs[i]
        return a.dtype.kind == "f" and i not in prim.nondiff_inputs

    def bound(self) -> Primitive:
        """The primitive with its static arguments bound (what a traced node holds)."""
        prim = self.make()
        _, attrs = prim.bind(self.call_args(self.inputs))
        return prim.with_attrs(**attrs)

    def specs(self):
        return [spec_of(a) for a in self.inputs]

    def out_spec(self):
        return self.bound().infer(*self.specs())

    def indexing(self):
        return self.bound().indexing(self.specs(), self.out_spec())


class OneOp(nn.Cell):
    """``sum(op(*inputs) * probe)``; float differentiable inputs are Parameters ``in{i}``."""

    def __init__(self, case: Case, strategy=None):
        super().__init__()
        self.case = case
        self.prim = case.make()
        if strategy is not None:
            self.prim.shard(strategy)
        self.args = []
        for i, a in enumerate(case.inputs):
            if case.is_param(i, self.prim):
                p = nn.Parameter(a, name=f"in{i}")
                setattr(self, f"in{i}", p)
                self.args.append(p)
            else:
                self.args.append(a)
        out = case.out_spec()
        self.probe = nn.Parameter(arange_like(out.shape, 7, low=0.3), name="probe")
        self.mul = ops.Mul()
        self.sum = ops.ReduceSum()

    def construct(self):
        out = self.prim(*self.case.call_args(self.args))
        return self.sum(self.mul(out, self.probe), ())


# ---- the cases ---------------------------------------------------------------------------------

X = arange_like((8, 4))
X3 = arange_like((8, 4, 2))
X4 = arange_like((8, 4, 4))
INTS = (np.arange(32).reshape(8, 4) * 5) % 3


def unary(name, make, x=X):
    return Case(name, make, (x,))


UNARY = [
    unary("Neg", ops.Neg), unary("Exp", ops.Exp), unary("Log", ops.Log, pos((8, 4))),
    unary("Sqrt", ops.Sqrt, pos((8, 4))), unary("Rsqrt", ops.Rsqrt, pos((8, 4))), unary("Square", ops.Square),
    unary("Tanh", ops.Tanh), unary("Sigmoid", ops.Sigmoid), unary("ReLU", ops.ReLU), unary("SiLU", ops.SiLU),
    unary("GeLU-tanh", ops.GeLU), unary("GeLU-erf", lambda: ops.GeLU(approximate=False)),
    unary("FastGeLU", ops.FastGeLU),
    Case("Cast-f32", ops.Cast, (X,), (np.float32,)),
    unary("Dropout-keep1", lambda: ops.Dropout(keep_prob=1.0)),
    unary("Dropout-keep0.5", lambda: ops.Dropout(keep_prob=0.5)),
]

BINARY = [
    Case("Add-bcast-(8,4)+(4,)", ops.Add, (X, arange_like((4,), 1))),
    Case("Add-scalar", ops.Add, (X, np.array(0.25))),
    Case("Sub", ops.Sub, (X, arange_like((8, 4), 1))),
    Case("Mul-bcast-(8,1,4)*(2,4)", ops.Mul, (arange_like((8, 1, 4)), arange_like((2, 4), 1))),
    Case("RealDiv-bcast-(8,4)/(8,1)", ops.RealDiv, (X, pos((8, 1), 1))),
    Case("Maximum", ops.Maximum, (X, arange_like((8, 4), 1))),
    Case("Pow-bcast-(8,4)^(4,)", ops.Pow, (pos((8, 4)), arange_like((4,), 1))),
    Case("AddN-3", ops.AddN, (X, arange_like((8, 4), 1), arange_like((8, 4), 2))),
    Case("Select-bcast", ops.Select, (X > 0, arange_like((8, 4), 1), arange_like((1, 4), 2))),
    Case("Equal-int-bcast", ops.Equal, (INTS, INTS[1])),
    Case("NotEqual-int", ops.NotEqual, (INTS, INTS[::-1].copy())),
    Case("Less", ops.Less, (X, arange_like((8, 4), 1))),
    Case("Greater-bcast", ops.Greater, (X, arange_like((4,), 1))),
    Case("LogicalAnd", ops.LogicalAnd, (X > 0, INTS > 0)),
]

CONTRACTION = [
    Case("MatMul", ops.MatMul, (X, arange_like((4, 8), 1))),
    Case("MatMul-ta", lambda: ops.MatMul(transpose_a=True), (arange_like((4, 8)), arange_like((4, 8), 1))),
    Case("MatMul-tb", lambda: ops.MatMul(transpose_b=True), (X, arange_like((8, 4), 1))),
    Case("MatMul-ta-tb", lambda: ops.MatMul(True, True), (arange_like((4, 8)), arange_like((8, 4), 1))),
    Case("BatchMatMul", ops.BatchMatMul, (arange_like((2, 8, 4)), arange_like((2, 4, 8), 1))),
    Case("BatchMatMul-bcast-tb", lambda: ops.BatchMatMul(transpose_b=True),
         (arange_like((4, 8, 4)), arange_like((2, 4), 1))),
]

REDUCTION = [
    Case("ReduceSum-ax1", ops.ReduceSum, (X3,), (1,)),
    Case("ReduceSum-ax(0,2)-keep", lambda: ops.ReduceSum(keep_dims=True), (X3,), ((0, 2),)),
    Case("ReduceSum-all", ops.ReduceSum, (X3,), ((),)),
    Case("ReduceMean-ax-1-keep", lambda: ops.ReduceMean(keep_dims=True), (X3,), (-1,)),
    Case("ReduceMean-ax0", ops.ReduceMean, (X3,), (0,)),
    Case("ReduceMax-ax1", ops.ReduceMax, (X3,), (1,)),
    Case("ReduceMin-ax0-keep", lambda: ops.ReduceMin(keep_dims=True), (X3,), (0,)),
    Case("Cumsum-ax1", ops.Cumsum, (X3,), (1,)),
    Case("Cumsum-ax0-excl-rev", lambda: ops.Cumsum(exclusive=True, reverse=True), (X3,), (0,)),
    Case("ArgMax-ax1", lambda: ops.ArgMax(axis=1), (X4,)),
]

MOVEMENT = [
    Case("Reshape-(8,4,2)->(8,8)", ops.Reshape, (X3,), ((8, 8),)),
    Case("Reshape-(4,2,8)->(8,8)", ops.Reshape, (arange_like((4, 2, 8)),), ((8, 8),)),
    Case("Reshape-(8,8)->(8,2,4)", ops.Reshape, (arange_like((8, 8)),), ((8, 2, 4),)),
    Case("Reshape-(32,)->(4,8)", ops.Reshape, (arange_like((32,)),), ((4, -1),)),
    Case("Reshape-(8,4)->(32,)", ops.Reshape, (X,), ((32,),)),
    Case("Transpose-(2,0,1)", ops.Transpose, (X3,), ((2, 0, 1),)),
    Case("ExpandDims-ax1", ops.ExpandDims, (X,), (1,)),
    Case("Squeeze-ax1", lambda: ops.Squeeze(1), (arange_like((8, 1, 4)),)),
    Case("Squeeze-all", ops.Squeeze, (arange_like((8, 1, 4, 1)),)),
    Case("StridedSlice-(8,6,4)[:,1:5:2]", ops.StridedSlice, (arange_like((8, 6, 4)),), ((0, 1), (8, 5), (1, 2))),
    Case("Slice-(8,6)[:,2:6]", ops.Slice, (arange_like((8, 6)),), ((0, 2), (-1, 4))),
    Case("Concat-ax1", lambda: ops.Concat(1), (X, arange_like((8, 2), 1)), tuple_input=True),
    Case("Concat-ax0", ops.Concat, (arange_like((4, 4)), arange_like((2, 4), 1), arange_like((2, 4), 2)),
         tuple_input=True),
]

ROWWISE = [
    Case("Softmax-ax-1", ops.Softmax, (X4,)),
    Case("Softmax-ax(0,2)", lambda: ops.Softmax((0, 2)), (X4,)),
    Case("LogSoftmax-ax1", lambda: ops.LogSoftmax(1), (X4,)),
    Case("LayerNorm-last", ops.LayerNorm, (X4, arange_like((4,), 1, 0.5), arange_like((4,), 2))),
    Case("LayerNorm-bna1-bpa1", lambda: ops.LayerNorm(1, 1), (X4, arange_like((4, 4), 1, 0.5), arange_like((4, 4), 2))),
    Case("LayerNorm-bna1-bpa-1", lambda: ops.LayerNorm(1, -1), (X4, arange_like((4,), 1, 0.5), arange_like((4,), 2))),
    Case("RMSNorm", ops.RMSNorm, (X4, arange_like((4,), 1, 0.5))),
    Case("Gather-ax0", ops.Gather, (arange_like((16, 4)), np.array([[3, 14, 7, 0], [9, 7, 12, 5]], np.int32)), (0,)),
    Case("SoftmaxCE", ops.SoftmaxCrossEntropyWithLogits, (X, pos((8, 4), 1))),
    Case("SoftmaxCE-3d", ops.SoftmaxCrossEntropyWithLogits, (arange_like((4, 2, 4)), pos((4, 2, 4), 1))),
    Case("SparseSoftmaxCE", ops.SparseSoftmaxCrossEntropyWithLogits,
         (arange_like((8, 16)) * 3, (np.arange(8, dtype=np.int32) * 5) % 16)),
    Case("SparseSoftmaxCE-3d", ops.SparseSoftmaxCrossEntropyWithLogits,
         (arange_like((4, 2, 8)) * 3, np.array([[7, 0], [3, 3], [5, 1], [6, 2]], np.int32))),
]

CASES = UNARY + BINARY + CONTRACTION + REDUCTION + MOVEMENT + ROWWISE

NO_RULE = [
    Case("BroadcastTo", lambda: ops.BroadcastTo((8, 4)), (arange_like((4,)),)),
    Case("Tile", ops.Tile, (arange_like((4, 2)),), ((2, 1),)),
    Case("OneHot", ops.OneHot, (np.array([3, 0, 2, 5, 1, 4, 7, 6], np.int32),), (8, 1.5, -0.5)),
    Case("Gather-ax1", ops.Gather, (arange_like((4, 16)), np.array([3, 14, 7, 7], np.int32)), (1,)),
]


# ---- strategies ----------------------------------------------------------------------------------

def devices_used(case: Case, strategy) -> int:
    """Product of the split counts, one per letter."""
    counts = {}
    for letters, split in zip(case.indexing().inputs, strategy):
        counts.update(zip(letters, split))
    return math.prod(counts.values())


def chosen_strategies(case: Case, n: int) -> list:
    """All candidates when few; else an even spread over those using all n devices, the
    most split first, topped up with ones that repeat the computation."""
    every = candidates(case.indexing(), [a.shape for a in case.inputs], n, case.out_spec().shape)
    if len(every) <= MAX_STRATEGIES:
        return every
    ranked = sorted(every, key=lambda s: -devices_used(case, s))   # stable: most split first
    top = devices_used(case, ranked[0])
    full = [s for s in ranked if devices_used(case, s) == top]
    rest = [s for s in ranked if devices_used(case, s) != top]
    picks = spread(full, MAX_STRATEGIES - 1)
    picks += spread(rest, MAX_STRATEGIES - len(picks))
    return picks


def spread(items: list, k: int) -> list:
    """k items evenly spaced through the list, its first one included."""
    if len(items) <= k:
        return list(items)
    return [items[round(i * (len(items) - 1) / max(k - 1, 1))] for i in range(k)]


def strategy_id(strategy) -> str:
    return "".join(str(s).replace(" ", "").replace(",)", ")") for s in strategy)


def params():
    out = []
    for case in CASES:
        for n in RANKS:
            for strategy in chosen_strategies(case, n):
                cid = f"{case.name}-N{n}-{strategy_id(strategy)}"
                marks = [pytest.mark.xfail(strict=True, reason=KNOWN_BUGS[cid])] if cid in KNOWN_BUGS else []
                out.append(pytest.param(case, n, strategy, id=cid, marks=marks))
    return out


# Cases that fail because of a framework bug (id -> the bug); strict, so a fix shows.
KNOWN_BUGS: dict[str, str] = {}


# ---- running ---------------------------------------------------------------------------------------

@lru_cache(maxsize=None)
def serial(case: Case):
    """The serial loss and gradients (by parameter name) of the one-op cell."""
    cell = OneOp(case)
    loss, grads = autopar.value_and_grad(cell)()
    return loss, grads, [p.name for p in cell.trainable_params()]


def run_sharded(case: Case, n: int, strategy=None):
    def body(comm):
        cell = OneOp(case, strategy)
        prog = ShardedGradProgram(cell, (), cell.trainable_params(), "semi_auto_parallel", comm, full_batch=True)
        first = prog.graph.nodes[0]                         # the op under test is traced first
        comm.stats.reset()
        loss, grads = prog((),)
        return loss, grads, prog.layouts, prog.plan.shardings[first.id], comm.stats.snapshot()["count"]
    return run_in_process(n, body)


def check_equals_serial(case: Case, res) -> None:
    loss, grads, names = serial(case)
    for rank, r in enumerate(res):
        np.testing.assert_allclose(r[0], loss, rtol=RTOL, atol=ATOL, err_msg=f"loss on rank {rank}")
    for k, name in enumerate(names):
        want, layout = grads[name], res[0][2][k]
        what = "forward output (d loss/d probe)" if name == "probe" else f"gradient of {name}"
        if not layout.partial:  # every rank holds exactly its block, replicas included
            for rank, r in enumerate(res):
                np.testing.assert_allclose(r[1][k], layout.shard(want, rank), rtol=RTOL, atol=ATOL,
                                           err_msg=f"{what} on rank {rank}, layout {layout}")
        got = layout.assemble({rank: r[1][k] for rank, r in enumerate(res)}, want.shape)
        np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL, err_msg=f"{what}, layout {layout}")


@pytest.mark.parametrize("case, n, strategy", params())
def test_sharded_op_equals_serial(case, n, strategy):
    res = run_sharded(case, n, strategy)
    assert res[0][3].splits() == tuple(strategy), f"planned {res[0][3]} for strategy {strategy}"
    check_equals_serial(case, res)
    if n == 1 or devices_used(case, strategy) == 1:
        assert all(r[4] == {} for r in res), f"communication with nothing split: {res[0][4]}"


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_serial_probe_gradient_is_the_eager_forward(case):
    """What the sharded runs are held to: d loss/d probe is the op's output, as an eager call
    gives it (dropout with keep_prob 1 is the identity; below 1 it has no eager form)."""
    prim = case.make()
    if prim.needs_rng:                   # runs only inside a cell
        if prim.attrs["keep_prob"] < 1:
            pytest.skip("dropout's mask exists only inside a cell")
        out = case.inputs[0]
    else:
        out = prim(*case.call_args(case.inputs))
    np.testing.assert_allclose(serial(case)[1]["probe"], out, rtol=1e-12, atol=0)
    assert len(serial(case)[2]) == 1 + sum(case.is_param(i, case.make()) for i in range(len(case.inputs)))


@pytest.mark.parametrize("case", NO_RULE, ids=lambda c: c.name)
def test_op_without_rule_runs_replicated_and_equals_serial(case):
    assert case.indexing() is None
    res = run_sharded(case, 2)
    assert not res[0][3].axes, f"an op with no rule was sharded: {res[0][3]}"
    check_equals_serial(case, res)


def test_every_op_kind_has_a_case():
    kinds = {c.make().kind for c in CASES + NO_RULE}
    assert kinds == set(ops.all_ops()), f"missing: {set(ops.all_ops()) - kinds}"


@pytest.mark.parametrize("name, strategy", [
    ("ReduceSum-ax1", ((1, 2, 1),)),                      # split summed axis
    ("ReduceSum-all", ((2, 2, 2),)),
    ("MatMul", ((1, 2), (2, 1))),                         # split contraction
    ("BatchMatMul", ((1, 1, 2), (1, 2, 1))),
    ("Gather-ax0", ((2, 1), (1, 1))),                     # vocabulary-split table
])
def test_partial_sum_paths_are_among_the_cases(name, strategy):
    """The strategies whose output is a partial sum (the reduction the framework must
    insert) are among those run above."""
    case = next(c for c in CASES if c.name == name)
    n = devices_used(case, strategy)
    assert strategy in chosen_strategies(case, n)
    sharding = from_strategy(case.indexing(), strategy, [a.shape for a in case.inputs], Mesh((n,), ("d",)))
    assert sharding.output_layout().partial


def test_known_bugs_name_cases_that_run():
    """An entry whose case no longer exists (a candidate dropped by a fix) must go."""
    ids = {p.id for p in params()}
    assert set(KNOWN_BUGS) <= ids, sorted(set(KNOWN_BUGS) - ids)


# rank 0's collectives: (kind, group, local shape); one forward and one backward pass
GOLDEN_COMM = [
    # split contraction: the partial output is all-reduced once (before the probe's Mul)
    ("MatMul", 2, ((1, 2), (2, 1)), [("allreduce", (0, 1), (8, 8))]),
    # row split: the loss, and B's gradient (partial over the row axis)
    ("MatMul", 2, ((2, 1), (1, 1)), [("allreduce", (0, 1), ()), ("allreduce", (0, 1), (4, 8))]),
    # mesh (x=2, z=2), rank 0's x group (0, 2) and z group (0, 1): the output over z, then
    # the loss and B's (2, 8) gradient shard over x
    ("MatMul", 4, ((2, 2), (2, 1)), [("allreduce", (0, 1), (4, 8)), ("allreduce", (0, 2), ()),
                                     ("allreduce", (0, 2), (2, 8))]),
    ("ReduceSum-ax1", 2, ((1, 2, 1),), [("allreduce", (0, 1), (8, 2))]),
    # vocabulary-parallel cross-entropy: row max, exp-sum and picked logit forward; the
    # picked logit again in the vjp
    ("SparseSoftmaxCE", 2, ((1, 2), (1,)), [("allreduce", (0, 1), (8,))] * 4),
    # vocabulary-split lookup: one all-reduce of the masked rows; the table's gradient stays local
    ("Gather-ax0", 2, ((2, 1), (1, 1)), [("allreduce", (0, 1), (2, 4, 4))]),
    # rows split: the loss, gamma's and beta's gradients
    ("LayerNorm-last", 2, ((2, 1, 1), (1,), (1,)),
     [("allreduce", (0, 1), ()), ("allreduce", (0, 1), (4,)), ("allreduce", (0, 1), (4,))]),
]


@pytest.mark.parametrize("name, n, strategy, want", GOLDEN_COMM,
                         ids=[f"{g[0]}-N{g[1]}-{strategy_id(g[2])}" for g in GOLDEN_COMM])
def test_exact_collectives(name, n, strategy, want):
    case = next(c for c in CASES if c.name == name)

    def body(comm):
        cell = OneOp(case, strategy)
        prog = ShardedGradProgram(cell, (), cell.trainable_params(), "semi_auto_parallel", comm, full_batch=True)
        comm.stats.reset()
        prog(())
        return sorted((rec.kind, rec.ranks, rec.shape) for rec in comm.stats.log)
    assert run_in_process(n, body)[0] == sorted(want)
