"""What the PanGu-α scripts share on their command line: checked flag types, the model
config a checkpoint carries, and how a script ends on a mistake -- one clear line, no
traceback.

A bad flag, a missing tokenizer, a corrupt token file, an over-long prompt or a checkpoint
without its config raise ValueError or FileNotFoundError (or an argparse error) with a
message naming the flag or file and the fix. Run by one process, the script prints
``<script>: error: <message>`` and exits with status 2 (argparse's status for bad usage).
A run that completes with a result that is not a number (a diverged checkpoint's NaN
perplexity) raises :class:`NonFiniteResult`, and training that diverged (K consecutive
non-finite steps) raises autopar's ``TrainingDivergedError``: the same one line, status 1
-- the command line was fine, the model is not. Under ``mpiexec`` with several ranks the error is
re-raised so that autopar's abort handler ends every rank (a rank left waiting in a
collective would hang the job).
"""
from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable
from pathlib import Path

from autopar.errors import format_error
from autopar.nn import TrainingDivergedError
from autopar.models.pangu_alpha import PanguAlphaConfig
from autopar.train.checkpoint import read_config, read_manifest

USER_ERRORS = (ValueError, FileNotFoundError)
NO_CONFIG_FIX = ("use a checkpoint written by examples/pangu_alpha/train.py, or save one with "
                 "autopar.save_checkpoint from a network holding the PanguAlpha (its config is saved with it)")


class NonFiniteResult(ArithmeticError):
    """A run that completed with NaN or inf where a number belongs: exit status 1."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse ending a bad command line with ONE line, ``<script>: error: <message>``
    (status 2), as :func:`run` ends the scripts' other mistakes; no usage block."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


def integer(low: int):
    """An argparse type: an integer >= ``low``."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < low:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {text!r}")
        return value
    return parse


def number(low: float, high: float = math.inf, *, low_open: bool = True):
    """An argparse type: a finite number in (low, high] (or [low, high] without ``low_open``)."""
    interval = f"{'(' if low_open else '['}{low:g}, {high:g}]" if high < math.inf else \
        f"{'>' if low_open else '>='} {low:g}"

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        inside = (value > low if low_open else value >= low) and value <= high
        if not (math.isfinite(value) and inside):
            raise argparse.ArgumentTypeError(f"expected a finite number {interval}, got {text!r}")
        return value
    return parse


def text(value: str) -> str:
    """An argparse type: text with something besides white space."""
    if not value.strip():
        raise argparse.ArgumentTypeError(f"expected non-empty text, got {value!r}")
    return value


def checkpoint_config(path: str, **overrides) -> PanguAlphaConfig:
    """The PanGu-α config saved with the checkpoint at ``path``, with ``overrides``: the one
    in its manifest (:func:`~autopar.train.checkpoint.read_config`), or in the manifest's
    ``extra["config"]`` where train.py put it before configs travelled with the weights. A
    ValueError naming the checkpoint, what is missing and the fix when it has neither."""
    directory, manifest = read_manifest(path)
    legacy = manifest["extra"].get("config")
    if manifest.get("config") is None and isinstance(legacy, dict):
        try:
            config = PanguAlphaConfig(**legacy)
        except (TypeError, ValueError) as err:
            raise ValueError(format_error(f"checkpoint {directory!r}", "model config in extra['config']",
                                          "valid PanguAlphaConfig fields", str(err))) from None
    else:
        config = read_config(directory, PanguAlphaConfig, fix=NO_CONFIG_FIX)
    return config.replace(**overrides)


def run(main: Callable[[], None], script: str) -> None:
    from autopar.comm.mpi import launched_under_mpi
    try:
        main()
    except USER_ERRORS as err:
        if launched_under_mpi():
            raise
        _stop(script, err, 2)
    except (NonFiniteResult, TrainingDivergedError) as err:
        if launched_under_mpi():
            raise
        _stop(script, err, 1)


def _stop(script: str, err: Exception, status: int) -> None:
    print(f"{Path(script).name}: error: {err}", file=sys.stderr, flush=True)
    sys.exit(status)
