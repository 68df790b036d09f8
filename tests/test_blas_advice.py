"""numpy's OpenBLAS kernel choice against the CPU's flags (autopar/backend/blas.py): the
advice names OPENBLAS_CORETYPE exactly when OpenBLAS runs narrower vectors than the CPU has,
and ``autopar.init`` passes it on as a warning. Session 11 measured why: on the lent 16-core
host numpy's OpenBLAS picked Haswell kernels on an AVX-512 Xeon (76.7 against 124.5 GFLOP/s
with SkylakeX's)."""
from __future__ import annotations

import warnings

import pytest

import autopar.context as context_module
from autopar.backend import blas

AVX512_CPU = frozenset({"sse4_2", "avx", "avx2", "fma", "avx512f", "avx512cd", "avx512bw", "avx512dq", "avx512vl"})
AVX2_CPU = frozenset({"sse4_2", "avx", "avx2", "fma"})
SSE_CPU = frozenset({"sse2", "sse4_2"})


@pytest.mark.parametrize("architecture, flags, expected", [
    ("Haswell", AVX512_CPU, "SkylakeX"),          # the lent host's case
    ("Zen", AVX512_CPU, "SkylakeX"),
    ("Sandybridge", AVX512_CPU, "SkylakeX"),
    ("SkylakeX", AVX512_CPU, None),               # already the widest
    ("SapphireRapids", AVX512_CPU, None),
    ("Haswell", AVX2_CPU, None),                  # AVX2 is all this CPU has
    ("Prescott", AVX2_CPU, "Haswell"),
    ("Sandybridge", AVX2_CPU, "Haswell"),
    ("Prescott", SSE_CPU, None),
    ("NeoverseN1", AVX512_CPU, None),             # a kernel set the table does not rank: say nothing
    (None, AVX512_CPU, None),                     # numpy not on OpenBLAS
    ("Haswell", AVX512_CPU - {"avx512bw"}, None), # an AVX-512 subset SkylakeX's kernels cannot run on
])
def test_suggests_the_widest_kernels_the_cpu_runs(architecture, flags, expected):
    assert blas.suggested_coretype(architecture, flags) == expected


def test_cpu_flags_reads_the_first_cpus_flags_line(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nmodel name\t: Some Xeon\nflags\t\t: fpu avx2 fma avx512f\n\n"
                    "processor\t: 1\nflags\t\t: fpu\n")
    assert blas.cpu_flags(str(info)) == {"fpu", "avx2", "fma", "avx512f"}
    assert blas.cpu_flags(str(tmp_path / "missing")) == frozenset()


def test_advice_names_the_variable_and_respects_a_users_choice():
    advice = blas.openblas_advice("Haswell", AVX512_CPU, environ={})
    assert "OPENBLAS_CORETYPE=SkylakeX" in advice and "Haswell" in advice
    assert blas.openblas_advice("Haswell", AVX512_CPU, environ={"OPENBLAS_CORETYPE": "Haswell"}) is None
    assert blas.openblas_advice("SkylakeX", AVX512_CPU, environ={}) is None


def test_the_architecture_is_openblas_own_among_several_blas_libraries(monkeypatch):
    mkl = {"user_api": "blas", "internal_api": "mkl", "architecture": None}
    openblas = {"user_api": "blas", "internal_api": "openblas", "architecture": "Haswell"}
    monkeypatch.setattr(blas, "threadpool_info", lambda: [mkl, openblas])
    assert blas.openblas_architecture() == "Haswell"
    monkeypatch.setattr(blas, "threadpool_info", lambda: [mkl])       # numpy on MKL: nothing to advise
    assert blas.openblas_architecture() is None
    assert blas.openblas_advice(flags=AVX512_CPU, environ={}) is None


def test_init_warns_once_on_rank_0_with_the_fix(monkeypatch):
    monkeypatch.setattr(context_module, "openblas_advice", lambda: "numpy's OpenBLAS runs its Haswell kernels ...")
    monkeypatch.setattr(context_module._STATE, "world", None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        context_module.init()
    slow = [w for w in caught if issubclass(w.category, blas.SlowBLASWarning)]
    assert len(slow) == 1 and "autopar.init" in str(slow[0].message) and "Haswell" in str(slow[0].message)


def test_init_says_nothing_when_the_kernels_fit(monkeypatch):
    monkeypatch.setattr(context_module, "openblas_advice", lambda: None)
    monkeypatch.setattr(context_module._STATE, "world", None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        context_module.init()
    assert not [w for w in caught if issubclass(w.category, blas.SlowBLASWarning)]
