"""Collectives on numpy arrays: an MPI backend and an in-process one with the same interface.

| collective (member i of n)                           | backward conjugate                          |
|------------------------------------------------------|---------------------------------------------|
| allreduce(x, op): sum/max/min over members, on all    | identity                                    |
| allgather(x, axis): concat members' x along axis      | reduce_scatter along the same axis          |
| reduce_scatter(x, axis): sum, keep block i along axis | allgather along the same axis               |
| alltoall(x, s, c): block j along s to j, concat on c  | alltoall(dy, c, s): the axes swapped        |
| broadcast(x, root): root's x to every member          | reduce (sum) to root                        |
| send(x, dest) / recv(shape, dtype, source)            | recv / send the gradient the other way      |

``iallreduce`` and ``ireduce_scatter`` start the same collectives non-blocking and return a
request whose ``wait()`` gives the result (gradient buckets overlap the backward pass with
them: ``comm_fusion``, fusion.py and autopar/runtime/fusion.py).

Every call takes numpy arrays and returns a new array; inputs are never modified. Groups are
made once, at plan/lower time, with ``comm.split(groups)`` (MPI ``Comm.Split``), never per
step. ``comm.stats`` counts every call and its bytes by kind, for a rank and all its
sub-communicators together.

* ``world()`` -- MPI's world communicator under ``mpiexec -n N`` (N > 1), else one rank;
* ``run_in_process(n, fn, *args)`` -- n virtual ranks as threads, for tests and planning checks;
* ``install_abort_handler()`` -- an uncaught exception on any rank ends the MPI job
  (``autopar.init()`` installs it under a launcher);
* ``CommChecks(watchdog_s=..., debug=..., check_every=...)`` -- checks carried by a
  communicator: a collective watchdog (on by default in an MPI world), a debug mode
  comparing the collectives the members issue, and how often programs compare inputs and
  step counters across ranks (``world()`` reads ``AUTOPAR_COMM_WATCHDOG``,
  ``AUTOPAR_COMM_DEBUG``, ``AUTOPAR_CHECK_EVERY``); see checks.py and consistency.py.

This package is the only place in autopar that imports mpi4py, and only when MPI is used.
"""
from .base import CommRecord, CommStats, Communicator
from .checks import CollectiveMismatchError, CollectiveTimeoutError, CommChecks
from .consistency import RankDivergenceError
from .inprocess import DeadlockError, RankAborted, run_in_process
from .mpi import install_abort_handler, world
from .single import SelfCommunicator

__all__ = ["Communicator", "CommStats", "CommRecord", "run_in_process", "world", "install_abort_handler",
           "SelfCommunicator", "RankAborted", "CollectiveMismatchError", "DeadlockError", "CommChecks",
           "CollectiveTimeoutError", "RankDivergenceError"]
