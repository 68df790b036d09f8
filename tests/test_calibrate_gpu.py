"""``python -m autopar.calibrate --device-target GPU`` on a machine without a GPU: its argument
checks, the missing-CuPy and no-device errors, and the profile it assembles from a probe of
fake measurements (validated by MachineProfile, written and read back)."""
from __future__ import annotations

import importlib.util
from types import SimpleNamespace

import pytest

from autopar.calibrate import (
    GPU_GEMM_DTYPES,
    GPU_QUICK,
    GpuDevice,
    GpuProbe,
    calibrate_gpu,
    gpu_problem,
    main,
    write_profile,
)
from autopar.calibrate.cli import _check_run
from autopar.strategy.profile import MachineProfile, load_profile

COLLECTIVES = ("intra_node_latency_s", "intra_node_bandwidth_bytes_per_s",
               "inter_node_latency_s", "inter_node_bandwidth_bytes_per_s")
DATE = "2026-12-05"
RATES = {"float32": 5.1e13, "float16": 7.0e14, "bfloat16": 7.9e14}


def fake_probe(seen: dict) -> GpuProbe:
    """A probe whose figures are known; ``seen`` records the profile op_costs was handed."""
    def op_costs(profile, sizes):
        seen["op_rates_profile"] = profile
        return ({"Softmax": (1.5e12, 4e-6, "softmax bytes / seconds"), "Dropout": (9.0e11, 0.0, "dropout fit")},
                {"MatMul": (9.0e-5, "matmul host issue"), "Reshape": (1.5e-5, "reshape host issue")})
    return GpuProbe(
        device=lambda: GpuDevice("Fake GPU 80GB", 85_000_000_000, "CuPy 0.0, CUDA runtime 0"),
        gemm_flops=lambda dtype, sizes: (RATES[dtype], f"{dtype} path"),
        gemm_efficiency=lambda dtype, peak, sizes: ((16.0, 0.05), (4096.0, 0.9)),
        elementwise_bytes_per_s=lambda sizes: 3.0e12,
        op_overhead_s=lambda sizes: (1.2e-5, 210),
        op_costs=op_costs)


def test_the_profile_holds_each_measurement_and_says_where_it_was_measured(tmp_path):
    seen: dict = {}
    like = load_profile("h100-8")
    profile = calibrate_gpu("fake-1", like, GPU_QUICK, GPU_GEMM_DTYPES, fake_probe(seen), date=DATE)
    assert dict(profile.gemm_flops) == RATES
    assert profile.gemm_efficiency["bfloat16"] == ((16.0, 0.05), (4096.0, 0.9))
    assert profile.elementwise_bytes_per_s == 3.0e12 and profile.op_overhead_s == 1.2e-5
    assert dict(profile.op_bytes_per_s) == {"Softmax": 1.5e12, "Dropout": 9.0e11}
    assert dict(profile.op_host_s) == {"MatMul": 9.0e-5, "Reshape": 1.5e-5} and profile.asynchronous
    assert dict(profile.op_device_s) == {"Softmax": 4e-6, "Dropout": 0.0}
    assert profile.kernel_overlap == 1.0 and profile.sources["kernel_overlap"].startswith("assumed")
    assert "dropout fit" in profile.sources["op_device_s.Dropout"]
    assert "matmul host issue" in profile.sources["op_host_s.MatMul"]
    assert "softmax bytes / seconds" in profile.sources["op_bytes_per_s.Softmax"]
    assert profile.memory_bytes == 85_000_000_000 and profile.devices_per_node == 1
    said = f"measured by autopar.calibrate on Fake GPU 80GB {DATE}: "
    measured = ["gemm_flops.float32", "gemm_flops.float16", "gemm_flops.bfloat16", "gemm_efficiency.bfloat16",
                "elementwise_bytes_per_s", "op_overhead_s", "op_bytes_per_s.Softmax", "op_host_s.MatMul", "memory_bytes",
                "devices_per_node"]
    for key in measured:
        assert profile.sources[key].startswith(said), (key, profile.sources[key])
    assert "bfloat16 path" in profile.sources["gemm_flops.bfloat16"]
    assert "210 tiny (4, 4) float32 ops" in profile.sources["op_overhead_s"]
    for field in COLLECTIVES:
        assert getattr(profile, field) == getattr(like, field)
        assert "copied from profile 'h100-8'" in profile.sources[field]
    assert seen["op_rates_profile"].op_overhead_s == 1.2e-5
    assert dict(seen["op_rates_profile"].gemm_flops) == RATES
    out = tmp_path / "fake-1.json"
    write_profile(profile, out)
    assert load_profile(out) == profile


def test_the_dtypes_measured_are_the_ones_asked_for():
    profile = calibrate_gpu("fake-1", load_profile("h100-8"), GPU_QUICK, ("bfloat16",), fake_probe({}), date=DATE)
    assert set(profile.gemm_flops) == {"bfloat16"} and set(profile.gemm_efficiency) == {"bfloat16"}


