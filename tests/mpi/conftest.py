"""Every test module here runs under mpiexec: start autopar's MPI world once, as a script
must (programs compiled under a launcher without ``autopar.init()`` are refused)."""
import autopar

autopar.init()
