"""Reading strategy files (the format: :mod:`autopar.strategy.strategy_file`): every entry
checked against the graph and stage it is loaded for, a malformed or mismatched one a
ValueError naming the file and the entry. The reader (:class:`StrategyReader`) is shared
with the offline checkpoint tools, which read a file's parameter layouts without a graph."""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass

from ..errors import format_error, is_int
from ..ir.graph import FORWARD, Graph, Node
from ..ir.layout import Layout
from ..ir.mesh import Mesh
from ..ops.sharding import Indexing, OpSharding, from_strategy
from .sharding_plan import ShardingPlan, replicated_sharding

FORMAT = "autopar-strategy"
VERSION = 1              # one plan
PIPELINE_VERSION = 2     # one plan per pipeline stage
RESAVE = "re-save it with strategy_ckpt_save_file for this model and device count"
JOINT_PLAN = "joint_plan"   # optional top-level key: the auto_parallel joint plan the stage plans belong to


def mindspore_json(layout: Layout) -> dict:
    device_matrix, tensor_map = layout.to_mindspore()
    return {"device_matrix": list(device_matrix),
            "tensor_map": [list(e) if isinstance(e, tuple) else e for e in tensor_map]}


@dataclass(frozen=True)
class StrategyReader:
    """Typed access to the parsed JSON: every malformed entry is a ValueError naming it."""

    where: str

    def fail(self, arg: str, expected: str, actual: str, fix: str = "") -> ValueError:
        return ValueError(format_error(self.where, arg, expected, actual, fix))

    def as_dict(self, x, arg: str) -> dict:
        if not isinstance(x, dict):
            raise self.fail(arg, "a JSON object", _short(x))
        return x

    def as_list(self, x, arg: str) -> list:
        if not isinstance(x, list):
            raise self.fail(arg, "a JSON list", _short(x))
        return x

    def keys(self, x, arg: str, required: tuple, optional: tuple = ()) -> None:
        self.as_dict(x, arg)
        missing = [k for k in required if k not in x]
        if missing:
            raise self.fail(arg, f"keys {list(required)}", f"no {missing[0]!r}", RESAVE)
        unknown = [k for k in x if k not in required and k not in optional]
        if unknown:
            raise self.fail(arg, f"only keys {list(required + optional)}", f"{unknown[0]!r}")

    def as_int(self, x, arg: str, minimum: int) -> int:
        if not is_int(x) or x < minimum:
            raise self.fail(arg, f"an int >= {minimum}", _short(x))
        return x

    def as_ints(self, x, arg: str, minimum: int, length: int | None = None) -> list[int]:
        x = self.as_list(x, arg)
        if length is not None and len(x) != length:
            raise self.fail(arg, f"{length} entries, one per dim", _short(x))
        return [self.as_int(v, f"{arg}[{k}]", minimum) for k, v in enumerate(x)]

    def mesh(self, x, arg: str, stage: Mesh, own_ranks: bool = False) -> Mesh:
        self.keys(x, arg, ("shape", "names") + (("ranks",) if own_ranks else ()), () if own_ranks else ("ranks",))
        shape = self.as_ints(x["shape"], f"{arg}.shape", 1)
        if math.prod(shape) != stage.size:
            raise self.fail(f"{arg}.shape", f"a device matrix of the stage's {stage.size} devices", str(shape),
                            RESAVE)
        names = self.as_list(x["names"], f"{arg}.names")
        if len(names) != len(shape) or not all(isinstance(n, str) for n in names) or len(set(names)) != len(names):
            raise self.fail(f"{arg}.names", f"{len(shape)} distinct axis names (strings)", _short(names))
        ranks = self.as_ints(x["ranks"], f"{arg}.ranks", 0) if "ranks" in x else list(stage.ranks)
        if not own_ranks and sorted(ranks) != sorted(stage.ranks):
            raise self.fail(f"{arg}.ranks", f"the stage's ranks {stage.ranks} in some order", _short(ranks))
        return self.check(lambda: Mesh(tuple(shape), tuple(names), tuple(ranks)), arg)

    def layout(self, x, arg: str, stage: Mesh) -> Layout:
        self.keys(x, arg, ("device_matrix", "dims", "partial"), ("mindspore",))
        mesh = self.mesh(x["device_matrix"], f"{arg}.device_matrix", stage)
        dims = self.as_list(x["dims"], f"{arg}.dims")
        dims = tuple(tuple(self.as_ints(d, f"{arg}.dims[{k}]", 0)) for k, d in enumerate(dims))
        partial = tuple(self.as_ints(x["partial"], f"{arg}.partial", 0))
        lay = self.check(lambda: Layout(mesh, dims, partial), arg)
        if "mindspore" in x:
            ms = x["mindspore"]
            self.keys(ms, f"{arg}.mindspore", ("device_matrix", "tensor_map"))
            want = mindspore_json(lay)
            if json.dumps(ms, sort_keys=True) != json.dumps(want, sort_keys=True):
                raise self.fail(f"{arg}.mindspore", f"{json.dumps(want)} (what dims give)", _short(ms),
                                "make dims and the MindSpore form agree")
        return lay

    def check(self, build, arg: str):
        """Run a constructor or check; its ValueError now names the file and entry."""
        try:
            return build()
        except ValueError as err:
            raise ValueError(f"{self.where}: {arg}: {err}") from None


