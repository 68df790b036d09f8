"""``python -m autopar.calibrate``: see :mod:`autopar.calibrate.cli`."""
import sys

from ..comm import install_abort_handler
from .cli import main

install_abort_handler()
sys.exit(main())
