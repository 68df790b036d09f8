"""The GPU calibration's real probe on a GPU (skipped without CuPy and a device): the profile
it writes names the device, holds its memory, rates half GEMMs on the path programs take and
rates the op kinds of the GPU workload."""
from __future__ import annotations

import dataclasses

import pytest
from gpu import cupy_or_skip

cupy = cupy_or_skip()

from autopar.backend import get_context  # noqa: E402
from autopar.calibrate import GPU_FULL, GPU_QUICK, calibrate_gpu  # noqa: E402
from autopar.strategy.profile import load_profile  # noqa: E402

# small GEMMs and arrays; the full op-rate workload (a smaller one leaves kinds under op_rates.MIN_SECONDS)
SIZES = dataclasses.replace(GPU_QUICK, gemm_n=2048, elementwise_bytes=16 * 2 ** 20,
                            op_rate_workload=GPU_FULL.op_rate_workload, op_rate_batch=GPU_FULL.op_rate_batch,
                            op_rate_wide=GPU_FULL.op_rate_wide)


@pytest.fixture(scope="module")
def profile():
    return calibrate_gpu("gpu-test", load_profile("h100-8"), SIZES)


def test_the_profile_names_this_gpu_and_holds_its_memory(profile):
    props = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)
    name = props["name"].decode() if isinstance(props["name"], bytes) else str(props["name"])
    assert profile.memory_bytes == cupy.cuda.Device().mem_info[1]
    assert profile.sources["memory_bytes"].startswith(f"measured by autopar.calibrate on {name} ")
    assert profile.devices_per_node == 1
    assert get_context("device_target") == "CPU"          # the op-rate workload put the target back


def test_half_gemms_run_on_the_tensor_cores_faster_than_float32(profile):
    assert "cuBLAS GemmEx" in profile.sources["gemm_flops.bfloat16"]
    assert profile.gemm_flops["bfloat16"] > 2 * profile.gemm_flops["float32"]


def test_the_workload_rates_the_kinds_a_step_spends_on(profile):
    assert {"Softmax", "LayerNorm", "Dropout", "GeLU", "optimizer_update"} <= set(profile.op_bytes_per_s)
    assert "bfloat16 ops" in profile.sources["op_bytes_per_s.Softmax"]


def test_device_time_is_the_kernels_alone_and_host_time_the_issue(profile):
    """The device rate of a kind is below the copy bandwidth (it cannot move bytes faster
    than the GPU copies) yet far above what the host-bound synchronised timing gave
    (session 8: Add 6.2e11 B/s); the host issues a MatMul in tens of microseconds, not the
    milliseconds a device-bound timing would show."""
    assert profile.op_bytes_per_s["Add"] < 1.5 * profile.elementwise_bytes_per_s
    assert profile.op_bytes_per_s["Add"] > 1e12
    assert 2e-6 < profile.op_host_s["MatMul"] < 1e-3 and profile.asynchronous
    assert set(profile.op_device_s) == set(profile.op_bytes_per_s)       # each rated kind's fixed cost
    assert all(0.0 <= s < 1e-3 for s in profile.op_device_s.values())
