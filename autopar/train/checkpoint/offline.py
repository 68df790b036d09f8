"""MindSpore's offline checkpoint tools on autopar's own files: ``build_searched_strategy``,
``merge_sliced_parameter`` and ``transform_checkpoints``.

MindSpore saves one checkpoint per rank with no layout in it, so merging slices or
re-slicing for another plan needs the strategy file beside it. An autopar manifest records
every piece's region and loading reshards at load time, so nothing here is needed to move a
checkpoint between plans; these tools are for scripts written against MindSpore's workflow,
and for writing a checkpoint laid out ahead of time for the plan that will load it::

    build_searched_strategy(file)            {parameter name: ParameterLayout}, as the plan saved it
    merge_sliced_parameter(slices, layout)   one slice per rank, in rank order -> the whole Parameter
    transform_checkpoints(src, dst, prefix, src_strategy_file, dst_strategy_file)
                                             the checkpoint rewritten at dst/prefix as a save under
                                             dst_strategy_file's plan would write it

Worked example: a (8, 4) weight of a dp2 x mp2 plan, device matrix (2, 2), tensor map
(-1, 0) (dims ``((), (1,))``: dim 1 split over the second axis). Its slice shape is (8, 2);
ranks 0 and 2 hold columns 0:2, ranks 1 and 3 columns 2:4. ``merge_sliced_parameter([s0,
s1, s2, s3], layout)`` checks that s2 equals s0 and s3 equals s1 bit for bit (replicas of one
block), then places s0 at [:, 0:2] and s1 at [:, 2:4]. ``transform_checkpoints`` onto that
plan writes the same two blocks, into rank0.safetensors and rank1.safetensors (one writer per
block: the rank at coordinate 0 of the replicated axes, as ``save_checkpoint`` does).
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass

import numpy as np

from ...errors import format_error
from ...ir.layout import Layout
from ...ir.mesh import Mesh
from ...nn.parameter import Parameter
from ...strategy.strategy_load import RESAVE, VERSION, StrategyReader, file_version, read_strategy_json, stage_bodies
from .format import FILE_NAME, full_region, read_manifest, region_of, value_error
from .holdings import layout_json
from .reader import PieceReader
from .safe_save import abandon, prepare_save, release_lock, temp_dir
from .save import BLOCK_OVERHEAD_BYTES, MANIFEST_BASE_BYTES, attempt, merge_entries, publish_checked, write_rank

SAME_FILE = "pass the strategy file saved (strategy_ckpt_save_file) by a run of this model"


@dataclass(frozen=True)
class ParameterLayout:
    """How one parameter lives on its ranks, as a strategy file saved it (MindSpore's
    ``ParallelLayouts``: device matrix, tensor map, slice shape). ``stage`` is the pipeline
    stage whose copy it is; ``layout`` is autopar's (``dims``: per tensor dim, the mesh axes
    splitting it)."""

    name: str
    shape: tuple[int, ...]          # global
    layout: Layout
    stage: int = 0

    def __post_init__(self):
        object.__setattr__(self, "shape", tuple(int(n) for n in self.shape))
        where = f"ParameterLayout({self.name!r})"
        if self.layout.partial:
            raise value_error(where, "layout", "no partial sums (a parameter holds its value)", str(self.layout))
        self.layout.check_shape(self.shape, where, "parameter")

    @property
    def device_matrix(self) -> tuple[int, ...]:
        return self.layout.mesh.shape

    @property
    def tensor_map(self) -> tuple:
        """MindSpore's: device-matrix axes counted from the right, -1 for an unsplit dim."""
        return self.layout.to_mindspore()[1]

    @property
    def dims(self) -> tuple[tuple[int, ...], ...]:
        return self.layout.dims

    @property
    def ranks(self) -> tuple[int, ...]:
        """The ranks holding a slice, in rank order (the order slices are merged in)."""
        return tuple(sorted(self.layout.mesh.ranks))

    @property
    def slice_shape(self) -> tuple[int, ...]:
        return self.layout.local_shape(self.shape)

    def region(self, rank: int) -> tuple[slice, ...]:
        """The global slices ``rank`` holds."""
        return self.layout.slices(rank, self.shape)

    def __str__(self) -> str:
        return f"{self.name} {self.shape} {self.layout} on {self.layout.mesh}: slice {self.slice_shape}"


