"""Plan reports: the op table, the step breakdown, plans side by side, and the picture."""
from __future__ import annotations

import numpy as np

from .costmodel import CostModel
from .pipeline.stage_search import StagePlan
from .search import human_bytes
from .sharding_plan import ShardingPlan


def op_table(model: CostModel, plan: ShardingPlan, limit: int | None = None) -> str:
    """op scope | strategy | output layout | communication | predicted time, one op a line."""
    head = f"{'op':52s} {'strategy':26s} {'output layout':22s} {'comm (ms)':>10s} {'time (ms)':>10s}"
    lines = [head, "-" * len(head)]
    rows = model.op_costs(plan)
    for n, c, edge in rows[:limit]:
        sh = plan.shardings[n.id]
        comm = c.comm_s + c.grad_s + edge
        lines.append(f"{n.name[:52]:52s} {str(sh)[:26]:26s} {str(sh.output_layout())[:22]:22s} "
                     f"{comm * 1e3:10.3f} {(c.seconds + edge) * 1e3:10.3f}")
    if limit is not None and len(rows) > limit:
        lines.append(f"... {len(rows) - limit} more ops")
    return "\n".join(lines)


def side_by_side(plans: dict[str, StagePlan | None]) -> str:
    """Plans as columns: degrees, split, predicted step and its breakdown, memory."""
    keys = [("stages x data x model", lambda p: f"pp{p.pp} x dp{p.dp} x mp{p.mp}"),
            ("micro-batches x size", lambda p: f"{p.micro_batches} x {p.micro_batch_size}"),
            ("layers per stage", lambda p: _short(",".join(map(str, p.layers_per_stage)))),
            ("recompute", lambda p: "on" if p.recompute else "off"),
            ("optimizer parallel", lambda p: "on" if p.optimizer_parallel else "off"),
            ("predicted step (s)", lambda p: f"{p.step_seconds:.3f}"),
            ("  compute (s)", lambda p: f"{p.compute_s:.3f}"),
            ("  communication (s)", lambda p: f"{p.comm_s:.3f}"),
            ("  bubble (s)", lambda p: f"{p.bubble_s:.3f}"),
            ("  optimizer update (s)", lambda p: f"{p.update_s:.3f}"),
            ("memory per device, peak", lambda p: human_bytes(p.peak_memory_bytes)),
            ("memory, first / last stage", lambda p: f"{human_bytes(p.memory_bytes[0])} / "
                                                     f"{human_bytes(p.memory_bytes[-1])}")]
    names = list(plans)
    width = max(24, *(len(n) + 2 for n in names))
    lines = [f"{'':28s}" + "".join(f"{n:>{width}s}" for n in names)]
    for label, fn in keys:
        cells = [fn(p) if p is not None else "-" for p in plans.values()]
        lines.append(f"{label:28s}" + "".join(f"{c:>{width}s}" for c in cells))
    return "\n".join(lines)


def _short(text: str, n: int = 22) -> str:
    return text if len(text) <= n else text[:n - 3] + "..."


def picture_formats() -> tuple[str, ...]:
    """File extensions :func:`draw` can write (those of matplotlib's Agg canvas, which it
    uses); empty when matplotlib is not installed. Lets a caller refuse a bad path before
    a long search instead of after it."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg  # optional dependency
    except ImportError:
        return ()
    return tuple(sorted(FigureCanvasAgg.get_supported_filetypes()))


def draw(path: str, plan: StagePlan, model: CostModel, op_plan: ShardingPlan, cap: float, title: str) -> None:
    """Two panels: memory and layers per stage against the cap; each op of one layer with
    how many ways it splits each of its inputs' dims (the per-layer strategy picture)."""
    import matplotlib  # optional (the examples extra): imported only when a picture is asked for
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(14, 6), gridspec_kw={"width_ratios": [1, 1.4]})
    stages = np.arange(plan.pp)
    left.bar(stages, np.array(plan.memory_bytes) / 2 ** 30, color="tab:blue")
    left.axhline(cap / 2 ** 30, color="tab:red", linestyle="--", label="memory per device")
    for s, n in zip(stages, plan.layers_per_stage):
        left.text(s, plan.memory_bytes[s] / 2 ** 30, str(n), ha="center", va="bottom", fontsize=8)
    left.set_xlabel("pipeline stage (numbers: layers)")
    left.set_ylabel("predicted memory per device (GiB)")
    left.legend(loc="lower right")
    left.set_title(plan.describe().replace(", layers", "\nlayers"), fontsize=8)

    rows = [(n, op_plan.shardings[n.id]) for n in model.forward if n.scope.startswith("blocks.0")]
    width = max((len(sh.splits()) and max(len(sp) for sp in sh.splits())) for _, sh in rows) if rows else 1
    grid = np.ones((len(rows), width))
    for r, (_, sh) in enumerate(rows):
        first = sh.splits()[0] if sh.splits() else ()
        grid[r, :len(first)] = first
    right.imshow(np.log2(grid), aspect="auto", cmap="viridis")
    right.set_yticks(range(len(rows)), [n.name.replace("blocks.0.", "")[:40] for n, _ in rows], fontsize=6)
    right.set_xticks(range(width), [f"dim {d}" for d in range(width)])
    for r in range(len(rows)):
        for d in range(width):
            right.text(d, r, f"{int(grid[r, d])}", ha="center", va="center", fontsize=6, color="white")
    right.set_title("one layer: ways each op splits its first input's dims", fontsize=9)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
