"""The parallel context: MindSpore's ``set_auto_parallel_context`` and ``init``, over one value.

:class:`ParallelContext` is a frozen, validated, hashable value holding every setting
MindSpore's auto-parallel context holds (mode, device count, rank, search mode, pipeline
stages, optimizer parallel, dataset strategy, strategy files, communication fusion)::

    ctx = ParallelContext(parallel_mode="semi_auto_parallel", device_num=8, pipeline_stages=2)
    ctx.stage_device_num        # 4: ranks are stage-major, stage = rank // 4
    ctx.replace(global_rank=5)  # a new validated value; ctx is unchanged

The MindSpore API is process-wide by nature: a script calls ``init()`` and
``set_auto_parallel_context(...)`` once and then builds its network. So this module keeps
the one deliberate piece of process-wide state in autopar: ``_STATE``, a private holder
of the current :class:`ParallelContext` and, once :func:`init` ran, the world
communicator. Everything else in autopar receives the context as an argument: the runtime
reads :func:`current_context` once, when it compiles a network, and passes the value
down; no module reads it deep inside, and nothing else keeps process-wide settings.

Semantics worth knowing:

* Fields may be set one call at a time (``device_num=8`` then ``global_rank=5``);
  cross-field rules (``global_rank < device_num``, ``pipeline_stages`` divides
  ``device_num``) are checked on the merged value, so set ``device_num`` first.
* Under ``mpiexec -n N`` (N > 1), :func:`init` sets ``device_num = N`` and ``global_rank``
  to this process's world rank; a ``device_num`` the user set to something other than 1
  or N is an error. Call ``init()`` before setting ``pipeline_stages`` or a rank-dependent
  value, as MindSpore scripts do. Without ``mpiexec`` the world has one rank and ``init()``
  leaves the context alone, so any ``device_num`` can be planned on one process.
* :func:`reset_auto_parallel_context` restores the defaults, except that after ``init()``
  on N > 1 ranks ``device_num`` and ``global_rank`` stay those of the world.
* :func:`parallel_context` changes the process-wide value for a ``with`` block, for every
  thread; in-process virtual ranks get their rank from their communicator, not from here.
* Safe by default under MPI: :func:`init` makes the world with the collective watchdog on
  (``watchdog_s``, else ``AUTOPAR_COMM_WATCHDOG``, else 300 s; 0 turns it off) and installs
  the abort handler (a rank's uncaught exception prints its traceback and ends the job).
  A process an MPI launcher started among several that compiles a parallel program, or
  saves a checkpoint, without :func:`init` is an error (:func:`require_init`): it would run
  alone as rank 0.
"""
from __future__ import annotations

import contextvars
import dataclasses
import math
import os
import threading
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from typing import Iterator

import numpy as np

from . import comm
from .backend import current_backend
from .backend.blas import SlowBLASWarning, openblas_advice
from .comm.fusion import DEFAULT_COMM_FUSION, CommFusion, parse_comm_fusion, with_allreduce_indices
from .comm.mpi import install_abort_handler, launcher_size
from .comm.nccl import select_world
from .errors import check_int, format_error, is_int
from .strategy.optimizer_shard import (
    DEFAULT_OPTIMIZER_SHARD,
    DEFAULT_THRESHOLD_KB,
    OptimizerShard,
    parse_optimizer_shard,
)
from .strategy.plan_source import PlanOptions
from .strategy.search import SEARCH_MODES


class ParallelMode:
    """MindSpore's ``context.ParallelMode``: the four values of ``parallel_mode``."""

    STAND_ALONE = "stand_alone"
    DATA_PARALLEL = "data_parallel"
    SEMI_AUTO_PARALLEL = "semi_auto_parallel"
    AUTO_PARALLEL = "auto_parallel"
    MODES = (STAND_ALONE, DATA_PARALLEL, SEMI_AUTO_PARALLEL, AUTO_PARALLEL)


DATASET_STRATEGIES = ("data_parallel", "full_batch")
BACKENDS = (None, "mpi", "hccl", "nccl", "mccl")  # MindSpore's names, all served by MPI here

