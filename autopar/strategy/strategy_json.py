"""Typed, checked access to a parsed strategy file (:mod:`autopar.strategy.strategy_file`):
every malformed entry is a ValueError naming the file, the entry, what was expected and
what was found."""
from __future__ import annotations

import json
import math
from dataclasses import dataclass

from ..errors import format_error, is_int
from .layout import Layout
from .mesh import Mesh

RESAVE = "re-save it with strategy_ckpt_save_file for this model and device count"


def _mindspore_json(layout: Layout) -> dict:
    device_matrix, tensor_map = layout.to_mindspore()
    return {"device_matrix": list(device_matrix),
            "tensor_map": [list(e) if isinstance(e, tuple) else e for e in tensor_map]}


@dataclass(frozen=True)
class _Reader:
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
            want = _mindspore_json(lay)
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
