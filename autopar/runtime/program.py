"""Lowering a graph to a flat program, and running it.

Everything decidable ahead of time is decided here, once: which nodes are needed for the
requested outputs, the kernel each instruction calls (with its static arguments bound),
the slots it reads and writes, and the slots that die after it (freed at once, so peak
memory is the live set, not the whole graph). The step loop does no graph walking and no
name look-ups: it is ``for fn, ins, outs, frees in instructions``.

Recompute (``autopar/runtime/recompute.py``) is a graph pass applied here first, when any
node is marked: clones of recomputed forward nodes go before their cell's backward, so the
liveness and donation below see them as ordinary instructions (a buffer a clone still
reads is alive until the clone has run). ``meter`` (a ``MemoryMeter``, off by default)
measures live bytes per run (``autopar/runtime/memory.py``).

Devices: a program runs on the device target in force when it is built
(``set_context(device_target=...)``, read once: :func:`autopar.backend.current_backend`).
On the CPU nothing moves. On a GPU the parameters move to the device once
(``Parameter.device_data``, kept there for the optimizer), the constants once, the inputs
at every call; the kernels then compute with CuPy because their inputs are CuPy arrays.
Array outputs (gradients) stay on the device for the optimizer; 0-d outputs (the loss)
come back to the host, since every caller reads them at once (the overflow check, the
progress bar) and the sync is paid anyway.

Value checks (``prim.checks_values``: an embedding's ids, a loss's labels in range) would
make the host wait for the device in the middle of the step. Those ops get a per-run list
(``checks=``, as dropout gets ``key=``): on the host they raise at once; on a device they
append the values to check, still on the device, and :meth:`Program.run` reads them all
in one copy after the last instruction, raising the op's error (named by its node, as any
error of the run) before any output is handed back -- so no optimizer updates on a bad batch.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from ..backend import Backend, base_buffer, current_backend, is_array, to_device, to_host, writable
from ..backend.arrays import read_scalars
from ..errors import format_error
from ..ir.graph import BACKWARD, Graph, Node
from ..ir.random import derive_key
from .allocator import retain_freed_memory
from .memory import MemoryMeter
from .recompute import live_nodes, with_recompute


@dataclass(frozen=True)
class Instruction:
    fn: Callable
    ins: tuple[int, ...]
    outs: tuple[int, ...]
    frees: tuple[int, ...]
    node: Node


def _vjp_kernel(node: Node, graph: Graph, fwd: Node) -> Callable:
    prim = fwd.prim
    specs = tuple(graph.spec(v) for v in fwd.inputs)
    n = len(fwd.inputs)
    saved_idx = prim.saved_input_indices(n)
    saves_all = saved_idx == tuple(range(n))
    has_y = prim.save_output
    needs = node.needs
    kept = tuple(j for j, need in enumerate(needs) if need)     # the gradients the node outputs

    def fn(dy, *saved, **kw):
        if saves_all:
            xs = list(saved[:n])
        else:
            xs = [None] * n
            for k, i in enumerate(saved_idx):
                xs[i] = saved[k]
        y = saved[-1] if has_y else None
        grads = prim.vjp(dy, xs, y, specs, needs, **kw)
        return tuple([grads[j] for j in kept])
    return fn


class Program:
    """The instructions computing ``outputs`` of ``graph`` on one process."""

    def __init__(self, graph: Graph, outputs: Sequence[int], seed: int = 0, measure_memory: bool = False,
                 backend: Backend | None = None):
        retain_freed_memory()
        self.backend = current_backend() if backend is None else backend
        self.outputs = tuple(outputs)
        self.recomputed_from: dict[int, int] = {}   # clone node id -> the node it re-runs
        if any(n.recompute for n in graph.nodes):
            graph, self.recomputed_from = with_recompute(graph, self.outputs)
        self.graph = graph
        self.seed = seed
        self.meter: MemoryMeter | None = MemoryMeter() if measure_memory else None
        needed = self._needed_nodes(graph, self.outputs)
        self.instructions = self._lower(graph, needed)
        self.inputs = tuple(v for v in graph.inputs if v is not None)
        self.n_slots = len(graph.values)
        self._rng_nodes = {i for i, ins in enumerate(self.instructions) if ins.node.prim.needs_rng}
        self._check_nodes = {i for i, ins in enumerate(self.instructions)
                             if ins.node.prim.checks_values and ins.node.forward_of is None and i not in self.donated}
        self._keyword_nodes = frozenset(self._rng_nodes | self._check_nodes)   # calls that take keywords
        self._consts = graph.consts if self.backend.is_host else {
            v: to_device(a, self.backend) for v, a in graph.consts.items()}

    @staticmethod
    def _needed_nodes(graph: Graph, outputs: Sequence[int]) -> list[Node]:
        return live_nodes(graph, outputs)

    def _lower(self, graph: Graph, nodes: list[Node]) -> list[Instruction]:
        last_use: dict[int, int] = {}
        for k, node in enumerate(nodes):
            for v in node.inputs:
                last_use[v] = k
        pinned = set(self.outputs) | set(graph.consts) | set(graph.params) | set(graph.inputs)
        for k, node in enumerate(nodes):  # outputs nobody reads die at once
            for o in node.outputs:
                last_use.setdefault(o, k)
        donated = self._plan_donations(graph, nodes, last_use, pinned)
        frees_at: dict[int, list[int]] = {}
        for v, k in last_use.items():
            if v not in pinned:
                frees_at.setdefault(k, []).append(v)
        out = []
        for k, node in enumerate(nodes):
            if node.phase == BACKWARD and node.forward_of is not None:
                fn = _vjp_kernel(node, graph, graph.nodes[node.forward_of])
            elif k in donated:
                fn = functools.partial(node.prim.forward_inplace, donated[k])
            else:
                fn = node.prim.forward
            out.append(Instruction(fn, node.inputs, node.outputs, tuple(frees_at.get(k, ())), node))
        self.donated = donated            # instruction index -> input it overwrites
        self.donations = len(donated)
        return out

    @staticmethod
    def _plan_donations(graph: Graph, nodes: list[Node], last_use: dict[int, int],
                        pinned: set[int]) -> dict[int, int]:
        """Instruction index -> input whose buffer the op may overwrite with its output.

        A value's *roots* are the fresh buffers it may share memory with: a fresh output
        (a new array) is its own root; any other output (a view, or an input handed back)
        may alias every root of the node's inputs. An input may be overwritten at
        instruction k when it is a fresh, unpinned buffer used once there, and every value
        that may alias it is dead after k. A 0-d value is never overwritten: numpy hands
        back arithmetic on 0-d arrays as immutable scalars (``np.add(a, b)`` is an
        ``np.float32``), which no ``out=`` can take, and there is no memory to save.
        """
        roots: dict[int, frozenset[int]] = {}
        for node in nodes:
            fwd = graph.nodes[node.forward_of].prim if node.forward_of is not None else None
            fresh = fwd.grads_are_fresh() if fwd is not None else node.prim.output_is_fresh()
            shared = frozenset().union(*(roots.get(v, frozenset()) for v in node.inputs))
            for o in node.outputs:
                roots[o] = frozenset((o,)) if fresh else shared
        aliases: dict[int, list[int]] = {}
        for v, rs in roots.items():
            for r in rs:
                aliases.setdefault(r, []).append(v)
        donated: dict[int, int] = {}
        for k, node in enumerate(nodes):
            if node.forward_of is not None:
                continue
            specs = [graph.spec(v) for v in node.inputs]
            for j in node.prim.inplace_inputs(specs, graph.spec(node.outputs[0])):
                v = node.inputs[j]
                if (graph.spec(v).shape and v not in pinned and roots.get(v) == frozenset((v,)) and node.inputs.count(v) == 1
                        and all(last_use[w] <= k and w not in pinned for w in aliases[v])):
                    donated[k] = j
                    break
        return donated

    def rng_key(self, node: Node, step: int) -> int:
        """The key of a node's random numbers at ``step``: its forward node's, and a
        recomputed clone's is its original's (the same dropout mask)."""
        if node.forward_of is not None:
            node = self.graph.nodes[node.forward_of]
        node = self.graph.nodes[self.recomputed_from.get(node.id, node.id)]
        return derive_key(self.seed, node.name, step)

    def initial_slots(self, inputs: Sequence[np.ndarray]) -> list:
        """The value slots before the first instruction: inputs, constants, parameters
        (on the program's device: see the module's docstring)."""
        slots: list = [None] * self.n_slots
        host = self.backend.is_host
        for v, a in zip(self.inputs, inputs):
            slots[v] = a if host else to_device(a, self.backend)
        for v, a in self._consts.items():
            slots[v] = a
        for v, p in zip(self.graph.params, self.graph.param_objs):
            slots[v] = p.data if host else self._on_device(p)
        return slots

    def _on_device(self, p):
        """A parameter's value on the device, moved there once (``Parameter.device_data``, or
        a rank's shard's ``ParamShard.device_data`` under a parallel plan)."""
        place = getattr(p, "device_data", None)
        if place is None:
            raise ValueError(format_error(
                "device_target", f"parameter {p.name!r}", "a Parameter or a parameter shard with device_data",
                f"a {type(p).__name__}", "run this program with device_target='CPU'"))
        return place(self.backend)

    def run(self, inputs: Sequence[np.ndarray], step: int = 0) -> list[np.ndarray]:
        slots = self.initial_slots(inputs)
        deferred: list[tuple[int, list]] = []        # (instruction, the checks it left for the end)
        if self.meter is None:
            self._execute(slots, step, deferred)
        else:
            self._execute_metered(slots, step, deferred, self.meter)
        if deferred:
            self.raise_failed_checks(deferred)
        outs = _owned([slots[o] for o in self.outputs], slots, self.graph.params)
        return outs if self.backend.is_host else [to_host(a) if a.ndim == 0 else a for a in outs]

    def _named(self, err: Exception, k: int) -> Exception:
        """``err`` with a note naming instruction ``k``'s node (the step loop pays nothing for it)."""
        node = self.instructions[k].node
        err.add_note(f"autopar: raised by {node.name}{' (backward)' if node.forward_of is not None else ''}")
        return err

    def keywords(self, k: int, node: Node, step: int, deferred: list) -> dict:
        """The keyword arguments of instruction ``k``: its random key, its list of deferred checks."""
        kw = {}
        if k in self._rng_nodes:
            kw["key"] = self.rng_key(node, step)
        if k in self._check_nodes:
            kw["checks"] = []
            deferred.append((k, kw["checks"]))
        return kw

    def raise_failed_checks(self, deferred: list[tuple[int, list]]) -> None:
        """Read every deferred check's device values in one copy; raise the first failing
        one's error, named by its instruction."""
        pending = [(k, check) for k, checks in deferred for check in checks]
        if not pending:
            return
        values = iter(read_scalars([v for _, check in pending for v in check.values]))
        for k, check in pending:
            err = check.error(*(next(values) for _ in check.values))
            if err is not None:
                raise self._named(err, k)

    def _execute(self, slots: list, step: int, deferred: list) -> None:
        keyword = self._keyword_nodes
        k = 0
        try:
            for k, ins in enumerate(self.instructions):
                args = [slots[i] for i in ins.ins]
                if k in keyword:
                    res = ins.fn(*args, **self.keywords(k, ins.node, step, deferred))
                else:
                    res = ins.fn(*args)
                if len(ins.outs) == 1 and not isinstance(res, tuple):
                    slots[ins.outs[0]] = res
                else:
                    for o, r in zip(ins.outs, res):
                        slots[o] = r
                for f in ins.frees:
                    slots[f] = None
        except Exception as err:  # name the op; the loop itself pays nothing for this
            self._named(err, k)
            raise

    def _execute_metered(self, slots: list, step: int, deferred: list, meter: MemoryMeter) -> None:
        """``_execute``, telling the meter every slot written and freed."""
        fixed = tuple(self.inputs) + tuple(self.graph.consts)
        meter.begin(slots, self.graph.params, fixed, self.outputs)
        k = 0
        try:
            for k, ins in enumerate(self.instructions):
                args = [slots[i] for i in ins.ins]
                kw = self.keywords(k, ins.node, step, deferred) if k in self._keyword_nodes else {}
                res = ins.fn(*args, **kw)
                if len(ins.outs) == 1 and not isinstance(res, tuple):
                    res = (res,)
                for o, r in zip(ins.outs, res):
                    slots[o] = r
                    meter.wrote(o, r)
                meter.sample()               # inputs and outputs of the instruction both alive
                for f in ins.frees:
                    meter.freed(f, slots[f])
                    slots[f] = None
        except Exception as err:  # name the op; the loop itself pays nothing for this
            self._named(err, k)
            raise
        meter.end(slots)


def _owned(outs: list, slots: list, params: tuple[int, ...]) -> list:
    """Outputs the caller may modify in place: a read-only array (a broadcast view), one
    sharing memory with another output (``Add`` hands dy to both inputs) or with a
    parameter is copied. Cheap: it compares base objects, not memory ranges."""
    taken = {id(base_buffer(slots[v])) for v in params if is_array(slots[v])}
    result = []
    for a in outs:
        if is_array(a):
            root = id(base_buffer(a))
            if not writable(a) or root in taken:
                a = a.copy()
                root = id(a)
            taken.add(root)
        result.append(a)
    return result
