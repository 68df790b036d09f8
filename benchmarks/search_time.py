"""Search time vs model size and device count: PanGu-α presets tiny -> 200B on 8 -> 4096
devices, under every search mode.

Each cell traces the preset on abstract inputs (a TensorSpec batch of one sequence per device:
shapes only, no parameter data) and times ``autopar.strategy.search.search`` on a one-stage
mesh of that many devices, under a machine profile (default the 2048-device Ascend 910
cluster) and its memory cap. Every cell runs in its own process, under a time limit (on the
``--clock``: wall, or CPU time on a shared machine) and an address-space limit, so a search
that runs away neither hangs the table nor takes the machine's memory. A cell that passes
its limit prints ``> limit``; one that raises prints the error's short text (a footnote
gives it whole); one whose mode already passed the limit on a smaller model on as many
devices is not run (``skipped``; ``--no-skip`` runs it). A second table gives the predicted
step time of each plan found, so speed can be weighed against quality::

    python benchmarks/search_time.py                 # the whole table (long: the limit bounds it)
    python benchmarks/search_time.py --quick         # tiny and 350M on 8 and 64 devices
    python benchmarks/search_time.py --memory-cap none --clock cpu   # the search alone, shared machine
    python benchmarks/search_time.py --presets 2.6B 200B --devices 2048 --modes recursive_programming
"""
from __future__ import annotations

import argparse
import json
import math
import resource
import subprocess
import sys
import time

from _common import pangu_graph, table, worker_env

PRESETS = ("tiny", "350M", "1.3B", "2.6B", "13B", "200B")
DEVICES = (8, 64, 512, 2048, 4096)
QUICK_PRESETS, QUICK_DEVICES = ("tiny", "350M"), (8, 64)


# "wall": what a user waits; "cpu": the process's CPU time, which leaves out time a shared
# machine gives other work (the search is one thread). The limit is on the same clock.
CLOCKS = {"wall": (time.perf_counter, "ITIMER_REAL", "SIGALRM"),
          "cpu": (time.process_time, "ITIMER_PROF", "SIGPROF")}


def cell(preset: str, devices: int, mode: str, profile: str, limit_s: float, clock_name: str,
         capped: bool = True) -> dict:
    """Trace, then time one search under a ``limit_s`` alarm; in the worker process."""
    import signal

    from autopar.ir.graph import FORWARD
    from autopar.ir.mesh import Mesh
    from autopar.models.pangu_alpha import PanguAlphaConfig
    from autopar.strategy.search import search
    cfg = PanguAlphaConfig.preset(preset)
    t0 = time.perf_counter()
    graph = pangu_graph(cfg, devices)
    seen = dict(traced_s=time.perf_counter() - t0, ops=sum(1 for n in graph.nodes if n.phase == FORWARD))
    stage = Mesh((devices,), ("devices",))
    clock, timer, sig = CLOCKS[clock_name]

    def too_long(*_):
        raise TimeoutError
    signal.signal(getattr(signal, sig), too_long)
    signal.setitimer(getattr(signal, timer), limit_s)
    t0 = clock()
    try:
        res = search(graph, stage, mode, profile=profile, memory_cap=None if capped else math.inf)
    except TimeoutError:
        return dict(timeout=True, **seen)
    except (ValueError, MemoryError) as err:
        return dict(error=f"{type(err).__name__}: {err}", seconds=clock() - t0, **seen)
    finally:
        signal.setitimer(getattr(signal, timer), 0)
    return dict(seconds=clock() - t0, step_s=res.cost.step_seconds, memory_bytes=res.cost.memory_bytes, **seen)


def short(error: str) -> str:
    """A table cell's worth of an error message."""
    if "would build a table of" in error:
        return "refused: table of " + error.split("table of ", 1)[1].split(" entries")[0] + " entries"
    if "no plan fits" in error:
        return "no plan fits (over by " + error.split("over by ", 1)[1].split(";")[0] + ")"
    if error.startswith("MemoryError"):
        return "out of memory (limit)"
    return error.split(":", 2)[-1].strip()[:40]


def run_cell(preset: str, devices: int, mode: str, args) -> dict:
    cmd = [sys.executable, __file__, "--worker", preset, str(devices), mode, "--profile", args.profile,
           "--limit", str(args.limit), "--memory-limit-gb", str(args.memory_limit_gb), "--clock", args.clock,
           "--memory-cap", args.memory_cap]
    try:
        out = subprocess.run(cmd, env=worker_env(), stdin=subprocess.DEVNULL, capture_output=True, text=True,
                             timeout=6 * args.limit + 300)   # a backstop: the search has its own alarm
    except subprocess.TimeoutExpired:
        return dict(timeout=True)
    last = out.stdout.strip().splitlines()[-1:]
    if out.returncode == 0 and last and last[0].startswith("{"):
        return json.loads(last[0])
    tail = (out.stderr or out.stdout).strip().splitlines()[-1:] or [f"exit {out.returncode}"]
    return dict(error=tail[0])


