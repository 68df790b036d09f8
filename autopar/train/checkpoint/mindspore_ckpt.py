"""MindSpore ``.ckpt`` files without MindSpore: read, write, and map PanGu-α's names.

The format is protobuf, from MindSpore's ``mindspore/ccsrc/utils/checkpoint.proto``
(mindspore-ai/mindspore)::

    message Checkpoint { message Value { required string tag = 1;              // field 1
                                         required TensorProto tensor = 2; }   // field 2
                         repeated Value value = 1; }
    message TensorProto { repeated int64 dims = 1;         // proto2: unpacked varints
                          required string tensor_type = 2; // str(dtype): "Float32", "BFloat16"...
                          required bytes tensor_content = 3; }  // raw little-endian C-order data

and how ``mindspore/train/serialization.py`` fills it: ``tensor_type`` is ``str(dtype)``
(``_tensor_to_np_type``: "Float16/32/64", "BFloat16", "Int8..Int64", "UInt8..UInt64" --
"Uint8" in MindSpore 1.x -- "Bool", and "str" for strings); a scalar is stored with
``dims == [0]``; a tensor over 512 MiB is split along its flat data into several Values of the
same tag, each with the full dims, written one after another (``_exec_save``), which the
reader concatenates. Newer files may hold a ``MapTensorProto maptensor = 3`` (embedding-cache
maps): refused by name. The wire encoding is written here by hand (varints and
length-delimited fields, about a hundred lines), so autopar needs no protobuf package: it
is not among autopar's dependencies, and reading with ``mmap`` keeps only the arrays in memory.

PanGu-α names (``pangu_from_mindspore`` / ``pangu_to_mindspore``): MindSpore's model zoo
(``model_zoo/official/nlp/pangu_alpha/src/pangu_alpha.py``, and ``mindspore/parallel/nn/
transformer.py`` in later versions) names the blocks ``backbone.blocks.{i}.{layernorm1,
layernorm2,attention.dense1..3,attention.projection,output.mapping,output.projection}``,
the query layer ``backbone.top_query_layer.*``, the final LayerNorm ``backbone.layernorm``.
Q/K/V are ``nn.Dense`` -- weights (out, in) like autopar's -- but the attention output
projection and both FFN matrices are ``Mapping``/``_Linear(transpose_b=False)`` cells whose
weights are stored (in, out): those three are transposed. The embedding tables are named
as the released weights' conversions write them (PCL's pcl_pangu merge script renames the
model zoo's names to these; a numpy -> HuggingFace GPTPanguForCausalLM script reads them):
``backbone.{word,position,top_query}_embedding.embedding_table``; the model zoo's training
names (``embedding_table``, ``backbone.embedding.embedding.position_embedding.embedding_table``,
``backbone.top_query_embedding_table``), the later ``backbone.embedding.{word,position}_
embedding.embedding_table`` and the pipeline model's query layer as the last
``backbone.blocks.{L-1}`` are read as aliases. The head is tied: no tensor of its own.

Loading onto any layout: ``convert_mindspore_ckpt`` writes an autopar checkpoint directory
(``save_checkpoint`` of the mapped weights, config recorded), which
``load_distributed_checkpoint`` then loads under any plan, each rank reading its regions.
MindSpore's per-rank sliced saves must be merged first (MindSpore's
``transform_checkpoints``); a sliced tensor is refused with that advice.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import mmap
import os
import re
import sys
import types

import numpy as np

from ...dtype import bfloat16, is_float
from ...nn.cell import Cell
from ...nn.parameter import Parameter
from .format import read_manifest, value_error
from .holdings import split_model
from .reader import PieceReader
from .save import save_checkpoint

# ---- dtypes ----------------------------------------------------------------------------------

MS_DTYPES = {"Float16": np.dtype(np.float16), "Float32": np.dtype(np.float32), "Float64": np.dtype(np.float64),
             "BFloat16": bfloat16, "Int8": np.dtype(np.int8), "Int16": np.dtype(np.int16),
             "Int32": np.dtype(np.int32), "Int64": np.dtype(np.int64), "UInt8": np.dtype(np.uint8),
             "UInt16": np.dtype(np.uint16), "UInt32": np.dtype(np.uint32), "UInt64": np.dtype(np.uint64),
             "Bool": np.dtype(np.bool_)}
LEGACY_DTYPES = {"Uint8": "UInt8", "Uint16": "UInt16", "Uint32": "UInt32", "Uint64": "UInt64"}   # MindSpore 1.x
STRING_TYPE = "str"            # a string entry (MindSpore's append_dict): read back as its raw bytes
SLICE_BYTES = 512 * 1024 * 1024   # MindSpore's SLICE_SIZE: larger tensors are split into several Values
_NP_TO_MS = {dt: name for name, dt in MS_DTYPES.items()}

# ---- protobuf wire format --------------------------------------------------------------------
VARINT, FIXED64, LENGTH, FIXED32 = 0, 1, 2, 5      # wire types (3, 4: groups, never in this format)


class _Truncated(Exception):
    """The data ended inside a field (internal; reported as a ValueError naming the file)."""


class _BadWire(Exception):
    """A wire type this format never uses: not a checkpoint, or encrypted (internal)."""


def _varint(n: int) -> bytes:
    """Base-128 varint; a negative int64 as its 64-bit two's complement (10 bytes)."""
    n &= (1 << 64) - 1
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _key(field: int, wire: int) -> bytes:
    return _varint(field << 3 | wire)