_WHERE = "ParallelContext"


def _fail(arg: str, expected: str, value, fix: str = "") -> ValueError:
    return ValueError(format_error(_WHERE, arg, expected, repr(value), fix))


def _bool(arg: str, value) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise _fail(arg, "True or False", value)
    return bool(value)


def _choice(arg: str, value, choices: tuple) -> str:
    if not isinstance(value, str) or value not in choices:
        raise _fail(arg, f"one of {choices}", value)
    return value


def _parallel_mode(value) -> str:
    """One of MindSpore's four modes; its ``hybrid_parallel`` (the user writes the collectives
    by hand) is refused by name, with what autopar does instead."""
    if value == "hybrid_parallel":
        raise _fail("parallel_mode", f"one of {ParallelMode.MODES} (hybrid_parallel is not supported)", value,
                    "autopar inserts every collective itself: use semi_auto_parallel with .shard() on the ops")
    return _choice("parallel_mode", value, ParallelMode.MODES)


def _path(arg: str, value) -> str:
    if not isinstance(value, (str, os.PathLike)):
        raise _fail(arg, "a file path (str), '' for none", value)
    return os.fspath(value)


def _dataset_strategy(value) -> str | tuple[tuple[int, ...], ...]:
    """``"data_parallel"``, ``"full_batch"``, or per-input split tuples like ((2, 1), (2, 1))."""
    if isinstance(value, str):
        return _choice("dataset_strategy", value, DATASET_STRATEGIES)
    expected = (f"one of {DATASET_STRATEGIES}, or a non-empty tuple with one tuple of "
                "split counts (ints >= 1) per input, like ((2, 1), (2, 1))")
    if not isinstance(value, (tuple, list)) or not value:
        raise _fail("dataset_strategy", expected, value)
    splits = []
    for item in value:
        if (not isinstance(item, (tuple, list)) or not item
                or any(not is_int(s) or s < 1 for s in item)):
            raise _fail("dataset_strategy", expected, value,
                        f"input {len(splits)} is {item!r}; give it a tuple of ints >= 1")
        splits.append(tuple(int(s) for s in item))
    return tuple(splits)


def _check_fed_splits(splits: tuple[tuple[int, ...], ...], stage_devices: int) -> None:
    """A ``dataset_strategy`` tuple feeds input k its block on the device matrix
    ``(s0, s1, ..., R)`` of a stage's ranks (``autopar.strategy.sharding_plan.fed_layout``),
    so each input's splits must multiply to a divisor of the stage's devices. Checked here
    once ``device_num`` is set (> 1); the count of inputs and of dims at compile time."""
    if stage_devices == 1:
        return
    for k, t in enumerate(splits):
        if stage_devices % math.prod(t):
            raise _fail("dataset_strategy", f"per input, split counts whose product divides the {stage_devices} "
                        "devices of a stage (device_num / pipeline_stages)", splits,
                        f"input {k} is {t} (product {math.prod(t)}); the devices left over repeat each block")


@dataclass(frozen=True)
class StrategyCkptConfig:
    """MindSpore's ``strategy_ckpt_config`` as held: its files live in the
    ``strategy_ckpt_load_file`` / ``strategy_ckpt_save_file`` keys (a dict given sets them),
    ``only_trainable_params`` here: a saved strategy file lists the layouts of trainable
    parameters only (frozen ones follow the ops that read them when it is loaded)."""

    only_trainable_params: bool = True


STRATEGY_CKPT_KEYS = ("load_file", "save_file", "only_trainable_params")


def _strategy_ckpt_config(value) -> tuple[StrategyCkptConfig, dict]:
    """(the held value, the file keys a dict sets: {"load_file": ..., "save_file": ...})."""
    if isinstance(value, StrategyCkptConfig):
        return value, {}
    expected = "a dict with keys among " + str(STRATEGY_CKPT_KEYS)
    if not isinstance(value, dict) or set(value) - set(STRATEGY_CKPT_KEYS):
        raise _fail("strategy_ckpt_config", expected, value)
    files = {k: _path(f"strategy_ckpt_config[{k!r}]", value[k]) for k in ("load_file", "save_file") if k in value}
    only = _bool("strategy_ckpt_config['only_trainable_params']", value.get("only_trainable_params", True))
    return StrategyCkptConfig(only), files