def _short(x) -> str:
    try:
        text = json.dumps(x)
    except (TypeError, ValueError, RecursionError):
        text = f"<{type(x).__name__}>"
    return text if len(text) <= 60 else text[:57] + "..."


# ---- load ---------------------------------------------------------------------------------

def load_strategy(path, graph: Graph, stage: Mesh) -> ShardingPlan:
    """The plan saved in ``path``, checked against ``graph`` and ``stage``."""
    path = check_args(path, graph)
    if not isinstance(stage, Mesh):
        raise TypeError(format_error("load_strategy", "stage", "a Mesh", type(stage).__name__))
    doc, where = read_strategy_json(path)
    return plan_from_json(doc, graph, stage, where)


def read_strategy_json(path: str) -> tuple[object, str]:
    where = f"strategy file {path!r}"
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as err:
        raise ValueError(format_error(where, "file", "a readable UTF-8 JSON file", str(err),
                                      "check strategy_ckpt_load_file")) from None
    try:
        return json.loads(text, parse_constant=_no_constant), where
    except (ValueError, RecursionError) as err:
        raise ValueError(format_error(where, "content", "JSON", f"a parse error ({err})",
                                      "the file is damaged; " + RESAVE)) from None


def _no_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


def plan_from_json(doc, graph: Graph, stage: Mesh, where: str = "strategy") -> ShardingPlan:
    """Rebuild and validate a plan from the file's content (version 1, or a version-2
    file of one stage)."""
    r = StrategyReader(where)
    if file_version(r, doc) == PIPELINE_VERSION:
        bodies = stage_bodies(r, doc)
        if len(bodies) != 1:
            raise r.fail("pipeline_stages", "1 (this compile has no pipeline)", str(len(bodies)),
                         f"set pipeline_stages={len(bodies)} to use it, or " + RESAVE)
        return _plan_from_body(StrategyReader(f"{where}: stages[0]"), bodies[0], graph, stage)
    return _plan_from_body(r, doc, graph, stage, header=("format", "version"))


@dataclass(frozen=True)
class PipelineStrategy:
    """A strategy file read for a pipeline: one unchecked plan body per stage, each checked
    against its stage graph when :meth:`plan` rebuilds it (a rank plans the stages it needs)."""

    where: str
    version: int
    bodies: tuple          # version 2: the stage entries; version 1: the file's one plan

    def plan(self, k: int, graph: Graph, stage: Mesh) -> ShardingPlan:
        if self.version == VERSION:
            return _plan_from_body(StrategyReader(self.where), self.bodies[k], graph, stage, header=("format", "version"))
        return _plan_from_body(StrategyReader(f"{self.where}: stages[{k}]"), self.bodies[k], graph, stage)


def load_pipeline_strategy(path, stages: int, device_num: int) -> PipelineStrategy:
    """The stage plans of ``path`` for ``stages`` pipeline stages on ``device_num`` ranks: a
    version-2 file, or a version-1 file for one stage."""
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(format_error("strategy file", "path", "a str or os.PathLike", type(path).__name__))
    doc, where = read_strategy_json(os.fspath(path))
    r = StrategyReader(where)
    version = file_version(r, doc)
    bodies = (doc,) if version == VERSION else stage_bodies(r, doc)
    if len(bodies) != stages:
        raise r.fail("pipeline_stages", f"{stages} (the context's pipeline_stages)", str(len(bodies)),
                     f"set pipeline_stages={len(bodies)}, or " + RESAVE)
    if version == PIPELINE_VERSION and r.as_int(doc["device_num"], "device_num", 1) != device_num:
        raise r.fail("device_num", f"{device_num} (the ranks of this pipeline)", str(doc["device_num"]),
                     "use the device count the file was saved for, or " + RESAVE)
    return PipelineStrategy(where, version, bodies)


