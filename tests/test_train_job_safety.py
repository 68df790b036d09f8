"""The main job's safety and its figures: a rerun never saves over a checkpoint it was not
told to continue or replace; MFU divides by a GEMM rate measured on the running machine (or
a named profile), aggregated over ranks as stated, and a figure above 100% is never printed
as a utilisation."""
import os
import subprocess
import sys

import pytest

from autopar.comm import run_in_process
from autopar.strategy.profile import load_profile
from test_comm_mpi_launch import ROOT

EXAMPLES = ROOT / "examples" / "pangu_alpha"
sys.path.insert(0, str(EXAMPLES))
from job import Peak, blas_threads, check_out, measure_peak, mfu_report, probe_shapes, profile_peak  # noqa: E402


def a_checkpoint(out):
    """A folder as train.py leaves it: <out>/checkpoint with files whose bytes we can check."""
    ckpt = out / "checkpoint"
    ckpt.mkdir(parents=True)
    (ckpt / "manifest.json").write_text('{"step": 7}')
    (ckpt / "rank_0.safetensors").write_bytes(b"weights of a finished run")
    return ckpt


def test_an_out_holding_a_checkpoint_is_refused_before_any_work(tmp_path):
    """Without --resume or --overwrite the job stops at once with one line naming the
    checkpoint and both flags; the checkpoint is untouched and no data is prepared."""
    out = tmp_path / "run"
    ckpt = a_checkpoint(out)
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, str(EXAMPLES / "train.py"), "--out", str(out),
                           "--data", str(tmp_path / "data")], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        f"train.py: error: --out {out}: checkpoint: expected no checkpoint in it (this run would save over it), "
        f"got one at {ckpt}; pass --resume to continue it or --overwrite to replace it, or choose another --out"]
    assert (ckpt / "manifest.json").read_text() == '{"step": 7}'
    assert (ckpt / "rank_0.safetensors").read_bytes() == b"weights of a finished run"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]        # no data folder made


def test_resume_or_overwrite_lets_the_run_write_its_checkpoint(tmp_path):
    out = tmp_path / "run"
    assert check_out(out, None, False) is None                          # nothing there yet
    ckpt = a_checkpoint(out)
    assert check_out(out, None, True) is None                           # --overwrite
    assert check_out(out, "", False) is None                            # --resume (its default: <out>/checkpoint)
    assert check_out(out, str(ckpt), False) is None                     # --resume naming that checkpoint
    other = str(tmp_path / "elsewhere" / "checkpoint")                  # resuming another run would replace it
    assert check_out(out, other, False) == (
        f"--out {out}: checkpoint: expected no checkpoint in it (this run would save over it), got one at {ckpt} "
        f"(this run resumes {other}); pass --resume to continue it or --overwrite to replace it, or choose "
        "another --out")
    assert "--overwrite" in check_out(out, None, False)


def ticking_clock(durations):
    """A clock whose successive start/stop readings are ``durations`` apart."""
    readings = iter([t for d in durations for t in (0.0, d)])

    def ticking():
        return next(readings)
    return ticking


def test_the_peak_is_each_ranks_best_gemm_averaged_over_ranks():
    """2·m·k·n over the fastest repeat of any shape, per rank; the peak is the mean of the
    ranks (their sum is the machine's), and the source says so with the spread."""
    shapes = ((2, 3, 4), (4, 4, 4))                                    # 48 and 128 FLOPs
    times = {0: [4e-6, 2e-6, 3e-6, 8e-6, 8e-6, 8e-6],                   # best: 48 / 2e-6 = 2.4e7
             1: [9e-6, 9e-6, 9e-6, 4e-6, 2e-6, 2e-6]}                   # best: 128 / 2e-6 = 6.4e7

    def probe(comm):
        barriers = []
        comm_barrier = comm.barrier
        comm.barrier = lambda: (barriers.append(1), comm_barrier())[1]
        return measure_peak(comm, shapes, repeats=3, clock=ticking_clock(times[comm.rank])), len(barriers)

    (peak0, b0), (peak1, b1) = run_in_process(2, probe)
    assert peak0 == peak1 and b0 == b1 == 6                            # one barrier per timed repeat
    assert peak0.flops == pytest.approx((2.4e7 + 6.4e7) / 2, rel=1e-12)
    assert peak0.source == ("float32 GEMM measured at start on CPU: 2x3x4, 4x4x4, best of 3 on time.ticking, "
                            f"{blas_threads()} BLAS thread(s), 2 rank(s) at once; mean of ranks "
                            "(min 0.024, max 0.064 GFLOP/s)")


def test_the_probe_times_the_models_own_gemms_and_a_large_square_one():
    class Config:
        seq_length, hidden_size, ffn_hidden_size, vocab_size = 128, 96, 384, 8000
    assert probe_shapes(Config, 16, 2) == ((1024, 96, 384), (1024, 96, 8000), (2048, 2048, 2048))


def test_a_named_profile_gives_its_calibrated_rate():
    peak = profile_peak(load_profile("cpu-2core"), "float32")
    assert peak.flops == load_profile("cpu-2core").gemm_rate("float32")
    assert peak.source.startswith("machine profile cpu-2core: measured by autopar.calibrate")


def test_an_mfu_above_100_percent_is_reported_as_invalid_not_as_a_utilisation():
    peak = Peak(100e9, "probe")
    assert mfu_report(0.5, 2, peak) == ("MFU 50.0% of 2 x 100 GFLOP/s (probe)", True)
    text, ok = mfu_report(1.094, 2, peak)
    assert not ok and text.startswith("MFU INVALID: 109.4% of 2 x 100 GFLOP/s (probe) is above 100%")
    assert "python -m autopar.calibrate" in text and "--profile" in text


def test_an_unknown_profile_is_an_error_before_any_work(tmp_path):
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, str(EXAMPLES / "train.py"), "--profile", "nosuch", "--out",
                           str(tmp_path / "run"), "--data", str(tmp_path / "data")], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("train.py: error: load_profile: no profile named 'nosuch'; shipped profiles: [")
    assert list(tmp_path.iterdir()) == []                               # no data prepared, nothing written


def test_device_target_gpu_without_cupy_is_an_error_before_any_work(tmp_path):
    try:
        import cupy  # noqa: F401
        pytest.skip("CuPy is installed here: the flag would run")
    except ImportError:
        pass
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, str(EXAMPLES / "train.py"), "--device-target", "GPU", "--out",
                           str(tmp_path / "run"), "--data", str(tmp_path / "data")], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("train.py: error: --device-target: set_context: device_target: expected 'GPU' "
                                  "with CuPy installed, got CuPy is not importable"), proc.stderr
    assert list(tmp_path.iterdir()) == []                               # no data prepared, nothing written
