"""GEMM rate by shape: a profile may give, per dtype, the fraction of the peak rate a GEMM
reaches by its smallest dimension min(m, n, k); small and skinny GEMMs are priced below
peak. Profiles without the curve load and price every GEMM at the peak."""
import json

import numpy as np
import pytest

from autopar import nn, ops
from autopar.ir.mesh import Mesh
from autopar.ir.spec import TensorSpec
from autopar.runtime.trace import trace
from autopar.strategy.costmodel import CostModel
from autopar.strategy.profile import PROFILE_DIR, MachineProfile, load_profile
from autopar.strategy.sharding_plan import plan_shardings

CURVE = [[16, 0.25], [256, 1.0]]


def with_curve(curve=CURVE, source=True, **changes) -> dict:
    """cpu-2core with compute alone priced: a float32 GEMM curve, free memory traffic."""
    d = json.loads((PROFILE_DIR / "cpu-2core.json").read_text())
    d |= {"gemm_efficiency": {"float32": curve}, "elementwise_bytes_per_s": 1e30, "op_overhead_s": 0.0,
          "op_bytes_per_s": {}} | changes
    d["sources"] = {k: v for k, v in d["sources"].items() if not k.startswith("op_bytes_per_s.")}
    if source:
        d["sources"]["gemm_efficiency.float32"] = "assumed, for this test"
    return d


def test_the_rate_follows_the_curve_in_log_of_the_smallest_dimension():
    prof = MachineProfile.from_dict(with_curve())
    peak = prof.gemm_flops["float32"]
    assert prof.gemm_rate("float32") == peak                        # no shape: the peak
    assert prof.gemm_rate("float32", 8) == pytest.approx(0.25 * peak)      # below the first point
    assert prof.gemm_rate("float32", 64) == pytest.approx(0.625 * peak)    # halfway in log 16 .. 256
    assert prof.gemm_rate("float32", 4096) == pytest.approx(peak)          # beyond the last point
    assert prof.gemm_rate("float64", 8) == prof.gemm_flops["float64"]      # no curve for float64
    assert MachineProfile.from_dict(json.loads(json.dumps(prof.to_dict()))) == prof


def test_profiles_without_a_curve_load_and_price_at_the_peak():
    for name in ("a100-8", "ascend910-2048", "cpu-2core", "h100-8"):
        prof = load_profile(name)
        dtype = next(iter(prof.gemm_flops))
        assert prof.gemm_rate(dtype, 8) == prof.gemm_flops[dtype], name


class OneMatMul(nn.Cell):
    def __init__(self):
        super().__init__()
        self.mm = ops.MatMul()

    def construct(self, x, w):
        return self.mm(x, w)


def test_a_skinny_matmul_is_priced_at_its_rate():
    g = trace(OneMatMul(), (TensorSpec((8, 512), np.dtype(np.float32)),
                            TensorSpec((512, 256), np.dtype(np.float32))), {}).graph
    stage = Mesh((1,), ("devices",))
    plan = plan_shardings(g, "stand_alone", stage, True)
    prof = MachineProfile.from_dict(with_curve())
    flat = MachineProfile.from_dict(with_curve([[1, 1.0]]))
    (n, skinny, _), = CostModel(g, stage, prof, True).op_costs(plan)
    (_, full, _), = CostModel(g, stage, flat, True).op_costs(plan)
    assert skinny.flops == 2 * 8 * 512 * 256                        # forward only: no input needs a gradient
    assert full.compute_s == pytest.approx(skinny.flops / prof.gemm_flops["float32"], rel=1e-12)
    assert skinny.compute_s == pytest.approx(4 * full.compute_s, rel=1e-12)  # m = 8: a quarter of the peak


@pytest.mark.parametrize("curve, match", [
    ([[16, 1.5]], "0 < fraction <= 1"),
    ([[256, 0.5], [16, 1.0]], "min dim increasing"),
    ([[0.5, 0.5]], "min dim >= 1"),
    ("fast", r"\[\[min dim, fraction\], \.\.\.\]"),
])
def test_a_bad_curve_is_refused_naming_the_field(curve, match):
    with pytest.raises(ValueError, match=r"gemm_efficiency\['float32'\].*" + match):
        MachineProfile.from_dict(with_curve(curve))


def test_a_curve_needs_a_source():
    with pytest.raises(ValueError, match=r"names no source for \['gemm_efficiency.float32'\]"):
        MachineProfile.from_dict(with_curve(source=False))