def file_version(r: StrategyReader, doc) -> int:
    """The file's version, after checking the format (1 or 2, else a ValueError)."""
    r.as_dict(doc, "<top level>")
    for key in ("format", "version"):
        if key not in doc:
            raise r.fail("<top level>", "keys ['format', 'version', ...]", f"no {key!r}", RESAVE)
    if doc["format"] != FORMAT:
        raise r.fail("format", repr(FORMAT), repr(doc["format"]), "this is not an autopar strategy file")
    if isinstance(doc["version"], bool) or doc["version"] not in (VERSION, PIPELINE_VERSION):
        raise r.fail("version", f"{VERSION} or {PIPELINE_VERSION}", repr(doc["version"]),
                     RESAVE + " with this autopar version")
    return doc["version"]


def stage_bodies(r: StrategyReader, doc) -> tuple:
    """A version-2 file's stage entries, checked for shape only."""
    r.keys(doc, "<top level>", ("format", "version", "device_num", "pipeline_stages", "stages"), (JOINT_PLAN,))
    count = r.as_int(doc["pipeline_stages"], "pipeline_stages", 1)
    bodies = r.as_list(doc["stages"], "stages")
    if len(bodies) != count:
        raise r.fail("stages", f"{count} entries (pipeline_stages)", str(len(bodies)), RESAVE)
    return tuple(bodies)


def _plan_from_body(r: StrategyReader, doc, graph: Graph, stage: Mesh, header: tuple = ()) -> ShardingPlan:
    """One plan's entries (``header``: the keys a version-1 file has besides them)."""
    r.keys(doc, "<top level>" if header else "stage entry", header + (
        "device_num", "stage", "inputs", "parameters", "constants", "ops"),
        ("predicted",) + ((JOINT_PLAN,) if header else ()))
    devices = r.as_int(doc["device_num"], "device_num", 1)
    if devices != stage.size:
        raise r.fail("device_num", f"{stage.size} (the devices of this stage)", str(devices),
                     "use the device count the file was saved for, or " + RESAVE)
    saved = r.mesh(doc["stage"], "stage", stage, own_ranks=True)
    if saved != stage:
        raise r.fail("stage", str(stage) + f" ranks {stage.ranks}", str(saved) + f" ranks {saved.ranks}", RESAVE)
    layouts: dict[int, Layout] = {}
    _read_inputs(r, doc["inputs"], graph, stage, layouts)
    _read_parameters(r, doc["parameters"], graph, stage, layouts)
    _read_constants(r, doc["constants"], graph, stage, layouts)
    ops = r.as_dict(doc["ops"], "ops")
    forward = forward_nodes(graph)
    names = {n.name for n in forward}
    missing = [n.name for n in forward if n.name not in ops]
    extra = [name for name in ops if name not in names]
    if missing or extra:
        raise r.fail("ops", "one entry per op of the graph", f"{len(missing)} op(s) missing {missing[:3]} and "
                     f"{len(extra)} not in the graph {extra[:3]}",
                     "the model changed since the file was saved; " + RESAVE)
    shardings: dict[int, OpSharding] = {}
    for node in forward:
        sharding, out = _read_op(r, ops[node.name], node, graph, stage)
        shardings[node.id] = sharding
        if out is not None:
            layouts[node.outputs[0]] = out
    if "predicted" in doc and doc["predicted"] is not None:
        _read_predicted(r, doc["predicted"])
    _place_unlisted(graph, forward, shardings, layouts)
    return ShardingPlan(stage, shardings, layouts)


def _place_unlisted(graph: Graph, forward, shardings: dict, layouts: dict) -> None:
    """A frozen parameter the file does not list (``only_trainable_params``) in the layout
    its first reader reads it in, as the rules place a parameter."""
    for v in graph.params:
        if v in layouts:
            continue
        reader = next((n for n in forward if v in n.inputs), None)
        if reader is not None:
            layouts[v] = shardings[reader.id].input_layout(reader.inputs.index(v))


def _read_inputs(r: StrategyReader, entries, graph: Graph, stage: Mesh, layouts: dict) -> None:
    entries = r.as_list(entries, "inputs")
    if len(entries) != len(graph.inputs):
        raise r.fail("inputs", f"{len(graph.inputs)} graph inputs", str(len(entries)), RESAVE)
    for k, (v, entry) in enumerate(zip(graph.inputs, entries)):
        arg = f"inputs[{k}]"
        if v is None or entry is None:
            if (v is None) != (entry is None):
                raise r.fail(arg, "None" if v is None else "an entry", repr(entry), RESAVE)
            continue
        _read_value(r, entry, arg, v, graph, stage, layouts)