def worker(preset: str, devices: int, mode: str, profile: str, limit_s: float, memory_gb: float,
           clock_name: str, capped: bool) -> None:
    if memory_gb > 0:
        cap = int(memory_gb * 2 ** 30)
        resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    print(json.dumps(cell(preset, devices, mode, profile, limit_s, clock_name, capped)), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", default=list(PRESETS), choices=PRESETS)
    parser.add_argument("--devices", nargs="+", type=int, default=list(DEVICES))
    parser.add_argument("--modes", nargs="+", default=None, help="search modes (default: all)")
    parser.add_argument("--profile", default="ascend910-2048", help="machine profile name or .json path")
    parser.add_argument("--limit", type=float, default=120.0, help="seconds one search may take (on --clock)")
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="wall",
                        help="wall clock (default), or CPU time on a machine shared with other work")
    parser.add_argument("--memory-limit-gb", type=float, default=8.0, help="address space of one search process")
    parser.add_argument("--memory-cap", choices=("profile", "none"), default="profile",
                        help="search under the profile's memory per device (default, as users do), or "
                             "uncapped: the search alone, without re-solving under a rising memory price")
    parser.add_argument("--no-skip", action="store_true", help="run every cell, even past a smaller model's limit")
    parser.add_argument("--quick", action="store_true", help=f"presets {QUICK_PRESETS} on {QUICK_DEVICES} devices")
    parser.add_argument("--json", default="", help="write every cell here")
    parser.add_argument("--worker", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        preset, devices, mode = args.worker
        worker(preset, int(devices), mode, args.profile, args.limit, args.memory_limit_gb, args.clock,
               args.memory_cap == "profile")
        return
    from autopar.strategy.search import SEARCH_MODES
    modes = args.modes or list(SEARCH_MODES)
    presets, devices = (QUICK_PRESETS, QUICK_DEVICES) if args.quick else (args.presets, args.devices)
    results: dict[tuple[str, int, str], dict] = {}
    # (preset index, devices) where a mode passed the limit: a larger preset on as many
    # devices has the same candidates per op and more ops, so it is not run. Fewer devices
    # are no promise of a shorter search (a model that does not fit is searched again and
    # again under a rising memory price), so every device count is tried.
    over: dict[str, list[tuple[int, int]]] = {m: [] for m in modes}
    for pi, preset in enumerate(presets):
        for d in devices:
            for mode in modes:
                if not args.no_skip and any(pj <= pi and e == d for pj, e in over[mode]):
                    results[preset, d, mode] = dict(skipped=True)
                    continue
                t0 = time.perf_counter()
                r = results[preset, d, mode] = run_cell(preset, d, mode, args)
                if r.get("timeout") or r.get("seconds", 0) > args.limit:
                    r["timeout"] = True
                    over[mode].append((pi, d))
                print(f"  {preset:>5} {d:>5} {mode:22s} {_cell_text(r, args.limit):>28s} "
                      f"({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)
    report(results, presets, devices, modes, args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump([dict(preset=p, devices=d, mode=m, **r) for (p, d, m), r in results.items()], f, indent=1)


def _cell_text(r: dict, limit: float) -> str:
    if r.get("skipped"):
        return "skipped"
    if r.get("timeout"):
        return f"> {limit:.0f} s"
    if "error" in r:
        return short(r["error"])
    return f"{r['seconds']:.2f} s"


def report(results, presets, devices, modes, args) -> None:
    from autopar.models.pangu_alpha import PanguAlphaConfig
    what = "wall time" if args.clock == "wall" else "CPU time"
    cap = "under its memory cap" if args.memory_cap == "profile" else "no memory cap"
    print(f"Search {what} per mode (s), one stage of N devices, profile {args.profile} ({cap}), global batch = N "
          f"sequences; limit {args.limit:.0f} s per search ('skipped': the mode passed the limit on a smaller "
          "model on as many devices)\n")
    rows, quality, errors = [], [], {}
    for preset in presets:
        cfg = PanguAlphaConfig.preset(preset)
        size = f"{cfg.parameter_count() / 1e9:.3g}B" if cfg.parameter_count() >= 1e9 else \
            f"{cfg.parameter_count() / 1e6:.3g}M"
        for d in devices:
            cells = [results[preset, d, m] for m in modes]
            traced = next((c["traced_s"] for c in cells if "traced_s" in c), None)
            ops = next((c["ops"] for c in cells if "ops" in c), "")
            texts = []
            for c in cells:
                text = _cell_text(c, args.limit)
                if "error" in c and not c.get("timeout"):
                    key = errors.setdefault(c["error"], f"[{len(errors) + 1}]")
                    text = f"{text} {key}"
                texts.append(text)
            rows.append([preset, cfg.num_layers, size, d, ops, "" if traced is None else f"{traced:.2f}", *texts])
            quality.append([preset, d, *[f"{c['step_s']:.4g}" if "step_s" in c else "-" for c in cells]])
    print(table(["preset", "layers", "params", "devices", "fwd ops", "trace s", *modes], rows,
                "lrrrrr" + "r" * len(modes)))
    print("\nPredicted step time (s) of the plan each mode found")
    print(table(["preset", "devices", *modes], quality, "lr" + "r" * len(modes)))
    for text, key in errors.items():
        print(f"{key} {text}")


if __name__ == "__main__":
    main()
