"""Per-op-kind rates: the profile field's validation, the instruction timer's bookkeeping,
and the rates' arithmetic (bytes the cost model counts / seconds less the overhead)."""
import json
import time

import numpy as np
import pytest

from autopar.models.op_rates import QUICK_WORKLOAD
from autopar.models.pangu_alpha import PanguAlphaConfig, PanguAlphaWithLoss
from autopar.runtime.compiled import GradProgram
from autopar.runtime.op_timer import kind_of, time_ops
from autopar.strategy.profile import PROFILE_DIR, MachineProfile, load_profile


def base():
    return json.loads((PROFILE_DIR / "cpu-2core.json").read_text())


def test_a_rate_needs_a_source_and_a_positive_value():
    data = base()
    data["op_bytes_per_s"] = {"GeLU": 1e9}
    data["sources"].pop("op_bytes_per_s.GeLU", None)
    with pytest.raises(ValueError, match=r"op_bytes_per_s.GeLU"):
        MachineProfile.from_dict(data)
    data["sources"]["op_bytes_per_s.GeLU"] = "assumed, for this test"
    data["op_bytes_per_s"] = {"GeLU": -1}
    with pytest.raises(ValueError, match=r"op_bytes_per_s\['GeLU'\]: expected a finite number > 0"):
        MachineProfile.from_dict(data)
    data["op_bytes_per_s"] = {"GeLU": 2e9}
    p = MachineProfile.from_dict(data)
    assert p.op_rate("GeLU") == 2e9 and p.op_rate("Tanh") == p.elementwise_bytes_per_s


def test_the_shipped_cpu_profile_rates_every_slow_kernel_below_the_elementwise_bandwidth():
    p = load_profile("cpu-2core")
    for kind in ("Dropout", "GeLU", "LayerNorm", "Softmax", "SparseSoftmaxCrossEntropyWithLogits"):
        assert p.op_rate(kind) < p.elementwise_bytes_per_s, kind


def test_the_timed_run_executes_the_program_and_counts_every_instruction():
    cfg = PanguAlphaConfig(**QUICK_WORKLOAD)
    net = PanguAlphaWithLoss(cfg)
    net.set_train(True)
    ids = np.random.default_rng(1).integers(0, cfg.vocab_size, (2, cfg.seq_length + 1)).astype(np.int32)
    prog = GradProgram(net, (ids,), {}, net.trainable_params())
    seconds, counts = time_ops(prog.program, [ids], step=3)
    assert sum(counts.values()) == len(prog.program.instructions)
    assert counts == {k: sum(kind_of(prog.program, ins.node) == k for ins in prog.program.instructions)
                      for k in counts}
    assert counts["Dropout"] > 0 and all(s >= 0 for s in seconds.values())
    loss, _ = prog((ids,), {}, step=3)            # the timed run changed nothing: same loss twice
    again, _ = prog((ids,), {}, step=3)
    assert float(loss) == float(again)


def test_rates_are_the_model_bytes_over_the_measured_seconds(monkeypatch):
    import autopar.models.op_rates as op_rates
    fake = {"GeLU": 0.010, "Dropout": 0.020, "MatMul": 1.0, "Reshape": 1e-6}

    def timed(program, inputs, step, clock, timed=None):
        counts = {}
        for ins in program.instructions:
            k = kind_of(program, ins.node)
            counts[k] = counts.get(k, 0) + 1
        return {k: fake.get(k, 0.0) for k in counts}, counts
    monkeypatch.setattr("autopar.runtime.op_timer.time_ops", timed)
    profile = load_profile("cpu-2core")
    rates = op_rates.measure_op_rates(profile, repeats=1, workload=QUICK_WORKLOAD, batch=2)
    assert set(rates) == {"GeLU", "Dropout", "optimizer_update"}   # GEMMs and sub-noise kinds are not rated
    assert rates["GeLU"][0] > rates["Dropout"][0] > 0