def _read_parameters(r: StrategyReader, entries, graph: Graph, stage: Mesh, layouts: dict) -> None:
    entries = r.as_dict(entries, "parameters")
    names = graph.param_names()
    for v, name, p in zip(graph.params, names, graph.param_objs):
        if name not in entries:
            if not p.requires_grad:     # saved with only_trainable_params: its readers place it
                continue
            raise r.fail(f"parameters[{name!r}]", "an entry for every trainable parameter of the graph", "none",
                         RESAVE)
        _read_value(r, entries[name], f"parameters[{name!r}]", v, graph, stage, layouts)
    extra = sorted(set(entries) - set(names))
    if extra:
        raise r.fail(f"parameters[{extra[0]!r}]", "a parameter of the graph", f"{len(extra)} unknown", RESAVE)


def _read_constants(r: StrategyReader, entries, graph: Graph, stage: Mesh, layouts: dict) -> None:
    entries = r.as_list(entries, "constants")
    if len(entries) != len(graph.consts):
        raise r.fail("constants", f"{len(graph.consts)} constants", str(len(entries)), RESAVE)
    for k, (v, entry) in enumerate(zip(graph.consts, entries)):
        _read_value(r, entry, f"constants[{k}]", v, graph, stage, layouts, optional=("used_by",))


def _read_value(r: StrategyReader, entry, arg: str, v: int, graph: Graph, stage: Mesh, layouts: dict,
                optional: tuple = ()) -> None:
    r.keys(entry, arg, ("shape", "layout"), optional)
    if not isinstance(entry.get("used_by", ""), (str, type(None))):
        raise r.fail(f"{arg}.used_by", "an op name or null", _short(entry["used_by"]))
    shape = tuple(r.as_ints(entry["shape"], f"{arg}.shape", 0))
    if shape != graph.spec(v).shape:
        raise r.fail(f"{arg}.shape", str(graph.spec(v).shape), str(shape), RESAVE)
    if entry["layout"] is not None:
        lay = r.layout(entry["layout"], f"{arg}.layout", stage)
        lay.check_shape(shape, f"{r.where}: {arg}", "layout")
        layouts[v] = lay


def _read_op(r: StrategyReader, entry, node: Node, graph: Graph, stage: Mesh) -> tuple[OpSharding, Layout | None]:
    """The node's exact sharding (strategy re-validated by the op's rule) and output layout."""
    arg = f"ops[{node.name!r}]"
    r.keys(entry, arg, ("scope", "kind", "strategy", "device_matrix", "axes", "output_layout"),
           ("out_dims", "interleave"))
    for key, want in (("kind", node.prim.kind), ("scope", node.scope)):
        if entry[key] != want:
            raise r.fail(f"{arg}.{key}", repr(want), repr(entry[key]), "the model changed; " + RESAVE)
    specs = [graph.spec(v) for v in node.inputs]
    out = graph.spec(node.outputs[0])
    shapes = [s.shape for s in specs]
    strategy = r.as_list(entry["strategy"], f"{arg}.strategy")
    if len(strategy) != len(specs):
        raise r.fail(f"{arg}.strategy", f"{len(specs)} split tuples, one per input", str(len(strategy)))
    strategy = tuple(tuple(r.as_ints(s, f"{arg}.strategy[{i}]", 1, len(shapes[i]))) for i, s in enumerate(strategy))
    indexing = node.prim.indexing(specs, out)
    has_rule = indexing is not None
    where = f"{r.where}: {arg} ({node.prim.kind})"
    if has_rule:  # the op's own rule re-validates the split counts (divisibility, devices)
        from_strategy(indexing, strategy, shapes, stage, where)
    else:         # no sharding rule: the op runs replicated
        indexing = replicated_sharding(len(specs), specs, out, stage).indexing
    mesh = r.mesh(entry["device_matrix"], f"{arg}.device_matrix", stage)
    sharding = OpSharding(indexing, mesh, _read_axes(r, entry["axes"], f"{arg}.axes", indexing, mesh, has_rule),
                          _read_out_dims(r, entry.get("out_dims"), f"{arg}.out_dims", len(out.shape), mesh),
                          _read_interleave(r, entry.get("interleave"), f"{arg}.interleave", indexing))
    if sharding.splits() != strategy:
        raise r.fail(f"{arg}.strategy", f"{sharding.splits()} (what device_matrix and axes split)",
                     str(strategy), "make strategy, device_matrix and axes agree, or " + RESAVE)
    for i, shape in enumerate(shapes):
        sharding.input_layout(i).check_shape(shape, where, f"input {i}")
    sharding.output_layout().check_shape(out.shape, where, "output")
    if entry["output_layout"] is None:
        return sharding, None
    lay = r.layout(entry["output_layout"], f"{arg}.output_layout", stage)
    if lay != sharding.home_layout():
        raise r.fail(f"{arg}.output_layout", f"{sharding.home_layout()} on {sharding.mesh} (what the sharding "
                     "gives)", f"{lay} on {lay.mesh}", RESAVE)
    return sharding, lay