def test_a_probe_figure_the_profile_rejects_names_the_field():
    bad = fake_probe({})
    bad = GpuProbe(**{**bad.__dict__, "elementwise_bytes_per_s": lambda sizes: 0.0})
    with pytest.raises(ValueError, match=r"MachineProfile.elementwise_bytes_per_s: expected a finite number > 0"):
        calibrate_gpu("fake-1", load_profile("h100-8"), GPU_QUICK, GPU_GEMM_DTYPES, bad, date=DATE)


@pytest.mark.parametrize("dtypes, like, needle", [
    (("float64",), "h100-8", "calibrate --device-target GPU: dtypes: expected names from ['float32', 'float16', "
                             "'bfloat16'], got ['float64']"),
    ((), "h100-8", "dtypes: expected names from"),
    (("float32",), None, "calibrate --device-target GPU: like: expected a profile to copy the collective figures "
                         "from, got None"),
])
def test_bad_calibrate_gpu_arguments_are_named(dtypes, like, needle):
    with pytest.raises(ValueError) as err:
        calibrate_gpu("x", like and load_profile(like), GPU_QUICK, dtypes, fake_probe({}), date=DATE)
    assert needle in str(err.value)


# ---------------------------------------------------------------- is there a GPU

def _importer(cupy=None, error: Exception | None = None):
    def import_module(name):
        assert name == "cupy"
        if error is not None:
            raise error
        return cupy
    return import_module


def _cupy_with(count=None, error: Exception | None = None):
    def get_device_count():
        if error is not None:
            raise error
        return count
    return SimpleNamespace(cuda=SimpleNamespace(runtime=SimpleNamespace(getDeviceCount=get_device_count)))


@pytest.mark.parametrize("import_module, needle", [
    (_importer(error=ImportError("No module named 'cupy'")),
     "CuPy is not importable (No module named 'cupy'); install it with pip install -e \".[gpu]\""),
    (_importer(_cupy_with(error=RuntimeError("cudaErrorNoDevice: no CUDA-capable device is detected"))),
     "CuPy sees no GPU (RuntimeError: cudaErrorNoDevice: no CUDA-capable device is detected)"),
    (_importer(_cupy_with(count=0)), "CuPy sees no GPU (0 devices)"),
])
def test_what_the_gpu_target_lacks_is_named(import_module, needle):
    assert needle in gpu_problem(import_module)


def test_a_visible_gpu_lacks_nothing():
    assert gpu_problem(_importer(_cupy_with(count=1))) == ""


# ---------------------------------------------------------------- the command line

def test_run_checks_name_the_argument_expected_and_actual(tmp_path):
    out = tmp_path / "p.json"
    problem, _ = _check_run(out, "h100-8", 2, "GPU", lambda: "")
    assert problem.startswith("argument --device-target: expected GPU on one rank (it measures one GPU), got 2 ranks")
    problem, _ = _check_run(out, None, 1, "GPU", lambda: "")
    assert problem.startswith("argument --like: expected a profile to copy the collective figures from with "
                              "--device-target GPU")
    problem, _ = _check_run(out, "h100-8", 1, "GPU", lambda: "CuPy sees no GPU (0 devices)")
    assert problem == ("argument --device-target: expected GPU on a machine where CuPy sees an NVIDIA GPU, got GPU "
                       "here, where CuPy sees no GPU (0 devices)")
    problem, like = _check_run(out, "h100-8", 1, "GPU", lambda: "")
    assert problem == "" and isinstance(like, MachineProfile) and like.name == "h100-8"


@pytest.mark.parametrize("args, needle", [
    (["--like", "h100-8", "--dtypes", "float64"],
     "argument --dtypes: expected a comma-separated list of float32, float16, bfloat16, got 'float64' "
     "(float64 unknown) on device target GPU"),
    ([], "argument --like: expected a profile to copy the collective figures from with --device-target GPU"),
    (["--like", "tpu-v9"], "argument --like: load_profile: no profile named 'tpu-v9'"),
])
def test_bad_gpu_arguments_stop_before_measuring(tmp_path, capsys, args, needle):
    out = tmp_path / "p.json"
    with pytest.raises(SystemExit) as exit_info:
        main(["--device-target", "gpu", "--out", str(out), *args])       # the target's name in any case
    assert exit_info.value.code == 2
    assert needle in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.skipif(importlib.util.find_spec("cupy") is not None, reason="CuPy is installed here")
def test_without_cupy_the_gpu_target_stops_naming_cupy(tmp_path, capsys):
    out = tmp_path / "p.json"
    with pytest.raises(SystemExit) as exit_info:
        main(["--device-target", "GPU", "--like", "h100-8", "--out", str(out)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert ("argument --device-target: expected GPU on a machine where CuPy sees an NVIDIA GPU, got GPU here, "
            "where CuPy is not importable (No module named 'cupy')") in err, err
    assert 'pip install -e ".[gpu]"' in err
    assert not out.exists()
