"""Machine profiles: the figures the cost model turns FLOPs and bytes into seconds with.

A profile is a JSON data file (``autopar/strategy/profiles/<name>.json``) holding, with units:

* ``devices_per_node``            — devices that share the fast intra-node link (count);
* ``memory_bytes``                — memory per device (bytes);
* ``gemm_flops``                  — dense matrix-multiply rate per dtype name (FLOP/s);
* ``elementwise_bytes_per_s``     — memory bandwidth for elementwise ops (bytes/s);
* ``intra_node_latency_s``        — collective start-up latency inside a node (s);
* ``intra_node_bandwidth_bytes_per_s`` — collective bandwidth inside a node (bytes/s);
* ``inter_node_latency_s``        — collective start-up latency between nodes (s);
* ``inter_node_bandwidth_bytes_per_s`` — collective bandwidth between nodes (bytes/s);
* ``op_overhead_s``               — fixed cost of every executed op: dispatch + kernel launch (s);
  optional, 0 when a file omits it (files written before it existed);
* ``collective_wait_s``           — optional, 0 when omitted: seconds every collective call (and
  pipeline send) costs on top of its latency because its ranks arrive at different times
  (calibrated against measured steps; the latency alone is one call among ready ranks);
* ``comm_overlap``                — optional, 0 when omitted: the fraction of the gradient buckets'
  communication (``comm_fusion``) that runs beside the backward pass's compute, in [0, 1]. 0 is
  the 2-core CPU VM's figure (both cores run the backward pass, so a bucket's all-reduce
  competes with it for the same cores and hides nothing; the project's measurement); 1 is a
  NIC or NCCL stream that runs beside compute (assumed for such machines, not measured here);
* ``kernel_overlap``              — optional, 0 when omitted: the fraction of the shorter of a
  kernel's FLOPs time and bytes time that it hides behind the longer, in [0, 1]. 1 is a
  roofline, max(FLOPs time, bytes time): a GPU or NPU kernel streams its operands while it
  computes (assumed for such profiles; the H100 steps' predictions agree, 0.97 and 1.06 of
  the measured, and the published A100 runs' error falls from 7.4% to 5.2%). 0 adds the two:
  the CPU figure, where numpy's matmul and its copies and allocations do not overlap (61
  measured 16-core plans: 9.5-10.9% error added, 12-19% as a roofline);
* ``op_host_s``                   — optional, per op kind: seconds the host takes to issue one
  instruction of that kind on a device that runs ops asynchronously (a GPU: the host queues
  kernels and goes on). A profile with these prices each op at the longer of its host issue and
  its device work, instead of their sum (a CPU, where one thread does both). Sourced per kind as
  ``op_host_s.<kind>``;
* ``op_device_s``                 — optional, per op kind: the device's fixed seconds per
  instruction of that kind besides its bytes at ``op_bytes_per_s`` (a kernel's start and tail;
  fitted through two widths by the GPU calibration). Sourced per kind as ``op_device_s.<kind>``;
* ``gemm_efficiency``             — optional, per dtype name: points ``[d, fraction]`` of the
  GEMM rate reached by a GEMM whose smallest dimension min(m, n, k) is d (small and skinny
  GEMMs run below peak); between points the fraction is interpolated in log d, outside
  them the nearest point holds; a dtype without a curve runs at its ``gemm_flops`` rate.
  Sourced per dtype as ``gemm_efficiency.<dtype>``;
* ``sources``                     — for every figure above, where it comes from (measured how,
  public document, or "assumed"). Keys are the field names; GEMM rates are keyed
  ``gemm_flops.<dtype>``. An optional figure left at its default gets a source saying so.

``python -m autopar.calibrate`` measures the running machine and writes such a file.

``load_profile("a100-8")`` loads a shipped profile by name (or by the part before its size,
when one profile has it: ``"ascend910"``); ``load_profile("/path/x.json")``
loads a file. ``PROFILES`` lists the shipped names.
"""
from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..errors import is_int