# ---- build_searched_strategy ---------------------------------------------------------------

def build_searched_strategy(strategy_filename) -> dict[str, ParameterLayout]:
    """Every parameter's layout in a strategy file (``strategy_ckpt_save_file``; version 1,
    or a pipeline's version 2, where a parameter read on two stages is its first stage's
    copy, the one checkpoints save). A parameter the file lists without a layout is held
    whole on every rank of its stage. Raises TypeError for a path that is not a str, and
    ValueError naming the file and entry for a malformed file."""
    return _read_strategy("build_searched_strategy", "strategy_filename", strategy_filename)[1]


def _read_strategy(where: str, arg: str, path) -> tuple[int, dict[str, ParameterLayout]]:
    """(the file's device count, its parameter layouts)."""
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(format_error(where, arg, "a str or os.PathLike (a strategy file)", type(path).__name__))
    doc, name = read_strategy_json(os.fspath(path))
    r = StrategyReader(name)
    if file_version(r, doc) == VERSION:
        bodies = [(r, doc)]
    else:
        bodies = [(StrategyReader(f"{name}: stages[{k}]"), body) for k, body in enumerate(stage_bodies(r, doc))]
    out: dict[str, ParameterLayout] = {}
    for k, (rk, body) in enumerate(bodies):
        for pname, entry in _stage_parameters(rk, body, k).items():
            out.setdefault(pname, entry)
    return r.as_int(doc.get("device_num"), "device_num", 1), out


def _stage_parameters(r: StrategyReader, body, stage_index: int) -> dict[str, ParameterLayout]:
    """The parameters of one plan body (a version-1 file, or one stage of a version-2 one)."""
    r.as_dict(body, "<plan>")
    for key in ("device_num", "stage", "parameters"):
        if key not in body:
            raise r.fail("<plan>", f"a {key!r} entry", "none", RESAVE)
    r.keys(body["stage"], "stage", ("shape", "names", "ranks"))
    size = math.prod(r.as_ints(body["stage"]["shape"], "stage.shape", 1))
    stage = r.mesh(body["stage"], "stage", Mesh((size,)), own_ranks=True)
    if r.as_int(body["device_num"], "device_num", 1) != stage.size:
        raise r.fail("device_num", f"{stage.size} (the devices of the stage)", str(body["device_num"]), RESAVE)
    out = {}
    for name, entry in r.as_dict(body["parameters"], "parameters").items():
        arg = f"parameters[{name!r}]"
        r.keys(entry, arg, ("shape", "layout"))
        shape = tuple(r.as_ints(entry["shape"], f"{arg}.shape", 0))
        if entry["layout"] is None:
            layout = Layout.replicated(stage, len(shape))
        else:
            layout = r.layout(entry["layout"], f"{arg}.layout", stage)
            if layout.partial:
                raise r.fail(f"{arg}.layout.partial", "[] (a parameter holds its value)", str(list(layout.partial)))
            layout.check_shape(shape, f"{r.where}: {arg}", "parameter")
        out[name] = ParameterLayout(name, shape, layout, stage_index)
    return out


# ---- merge_sliced_parameter ----------------------------------------------------------------

def merge_sliced_parameter(sliced_parameters, strategy=None) -> Parameter:
    """The whole Parameter from its slices: ``sliced_parameters`` (numpy arrays or
    Parameters) hold one slice per rank, in rank order. ``strategy``: the parameter's
    ParameterLayout, or the dict ``build_searched_strategy`` returns (looked up by the
    Parameters' name, KeyError when absent); None concatenates the slices along dim 0, as
    MindSpore does.

    Replicas of one block must agree bit for bit: when they do not, nothing is merged and a
    ValueError names the parameter, the block and the ranks on each side. A wrong number of
    slices, a slice of the wrong shape or dtype is a ValueError naming the expected and the
    actual. The inputs are never modified."""
    arrays, name = _slices(sliced_parameters)
    if strategy is None:
        return Parameter(_concatenated(arrays, name), name=name or "")
    entry = _entry(strategy, name)
    return Parameter(_merged(arrays, entry), name=entry.name)