@dataclass(frozen=True, repr=False)
class ParallelContext:
    """Every auto-parallel setting, as one validated value (MindSpore's names and defaults).

    ``parallel_optimizer_threshold`` is in KB: weights smaller than this are not sharded by
    the parallel optimizer. Under ``auto_parallel`` the joint search chooses what the user
    left open: pipeline stages (unless ``pipeline_stages`` was set; with ``auto_pipeline``
    it is the upper bound, as in MindSpore), micro-batches, recompute and optimizer parallel
    (unless ``enable_parallel_optimizer`` was set). :attr:`explicit` records the names set
    through :func:`set_auto_parallel_context` / :meth:`replace` (not a MindSpore key).
    ``comm_fusion`` is MindSpore's dict (``{"allreduce": {"mode": "auto"}}``; see
    :mod:`autopar.comm.fusion`), held as a validated :class:`~autopar.comm.fusion.CommFusion`
    and given back in the dict form; by default nothing is fused. ``full_batch=True`` is
    MindSpore's older spelling of ``dataset_strategy="full_batch"``; :attr:`loads_full_batch`
    reads either.
    """

    parallel_mode: str = ParallelMode.STAND_ALONE
    device_num: int = 1
    global_rank: int = 0
    gradients_mean: bool = False
    full_batch: bool = False
    dataset_strategy: str | tuple[tuple[int, ...], ...] = "data_parallel"
    search_mode: str = "dynamic_programming"
    pipeline_stages: int = 1
    enable_parallel_optimizer: bool = False
    parallel_optimizer_threshold: int = DEFAULT_THRESHOLD_KB
    strategy_ckpt_save_file: str = ""
    strategy_ckpt_load_file: str = ""
    cost_profile: str = ""    # machine profile the auto_parallel search costs plans with ('' = cpu-2core)
    auto_pipeline: bool = False
    comm_fusion: CommFusion = DEFAULT_COMM_FUSION   # MindSpore's dict form in, a CommFusion held (comm/fusion.py)
    # MindSpore's dict in (optimizer_level, optimizer_weight_shard_size, ...), an OptimizerShard held
    parallel_optimizer_config: OptimizerShard = DEFAULT_OPTIMIZER_SHARD
    all_reduce_fusion_config: tuple = ()   # MindSpore's older key: comm_fusion's allreduce "index" rule
    strategy_ckpt_config: StrategyCkptConfig = StrategyCkptConfig()   # a dict in; its files set the two keys
    grad_accumulation_step: int = 1    # micro-batches whose gradients add up per step (semi/auto parallel)
    # names the user set (what the joint search must not choose); not part of the value's equality
    explicit: frozenset = field(default=frozenset(), compare=False)

    def __post_init__(self):
        checked = {
            "parallel_mode": _parallel_mode(self.parallel_mode),
            "device_num": check_int(_WHERE, "device_num", self.device_num, 1),
            "global_rank": check_int(_WHERE, "global_rank", self.global_rank, 0),
            "gradients_mean": _bool("gradients_mean", self.gradients_mean),
            "full_batch": _bool("full_batch", self.full_batch),
            "dataset_strategy": _dataset_strategy(self.dataset_strategy),
            "search_mode": _choice("search_mode", self.search_mode, SEARCH_MODES),
            "pipeline_stages": check_int(_WHERE, "pipeline_stages", self.pipeline_stages, 1),
            "grad_accumulation_step": check_int(_WHERE, "grad_accumulation_step", self.grad_accumulation_step, 1),
            "enable_parallel_optimizer": _bool("enable_parallel_optimizer", self.enable_parallel_optimizer),
            "parallel_optimizer_threshold": check_int(_WHERE, "parallel_optimizer_threshold",
                                                      self.parallel_optimizer_threshold, 0),
            "strategy_ckpt_save_file": _path("strategy_ckpt_save_file", self.strategy_ckpt_save_file),
            "strategy_ckpt_load_file": _path("strategy_ckpt_load_file", self.strategy_ckpt_load_file),
            # MindSpore's dict form: its load_file / save_file are the two keys above
            "strategy_ckpt_config": self.strategy_ckpt_config,
            "cost_profile": _path("cost_profile", self.cost_profile),
            "auto_pipeline": _bool("auto_pipeline", self.auto_pipeline),
            "comm_fusion": parse_comm_fusion(self.comm_fusion),
            "explicit": frozenset(self.explicit),
        }
        checked["strategy_ckpt_config"], files = _strategy_ckpt_config(self.strategy_ckpt_config)
        for key, path in files.items():
            checked[f"strategy_ckpt_{key}"] = path
        indices = self.all_reduce_fusion_config
        if not isinstance(indices, (list, tuple)):
            raise _fail("all_reduce_fusion_config", "a list of parameter indices where buckets split, like [20, 35]",
                        indices)
        checked["comm_fusion"] = with_allreduce_indices(checked["comm_fusion"], indices)
        checked["all_reduce_fusion_config"] = tuple(int(i) for i in indices)
        checked["parallel_optimizer_config"], threshold = parse_optimizer_shard(self.parallel_optimizer_config)
        if threshold is not None:       # MindSpore's place for the threshold: the same setting as the key
            if "parallel_optimizer_threshold" in self.explicit and threshold != checked["parallel_optimizer_threshold"]:
                raise _fail("parallel_optimizer_config", "a parallel_optimizer_threshold equal to the key's "
                            f"({checked['parallel_optimizer_threshold']})", threshold, "set the threshold once")
            checked["parallel_optimizer_threshold"] = threshold
        for name, value in checked.items():
            object.__setattr__(self, name, value)
        n = self.device_num
        if self.global_rank >= n:
            raise _fail("global_rank", f"an int in [0, device_num) = [0, {n})", self.global_rank,
                        "set device_num first, or pass a rank below it")
        if n % self.pipeline_stages:
            raise _fail("pipeline_stages", f"a divisor of device_num = {n}", self.pipeline_stages,
                        "each stage needs the same number of devices; set device_num first")
        if self.grad_accumulation_step > 1 and self.parallel_mode not in (ParallelMode.SEMI_AUTO_PARALLEL,
                                                                          ParallelMode.AUTO_PARALLEL):
            raise _fail("grad_accumulation_step", "1 outside semi_auto_parallel / auto_parallel (MindSpore's rule)",
                        self.grad_accumulation_step, "set parallel_mode first, or wrap the network in "
                        "nn.GradAccumulationCell(net, micro_size)")
        if self.full_batch and isinstance(self.dataset_strategy, tuple):
            raise _fail("full_batch", f"False when dataset_strategy is a tuple ({self.dataset_strategy})",
                        self.full_batch, "use dataset_strategy alone; full_batch is its older spelling")
        if isinstance(self.dataset_strategy, tuple):
            _check_fed_splits(self.dataset_strategy, self.stage_device_num)

    def __repr__(self) -> str:
        changed = [f"{name}={getattr(self, name)!r}" for name in FIELD_NAMES
                   if getattr(self, name) != _DEFAULTS[name]]
        return f"ParallelContext({', '.join(changed)})"

    @property
    def stage_device_num(self) -> int:
        """Devices per pipeline stage; ranks are stage-major (stage = rank // stage_device_num)."""
        return self.device_num // self.pipeline_stages

    @property
    def is_parallel(self) -> bool:
        return self.parallel_mode != ParallelMode.STAND_ALONE and self.device_num > 1

    @property
    def loads_full_batch(self) -> bool:
        """Whether every rank reads the whole batch (``full_batch`` or its newer spellings:
        ``dataset_strategy="full_batch"`` or a tuple of all ones, every input whole)."""
        whole = isinstance(self.dataset_strategy, tuple) and all(s == 1 for t in self.dataset_strategy for s in t)
        return self.full_batch or self.dataset_strategy == "full_batch" or whole

    @property
    def mirror_mean(self) -> bool | None:
        """``gradients_mean`` when the user set it, else None (every mode then gives the
        global batch's gradient: see :func:`autopar.runtime.protocol.gradient_factors`)."""
        return self.gradients_mean if self.is_set("gradients_mean") else None

    @property
    def slice_threshold(self) -> int | None:
        """Optimizer parallel's size threshold in KiB (weights below it stay whole), or None
        when optimizer parallel is off."""
        return self.parallel_optimizer_threshold if self.enable_parallel_optimizer else None

    @property
    def plan_options(self) -> PlanOptions:
        """What of this context the planner reads, as the frozen value strategy/ takes."""
        return PlanOptions(self.strategy_ckpt_load_file, self.search_mode, self.cost_profile,
                           self.enable_parallel_optimizer, comm_fusion=self.comm_fusion,
                           only_trainable_params=self.strategy_ckpt_config.only_trainable_params,
                           optimizer_shard=dataclasses.replace(self.parallel_optimizer_config,
                                                               threshold_kb=self.parallel_optimizer_threshold))

    def replace(self, **changes) -> ParallelContext:
        """A new validated value with ``changes`` applied; unknown names are a ValueError."""
        _check_names(changes, "ParallelContext.replace")
        held = {**self.as_dict(), "strategy_ckpt_config": self.strategy_ckpt_config}   # files: the keys' own
        return ParallelContext(**{**held, **changes}, explicit=self.explicit | set(changes))

    def is_set(self, name: str) -> bool:
        """Whether the user fixed ``name``: set explicitly, or away from its default."""
        return name in self.explicit or getattr(self, name) != _DEFAULTS[name]

    def as_dict(self) -> dict:
        """MindSpore's keys and their values (``comm_fusion`` in MindSpore's dict form)."""
        return {name: _mindspore_value(name, getattr(self, name), self) for name in FIELD_NAMES}


