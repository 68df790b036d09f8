"""Install metadata for autopar.

    pip install -e ".[examples,test]"
    pip install -e ".[gpu]"        # CuPy, for set_context(device_target="GPU")
    pip install -e ".[mkl]"        # oneMKL, for AUTOPAR_BLAS=mkl (host GEMMs)
"""
from setuptools import find_packages, setup

# oneMKL's wheels are x86-64 only; the tests that use it skip where it is not installed
MKL = "mkl; platform_machine == 'x86_64' or platform_machine == 'AMD64'"

setup(
    name="autopar",
    version="0.1.0",
    description="MindSpore-like auto-parallel training in Python on numpy, networkx and MPI",
    packages=find_packages(include=["autopar", "autopar.*"]),
    package_data={"autopar.strategy": ["profiles/*.json"]},   # machine profiles ship with the package
    python_requires=">=3.11",
    install_requires=[
        "numpy>=1.24",
        "ml_dtypes>=0.5",  # bfloat16 as a numpy dtype (mixed precision)
        "networkx>=3.0",
        "mpich",          # MPI library and mpiexec from PyPI
        "mpi4py>=4.0",
        "safetensors>=0.4",
        "threadpoolctl>=3.0",
    ],
    extras_require={
        "examples": ["jieba", "sentencepiece", "tqdm", "matplotlib", "snownlp"],
        "test": ["pytest", "pytest-timeout", "hypothesis", MKL],
        "gpu": ["cupy-cuda13x>=14"],   # set_context(device_target="GPU"); CUDA 12: pip install cupy-cuda12x
        "mkl": [MKL],   # AUTOPAR_BLAS=mkl: host GEMMs through oneMKL (autopar/backend/mkl.py)
    },
)