def _length_delimited(field: int, payload: bytes) -> bytes:
    return _key(field, LENGTH) + _varint(len(payload)) + payload


def _read_varint(buf, pos: int, end: int) -> tuple[int, int]:
    value, shift = 0, 0
    while True:
        if pos >= end or shift > 63:
            raise _Truncated
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7


def _fields(buf, pos: int, end: int):
    """(field number, wire type, value) of each field in buf[pos:end]: an int for varints,
    a (start, stop) span for length-delimited fields; fixed-width fields are skipped."""
    while pos < end:
        key, pos = _read_varint(buf, pos, end)
        field, wire = key >> 3, key & 7
        if wire == VARINT:
            value, pos = _read_varint(buf, pos, end)
        elif wire == LENGTH:
            n, pos = _read_varint(buf, pos, end)
            value, pos = (pos, pos + n), pos + n
        elif wire in (FIXED64, FIXED32):
            value, pos = None, pos + (8 if wire == FIXED64 else 4)
        else:
            raise _BadWire(f"wire type {wire} (field {field})")
        if pos > end:
            raise _Truncated
        yield field, wire, value


# ---- reading ---------------------------------------------------------------------------------

def _int64(v: int) -> int:
    return v - (1 << 64) if v >= 1 << 63 else v


def _tensor_proto(buf, start: int, stop: int, where: str) -> tuple[list[int], str, tuple[int, int]]:
    dims, dtype, content = [], None, None
    for field, wire, value in _fields(buf, start, stop):
        if field == 1 and wire == VARINT:
            dims.append(_int64(value))
        elif field == 1 and wire == LENGTH:           # packed, as proto3 writers do
            pos, end = value
            while pos < end:
                d, pos = _read_varint(buf, pos, end)
                dims.append(_int64(d))
        elif field == 2 and wire == LENGTH:
            dtype = bytes(buf[value[0]:value[1]]).decode("utf-8", "replace")
        elif field == 3 and wire == LENGTH:
            content = value
    if dtype is None or content is None:
        raise value_error(where, "TensorProto", "tensor_type (field 2) and tensor_content (field 3)",
                          f"{'no tensor_type' if dtype is None else 'no tensor_content'}",
                          "the file is corrupt or not a MindSpore checkpoint")
    return dims, dtype, content


def _values(buf, path: str):
    """(tag, dims, tensor_type, content span) of every Checkpoint.Value, in file order."""
    for field, wire, value in _fields(buf, 0, len(buf)):
        if field != 1 or wire != LENGTH:
            continue
        tag, tensor = None, None
        for f, w, v in _fields(buf, *value):
            if f == 1 and w == LENGTH:
                tag = bytes(buf[v[0]:v[1]]).decode("utf-8", "replace")
            elif f == 2 and w == LENGTH:
                tensor = v
            elif f == 3 and w == LENGTH:
                raise value_error(f"{path}: tag {tag!r}", "value", "a TensorProto (field 2)",
                                  "a MapTensorProto (field 3, an embedding-cache map)",
                                  "export the map as an ordinary tensor in MindSpore first")
        if tag is None or tensor is None:
            raise value_error(path, "Checkpoint.Value", "a tag (field 1) and a tensor (field 2)",
                              f"tag {tag!r}, tensor {'present' if tensor else 'missing'}",
                              "the file is corrupt or not a MindSpore checkpoint")
        yield (tag, *_tensor_proto(buf, *tensor, f"{path}: tag {tag!r}"))