PROFILE_DIR = Path(__file__).parent / "profiles"

PROFILES: tuple[str, ...] = tuple(sorted(p.stem for p in PROFILE_DIR.glob("*.json")))

# Figures that must each have a ``sources`` entry (besides one per ``gemm_flops`` dtype).
SOURCED_FIELDS: tuple[str, ...] = (
    "devices_per_node",
    "memory_bytes",
    "elementwise_bytes_per_s",
    "intra_node_latency_s",
    "intra_node_bandwidth_bytes_per_s",
    "inter_node_latency_s",
    "inter_node_bandwidth_bytes_per_s",
)

# Optional figures: name -> default. A profile that gives one needs a source for it; one left
# at its default without a source is given the source DEFAULTED_SOURCE.
OPTIONAL_FIELDS: Mapping[str, float] = {"op_overhead_s": 0.0, "collective_wait_s": 0.0, "comm_overlap": 0.0,
                                        "kernel_overlap": 0.0}
DEFAULTED_SOURCE = "left at its default, 0 s, with no source: no per-op overhead charged"
DEFAULTED_SOURCES: Mapping[str, str] = {
    "op_overhead_s": DEFAULTED_SOURCE,
    "collective_wait_s": "left at its default, 0 s, with no source: no waiting charged per collective",
    "kernel_overlap": "left at its default, 0, with no source: a kernel's FLOPs time and bytes time are added "
                      "(the CPU figure)",
    "comm_overlap": "left at its default, 0, with no source: gradient buckets overlap nothing (the 2-core CPU "
                    "VM's figure: both cores compute, so a bucket's all-reduce competes with backward)"}


def _positive_number(name: str, value, *, allow_zero: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"MachineProfile.{name}: expected a number, got {value!r} "
                         f"({type(value).__name__})")
    value = float(value)
    if not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"MachineProfile.{name}: expected a finite number {bound}, got {value!r}")
    return value