def _slices(sliced) -> tuple[list[np.ndarray], str | None]:
    """The slices as arrays, and the name the Parameters among them share (None for arrays)."""
    where = "merge_sliced_parameter"
    if not isinstance(sliced, (list, tuple)) or not sliced:
        raise TypeError(format_error(where, "sliced_parameters", "a non-empty list of slices in rank order",
                                     repr(sliced)[:60]))
    arrays, names = [], []
    for k, s in enumerate(sliced):
        if isinstance(s, Parameter):
            arrays.append(s.asnumpy())
            names.append(s.name)
        elif isinstance(s, np.ndarray):
            arrays.append(s)
        else:
            raise TypeError(format_error(where, f"sliced_parameters[{k}]", "a numpy array or a Parameter",
                                         type(s).__name__))
    if len(set(names)) > 1:
        raise value_error(where, "sliced_parameters", "slices of one parameter (one name)",
                          f"names {sorted(set(names))}", "merge each parameter's slices separately")
    return arrays, names[0] if names else None


def _entry(strategy, name: str | None) -> ParameterLayout:
    """The layout to merge by: ``strategy`` itself, or its entry for ``name``."""
    where = "merge_sliced_parameter"
    if isinstance(strategy, dict):
        if name is None:
            raise TypeError(format_error(where, "strategy", "a ParameterLayout when the slices are numpy arrays",
                                         "a dict (numpy slices carry no parameter name)",
                                         "pass strategy[name], or Parameters named after the parameter"))
        if name not in strategy:
            raise KeyError(format_error(where, "strategy", f"an entry for parameter {name!r}",
                                        f"{len(strategy)} entries without it", SAME_FILE))
        strategy = strategy[name]
    if not isinstance(strategy, ParameterLayout):
        raise TypeError(format_error(where, "strategy", "a ParameterLayout, a dict of them or None",
                                     type(strategy).__name__, "use build_searched_strategy(file)"))
    if name is not None and name != strategy.name:
        raise value_error(where, "strategy", f"the layout of {name!r} (the slices' parameter)",
                          f"the layout of {strategy.name!r}", "pass the entry of the parameter being merged")
    return strategy


def _same_dtype(where: str, arrays: list[np.ndarray]) -> np.dtype:
    dtypes = sorted({str(a.dtype) for a in arrays})
    if len(dtypes) > 1:
        raise value_error(where, "slice dtypes", "one dtype", str(dtypes), "cast the slices alike")
    return arrays[0].dtype


def _concatenated(arrays: list[np.ndarray], name: str | None) -> np.ndarray:
    """MindSpore's merge without a strategy: the slices stacked along dim 0."""
    where = f"merge_sliced_parameter({name!r})" if name else "merge_sliced_parameter"
    _same_dtype(where, arrays)
    for k, a in enumerate(arrays):
        if a.ndim == 0 or a.shape[1:] != arrays[0].shape[1:]:
            raise value_error(where, f"slice {k} shape", f"(n, *{arrays[0].shape[1:]}) like slice 0 "
                              "(no strategy: concatenated along dim 0)", str(a.shape),
                              "pass strategy=build_searched_strategy(file) for slices split along other dims")
    return np.concatenate(arrays, axis=0)


def _merged(arrays: list[np.ndarray], entry: ParameterLayout) -> np.ndarray:
    """The blocks placed by the layout, once every replica is known to agree."""
    where = f"merge_sliced_parameter({entry.name!r})"
    ranks = entry.ranks
    if len(arrays) != len(ranks):
        raise value_error(where, "sliced_parameters", f"{len(ranks)} slices, one per rank {list(ranks)} of "
                          f"{entry.layout.mesh}, in rank order", f"{len(arrays)} slices",
                          "pass every rank's slice, replicas included")
    for k, a in enumerate(arrays):
        if a.shape != entry.slice_shape:
            raise value_error(where, f"slice {k} (rank {ranks[k]}) shape",
                              f"{entry.slice_shape} (global {entry.shape} split {entry.layout.splits()})",
                              str(a.shape), "pass the slices in rank order, each as its rank saved it")
    dtype = _same_dtype(where, arrays)
    holders: dict[tuple[int, ...], list[int]] = {}      # block index -> positions of the ranks holding it
    for k, rank in enumerate(ranks):
        holders.setdefault(entry.layout.block_index(rank), []).append(k)
    _check_replicas(where, arrays, entry, holders)
    out = np.empty(entry.shape, dtype=dtype)
    for positions in holders.values():
        out[entry.region(ranks[positions[0]])] = arrays[positions[0]]
    return out