def _dtype_of(name: str, where: str):
    name = LEGACY_DTYPES.get(name, name)
    if name == STRING_TYPE:
        return None
    if name not in MS_DTYPES:
        raise value_error(where, "tensor_type", f"one of {sorted(MS_DTYPES) + [STRING_TYPE]}", repr(name),
                          "a newer MindSpore dtype autopar cannot read (e.g. a quantized Int4)")
    return MS_DTYPES[name]


def _array(buf, dims: list[int], ms_type: str, spans: list[tuple[int, int]], where: str) -> np.ndarray:
    """The tensor of one tag from its content spans in ``buf`` (several for a split tensor),
    every size checked before anything is allocated."""
    dtype = _dtype_of(ms_type, where)
    got = sum(b - a for a, b in spans)
    if dtype is None:
        data = b"".join(bytes(buf[a:b]) for a, b in spans)
        return np.array(data, dtype=f"S{max(got, 1)}")                         # raw bytes, 0-d
    if any(d < 0 for d in dims):
        raise value_error(where, "dims", "sizes >= 0", str(dims), "the file is corrupt")
    shape = () if dims in ([], [0]) else tuple(dims)                           # MindSpore: [0] is a scalar
    want = math.prod(shape) * dtype.itemsize
    if got != want:
        raise value_error(where, "tensor_content", f"{want} bytes ({ms_type} x dims {dims})",
                          f"{got} bytes", "the file is truncated or corrupt")
    parts = [np.frombuffer(buf, dtype, (b - a) // dtype.itemsize, a) for a, b in spans]
    return (parts[0].copy() if len(parts) == 1 else np.concatenate(parts)).reshape(shape)


def load_mindspore_ckpt(path) -> dict[str, np.ndarray]:
    """Every tensor of a MindSpore ``.ckpt`` file, ``{tag: array}`` in file order (parameters,
    and whatever else the file holds: optimizer moments, step counters). Raises ValueError
    naming the file and the tag for a truncated file, an unknown dtype, dims that disagree
    with the data, or a tag split across the file."""
    path = os.fspath(path)
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size == 0:
            raise value_error(path, "contents", "a MindSpore checkpoint", "an empty file")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            return _parse(buf, path)


def _parse(buf, path: str) -> dict[str, np.ndarray]:
    out, pending = {}, None   # pending: [tag, dims, type, content spans] of the tag being read
    try:
        for tag, dims, ms_type, span in _values(buf, path):
            if pending is not None and pending[:3] == [tag, dims, ms_type]:
                pending[3].append(span)                                        # the next slice of a split tensor
                continue
            if pending is not None:
                out[pending[0]] = _array(buf, *pending[1:], f"{path}: tag {pending[0]!r}")
            if tag in out:
                raise value_error(f"{path}: tag {tag!r}", "tag", "each tag once (slices of one tensor adjacent)",
                                  "a second, separate entry", "the file is corrupt")
            pending = [tag, dims, ms_type, [span]]
    except _Truncated:
        at = f" after tag {pending[0]!r}" if pending else ""
        raise value_error(path, "contents", "complete protobuf fields", f"the file ends inside a field{at}",
                          "the file is truncated (copy it again), or encrypted (decrypt it with MindSpore)") from None
    except _BadWire as err:
        raise value_error(path, "contents", "a MindSpore checkpoint (protobuf)", str(err),
                          "the file is corrupt, encrypted (decrypt it with MindSpore) or not a checkpoint") from None
    if pending is None:
        raise value_error(path, "contents", "at least one tagged tensor", "none",
                          "the file is not a MindSpore checkpoint, or is encrypted")
    out[pending[0]] = _array(buf, *pending[1:], f"{path}: tag {pending[0]!r}")
    return out


# ---- writing ---------------------------------------------------------------------------------

def _ms_type(tag: str, array: np.ndarray, path: str) -> str:
    if array.dtype.kind == "S":
        return STRING_TYPE
    if array.dtype not in _NP_TO_MS:
        raise value_error(f"{path}: tag {tag!r}", "dtype", f"one of {sorted(n.name for n in _NP_TO_MS)}",
                          array.dtype.name, "cast it first")
    return _NP_TO_MS[array.dtype]


def _encoded_values(tag: str, array: np.ndarray, path: str):
    """The serialized Checkpoint.Value entries of one tensor (several above SLICE_BYTES), as
    pieces to write in order: headers as bytes, the data as views of the array (no copy)."""
    ms_type = _ms_type(tag, array, path)
    if array.shape == (0,):
        raise value_error(f"{path}: tag {tag!r}", "shape", "not (0,)", "(0,)",
                          "MindSpore stores a scalar as dims [0], so an empty 1-d tensor cannot be told apart")
    if ms_type == STRING_TYPE:
        dims, chunks = [0], [memoryview(array.tobytes())]
    else:
        dims = [0] if array.ndim == 0 else list(array.shape)
        flat = np.ascontiguousarray(array).reshape(-1)
        n = max(1, math.ceil(flat.nbytes / SLICE_BYTES))
        rows = flat.view(np.uint8).reshape(-1, flat.itemsize)             # split between elements only
        chunks = [memoryview(c.reshape(-1)) for c in np.array_split(rows, n)]
    head = b"".join(_key(1, VARINT) + _varint(d) for d in dims) + _length_delimited(2, ms_type.encode())
    tag_field = _length_delimited(1, tag.encode())
    for chunk in chunks:
        content_head = _key(3, LENGTH) + _varint(chunk.nbytes)
        tensor_size = len(head) + len(content_head) + chunk.nbytes
        tensor_head = _key(2, LENGTH) + _varint(tensor_size)
        value_size = len(tag_field) + len(tensor_head) + tensor_size
        yield _key(1, LENGTH) + _varint(value_size) + tag_field + tensor_head + head + content_head
        yield chunk


def save_mindspore_ckpt(path, arrays: dict[str, np.ndarray]) -> str:
    """Write ``{tag: array}`` as a MindSpore ``.ckpt`` file, atomically: into ``<path>.part``,
    fsynced, then renamed over ``path`` (a failure leaves any previous file as it was).
    Returns ``path``."""
    path = os.path.abspath(os.fspath(path))
    part = path + ".part"
    try:
        with open(part, "wb") as f:
            for tag, array in arrays.items():
                if not isinstance(tag, str) or not tag:
                    raise value_error(path, "tag", "a non-empty str", repr(tag))
                for entry in _encoded_values(tag, np.asarray(array), path):
                    f.write(entry)
            f.flush()
            os.fsync(f.fileno())
        os.replace(part, path)
    except BaseException:
        if os.path.exists(part):
            os.remove(part)
        raise
    return path


# ---- PanGu-α names ---------------------------------------------------------------------------

# (MindSpore suffix, autopar suffix, stored transposed in MindSpore) inside one decoder layer
_LAYER = [(f"{ln}.{p}", f"{ln}.{p}", False) for ln in ("layernorm1", "layernorm2") for p in ("gamma", "beta")]
_LAYER += [(f"attention.dense{k}.{p}", f"attention.dense{k}.{p}", False) for k in (1, 2, 3) for p in ("weight", "bias")]
_LAYER += [(f"{m}.weight", f"{m}.weight", True) for m in ("attention.projection", "output.mapping",
                                                            "output.projection")]
_LAYER += [(f"{m}.bias", f"{m}.bias", False) for m in ("attention.projection", "output.mapping", "output.projection")]

ALIASES = {   # other MindSpore PanGu-α versions' names -> the names written here
    "embedding_table": "backbone.word_embedding.embedding_table",                         # model zoo, training
    "backbone.embedding.embedding.position_embedding.embedding_table": "backbone.position_embedding.embedding_table",
    "backbone.top_query_embedding_table": "backbone.top_query_embedding.embedding_table",
    "backbone.embedding.word_embedding.embedding_table": "backbone.word_embedding.embedding_table",  # r1.6+
    "backbone.embedding.position_embedding.embedding_table": "backbone.position_embedding.embedding_table",
}
# Not weights: optimizer moments, step and loss-scale counters, inference key/value caches
TRAINING_STATE = re.compile(r"^(adam_[mv]|moments|accu_grads)\.|"
                            r"^(global_step|scale_sense|current_iterator_step|last_overflow_iterator_step|"
                            r"epoch_num|step_num|learning_rate|beta[12]_power)$|\.(key_past|value_past)$")


@dataclasses.dataclass(frozen=True)
class NameRow:
    """One PanGu-α tensor: its MindSpore and autopar names, autopar's shape, and whether
    MindSpore stores it transposed ((in, out) where autopar keeps (out, in))."""
    mindspore: str
    autopar: str
    shape: tuple[int, ...]
    transposed: bool

    @property
    def mindspore_shape(self) -> tuple[int, ...]:
        return self.shape[::-1] if self.transposed else self.shape


def _layer_shape(suffix: str, h: int, f: int) -> tuple[int, ...]:
    if suffix.startswith("output.mapping"):
        return (f, h) if suffix.endswith("weight") else (f,)   # autopar (out, in): (F, H)
    if suffix == "output.projection.weight":
        return (h, f)
    return (h, h) if suffix.endswith("weight") else (h,)


def pangu_names(config) -> list[NameRow]:
    """Every PanGu-α tensor of ``config`` (a PanguAlphaConfig, or any object with its fields)
    with its MindSpore name, autopar name, autopar shape and transposition."""
    h, f, v, s = config.hidden_size, config.ffn_hidden_size, config.vocab_size, config.seq_length
    rows = [NameRow("backbone.word_embedding.embedding_table", "word_embedding.embedding_table", (v, h), False),
            NameRow("backbone.position_embedding.embedding_table", "position_embedding.embedding_table", (s, h), False),
            NameRow("backbone.top_query_embedding.embedding_table", "query_layer.top_query_embedding.embedding_table",
                    (s, h), False)]
    layers = [(f"backbone.blocks.{i}.", f"blocks.{i}.") for i in range(config.num_layers - 1)]
    for ms, ap in layers + [("backbone.top_query_layer.", "query_layer.")]:
        rows += [NameRow(ms + a, ap + b, _layer_shape(b, h, f), t) for a, b, t in _LAYER]
    rows += [NameRow(f"backbone.layernorm.{p}", f"final_layernorm.{p}", (h,), False) for p in ("gamma", "beta")]
    return rows


def split_training_state(arrays: dict) -> tuple[dict, list[str]]:
    """(the entries that may be weights, the names of those that are not: optimizer moments,
    step and loss-scale counters, key/value caches, strings), as MindSpore training saves."""
    dropped = [n for n, a in arrays.items() if TRAINING_STATE.search(n) or np.asarray(a).dtype.kind == "S"]
    return {n: a for n, a in arrays.items() if n not in set(dropped)}, dropped


def _canonical(names, config, where: str) -> dict[str, str]:
    """{name written here: the given name}, aliases resolved; two given names for one tensor
    are an error."""
    query_block = f"backbone.blocks.{config.num_layers - 1}."    # the pipeline model's query layer...
    pipeline = not any(n.startswith("backbone.top_query_layer.") for n in names)   # ...when it has no other
    out = {}
    for name in names:
        canon = ALIASES.get(name, name)
        if pipeline and canon.startswith(query_block):
            canon = "backbone.top_query_layer." + canon[len(query_block):]
        if canon in out:
            raise value_error(where, f"tensor {canon!r}", "one entry", f"two: {out[canon]!r} and {name!r}",
                              "remove one of them")
        out[canon] = name
    return out


def _listed(names: list[str], first: int = 6) -> str:
    return f"{names[:first]}{f' and {len(names) - first} more' if len(names) > first else ''}"


def _check_names(where: str, missing: list[str], extra: list[str], strict: bool, side: str) -> None:
    if strict and (missing or extra):
        raise value_error(where, "tensor names", f"exactly PanGu-α's {side} names for this config",
                          f"missing {_listed(missing)}, unexpected {_listed(extra)}",
                          "check the config (num_layers, sizes) matches the weights, or pass strict=False")


def _shape_error(where: str, tag: str, want: tuple, got: tuple) -> ValueError:
    sliced = len(want) == len(got) and got != want and all(w % g == 0 for w, g in zip(want, got) if g)
    fix = ("it looks like one rank's slice of a sharded MindSpore save: merge the slices first "
           "(MindSpore's transform_checkpoints or merge_sliced_parameter)" if sliced
           else "build the config of the model these weights belong to")
    return value_error(where, f"tensor {tag!r} shape", f"{want} (MindSpore's layout for this config)", str(got), fix)


def pangu_from_mindspore(arrays: dict, config, *, strict: bool = True) -> dict[str, np.ndarray]:
    """MindSpore PanGu-α tensors ``{MindSpore name: array}`` -> ``{autopar name: array}``:
    aliases resolved, (in, out) weights transposed, values cast to ``config.param_dtype``.
    Training state (``split_training_state``) is left out. Missing or unknown names raise
    ValueError listing them (``strict=False``: skipped)."""
    where = "pangu_from_mindspore"
    weights, _ = split_training_state(arrays)
    given = _canonical(weights, config, where)
    rows = pangu_names(config)
    known = {r.mindspore for r in rows}
    _check_names(where, [r.mindspore for r in rows if r.mindspore not in given],
                 sorted(given[c] for c in given if c not in known), strict, "MindSpore")
    dtype = np.dtype(getattr(config, "param_dtype", "float32"))
    out = {}
    for r in rows:
        if r.mindspore not in given:
            continue
        tag = given[r.mindspore]
        a = np.asarray(weights[tag])
        if a.shape != r.mindspore_shape:
            raise _shape_error(where, tag, r.mindspore_shape, a.shape)
        if not is_float(a.dtype):
            raise value_error(where, f"tensor {tag!r} dtype", "a float dtype", a.dtype.name)
        out[r.autopar] = np.ascontiguousarray(a.T if r.transposed else a).astype(dtype, copy=False)
    return out


def pangu_to_mindspore(arrays: dict, config, *, strict: bool = True, dtype=None) -> dict[str, np.ndarray]:
    """autopar PanGu-α parameters ``{autopar name: array}`` -> ``{MindSpore name: array}`` in
    MindSpore's layouts (the reverse of :func:`pangu_from_mindspore`), optionally cast to
    ``dtype`` (the released weights are float16). Missing or unknown names raise ValueError."""
    where = "pangu_to_mindspore"
    rows = pangu_names(config)
    known = {r.autopar for r in rows}
    _check_names(where, [r.autopar for r in rows if r.autopar not in arrays],
                 sorted(n for n in arrays if n not in known), strict, "autopar")
    out = {}
    for r in rows:
        if r.autopar not in arrays:
            continue
        a = np.asarray(arrays[r.autopar])
        if a.shape != r.shape:
            raise value_error(where, f"tensor {r.autopar!r} shape", f"{r.shape} (this config's)", str(a.shape))
        a = np.ascontiguousarray(a.T if r.transposed else a)
        out[r.mindspore] = a if dtype is None else a.astype(dtype)
    return out


# ---- converting whole checkpoints ------------------------------------------------------------

class _Weights(Cell):
    """A holder of named weights, so that save_checkpoint writes them (and the config)
    exactly as it writes a model's."""

    def __init__(self, arrays: dict[str, np.ndarray], config):
        super().__init__()
        self.config = config
        for i, (name, array) in enumerate(arrays.items()):
            setattr(self, f"w{i}", Parameter(array, name=name))


def convert_mindspore_ckpt(src, dst, config, *, strict: bool = True, world=None) -> dict:
    """A MindSpore PanGu-α ``.ckpt`` -> an autopar checkpoint directory ``dst`` (with
    ``config`` recorded), which :func:`load_distributed_checkpoint` loads onto any plan.
    Returns ``{"path", "tensors": names written, "dropped": training-state names left out}``."""
    arrays = load_mindspore_ckpt(src)
    weights = pangu_from_mindspore(arrays, config, strict=strict)
    path = save_checkpoint(_Weights(weights, config), dst, world=world)
    return {"path": path, "tensors": list(weights), "dropped": split_training_state(arrays)[1]}


def _config_fields(config) -> types.SimpleNamespace:
    return types.SimpleNamespace(**config) if isinstance(config, dict) else config


def _parameters_of(src) -> tuple[dict[str, np.ndarray], object]:
    """(parameters by autopar name, the config saved with them) of a checkpoint directory
    or an unsharded network."""
    if isinstance(src, (str, os.PathLike)):
        directory, manifest = read_manifest(src)
        names = [n for n, e in manifest["tensors"].items() if e.get("kind", "parameter") == "parameter"]
        reader = PieceReader(directory, manifest)   # parameters only: a trainer's states are not read
        try:
            params = {n: reader.read(n) for n in names}
        finally:
            reader.close()
        saved = manifest.get("config")
        return params, None if saved is None else types.SimpleNamespace(**saved["fields"])
    network, _ = split_model(src)
    params = network.parameters_dict()
    sharded = [n for n, p in params.items() if p._shard is not None]
    if sharded:
        raise value_error("export_mindspore_ckpt", "network", "an unsharded network", f"shards of {sharded[:3]}",
                          "save_checkpoint it (collective) and export the checkpoint directory")
    return {n: p.asnumpy() for n, p in params.items()}, getattr(network, "config", None)


def export_mindspore_ckpt(src, dst, config=None, *, dtype=None, strict: bool = True) -> str:
    """An autopar PanGu-α checkpoint directory (or an unsharded network) -> a MindSpore
    ``.ckpt`` file with MindSpore's names and layouts (parameters only; optimizer states stay
    behind). ``config`` (a PanguAlphaConfig or a dict of its fields): by default the one saved
    with the checkpoint, or the network's ``config``; ``dtype``: cast (e.g. "float16", as the
    released weights are). Returns ``dst``."""
    params, saved = _parameters_of(src)
    config = _config_fields(config) if config is not None else saved
    if config is None:
        raise value_error("export_mindspore_ckpt", "config", "a PanGu-α config",
                          "none given and none saved with the weights", "pass config=PanguAlphaConfig(...)")
    return save_mindspore_ckpt(dst, pangu_to_mindspore(params, config, strict=strict, dtype=dtype))


# ---- command line ----------------------------------------------------------------------------

SIZE_FIELDS = ("num_layers", "hidden_size", "ffn_hidden_size", "vocab_size", "seq_length")


def _config_value(file: str):
    """A PanGu-α config from a JSON file of its fields (``{"class", "fields"}`` or flat), as a
    frozen dataclass named PanguAlphaConfig, so the converted checkpoint records it and
    ``read_config(path, PanguAlphaConfig)`` rebuilds (and validates) the real one. The sizes
    the names and shapes depend on must be given; other fields keep PanguAlphaConfig's defaults."""
    with open(file, encoding="utf-8") as f:
        data = json.load(f)
    fields = data.get("fields", data) if isinstance(data, dict) else None
    if not isinstance(fields, dict) or any(k not in fields for k in SIZE_FIELDS):
        raise value_error(file, "contents", f"a JSON object of PanguAlphaConfig fields with {list(SIZE_FIELDS)}",
                          repr(sorted(fields)) if isinstance(fields, dict) else type(data).__name__,
                          "give every field that differs from PanguAlphaConfig's defaults (num_heads too)")
    cls = dataclasses.make_dataclass("PanguAlphaConfig", list(fields), frozen=True)
    return cls(**fields)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m autopar.train.checkpoint.mindspore_ckpt",
                                description="MindSpore .ckpt files: list, convert PanGu-α weights both ways.")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--list", metavar="CKPT", help="print every tag, dtype and shape")
    g.add_argument("--to-autopar", nargs=2, metavar=("CKPT", "DIR"), help="convert to an autopar checkpoint")
    g.add_argument("--to-mindspore", nargs=2, metavar=("DIR", "CKPT"), help="export an autopar checkpoint")
    p.add_argument("--config", metavar="JSON", help="PanguAlphaConfig fields (needed by --to-autopar)")
    p.add_argument("--dtype", help="--to-mindspore: cast the weights, e.g. float16")
    args = p.parse_args(argv)
    if args.list:
        for tag, a in load_mindspore_ckpt(args.list).items():
            print(f"{tag}\t{a.dtype.name}\t{list(a.shape)}")
    elif args.to_mindspore:
        print(export_mindspore_ckpt(args.to_mindspore[0], args.to_mindspore[1], dtype=args.dtype))
    else:
        if not args.config:
            p.error("--to-autopar needs --config FILE.json (PanguAlphaConfig fields)")
        config = _config_value(args.config)
        print(convert_mindspore_ckpt(args.to_autopar[0], args.to_autopar[1], config)["path"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