FIELD_NAMES = tuple(f.name for f in fields(ParallelContext) if f.name != "explicit")


def _mindspore_value(name: str, value, ctx: ParallelContext):
    """A field's value as MindSpore spells it: the dict form of ``comm_fusion`` and
    ``parallel_optimizer_config``, a list for ``all_reduce_fusion_config``, the rest as held."""
    if name == "all_reduce_fusion_config":
        return list(value)
    if name == "strategy_ckpt_config":
        return {"load_file": ctx.strategy_ckpt_load_file, "save_file": ctx.strategy_ckpt_save_file,
                "only_trainable_params": value.only_trainable_params}
    return value.as_mindspore() if name in ("comm_fusion", "parallel_optimizer_config") else value
_DEFAULTS = {f.name: f.default for f in fields(ParallelContext)}


# MindSpore's set_auto_parallel_context keys autopar does not take, each with what to do
# instead: refused by name rather than accepted and ignored (README: "MindSpore context keys").
NOT_SUPPORTED = {
    "auto_parallel_search_mode": "use search_mode (MindSpore's newer name for the same setting)",
    "gradient_fp32_sync": "gradients are reduced in their own dtype: float32 with float32 master weights (True)",
    "loss_repeated_mean": "autopar differentiates the loss of the global batch; repeated calculations do not occur",
    "parameter_broadcast": "every rank generates the same initial weights from a counter-based RNG",
    "enable_alltoall": "redistributions already use all-to-all where the layouts ask for it",
    "pipeline_config": "use nn.PipelineCell(net, micro_size, pipeline_schedule=..., virtual_stages=...)",
    "group_ckpt_save_file": "communication groups are derived from the plan at every compile",
    "force_fp32_communication": "collectives move each dtype as it is (bfloat16 sums in float32)",
    "pipeline_result_broadcast": "the loss is returned on every rank",
    "dump_local_norm": "read TrainOneStepCell.last_grad_norm",
    "dump_local_norm_path": "read TrainOneStepCell.last_grad_norm",
    "dump_device_local_norm": "read TrainOneStepCell.last_grad_norm",
}


