"""``python -m autopar.plan``: plan a model from ``autopar.models`` on paper.

No MPI and no parameter data: the model is traced on abstract inputs and priced by the
cost model under a machine profile. The search chooses pipeline stages, layer split,
data x model degrees, micro-batches, recompute and optimizer parallel; a hand-given plan
(``--pp --dp --mp ...``) is priced by the same model and printed beside it::

    python -m autopar.plan --model pangu_alpha --preset 200B --devices 2048 --profile ascend910-2048 \\
        --pp 16 --dp 16 --mp 8 --micro-batches 32 --recompute --optimizer-parallel

``--op-search MODE`` instead searches every op's strategy of the whole model on all devices
(no pipeline; ``dynamic_programming``, ``recursive_programming`` or
``sharding_propagation``), as ``parallel_mode="auto_parallel"`` does at run time.
"""
from __future__ import annotations

import argparse
import json
import sys
import time

from .strategy.costmodel import CostModel
from .strategy.mesh import Mesh
from .strategy.plan import plan_shardings
from .strategy.profile import load_profile
from .strategy.report import draw, op_table, side_by_side
from .strategy.search import SEARCH_MODES, human_bytes, search
from .strategy.stages import FAMILIES, StageCoster, evaluate, search_stages


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m autopar.plan", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=sorted(FAMILIES), default="pangu_alpha")
    p.add_argument("--preset", required=True, help="a preset of the model's config, e.g. 200B, 2.6B, tiny")
    p.add_argument("--devices", type=int, required=True)
    p.add_argument("--profile", default="cpu-2core", help="a shipped profile name or a profile JSON file")
    p.add_argument("--batch", type=int, default=512, help="global batch (sequences per step)")
    p.add_argument("--compute-dtype", default=None, help="default: float16 where the profile lists no float32 rate")
    p.add_argument("--memory-cap", type=float, default=None, help="GiB per device (default: the profile's)")
    p.add_argument("--max-mp", type=int, default=None, help="largest model-parallel degree (default: devices per node)")
    hand = p.add_argument_group("a hand-given plan, priced beside the searched one")
    hand.add_argument("--pp", type=int)
    hand.add_argument("--dp", type=int)
    hand.add_argument("--mp", type=int)
    hand.add_argument("--micro-batches", type=int)
    hand.add_argument("--layers-per-stage", default=None, help="e.g. 2,2,3,3 (default: the most even that fits)")
    hand.add_argument("--recompute", action="store_true")
    hand.add_argument("--optimizer-parallel", action="store_true")
    p.add_argument("--op-search", choices=SEARCH_MODES, default=None)
    p.add_argument("--ops", type=int, default=40, help="op rows to print (0: all)")
    p.add_argument("--json", default=None, help="write the plan (and, without a pipeline, the strategy file)")
    p.add_argument("--png", default=None, help="draw memory per stage and one layer's strategies")
    args = p.parse_args(argv)
    if args.devices < 1 or args.batch < 1:
        p.error(f"--devices and --batch: expected integers >= 1, got {args.devices} and {args.batch}")
    given = [args.pp, args.dp, args.mp, args.micro_batches]
    if any(g is not None for g in given) and None in given:
        p.error("a hand plan needs all of --pp --dp --mp --micro-batches")
    return args


def main(argv=None) -> int:
    args = parse(argv)
    t0 = time.perf_counter()
    profile = load_profile(args.profile)
    dtype = args.compute_dtype or ("float32" if "float32" in profile.gemm_flops else min(
        profile.gemm_flops, key=lambda d: -profile.gemm_flops[d]))
    family = FAMILIES[args.model](args.preset, compute_dtype=dtype)
    cap = profile.memory_bytes if args.memory_cap is None else args.memory_cap * 2 ** 30
    print(f"{args.model} {args.preset}: {family.layers} layers, {args.devices} devices, profile {profile.name} "
          f"(memory {human_bytes(profile.memory_bytes)} per device, {profile.devices_per_node} per node), "
          f"global batch {args.batch}, compute {dtype}")
    if args.op_search:
        return _op_search(args, family, profile, cap, t0)
    coster = StageCoster(family, args.devices, profile)
    best, tried = search_stages(coster, args.batch, cap, args.max_mp)
    searched_s = time.perf_counter() - t0
    plans = {"searched": best}
    if args.pp is not None:
        split = tuple(int(x) for x in args.layers_per_stage.split(",")) if args.layers_per_stage else None
        hand = evaluate(coster, args.batch, args.pp, args.dp, args.mp, args.micro_batches, args.recompute,
                        args.optimizer_parallel, split, cap)
        if hand is None:
            print(f"hand plan pp{args.pp} x dp{args.dp} x mp{args.mp} with {args.micro_batches} micro-batches: "
                  f"does not fit {args.devices} devices / batch {args.batch} / the model's shapes", file=sys.stderr)
            return 2
        plans["hand-given"] = hand
    print(f"\nsearched {len(tried)} plans in {searched_s:.2f} s; memory cap {human_bytes(cap)} per device\n")
    print(side_by_side(plans))
    if best is None:
        lean = min(tried, key=lambda p: p.peak_memory_bytes) if tried else None
        print(f"\nno plan fits {human_bytes(cap)} per device" + (
            f": the leanest needs {human_bytes(lean.peak_memory_bytes)} ({lean.describe()})" if lean else ""),
            file=sys.stderr)
        return 1
    if "hand-given" in plans:
        h = plans["hand-given"]
        print(f"\nsearched / hand-given predicted step: {best.step_seconds / h.step_seconds:.3f}")
    model, op_plan = _stage_plan(coster, best)
    print(f"\none stage of the searched plan, one layer and its stage's extras "
          f"({coster.devices // best.pp} devices, micro-batch {best.micro_batch_size}):\n")
    print(op_table(model, op_plan, args.ops or None))
    if args.json:
        _write_json(args.json, best, plans, family)
        print(f"\nplan written to {args.json}")
    if args.png:
        draw(args.png, best, model, op_plan, cap, f"{args.model} {args.preset} on {args.devices} x {profile.name}")
        print(f"picture written to {args.png}")
    return 0