@dataclass(frozen=True)
class MachineProfile:
    """One machine's rates, all in SI units (s, bytes, FLOP/s, bytes/s); see module docstring."""

    name: str
    devices_per_node: int
    memory_bytes: int                               # per device, bytes
    gemm_flops: Mapping[str, float]                 # dtype name -> FLOP/s
    elementwise_bytes_per_s: float                  # bytes/s
    intra_node_latency_s: float                     # s
    intra_node_bandwidth_bytes_per_s: float         # bytes/s
    inter_node_latency_s: float                     # s
    inter_node_bandwidth_bytes_per_s: float         # bytes/s
    sources: Mapping[str, str] = field(default_factory=dict)
    op_overhead_s: float = OPTIONAL_FIELDS["op_overhead_s"]   # s per executed op
    collective_wait_s: float = OPTIONAL_FIELDS["collective_wait_s"]   # s per collective call: ranks waiting
    comm_overlap: float = OPTIONAL_FIELDS["comm_overlap"]   # fraction of bucket communication beside backward
    kernel_overlap: float = OPTIONAL_FIELDS["kernel_overlap"]   # fraction of min(FLOPs time, bytes time) hidden
    # op kind -> bytes/s its kernels (forward + backward) move, where they run below the
    # elementwise bandwidth (masks hashed, erf, exp, row reductions); each sourced as
    # "op_bytes_per_s.<kind>"
    op_bytes_per_s: Mapping[str, float] = field(default_factory=dict)
    # op kind -> host seconds to issue one instruction of it, on an asynchronous device (GPU);
    # each sourced as "op_host_s.<kind>"
    op_host_s: Mapping[str, float] = field(default_factory=dict)
    # op kind -> device seconds per instruction besides its bytes; each sourced as "op_device_s.<kind>"
    op_device_s: Mapping[str, float] = field(default_factory=dict)
    # dtype -> ((min(m, n, k), fraction of gemm_flops), ...), d increasing
    gemm_efficiency: Mapping[str, tuple[tuple[float, float], ...]] = field(default_factory=dict)

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"MachineProfile.name: expected a non-empty string, got {self.name!r}")
        for int_field in ("devices_per_node", "memory_bytes"):
            value = getattr(self, int_field)
            if isinstance(value, float) and value.is_integer():
                value = int(value)
            if not is_int(value) or value <= 0:
                raise ValueError(f"MachineProfile.{int_field}: expected a positive integer, "
                                 f"got {value!r} (profile {self.name!r})")
            object.__setattr__(self, int_field, value)
        if not isinstance(self.gemm_flops, Mapping) or not self.gemm_flops:
            raise ValueError(f"MachineProfile.gemm_flops: expected a non-empty mapping dtype name "
                             f"-> FLOP/s, got {self.gemm_flops!r} (profile {self.name!r})")
        gemm = {}
        for dtype, rate in self.gemm_flops.items():
            if not isinstance(dtype, str) or not dtype:
                raise ValueError(f"MachineProfile.gemm_flops: dtype names must be non-empty "
                                 f"strings, got {dtype!r} (profile {self.name!r})")
            gemm[dtype] = _positive_number(f"gemm_flops[{dtype!r}]", rate)
        object.__setattr__(self, "gemm_flops", gemm)
        for rate_field in ("elementwise_bytes_per_s", "intra_node_bandwidth_bytes_per_s",
                           "inter_node_bandwidth_bytes_per_s"):
            object.__setattr__(self, rate_field,
                               _positive_number(rate_field, getattr(self, rate_field)))
        for latency_field in ("intra_node_latency_s", "inter_node_latency_s", "op_overhead_s", "collective_wait_s"):
            object.__setattr__(self, latency_field, _positive_number(
                latency_field, getattr(self, latency_field), allow_zero=True))
        overlap = _positive_number("comm_overlap", self.comm_overlap, allow_zero=True)
        if overlap > 1:
            raise ValueError(f"MachineProfile.comm_overlap: expected a fraction in [0, 1], got {overlap!r} "
                             f"(profile {self.name!r}); 1 means the buckets' communication runs beside compute")
        object.__setattr__(self, "comm_overlap", overlap)
        hidden = _positive_number("kernel_overlap", self.kernel_overlap, allow_zero=True)
        if hidden > 1:
            raise ValueError(f"MachineProfile.kernel_overlap: expected a fraction in [0, 1], got {hidden!r} "
                             f"(profile {self.name!r}); 1 prices a kernel at the longer of its FLOPs and bytes times")
        object.__setattr__(self, "kernel_overlap", hidden)
        if not isinstance(self.op_bytes_per_s, Mapping):
            raise ValueError(f"MachineProfile.op_bytes_per_s: expected a mapping op kind -> bytes/s, "
                             f"got {self.op_bytes_per_s!r} (profile {self.name!r})")
        object.__setattr__(self, "op_bytes_per_s", {
            str(k): _positive_number(f"op_bytes_per_s[{k!r}]", v) for k, v in self.op_bytes_per_s.items()})
        if not isinstance(self.op_host_s, Mapping):
            raise ValueError(f"MachineProfile.op_host_s: expected a mapping op kind -> seconds, "
                             f"got {self.op_host_s!r} (profile {self.name!r})")
        object.__setattr__(self, "op_host_s", {
            str(k): _positive_number(f"op_host_s[{k!r}]", v) for k, v in self.op_host_s.items()})
        if not isinstance(self.op_device_s, Mapping):
            raise ValueError(f"MachineProfile.op_device_s: expected a mapping op kind -> seconds, "
                             f"got {self.op_device_s!r} (profile {self.name!r})")
        object.__setattr__(self, "op_device_s", {
            str(k): _positive_number(f"op_device_s[{k!r}]", v, allow_zero=True) for k, v in self.op_device_s.items()})
        object.__setattr__(self, "gemm_efficiency", self._checked_curves(gemm))
        if not isinstance(self.sources, Mapping):
            raise ValueError(f"MachineProfile.sources: expected a mapping figure -> source, "
                             f"got {type(self.sources).__name__} (profile {self.name!r})")
        sources = dict(self.sources)
        for key, text in sources.items():
            if not isinstance(text, str) or not text.strip():
                raise ValueError(f"MachineProfile.sources[{key!r}]: expected a non-empty string "
                                 f"naming where the figure comes from, got {text!r}")
        for name, default in OPTIONAL_FIELDS.items():
            if name not in sources and getattr(self, name) == default:
                sources[name] = DEFAULTED_SOURCES[name]
        needed = list(SOURCED_FIELDS) + list(OPTIONAL_FIELDS) + [f"gemm_flops.{d}" for d in gemm] + \
            [f"op_bytes_per_s.{k}" for k in self.op_bytes_per_s] + [f"op_host_s.{k}" for k in self.op_host_s] + \
            [f"op_device_s.{k}" for k in self.op_device_s] + \
            [f"gemm_efficiency.{d}" for d in self.gemm_efficiency]
        missing = [k for k in needed if k not in sources]
        if missing:
            raise ValueError(f"MachineProfile.sources: profile {self.name!r} names no source for "
                             f"{missing}; add a 'sources' entry per figure (measured how, "
                             f"public document, or 'assumed')")
        object.__setattr__(self, "sources", sources)

    def _checked_curves(self, gemm: Mapping[str, float]) -> dict[str, tuple[tuple[float, float], ...]]:
        """``gemm_efficiency`` validated: a curve per dtype with a GEMM rate, points
        ``[d >= 1, 0 < fraction <= 1]`` with d increasing."""
        if not isinstance(self.gemm_efficiency, Mapping):
            raise ValueError(f"MachineProfile.gemm_efficiency: expected a mapping dtype name -> [[min dim, "
                             f"fraction], ...], got {self.gemm_efficiency!r} (profile {self.name!r})")
        curves = {}
        for dtype, points in self.gemm_efficiency.items():
            where = f"MachineProfile.gemm_efficiency[{dtype!r}]"
            if dtype not in gemm:
                raise ValueError(f"{where}: expected a dtype with a gemm_flops rate ({sorted(gemm)}), "
                                 f"got {dtype!r} (profile {self.name!r})")
            try:
                pts = tuple((float(d), float(f)) for d, f in points)
            except (TypeError, ValueError):
                raise ValueError(f"{where}: expected [[min dim, fraction], ...], got {points!r}") from None
            ok = pts and all(math.isfinite(d) and d >= 1 and 0 < f <= 1 for d, f in pts) and \
                all(a[0] < b[0] for a, b in zip(pts, pts[1:]))
            if not ok:
                raise ValueError(f"{where}: expected points [min dim >= 1, 0 < fraction <= 1] with min dim "
                                 f"increasing, got {points!r} (profile {self.name!r})")
            curves[dtype] = pts
        return curves

    def gemm_rate(self, dtype: str, min_dim: float | None = None) -> float:
        """GEMM rate for ``dtype`` in FLOP/s, for a GEMM whose smallest dimension is
        ``min_dim`` (None: the peak); ValueError naming the known dtypes otherwise."""
        try:
            peak = self.gemm_flops[dtype]
        except KeyError:
            raise ValueError(f"MachineProfile {self.name!r}: no gemm_flops for dtype {dtype!r}; "
                             f"known: {sorted(self.gemm_flops)}") from None
        curve = self.gemm_efficiency.get(dtype)
        if not curve or min_dim is None:
            return peak
        return peak * _interpolate_log(curve, float(min_dim))

    def op_rate(self, kind: str) -> float:
        """Bytes/s an op of ``kind`` moves: its measured rate, else the elementwise bandwidth."""
        return self.op_bytes_per_s.get(kind, self.elementwise_bytes_per_s)

    @property
    def asynchronous(self) -> bool:
        """Whether the host only queues ops (a GPU profile with ``op_host_s``)."""
        return bool(self.op_host_s)

    def host_seconds(self, kind: str, launches: int = 1) -> float:
        """The host's issue of ``launches`` instructions of ``kind``: its ``op_host_s`` figure,
        else ``op_overhead_s`` each."""
        return launches * self.op_host_s.get(kind, self.op_overhead_s)

    def device_seconds(self, kind: str, nbytes: float, launches: int = 1, flops_s: float = 0.0) -> float:
        """The device's time for ``launches`` instructions of ``kind`` moving ``nbytes`` and
        computing for ``flops_s``: the two added, less the ``kernel_overlap`` share of the
        shorter (1: a roofline), plus the kind's fixed ``op_device_s`` per instruction."""
        bytes_s = nbytes / self.op_rate(kind)
        overlapped = flops_s + bytes_s - self.kernel_overlap * min(flops_s, bytes_s)
        return overlapped + launches * self.op_device_s.get(kind, 0.0)

    def op_seconds(self, kind: str, work_s: float, launches: int = 1) -> float:
        """Seconds of ``launches`` instructions of ``kind`` doing ``work_s`` of compute: host
        dispatch plus the work where one thread does both (``op_overhead_s`` each), the longer
        of the host's issue (``op_host_s``) and the device's work where the host only queues it."""
        if launches == 0:
            return work_s
        if self.op_host_s:
            return max(self.host_seconds(kind, launches), work_s)
        return work_s + launches * self.op_overhead_s

    def to_dict(self) -> dict:
        return asdict(self) | {"gemm_flops": dict(self.gemm_flops), "sources": dict(self.sources),
                               "op_bytes_per_s": dict(self.op_bytes_per_s), "op_host_s": dict(self.op_host_s),
                               "op_device_s": dict(self.op_device_s),
                               "gemm_efficiency": {d: [list(p) for p in c] for d, c in self.gemm_efficiency.items()}}

    @classmethod
    def from_dict(cls, data: Mapping) -> MachineProfile:
        if not isinstance(data, Mapping):
            raise ValueError(f"MachineProfile: expected a JSON object, got {type(data).__name__}")
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"MachineProfile: unknown fields {unknown}; known: {sorted(known)}")
        missing = sorted(k for k in known - set(data)
                         if k not in ("sources", "op_bytes_per_s", "op_host_s", "op_device_s", "gemm_efficiency") and k not in OPTIONAL_FIELDS)
        if missing:
            raise ValueError(f"MachineProfile: missing fields {missing}")
        return cls(**data)