def _check_names(names, where: str) -> None:
    unknown = sorted(set(names) - set(FIELD_NAMES))
    for name in unknown:
        if name in NOT_SUPPORTED:
            raise ValueError(format_error(where, name, "a key autopar supports", "MindSpore's key, which autopar "
                                          "does not support", NOT_SUPPORTED[name]))
    if unknown:
        raise ValueError(format_error(where, "name", f"one of {FIELD_NAMES}", ", ".join(map(repr, unknown))))


# --- the one process-wide holder ----------------------------------------------------------

class _State:
    """The current context and, after :func:`init`, the world communicator."""

    def __init__(self):
        self.lock = threading.RLock()
        self.context = ParallelContext()
        self.world = None

    def defaults(self) -> ParallelContext:
        if self.world is not None and self.world.size > 1:
            return ParallelContext(device_num=self.world.size, global_rank=self.world.rank)
        return ParallelContext()


_STATE = _State()


def current_context() -> ParallelContext:
    """The context in force now; the runtime reads it once per compile and passes it down."""
    return _STATE.context


def set_auto_parallel_context(**kwargs) -> None:
    """MindSpore's setter: merge ``kwargs`` into the current context and validate the result."""
    _check_names(kwargs, "set_auto_parallel_context")
    with _STATE.lock:
        _STATE.context = _STATE.context.replace(**kwargs)


