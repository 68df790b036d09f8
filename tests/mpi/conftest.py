"""Every test module here runs under mpiexec: start autopar's MPI world once, as a script
must (programs compiled under a launcher without ``autopar.init()`` are refused).

``AUTOPAR_TEST_SHM_EVERY_SUM=1`` (set by some launching tests) sends every sum, however small,
through the shared-memory window (autopar/comm/shm.py), which tiny models would otherwise
never reach: those runs check that the whole programs equal serial over it."""
import os

import autopar
from autopar.comm import shm

if os.environ.get("AUTOPAR_TEST_SHM_EVERY_SUM") == "1":
    shm.MIN_BYTES = 1

autopar.init()
