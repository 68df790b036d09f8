"""``python -m autopar.plan``: plan a model from ``autopar.models`` on paper.

No MPI and no parameter data: the model is traced on abstract inputs and priced by the
cost model under a machine profile. The search chooses pipeline stages, layer split,
data x model degrees, micro-batches, recompute and optimizer parallel; a hand-given plan
(``--pp --dp --mp ...``) is priced by the same model and printed beside it::

    python -m autopar.plan --model pangu_alpha --preset 200B --devices 2048 --profile ascend910-2048 \\
        --pp 16 --dp 16 --mp 8 --micro-batches 32 --recompute --optimizer-parallel

Any model shape, not only presets: ``--hidden --layers --heads --ffn --seq --vocab`` (the
config's ``hidden_size num_layers num_heads ffn_hidden_size seq_length vocab_size``) or
``--config file.json`` (a JSON object of config fields) override the fields of ``--preset``
(default with a shape: ``tiny``, every family's smallest; fields no flag gives come from it,
e.g. PanGu-α tiny's dropout 0, so start from a published preset to keep its dropout); flags
win over the file. ``--micro-batch-size B`` fixes the sequences each data-parallel rank takes
per micro-batch (Megatron's b): micro-batches = --batch / (dp x B)::

    python -m autopar.plan --model pangu_alpha --preset 2.6B --hidden 3072 --layers 31 --heads 32 \\
        --ffn 12288 --seq 2048 --vocab 51200 --devices 64 --profile a100-8 --micro-batch-size 16 \\
        --compute-dtype float16 --json plan.json

``--json`` writes the chosen plan in the stage-plan layout a run loads
(:mod:`autopar.strategy.pipeline.plan_file`, ``load_stage_plan``).

``--op-search MODE`` instead searches every op's strategy of the whole model on all devices
(no pipeline; ``dynamic_programming``, ``recursive_programming`` or
``sharding_propagation``), as ``parallel_mode="auto_parallel"`` does at run time.

Every flag is checked before any work, alone and against the others and the model (a hand
plan's pp x dp x mp against --devices, pp against the layers, micro-batches against the
batch, mp against the heads, the model shape against the config's own checks; --config read
and parsed; --json/--png opened for writing). Exit status: 0, a plan; 1, the search found
none (one line on stderr says why); 2, a bad command line (one line, ``python -m
autopar.plan: error: ...``, naming the flag, the expected and the given).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

from . import models  # noqa: F401  (importing the models registers their families with the planner)
from .errors import format_error
from .ir.mesh import Mesh
from .strategy.costmodel import CostModel
from .strategy.pipeline.plan_file import plan_entry, save_stage_plan, stage_plan_document
from .strategy.pipeline.registry import ModelFamily, model_family, registered_models
from .strategy.pipeline.stage_search import StageCoster, StageSetting, divisors, evaluate, search_stages
from .strategy.profile import MachineProfile, load_profile
from .strategy.report import draw, op_table, picture_formats, side_by_side
from .strategy.search import SEARCH_MODES, human_bytes, search
from .strategy.sharding_plan import plan_shardings
from .strategy.strategy_file import save_strategy

PROG = "python -m autopar.plan"
# The stage search enumerates every divisor of --devices one by one: 2^20 takes a tenth of
# a second, 2^30 would take minutes. No machine built has more than 2^20 devices.
MAX_DEVICES = 2 ** 20
# Far above any published global batch (GPT-3: 1536 sequences); larger batches overflow the
# 64-bit shapes and FLOP counts of the cost model on the big presets.
MAX_BATCH = 2 ** 20
HAND_FLAGS = ("--pp", "--dp", "--mp", "--micro-batches")
# Model-shape flags -> the config field each sets, and its bound: every tensor of the traced
# model (attention scores: batch x heads x seq^2 elements) stays below 2^62 elements at
# MAX_BATCH, so shapes never overflow the cost model's 64-bit element counts.
SHAPE_FLAGS = {"--hidden": ("hidden_size", 2 ** 17), "--layers": ("num_layers", 2 ** 12),
               "--heads": ("num_heads", 2 ** 10), "--ffn": ("ffn_hidden_size", 2 ** 19),
               "--seq": ("seq_length", 2 ** 16), "--vocab": ("vocab_size", 2 ** 22)}
SHAPE_BASE_PRESET = "tiny"     # every registered family's smallest preset
# The stage search prices the 1F1B schedule only (its in-flight micro-batches); GPipe is run
# by the runtime but not yet searched or priced.
SEARCHED_SCHEDULES = ("1f1b",)


class _Parser(argparse.ArgumentParser):
    """Ends a bad command line with ONE line on stderr, ``<prog>: error: <message>``, and exit
    status 2 (argparse's status for bad usage), without the usage block: every message names
    its flag, what was expected and what was given."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


def _integer(low: int, high: int | None = None):
    """An argparse type: an integer in [low, high] (no upper bound when high is None)."""
    bound = f">= {low}" if high is None else f"in [{low}, {high}]"

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"expected an integer {bound}, got {text!r}")
        return value
    return parse