def _check_replicas(where: str, arrays: list[np.ndarray], entry: ParameterLayout, holders: dict) -> None:
    """Every copy of a block equals the others bit for bit, else a ValueError naming the
    block and the ranks holding each differing value."""
    for positions in holders.values():
        values: dict[bytes, list[int]] = {}
        for k in positions:
            values.setdefault(np.ascontiguousarray(arrays[k]).tobytes(), []).append(entry.ranks[k])
        if len(values) > 1:
            sides = list(values.values())
            region = [list(r) for r in region_of(entry.region(sides[0][0]))]
            raise value_error(where, f"replicas of block {region}", "equal slices on every rank holding it",
                              f"ranks {sides[0]} hold one value and ranks {[r for s in sides[1:] for r in s]} "
                              f"{'another' if len(sides) == 2 else 'others'}",
                              "merge slices saved by one run at one step; nothing was merged")


# ---- transform_checkpoints -----------------------------------------------------------------

def transform_checkpoints(src_checkpoints_dir, dst_checkpoints_dir, ckpt_prefix: str,
                          src_strategy_file=None, dst_strategy_file=None) -> str:
    """Rewrite the checkpoint ``src_checkpoints_dir`` (an autopar checkpoint directory) as
    the checkpoint ``dst_checkpoints_dir/ckpt_prefix`` laid out for ``dst_strategy_file``'s
    plan: each tensor (an optimizer state by its parameter's layout) as one piece per
    distinct block, in the file of the rank that writes it -- the files ``save_checkpoint``
    writes on that plan. ``dst_strategy_file`` None writes it unsplit, as a serial save.
    Offline, in one process; returns the new checkpoint's path.

    The manifest records where every source piece lies, so ``src_strategy_file`` is a check:
    when given, each parameter's layout in it must be the one the checkpoint records (None
    means "the checkpoint's own layouts"; MindSpore's None means unsplit). Every value is
    copied bit for bit, every source piece verified against its checksum.

    The destination is published as ``save_checkpoint`` publishes (lock, temporary
    directory, free-space check, swap by renames): a checkpoint already at the destination
    is replaced only by a complete new one, and kept as it was when any step fails (a corrupt
    source piece, a full disk). The destination may be the source itself.
    """
    where = "transform_checkpoints"
    path = _destination_path(where, dst_checkpoints_dir, ckpt_prefix)
    directory, manifest = read_manifest(src_checkpoints_dir)
    tensors = manifest["tensors"]
    shapes = {n: tuple(e["shape"]) for n, e in tensors.items() if e.get("kind", "parameter") == "parameter"}
    if src_strategy_file is not None:
        _check_source(where, tensors, _matching(where, "src_strategy_file", src_strategy_file, shapes)[1])
    world_size, layouts = (1, dict.fromkeys(shapes)) if dst_strategy_file is None else \
        _matching(where, "dst_strategy_file", dst_strategy_file, shapes)
    blocks = _blocks(where, tensors, layouts)
    needed = MANIFEST_BASE_BYTES + sum(_nbytes(tensors[name], region) + BLOCK_OVERHEAD_BYTES
                                       for mine in blocks.values() for name, region, _ in mine)
    head = {k: v for k, v in manifest.items() if k != "tensors"} | {"world_size": world_size}
    step = manifest["step"]
    lock = _run(path, needed, prepare_save, path, step, needed)
    tmp = temp_dir(path, step)
    try:
        reader = PieceReader(directory, manifest)
        try:
            per_rank = [_run(path, needed, write_rank, tmp, rank, _held(reader, tensors, mine))
                        for rank, mine in sorted(blocks.items())]
        finally:
            reader.close()   # everything read before the swap: the destination may be the source
        _run(path, needed, publish_checked, tmp, path, head | {"tensors": merge_entries(per_rank)})
    except BaseException:
        abandon(tmp)
        raise
    finally:
        release_lock(path, lock)
    return path