def _stage_plan(coster: StageCoster, plan):
    """The cost model and op plan of one stage of ``plan`` (its one-layer graph)."""
    from .runtime.trace import trace
    fam = coster.family
    cfg = fam.one_layer(fam.config).replace(data_parallel=plan.dp, model_parallel=plan.mp)
    graph = trace(fam.build(cfg), fam.input_specs(cfg, plan.micro_batch_size), {}).graph
    stage = Mesh((coster.devices // plan.pp,), ("devices",))
    return (CostModel(graph, stage, coster.profile, True, optimizer_parallel=plan.optimizer_parallel),
            plan_shardings(graph, "semi_auto_parallel", stage, True))


def _write_json(path: str, best, plans, family) -> None:
    doc = {"model": family.name, "plans": {k: None if p is None else {
        "pp": p.pp, "dp": p.dp, "mp": p.mp, "micro_batches": p.micro_batches,
        "micro_batch_size": p.micro_batch_size, "layers_per_stage": list(p.layers_per_stage),
        "recompute": p.recompute, "optimizer_parallel": p.optimizer_parallel,
        "predicted": {"step_seconds": p.step_seconds, "compute_s": p.compute_s, "comm_s": p.comm_s,
                      "bubble_s": p.bubble_s, "update_s": p.update_s,
                      "memory_bytes_per_stage": list(p.memory_bytes)}} for k, p in plans.items()}}
    with open(path, "w") as f:
        json.dump(doc, f, indent=1)


def _op_search(args, family, profile, cap, t0) -> int:
    """Every op's strategy of the whole model on all devices (no pipeline)."""
    from .runtime.trace import trace
    cfg = family.config
    graph = trace(family.build(cfg), family.input_specs(cfg, args.batch), {}).graph
    stage = Mesh((args.devices,), ("devices",))
    res = search(graph, stage, args.op_search, full_batch=True, profile=profile, memory_cap=cap,
                 optimizer_parallel=args.optimizer_parallel)
    took = time.perf_counter() - t0
    model = CostModel(graph, stage, profile, True, optimizer_parallel=args.optimizer_parallel)
    print(f"\n{args.op_search}: {len(model.forward)} ops planned in {took:.2f} s\n")
    print(op_table(model, res.plan, args.ops or None))
    c = res.cost
    print(f"\npredicted step {c.step_seconds:.4f} s (compute {c.compute_s:.4f}, communication {c.comm_s:.4f}, "
          f"optimizer {c.update_s:.4f}; no pipeline, bubble 0); memory per device {human_bytes(c.memory_bytes)} "
          f"(weights {human_bytes(c.param_bytes)}, gradients {human_bytes(c.grad_bytes)}, optimizer states "
          f"{human_bytes(c.state_bytes)}, activations {human_bytes(c.activation_bytes)})")
    if args.pp is not None and args.pp == 1:
        hand_cfg = cfg.replace(data_parallel=args.dp, model_parallel=args.mp)
        hg = trace(family.build(hand_cfg), family.input_specs(hand_cfg, args.batch), {}).graph
        hc = CostModel(hg, stage, profile, True, optimizer_parallel=args.optimizer_parallel).evaluate(
            plan_shardings(hg, "semi_auto_parallel", stage, True))
        print(f"hand-given dp{args.dp} x mp{args.mp}: predicted step {hc.step_seconds:.4f} s, memory "
              f"{human_bytes(hc.memory_bytes)}; searched / hand-given: {c.step_seconds / hc.step_seconds:.3f}")
    if args.json:
        from .strategy.strategy_file import save_strategy
        save_strategy(args.json, graph, res.plan, predicted=c.summary())
        print(f"\nstrategy file written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