def _gib(text: str) -> float:
    """An argparse type: a finite number of GiB > 0."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"expected a finite number of GiB > 0, got {text!r}")
    return value


def _layer_counts(text: str) -> tuple[int, ...]:
    """An argparse type: comma-separated layer counts, each >= 1 (e.g. ``2,2,3,3``)."""
    try:
        counts = tuple(int(x) for x in text.split(","))
    except ValueError:
        counts = ()
    if not counts or min(counts) < 1:
        raise argparse.ArgumentTypeError(f"expected layer counts >= 1 separated by commas, one per stage, "
                                         f"such as 2,2,3,3, got {text!r}")
    return counts


def _config_file(path: str) -> dict:
    """An argparse type: a JSON file holding one object of config fields, read and parsed."""
    try:
        with open(path) as f:
            fields = json.load(f)
    except OSError as err:
        raise argparse.ArgumentTypeError(f"{path!r}: expected a readable JSON file of config fields, got "
                                         f"{err.strerror or err}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise argparse.ArgumentTypeError(f"{path!r}: expected a JSON object of config fields, got invalid "
                                         f"JSON ({err})") from None
    if not isinstance(fields, dict):
        raise argparse.ArgumentTypeError(f"{path!r}: expected a JSON object of config fields such as "
                                         f'{{"hidden_size": 2560}}, got a JSON {type(fields).__name__}')
    return {k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()}


def _profile(text: str) -> MachineProfile:
    """An argparse type: a shipped profile name or a profile JSON file, loaded (and validated)."""
    try:
        return load_profile(text)
    except (ValueError, TypeError, OSError) as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog=PROG, description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=registered_models(), default="pangu_alpha")
    p.add_argument("--preset", default=None, help="a preset of the model's config, e.g. 200B, 2.6B, tiny "
                   f"(required unless a shape is given; then default {SHAPE_BASE_PRESET})")
    p.add_argument("--devices", type=_integer(1, MAX_DEVICES), required=True)
    p.add_argument("--profile", type=_profile, default="cpu-2core",
                   help="a shipped profile name or a profile JSON file")
    p.add_argument("--batch", type=_integer(1, MAX_BATCH), default=512, help="global batch (sequences per step)")
    p.add_argument("--compute-dtype", default=None, help="default: float16 where the profile lists no float32 rate")
    p.add_argument("--memory-cap", type=_gib, default=None, help="GiB per device (default: the profile's)")
    p.add_argument("--max-mp", type=_integer(1), default=None,
                   help="largest model-parallel degree (default: devices per node)")
    p.add_argument("--micro-batch-size", type=_integer(1, MAX_BATCH), default=None,
                   help="sequences per data-parallel rank in one micro-batch (Megatron's b): micro-batches = "
                   "--batch / (dp x this); fixes it for the search and the hand plan (default: searched)")
    p.add_argument("--schedule", choices=SEARCHED_SCHEDULES, default="1f1b",
                   help="pipeline schedule; only 1f1b is priced by the stage search today (gpipe runs but is "
                   "not priced)")
    shape = p.add_argument_group("model shape (overrides the --preset's config fields)")
    for flag, (field, bound) in SHAPE_FLAGS.items():
        note = " (PanGu-α: counts the query layer)" if field == "num_layers" else ""
        shape.add_argument(flag, type=_integer(1, bound), default=None, help=f"the config's {field}{note}")
    shape.add_argument("--config", type=_config_file, default=None,
                       help="a JSON file of config fields (e.g. {\"hidden_size\": 2560, \"num_layers\": 32}); "
                       "shape flags win over it")
    hand = p.add_argument_group("a hand-given plan, priced beside the searched one")
    for flag in HAND_FLAGS:
        hand.add_argument(flag, type=_integer(1))
    hand.add_argument("--layers-per-stage", type=_layer_counts, default=None,
                      help="e.g. 2,2,3,3 (default: the most even that fits)")
    hand.add_argument("--recompute", action="store_true")
    hand.add_argument("--optimizer-parallel", action="store_true")
    p.add_argument("--op-search", choices=SEARCH_MODES, default=None)
    p.add_argument("--ops", type=_integer(0), default=40, help="op rows to print (0: all)")
    p.add_argument("--json", default=None, help="write the stage-plan file a run loads (load_stage_plan); with "
                   "--op-search, the strategy file")
    p.add_argument("--png", default=None, help="draw memory per stage and one layer's strategies")
    return p


def _check_flag_combinations(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Flags that need other flags, or that the chosen mode would silently ignore."""
    if args.preset is None and not _shape_given(args):
        p.error(f"argument --preset: expected a preset name, or a model shape ({' '.join(SHAPE_FLAGS)} or "
                "--config), got neither")
    if args.micro_batch_size is not None and args.batch % args.micro_batch_size:
        p.error(f"argument --micro-batch-size: expected a divisor of --batch {args.batch} (each data-parallel "
                f"rank's share of a micro-batch), got {args.micro_batch_size}")
    given = [args.pp, args.dp, args.mp, args.micro_batches]
    if args.micro_batches is None and args.micro_batch_size is not None:
        given[3] = args.micro_batch_size        # the micro-batch size gives the count
    if any(g is not None for g in given[:3] + [args.micro_batches]) and None in given:
        missing = [f for f, g in zip(HAND_FLAGS, given) if g is None]
        p.error(f"a hand plan needs all of {' '.join(HAND_FLAGS)} (or --micro-batch-size for --micro-batches); "
                f"missing {' '.join(missing)}")
    hand = args.pp is not None
    only_hand = [("--layers-per-stage", args.layers_per_stage is not None), ("--recompute", args.recompute)]
    if not args.op_search:
        only_hand.append(("--optimizer-parallel", args.optimizer_parallel))
    for flag, used in only_hand:
        if used and not hand:
            p.error(f"argument {flag}: applies to the hand-given plan; give {' '.join(HAND_FLAGS)} too")
    if args.op_search:
        for flag, used in (("--layers-per-stage", args.layers_per_stage is not None),
                           ("--recompute", args.recompute), ("--png", args.png is not None),
                           ("--max-mp", args.max_mp is not None),
                           ("--micro-batch-size", args.micro_batch_size is not None)):
            if used:
                p.error(f"argument {flag}: applies to the stage search, not --op-search (one stage, no pipeline)")
        if hand and (args.pp, args.micro_batches) != (1, 1):
            p.error(f"argument --pp/--micro-batches: --op-search plans one stage without a pipeline: expected "
                    f"--pp 1 --micro-batches 1, got --pp {args.pp} --micro-batches {args.micro_batches}")


