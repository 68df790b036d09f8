"""Collectives over MPI and an in-process backend (the only place that imports mpi4py).

Filled in by the sharded-execution work; the serial runtime needs no communication.
"""