def get_auto_parallel_context(name: str):
    """The current value of one field, by its MindSpore name."""
    _check_names([name], "get_auto_parallel_context")
    return _mindspore_value(name, getattr(_STATE.context, name), _STATE.context)


def reset_auto_parallel_context() -> None:
    """Back to the defaults (keeping the world's device_num and global_rank after init)."""
    with _STATE.lock:
        _STATE.context = _STATE.defaults()


@contextmanager
def parallel_context(**kwargs) -> Iterator[ParallelContext]:
    """Set ``kwargs`` for a ``with`` block, then restore the previous value, even on error."""
    _check_names(kwargs, "parallel_context")
    with _STATE.lock:
        previous = _STATE.context
        _STATE.context = previous.replace(**kwargs)
    try:
        yield _STATE.context
    finally:
        with _STATE.lock:
            _STATE.context = previous


def _world(checks: comm.CommChecks):
    """MPI's world, or its NCCL communicator where the GPU target gives every rank a GPU of
    its own (comm.nccl.select_world; ``AUTOPAR_COMM=mpi`` keeps MPI)."""
    return select_world(comm.world(checks), current_backend())


_BOUND_WORLD: contextvars.ContextVar = contextvars.ContextVar("autopar_world", default=None)


@contextmanager
def bound_world(comm) -> Iterator:
    """Within the block (and thread), ``current_world()`` is ``comm``: how a virtual rank of
    the in-process backend runs the same code an MPI rank runs."""
    token = _BOUND_WORLD.set(comm)
    try:
        yield comm
    finally:
        _BOUND_WORLD.reset(token)


def current_world():
    """The communicator programs are compiled for: one bound by :func:`bound_world`, else
    the world :func:`init` started, else a single-rank one."""
    bound = _BOUND_WORLD.get()
    if bound is not None:
        return bound
    if _STATE.world is not None:
        return _STATE.world
    return comm.SelfCommunicator()


