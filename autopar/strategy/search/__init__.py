"""Strategy search under ``parallel_mode="auto_parallel"``.

:func:`search_plan` builds the pairwise problem of :mod:`.problem` from the cost model
and solves it with the ``search_mode``'s solver:

* ``dynamic_programming`` -- exact eliminations (:mod:`.elimination`);
* ``sharding_propagation`` -- greedy from the user's strategies (:mod:`.simple`);
* ``recursive_programming`` -- repeated two-way (prime) cuts (:mod:`.recursive`).

User strategies (``.shard()``) are constraints: those ops have one candidate. A memory
cap (the profile's device memory unless given) filters plans: when the fastest plan does
not fit, the search adds a price per byte (a Lagrange multiplier) and raises it until
the plan fits; when even the leanest plan does not fit, the error says by how much and
which tensors dominate.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from ...ir.graph import Graph
from ...ir.mesh import Mesh
from ..costmodel import CostModel, PlanCost
from ..optimizer_shard import DEFAULT_OPTIMIZER_SHARD, OptimizerShard
from ..profile import MachineProfile, load_profile
from ..sharding_plan import ShardingPlan
from .elimination import solve
from .problem import Problem, build, plan_of, user_strategy
from .recursive import _splittable, recursive
from .simple import brute_force, propagate

# The one list of search modes: ParallelContext validates search_mode against it and the
# plan CLI offers it; a new mode is added here and dispatched in _solve.
SEARCH_MODES = ("dynamic_programming", "recursive_programming", "sharding_propagation")
DEFAULT_PROFILE = "cpu-2core"


@dataclass(frozen=True)
class SearchResult:
    plan: ShardingPlan
    cost: PlanCost
    mode: str
    lam: float            # seconds per byte paid to fit the memory cap (0: the fastest plan fit)


def _solve(model: CostModel, mode: str, lam: float, problem: Problem | None) -> ShardingPlan:
    if mode == "recursive_programming":
        return plan_of(model, recursive(model, lam))
    choice = solve(problem, lam)[0] if mode == "dynamic_programming" else propagate(problem, lam)
    return problem.plan(choice)


def search(graph: Graph, stage: Mesh, mode: str = "dynamic_programming", full_batch: bool = False,
           profile: MachineProfile | str | None = None, memory_cap: float | None = None,
           optimizer_states: int = 2, optimizer_parallel: bool = False,
           optimizer_shard: OptimizerShard = DEFAULT_OPTIMIZER_SHARD) -> SearchResult:
    """The searched plan of ``graph``'s forward ops on ``stage``, with its predicted cost."""
    if mode not in SEARCH_MODES:
        raise ValueError(f"search_mode: expected one of {SEARCH_MODES}, got {mode!r}")
    if not isinstance(profile, MachineProfile):
        profile = load_profile(profile or DEFAULT_PROFILE)
    cap = float(profile.memory_bytes if memory_cap is None else memory_cap)
    if not cap > 0:
        raise ValueError(f"memory_cap: expected bytes > 0, got {memory_cap!r}")
    model = CostModel(graph, stage, profile, full_batch, optimizer_states, optimizer_parallel,
                      optimizer_shard=optimizer_shard)
    _check_divisible(model)
    problem = None if mode == "recursive_programming" else build(model)

    def attempt(lam: float) -> tuple[ShardingPlan, PlanCost]:
        plan = _solve(model, mode, lam, problem)
        return plan, model.evaluate(plan)

    plan, cost = attempt(0.0)
    if cost.memory_bytes <= cap:
        return SearchResult(plan, cost, mode, 0.0)
    lo, hi = 0.0, 1e-15
    lean = None
    while hi < 1e3:                      # price memory until a plan fits
        lean = attempt(hi)
        if lean[1].memory_bytes <= cap:
            break
        lo, hi = hi, hi * 16
    else:
        raise _does_not_fit(model, lean[0], lean[1], cap)
    for _ in range(12):                  # the smallest price that still fits: the fastest fitting plan
        mid = (lo + hi) / 2
        trial = attempt(mid)
        if trial[1].memory_bytes <= cap:
            hi, lean = mid, trial
        else:
            lo = mid
    return SearchResult(lean[0], lean[1], mode, hi)


def search_plan(graph: Graph, stage: Mesh, mode: str = "dynamic_programming", full_batch: bool = False,
                profile: MachineProfile | str | None = None, **kw) -> ShardingPlan:
    return search(graph, stage, mode, full_batch, profile, **kw).plan


def human_bytes(n: float) -> str:
    for unit, size in (("GiB", 2 ** 30), ("MiB", 2 ** 20), ("KiB", 2 ** 10)):
        if abs(n) >= size:
            return f"{n / size:.3g} {unit}"
    return f"{n:.0f} B"


def _check_divisible(model: CostModel) -> None:
    """Some op must be able to split some dim over part of the devices, or the search has
    nothing to choose: say so instead of silently running everything replicated."""
    n = model.stage.size
    if n == 1:
        return
    for node in model.forward:
        spec = _splittable(node, model)
        if spec is None:
            if user_strategy(node) is not None:
                return
            continue
        if any(math.gcd(size, n) > 1 for size in spec[2].values()):
            return
    dims = sorted({d for node in model.forward for v in node.inputs for d in model.graph.spec(v).shape})
    raise ValueError(f"device_num: {n} devices: no strategy exists, as {n} divides no dim of any op "
                     f"(their sizes: {dims[:12]}{'...' if len(dims) > 12 else ''}); use a device count "
                     "sharing a factor with the batch or hidden size")


def _does_not_fit(model: CostModel, plan: ShardingPlan, cost: PlanCost, cap: float) -> ValueError:
    """How far the leanest plan is over the cap, and the tensors that dominate it."""
    big = []
    for n in model.forward:
        sh = plan.shardings[n.id]
        c = model.node_cost(n, sh)
        if c.param_bytes:
            names = [model.graph.param_objs[model.graph.params.index(v)].name for v in n.inputs
                     if v in model.home and model.home[v][0] == n.id]
            big.append((c.param_bytes + c.grad_bytes + c.state_bytes,
                        f"parameter {', '.join(names)} (weight + gradient + optimizer states)"))
        if c.activation_bytes:
            big.append((c.activation_bytes, f"activations kept by {n.name}"))
    big.sort(key=lambda t: -t[0])
    top = "; ".join(f"{what}: {human_bytes(b)}" for b, what in big[:4])
    return ValueError(
        f"memory: no plan fits {human_bytes(cap)} per device: the leanest plan found needs "
        f"{human_bytes(cost.memory_bytes)} (over by {human_bytes(cost.memory_bytes - cap)}; parameters "
        f"{human_bytes(cost.param_bytes)}, gradients {human_bytes(cost.grad_bytes)}, optimizer states "
        f"{human_bytes(cost.state_bytes)}, activations {human_bytes(cost.activation_bytes)}). Largest: {top}. "
        "Use more devices, optimizer parallel, recompute or pipeline stages")


__all__ = ["SEARCH_MODES", "SearchResult", "search", "search_plan", "brute_force", "build", "solve"]