def _interpolate_log(points: tuple[tuple[float, float], ...], d: float) -> float:
    """The fraction at ``d`` on a curve of (d, fraction) points: linear in log d between
    points, the nearest point's outside them."""
    if d <= points[0][0]:
        return points[0][1]
    for (d0, f0), (d1, f1) in zip(points, points[1:]):
        if d <= d1:
            t = (math.log(d) - math.log(d0)) / (math.log(d1) - math.log(d0))
            return f0 + t * (f1 - f0)
    return points[-1][1]


def load_profile(name_or_path: str | Path) -> MachineProfile:
    """Load a shipped profile by name (see ``PROFILES``) or a JSON file by path."""
    text = str(name_or_path)
    path = Path(text)
    if not (text.endswith(".json") or path.is_file()):
        path = PROFILE_DIR / f"{text}.json"
        prefixed = [name for name in PROFILES if name.startswith(text + "-")]
        if not path.is_file() and len(prefixed) == 1:   # "ascend910" names "ascend910-2048"
            path = PROFILE_DIR / f"{prefixed[0]}.json"
        if not path.is_file():
            raise ValueError(f"load_profile: no profile named {text!r}; shipped profiles: "
                             f"{list(PROFILES)}, or pass a path to a .json file")
    if not path.is_file():
        raise ValueError(f"load_profile: profile file {str(path)!r} does not exist")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"load_profile: {str(path)!r} is not valid JSON: {exc}") from None
    return MachineProfile.from_dict(data)