def test_host_seconds_are_per_instruction_of_each_kind_and_per_parameter_update():
    """``timed`` replaces the clock: each instruction (and the update's two parts) is charged
    what it returns, so host seconds per instruction come back exactly, per kind, and the
    update's per parameter; every instruction still runs (its result is used)."""
    import autopar.models.op_rates as op_rates
    calls = []

    def timed(k, run):
        calls.append(k)
        return run(), 0.25 if k < 0 else 1e-3          # -2: the norm, -1: scale + update
    host = op_rates.measure_op_host_seconds(1, time.perf_counter, timed, workload=QUICK_WORKLOAD, batch=2)
    cfg = PanguAlphaConfig(**QUICK_WORKLOAD)
    n_params = len(PanguAlphaWithLoss(cfg).trainable_params())
    assert host["optimizer_update"][0] == pytest.approx(0.5 / n_params)
    assert {k: v for k, (v, _) in host.items() if k != "optimizer_update"} == pytest.approx(
        {k: 1e-3 for k in host if k != "optimizer_update"})
    assert {"MatMul", "Reshape", "LayerNorm", "Dropout"} <= set(host)      # views and GEMMs too
    assert calls.count(-1) == calls.count(-2) == 1 and len(calls) > 50


def test_a_profile_is_found_by_the_name_before_its_size():
    assert load_profile("ascend910").name == load_profile("ascend910-2048").name
    with pytest.raises(ValueError, match="no profile named 'ascend'"):
        load_profile("ascend")


@pytest.mark.parametrize("rate, fixed", [(2.0e12, 4e-6), (5.0e11, 0.0), (1.0e12, 2e-5)])
def test_a_two_width_fit_recovers_the_rate_and_the_fixed_cost(rate, fixed):
    from autopar.models.op_rates import fit_rate
    n, m1, m2 = 40, 3.0e8, 1.2e9                     # the same instructions, four times the bytes
    got = fit_rate(n, m1, n * fixed + m1 / rate, n, m2, n * fixed + m2 / rate)
    assert got == pytest.approx((rate, fixed), rel=1e-9, abs=1e-15)


def test_a_fit_the_points_cannot_make_falls_back_to_the_larger_point():
    from autopar.models.op_rates import fit_rate
    assert fit_rate(10, 1e8, 2e-3, 10, 4e8, 1e-3) == (4e8 / 1e-3, 0.0)   # more bytes, less time: noise
    assert fit_rate(10, 4e8, 1e-3, 10, 4e8, 2e-3) == (4e8 / 2e-3, 0.0)   # the same bytes: no slope
    rate, fixed = fit_rate(10, 1e8, 1e-4, 10, 4e8, 1e-3)                 # a negative fixed cost: none
    assert (rate, fixed) == (4e8 / 1e-3, 0.0)


def test_fits_take_the_two_widths_and_rate_only_the_kinds_with_bytes():
    """Each instruction timed as 1 ms whatever it moves: the two widths' times are equal, so no
    kind has a positive slope and every fit falls back to its wider point, fixed cost 0;
    GEMMs and views (no bytes) are not rated; the how names both widths."""
    import autopar.models.op_rates as op_rates
    profile = load_profile("cpu-2core")
    wide = dict(QUICK_WORKLOAD, hidden_size=128, ffn_hidden_size=512)
    def one_ms(k, run):
        return run(), 1e-3
    fits = op_rates.measure_op_fits(profile, 1, time.perf_counter, (one_ms, one_ms), (QUICK_WORKLOAD, wide), 2)
    assert {"Dropout", "LayerNorm", "Softmax", "optimizer_update"} <= set(fits)
    assert not {"MatMul", "BatchMatMul", "Reshape"} & set(fits)
    assert all(fixed == 0.0 for _, fixed, _ in fits.values())
    assert "at 64h and 128h" in fits["LayerNorm"][2]


def test_fits_time_each_width_with_its_own_timer():
    """The narrow workload's instructions go to the first timer (1 ms each), the wide one's to
    the second (2 ms each): a GPU holds the stream for each width's own host issue. Swapped or
    shared timers would give LayerNorm's two times in another ratio than 1 : 2."""
    import re

    import autopar.models.op_rates as op_rates
    wide = dict(QUICK_WORKLOAD, hidden_size=128, ffn_hidden_size=512)
    fits = op_rates.measure_op_fits(load_profile("cpu-2core"), 1, time.perf_counter,
                                    (lambda k, run: (run(), 1e-3), lambda k, run: (run(), 2e-3)),
                                    (QUICK_WORKLOAD, wide), 2)
    how = fits["LayerNorm"][2]
    n = int(re.search(r"(\d+) LayerNorm instructions", how).group(1))
    assert f"in {n * 1e-3:.3g} and {n * 2e-3:.3g} s" in how