def require_init(where: str) -> None:
    """Raise when an MPI launcher started this process among several and it has neither
    called :func:`init` nor been bound to a world (:func:`bound_world`, as in-process ranks
    are): it would run alone as rank 0 -- no gradient sync, every rank writing rank 0's
    files. Reads the launcher's environment; never initialises MPI. ``where`` names the
    caller (``"save_checkpoint"``)."""
    if _BOUND_WORLD.get() is not None or _STATE.world is not None:
        return
    n = launcher_size()
    if n is not None and n > 1:
        raise RuntimeError(format_error(
            where, "autopar.init()", f"a call first (this process is one of the {n} that an MPI launcher such "
            "as mpiexec started)", "none: this process would run alone as rank 0 of 1 (no gradient sync; "
            "every rank writing rank 0's files)",
            "call autopar.init() at the top of the script, before building and training the network"))


def init(backend_name: str | None = None, *, watchdog_s: float | None = None) -> None:
    """Start communication (MindSpore's ``init``); idempotent.

    Under ``mpiexec -n N`` (N > 1) sets ``device_num = N`` and ``global_rank`` to the world
    rank, installs the abort handler (an uncaught exception on a rank prints its rank and
    traceback and ends the job) and watches every collective: a rank that waits longer than
    ``watchdog_s`` seconds (None: ``AUTOPAR_COMM_WATCHDOG``, else 300; 0: off) stops the
    job, naming the ranks missing from the collective. Without ``mpiexec`` the world is one
    rank and the context is left as it is. ``backend_name`` may be MindSpore's
    ``"hccl"``/``"nccl"``/``"mccl"`` or ``"mpi"``; all of them mean the same choice: MPI, or
    NCCL when ``set_context(device_target="GPU")`` came first and every rank has a GPU of its
    own (autopar/comm/nccl.py; ``AUTOPAR_COMM=mpi`` or ``=nccl`` decides instead).
    """
    if backend_name not in BACKENDS:
        raise ValueError(format_error("init", "backend_name", f"one of {BACKENDS}", repr(backend_name),
                                      "autopar communicates over MPI; pass None"))
    checks = _checks(watchdog_s)
    with _STATE.lock:
        if _STATE.world is not None:
            return
        world = _world(checks)
        context = _STATE.context
        if world.size > 1:
            if context.device_num not in (1, world.size):
                raise ValueError(format_error(
                    "init", "device_num", f"{world.size} (the number of processes mpiexec started)",
                    str(context.device_num), "do not set device_num, or set it to the process count"))
            if context.global_rank not in (0, world.rank):
                raise ValueError(format_error(
                    "init", "global_rank", f"{world.rank} (this process's MPI rank)",
                    str(context.global_rank), "do not set global_rank; init() sets it"))
            context = context.replace(device_num=world.size, global_rank=world.rank)
            install_abort_handler()
        _STATE.context = context
        _STATE.world = world
    if world.rank == 0 and current_backend().target == "CPU":
        advice = openblas_advice()          # slow BLAS kernels: said once per job, by rank 0
        if advice:
            warnings.warn(f"autopar.init: {advice}", SlowBLASWarning, stacklevel=2)


def _checks(watchdog_s) -> comm.CommChecks:
    """The world's run-time checks: the environment's (comm.CommChecks.from_env), with
    ``watchdog_s`` (seconds, 0: off) instead of AUTOPAR_COMM_WATCHDOG when given."""
    checks = comm.CommChecks.from_env()
    if watchdog_s is None:
        return checks
    if isinstance(watchdog_s, bool) or not isinstance(watchdog_s, (int, float)) or not 0 <= watchdog_s < float("inf"):
        raise ValueError(format_error("init", "watchdog_s", "a finite number of seconds >= 0 (0: off), or None "
                                      "for AUTOPAR_COMM_WATCHDOG or the default", repr(watchdog_s)))
    return dataclasses.replace(checks, watchdog_s=watchdog_s or None)


def get_rank() -> int:
    """This process's world rank (0 before :func:`init`; an error before it under a launcher
    of several processes, where every rank would call itself 0)."""
    require_init("get_rank")
    return 0 if _STATE.world is None else _STATE.world.rank


def get_group_size() -> int:
    """The number of world ranks (1 before :func:`init`; an error before it under a launcher
    of several processes)."""
    require_init("get_group_size")
    return 1 if _STATE.world is None else _STATE.world.size
