"""How the PanGu-α scripts end on a user mistake: one clear line, no traceback.

A missing tokenizer, a corrupt token file, an over-long prompt or an unknown preset raise
ValueError or FileNotFoundError with a message naming the file or flag and the fix. Run
by one process, the script prints ``<script>: error: <message>`` and exits with status 2
(argparse's status for bad usage). Under ``mpiexec`` with several ranks the error is
re-raised so that autopar's abort handler ends every rank (a rank left waiting in a
collective would hang the job).
"""
from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

USER_ERRORS = (ValueError, FileNotFoundError)


def run(main: Callable[[], None], script: str) -> None:
    from autopar.comm.mpi import launched_under_mpi
    try:
        main()
    except USER_ERRORS as err:
        if launched_under_mpi():
            raise
        print(f"{Path(script).name}: error: {err}", file=sys.stderr, flush=True)
        sys.exit(2)