def _check_outputs(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """--json and --png must be writable before the search, not found unwritable after it."""
    if args.png is not None:
        formats = picture_formats()
        if not formats:
            p.error("argument --png: needs matplotlib, which is not installed; pip install matplotlib")
        ext = os.path.splitext(args.png)[1].lstrip(".").lower()
        if ext not in formats:
            p.error(f"argument --png: expected a file name ending in one of "
                    f"{', '.join('.' + f for f in formats)}, got {args.png!r}")
    for flag, path in (("--json", args.json), ("--png", args.png)):
        if path is not None:
            problem = _unwritable(path)
            if problem:
                p.error(format_error(f"argument {flag}", repr(path), "a file this process can write",
                                     problem, "give a path in an existing, writable directory"))


def _unwritable(path: str) -> str | None:
    """Why ``path`` cannot be written, or None: tried by opening it for append (which keeps an
    existing file's contents) and removing it again if it did not exist."""
    existed = os.path.lexists(path)
    try:
        with open(path, "a"):
            pass
    except OSError as err:
        return err.strerror or str(err)
    except ValueError as err:          # e.g. an embedded NUL byte
        return str(err)
    if not existed:
        os.remove(path)
    return None


def _shape_given(args: argparse.Namespace) -> bool:
    return args.config is not None or any(getattr(args, _dest(f)) is not None for f in SHAPE_FLAGS)


def _dest(flag: str) -> str:
    return flag.lstrip("-").replace("-", "_")


def shape_overrides(args: argparse.Namespace) -> tuple[dict, dict]:
    """(config field -> value, config field -> the flag that set it): --config's fields, then
    the shape flags over them."""
    fields = dict(args.config or {})
    source = {k: "--config" for k in fields}
    for flag, (field, _) in SHAPE_FLAGS.items():
        value = getattr(args, _dest(flag))
        if value is not None:
            fields[field], source[field] = value, flag
    return fields, source


def model_of(p: argparse.ArgumentParser, args: argparse.Namespace) -> tuple[ModelFamily, str]:
    """The model family at --preset with the shape overrides, computing in --compute-dtype
    (else the --config's compute_dtype, else the profile's best); sets ``args.preset`` and
    ``args.overrides`` (what the plan file records)."""
    profile = args.profile
    args.preset = args.preset or SHAPE_BASE_PRESET
    fields, source = shape_overrides(args)
    try:
        model_family(args.model, args.preset)
    except (ValueError, TypeError) as err:
        p.error(f"argument --preset: {err} (for --model {args.model})")
    dtype = args.compute_dtype or fields.get("compute_dtype") or (
        "float32" if "float32" in profile.gemm_flops else max(profile.gemm_flops, key=profile.gemm_flops.get))
    args.overrides = fields
    try:
        return model_family(args.model, args.preset, **{**fields, "compute_dtype": dtype}), dtype
    except (ValueError, TypeError) as err:
        p.error(f"argument {_blame(str(err), source, args.compute_dtype is not None)}: {err}")


def _blame(message: str, source: dict, dtype_flag: bool) -> str:
    """The flag(s) a config error comes from: the one that set the field the message names
    (``PanguAlphaConfig: hidden_size: expected ...``), else every shape flag given with
    --preset (the field came from the preset and clashes with them)."""
    named = message.split(": ")[1] if message.count(": ") >= 2 else ""
    unexpected = "unexpected keyword argument" in message          # a --config key no config field has
    if named == "compute_dtype" and dtype_flag:
        return "--compute-dtype"
    if named in source:
        return source[named]
    if unexpected and "--config" in source.values():
        return "--config"
    return "/".join(sorted(set(source.values())) + ["--preset"])


def _dtype_note(profile: MachineProfile, dtype: str) -> str:
    """How the cost model prices ``dtype`` on ``profile`` when the profile has no rate for it."""
    if dtype in profile.gemm_flops:
        return ""
    slowest = min(profile.gemm_flops, key=profile.gemm_flops.get)
    return f" (profile {profile.name} lists no {dtype} GEMM rate: priced at its slowest, {slowest})"


def check_hand_plan(p: argparse.ArgumentParser, args: argparse.Namespace, family: ModelFamily) -> None:
    """Say which of pp / dp / mp / micro-batches does not fit what, before any pricing."""
    pp, dp, mp = args.pp, args.dp, args.mp
    if args.micro_batch_size is not None:
        args.micro_batches = _micro_batches_of_size(p, args)
    m = args.micro_batches
    where = f"hand plan --pp {pp} --dp {dp} --mp {mp} --micro-batches {m}"
    if pp * dp * mp != args.devices:
        p.error(format_error(where, "--pp x --dp x --mp", f"--devices {args.devices}",
                             f"{pp} x {dp} x {mp} = {pp * dp * mp}",
                             f"choose degrees whose product is {args.devices}"))
    if pp > family.layers:
        p.error(format_error(where, "--pp", f"at most {family.layers} (the pipelined layers of "
                             f"{args.model} {args.preset}; every stage needs one)", str(pp), "use fewer stages"))
    if args.batch % m:
        p.error(format_error(where, "--micro-batches", f"a divisor of --batch {args.batch}", str(m),
                             "each micro-batch holds --batch / --micro-batches whole sequences"))
    if (args.batch // m) % dp:
        p.error(format_error(where, "--dp", f"a divisor of the micro-batch size --batch {args.batch} / "
                             f"--micro-batches {m} = {args.batch // m}", str(dp),
                             "each data-parallel rank takes an equal share of every micro-batch"))
    split = args.layers_per_stage
    if split is not None and (len(split) != pp or sum(split) != family.layers):
        p.error(format_error(where, "--layers-per-stage", f"{pp} counts (one per --pp stage) summing to "
                             f"{family.layers} (the pipelined layers of {args.model} {args.preset})",
                             f"{len(split)} counts summing to {sum(split)}", ""))
    try:
        family.check_degrees(dp, mp)
    except ValueError as err:
        p.error(f"{where}: --dp/--mp do not fit the model: {err}")


def _micro_batches_of_size(p: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    """The hand plan's micro-batch count from --micro-batch-size: --batch / (--dp x size),
    which must be whole and agree with --micro-batches when both are given."""
    batch, dp, b = args.batch, args.dp, args.micro_batch_size
    where = f"hand plan --dp {dp} --micro-batch-size {b}"
    if batch % (dp * b):
        p.error(format_error(where, "--micro-batch-size", f"a size whose --dp {dp} copies divide --batch {batch}",
                             f"{b} ({dp} x {b} = {dp * b} does not divide {batch})",
                             "micro-batches = --batch / (--dp x --micro-batch-size) must be whole"))
    m = batch // (dp * b)
    if args.micro_batches is not None and args.micro_batches != m:
        p.error(format_error(where, "--micro-batches", f"--batch {batch} / (--dp {dp} x --micro-batch-size {b}) "
                             f"= {m}", str(args.micro_batches), "give one of the two"))
    return m


def search_fixed_size(coster: StageCoster, batch: int, size: int, cap: float, max_mp: int | None
                      ) -> tuple[object, list]:
    """The stage search with the micro-batch size fixed at ``size`` sequences per
    data-parallel rank: the same stages, degrees, recompute and optimizer-parallel choices as
    :func:`search_stages`, each at its one micro-batch count ``batch / (dp x size)``."""
    fam, tried = coster.family, []
    for pp in divisors(coster.devices):
        if pp > fam.layers:
            break
        stage_dev = coster.devices // pp
        for mp in [d for d in divisors(stage_dev) if d <= (max_mp or coster.profile.devices_per_node)]:
            dp = stage_dev // mp
            if batch % (dp * size):
                continue
            for recompute in (False, True):
                for zero in (False, True):
                    setting = StageSetting(pp, dp, mp, batch // (dp * size), recompute, zero)
                    plan = evaluate(coster, batch, setting, memory_cap=cap)
                    if plan is not None:
                        tried.append(plan)
    fitting = [p for p in tried if p.peak_memory_bytes <= cap]
    return (min(fitting, key=lambda p: p.step_seconds) if fitting else None), tried


def main(argv=None) -> int:
    """Exit status 0: a plan; 1: the search found none (one line on stderr says why);
    2: a bad command line, refused before any work (one line naming the flag)."""
    p = build_parser()
    args = p.parse_args(argv)
    _check_flag_combinations(p, args)
    _check_outputs(p, args)
    family, dtype = model_of(p, args)
    if args.pp is not None:
        check_hand_plan(p, args, family)
    t0 = time.perf_counter()
    profile = args.profile
    cap = profile.memory_bytes if args.memory_cap is None else args.memory_cap * 2 ** 30
    shape = "".join(f"{k}={v}, " for k, v in args.overrides.items())
    print(f"{args.model} {args.preset}{f' ({shape[:-2]})' if shape else ''}: {family.layers} layers, "
          f"{args.devices} devices, profile {profile.name} "
          f"(memory {human_bytes(profile.memory_bytes)} per device, {profile.devices_per_node} per node), "
          f"global batch {args.batch}, compute {dtype}{_dtype_note(profile, dtype)}")
    if args.op_search:
        return _op_search(p, args, family, profile, cap, t0)
    coster = StageCoster(family, args.devices, profile)
    plans = {"searched": None}
    if args.pp is not None:        # priced first: a plan the model refuses fails before the search
        plans["hand-given"] = _price_hand_plan(p, args, coster, cap)
    if args.micro_batch_size is None:
        best, tried = search_stages(coster, args.batch, cap, args.max_mp)
    else:
        best, tried = search_fixed_size(coster, args.batch, args.micro_batch_size, cap, args.max_mp)
    plans["searched"] = best
    searched_s = time.perf_counter() - t0
    print(f"\nsearched {len(tried)} plans in {searched_s:.2f} s; memory cap {human_bytes(cap)} per device\n")
    print(side_by_side(plans))
    if best is None:
        _no_plan(args, cap, tried)
        return 1
    if "hand-given" in plans:
        h = plans["hand-given"]
        print(f"\nsearched / hand-given predicted step: {best.step_seconds / h.step_seconds:.3f}")
    model, op_plan = _stage_plan(coster, best)
    print(f"\none stage of the searched plan, one layer and its stage's extras "
          f"({coster.devices // best.pp} devices, micro-batch {best.micro_batch_size}):\n")
    print(op_table(model, op_plan, args.ops or None))
    if args.json:
        _write_json(args, plans, family, dtype)
        print(f"\nplan written to {args.json}")
    if args.png:
        draw(args.png, best, model, op_plan, cap, f"{args.model} {args.preset} on {args.devices} x {profile.name}")
        print(f"picture written to {args.png}")
    return 0


def _price_hand_plan(p: argparse.ArgumentParser, args: argparse.Namespace, coster: StageCoster, cap: float):
    """The hand plan's prediction; a one-line error when the model's ops refuse its degrees."""
    pp, dp, mp, m = args.pp, args.dp, args.mp, args.micro_batches
    try:
        coster.parts(args.devices // pp, dp, mp, args.batch // m, args.optimizer_parallel)
    except ValueError as err:
        p.error(f"hand plan --pp {pp} --dp {dp} --mp {mp} --micro-batches {m}: the model's ops refuse "
                f"these degrees: {err}")
    hand = StageSetting(pp, dp, mp, m, args.recompute, args.optimizer_parallel,
                        tuple(args.layers_per_stage) if args.layers_per_stage else None)
    return evaluate(coster, args.batch, hand, cap)


def _no_plan(args: argparse.Namespace, cap: float, tried: list) -> None:
    """One line on stderr: why the search found nothing (exit status 1: the question was
    valid, its answer is that no plan exists)."""
    if not tried:
        size = "" if args.micro_batch_size is None else f" in micro-batches of {args.micro_batch_size} per rank"
        why = (f"no plan exists: no pipeline x data x model split of {args.devices} devices fits global batch "
               f"{args.batch}{size} and the model's shapes; use a --batch with more factors in common with "
               f"--devices{'' if not size else ' or another --micro-batch-size'}")
    else:
        lean = min(tried, key=lambda plan: plan.peak_memory_bytes)
        why = (f"no plan fits {human_bytes(cap)} per device: the leanest needs "
               f"{human_bytes(lean.peak_memory_bytes)} ({lean.describe()}); use more --devices or a larger "
               f"--memory-cap")
    print(f"{PROG}: {why}", file=sys.stderr)


def _stage_plan(coster: StageCoster, plan):
    """The cost model and op plan of one stage of ``plan`` (its one-layer graph)."""
    graph = coster.family.graph(plan.micro_batch_size, plan.dp, plan.mp, one_layer=True)
    stage = Mesh((coster.devices // plan.pp,), ("devices",))
    return (CostModel(graph, stage, coster.profile, True, optimizer_parallel=plan.optimizer_parallel),
            plan_shardings(graph, "semi_auto_parallel", stage, True))


def _write_json(args: argparse.Namespace, plans: dict, family: ModelFamily, dtype: str) -> None:
    """The stage-plan file (:mod:`autopar.strategy.pipeline.plan_file`): the searched plan as
    the one a run takes, the hand-given one beside it."""
    entries = {name: plan_entry(plan, args.schedule, dtype) for name, plan in plans.items() if plan is not None}
    save_stage_plan(args.json, stage_plan_document(
        args.model, args.preset, args.overrides, family.layers, args.devices, args.profile.name, args.batch,
        entries))


def _op_search(p: argparse.ArgumentParser, args, family, profile, cap, t0) -> int:
    """Every op's strategy of the whole model on all devices (no pipeline)."""
    graph = family.graph(args.batch)
    stage = Mesh((args.devices,), ("devices",))
    hand = None
    if args.pp is not None:     # checked: --pp 1 --micro-batches 1; priced first, so it fails before the search
        try:
            hg = family.graph(args.batch, args.dp, args.mp)
            hand = CostModel(hg, stage, profile, True, optimizer_parallel=args.optimizer_parallel).evaluate(
                plan_shardings(hg, "semi_auto_parallel", stage, True))
        except ValueError as err:
            p.error(f"hand plan --dp {args.dp} --mp {args.mp}: the model's ops refuse these degrees: {err}")
    try:
        res = search(graph, stage, args.op_search, full_batch=True, profile=profile, memory_cap=cap,
                     optimizer_parallel=args.optimizer_parallel)
    except ValueError as err:      # no strategy divides the shapes, or none fits the memory cap
        print(f"{PROG}: --op-search {args.op_search} found no plan: {err}", file=sys.stderr)
        return 1
    took = time.perf_counter() - t0
    model = CostModel(graph, stage, profile, True, optimizer_parallel=args.optimizer_parallel)
    print(f"\n{args.op_search}: {len(model.forward)} ops planned in {took:.2f} s\n")
    print(op_table(model, res.plan, args.ops or None))
    c = res.cost
    print(f"\npredicted step {c.step_seconds:.4f} s (compute {c.compute_s:.4f}, communication {c.comm_s:.4f}, "
          f"optimizer {c.update_s:.4f}; no pipeline, bubble 0); memory per device {human_bytes(c.memory_bytes)} "
          f"(weights {human_bytes(c.param_bytes)}, gradients {human_bytes(c.grad_bytes)}, optimizer states "
          f"{human_bytes(c.state_bytes)}, activations {human_bytes(c.activation_bytes)})")
    if hand is not None:
        print(f"hand-given dp{args.dp} x mp{args.mp}: predicted step {hand.step_seconds:.4f} s, memory "
              f"{human_bytes(hand.memory_bytes)}; searched / hand-given: {c.step_seconds / hand.step_seconds:.3f}")
    if args.json:
        save_strategy(args.json, graph, res.plan, predicted=c.summary())
        print(f"\nstrategy file written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