def _destination_path(where: str, dst_dir, prefix) -> str:
    if not isinstance(dst_dir, (str, os.PathLike)):
        raise TypeError(format_error(where, "dst_checkpoints_dir", "a str or os.PathLike", type(dst_dir).__name__))
    if not isinstance(prefix, str) or not FILE_NAME.match(prefix):
        raise value_error(where, "ckpt_prefix", "a plain file name (the new checkpoint's directory name)",
                          repr(prefix))
    dst_dir = os.path.abspath(os.fspath(dst_dir))
    if os.path.exists(dst_dir) and not os.path.isdir(dst_dir):
        raise NotADirectoryError(format_error(where, "dst_checkpoints_dir", "a directory (made when missing)",
                                              f"{dst_dir!r}, a file"))
    return os.path.join(dst_dir, prefix)


def _matching(where: str, arg: str, file, shapes: dict) -> tuple[int, dict[str, ParameterLayout]]:
    """The strategy file's device count and layouts, checked to name exactly the
    checkpoint's parameters with their global shapes."""
    device_num, layouts = _read_strategy(where, arg, file)
    missing, unexpected = sorted(set(shapes) - set(layouts)), sorted(set(layouts) - set(shapes))
    if missing or unexpected:
        raise value_error(f"{where}({arg}={os.fspath(file)!r})", "parameters", "the checkpoint's parameters exactly",
                          f"missing {missing[:5]}, unexpected {unexpected[:5]}", SAME_FILE)
    for name, shape in shapes.items():
        if layouts[name].shape != shape:
            raise value_error(f"{where}({arg}={os.fspath(file)!r})", f"parameter {name!r} shape",
                              f"{shape} (the checkpoint's)", str(layouts[name].shape), SAME_FILE)
    return device_num, layouts


def _check_source(where: str, tensors: dict, layouts: dict[str, ParameterLayout]) -> None:
    """Each parameter's layout in the source strategy is the one the checkpoint records
    (a serial save records none: the strategy must split nothing)."""
    for name, entry in layouts.items():
        saved = tensors[name].get("layout")
        if saved == layout_json(entry.layout) or (saved is None and entry.slice_shape == entry.shape):
            continue
        raise value_error(where, f"src_strategy_file parameter {name!r}",
                          f"the layout the checkpoint records ({saved or 'whole, unsplit'})",
                          f"{layout_json(entry.layout)} ({entry.layout})",
                          "pass the strategy file of the run that saved the checkpoint, or None to use "
                          "the layouts it records")


def _blocks(where: str, tensors: dict, layouts: dict) -> dict[int, list]:
    """{rank: [(tensor name, global region, its ParameterLayout or None)]}: every block of the
    destination once, written by the rank at coordinate 0 of its layout's replicated axes."""
    out: dict[int, list] = {}
    for name, e in tensors.items():
        param = name if e.get("kind", "parameter") == "parameter" else name.partition(".")[2]
        if param not in layouts:
            raise value_error(where, f"tensor {name!r}", "an optimizer state of a parameter of the checkpoint",
                              f"one of {param!r}, which it lacks", "the manifest may be corrupt")
        entry = layouts[param]
        if entry is None:
            out.setdefault(0, []).append((name, full_region(e["shape"]), None))
            continue
        replicated = entry.layout.replicated_axes()
        for rank in entry.ranks:
            coord = entry.layout.mesh.coord(rank)
            if all(coord[a] == 0 for a in replicated):
                out.setdefault(rank, []).append((name, region_of(entry.region(rank)), entry))
    return out


def _nbytes(tensor: dict, region) -> int:
    return math.prod(b - a for a, b in region) * np.dtype(tensor["dtype"]).itemsize


def _held(reader: PieceReader, tensors: dict, mine: list) -> list[dict]:
    """One destination rank's blocks, read from the source, in the form ``save`` writes."""
    return [{"name": name, "array": reader.read(name, region), "kind": tensors[name].get("kind", "parameter"),
             "shape": tuple(tensors[name]["shape"]), "dtype": tensors[name]["dtype"], "region": region,
             "layout": None if entry is None else layout_json(entry.layout), "writer": True}
            for name, region, entry in mine]


def _run(path: str, needed: int, step, *args):
    """``step(*args)``, a full disk raised as an error naming the path and the space needed."""
    result, error = attempt(path, needed, step, *args)
    if error is not None:
        raise error
    return result