def _read_interleave(r: StrategyReader, entry, arg: str, indexing: Indexing) -> tuple[str, int] | None:
    """A Layout's ``interleaved_parallel`` copies: [letter, k] (an output letter of the op's
    rule, k >= 2), or None if absent; the lowering checks the local sizes."""
    if entry is None:
        return None
    pair = r.as_list(entry, arg)
    letters = "".join(indexing.output) if indexing is not None else ""
    if len(pair) != 2 or not isinstance(pair[0], str) or pair[0] not in letters:
        raise r.fail(arg, f"[letter, copies] with a letter of the op's output {letters!r}", _short(entry), RESAVE)
    return pair[0], r.as_int(pair[1], f"{arg}[1]", 2)


def _read_out_dims(r: StrategyReader, entry, arg: str, ndim: int, mesh: Mesh):
    """An out_strategy's home dims: per output dim, the mesh axes splitting it; None if absent."""
    if entry is None:
        return None
    dims = r.as_list(entry, arg)
    if len(dims) != ndim:
        raise r.fail(arg, f"{ndim} lists of mesh axes, one per output dim", str(len(dims)), RESAVE)
    out = tuple(tuple(r.as_ints(d, f"{arg}[{i}]", 0)) for i, d in enumerate(dims))
    flat = [a for d in out for a in d]
    if len(set(flat)) != len(flat) or any(a >= mesh.ndim for a in flat):
        raise r.fail(arg, f"distinct mesh axes below {mesh.ndim}", str(out), RESAVE)
    return out


def _read_axes(r: StrategyReader, entry, arg: str, indexing: Indexing, mesh: Mesh, has_rule: bool):
    """``{letter: [mesh axes]}`` as OpSharding's sorted ``(letter, axes)`` pairs."""
    entry = r.as_dict(entry, arg)
    used: dict[int, str] = {}
    out = []
    for ch, axes in entry.items():
        if ch not in indexing.letters:
            raise r.fail(f"{arg}[{ch!r}]", f"an index letter of the op ({''.join(indexing.letters)})", repr(ch))
        axes = tuple(r.as_ints(axes, f"{arg}[{ch!r}]", 0))
        if not axes:
            continue
        if ch in indexing.fixed or not has_rule:
            raise r.fail(f"{arg}[{ch!r}]", "no mesh axes: the op cannot split this index", str(list(axes)))
        for a in axes:
            if a >= mesh.ndim:
                raise r.fail(f"{arg}[{ch!r}]", f"mesh axes in [0, {mesh.ndim})", str(list(axes)))
            if a in used:
                raise r.fail(f"{arg}[{ch!r}]", f"mesh axes no other index uses (axis {a} splits {used[a]!r})",
                             str(list(axes)))
            used[a] = ch
        out.append((ch, axes))
    return tuple(sorted(out))


def _read_predicted(r: StrategyReader, entry) -> None:
    entry = r.as_dict(entry, "predicted")
    for key in ("step_seconds", "memory_bytes_per_rank"):
        x = entry.get(key)
        if x is not None and (isinstance(x, bool) or not isinstance(x, (int, float)) or x < 0):
            raise r.fail(f"predicted.{key}", "a number >= 0", repr(x))
    if entry.get("breakdown") is not None:
        r.as_dict(entry["breakdown"], "predicted.breakdown")


def forward_nodes(graph: Graph):
    return [n for n in graph.nodes if n.phase == FORWARD]


def check_args(path, graph) -> str:
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(format_error("strategy file", "path", "a str or os.PathLike", type(path).__name__))
    if not isinstance(graph, Graph):
        raise TypeError(format_error("strategy file", "graph", "a Graph", type(graph).__name__))
    return os.fspath(path)
