"""The tracing context: the tracer (if any) that records op calls in this thread.

An op called while a cell is traced is recorded by the current tracer (``tracer.add(op,
inputs)``, see :mod:`autopar.runtime.trace`); called outside tracing it runs on arrays
(:mod:`autopar.ops.call`). The tracer is set for the duration of one trace with
:func:`tracing`; ops and cells only read it, so they need nothing above this layer.
"""
from __future__ import annotations

import contextvars
from collections.abc import Iterator
from contextlib import contextmanager

_TRACER: contextvars.ContextVar = contextvars.ContextVar("autopar_tracer", default=None)


def current_tracer():
    """The tracer recording op calls in this thread, or None outside tracing."""
    return _TRACER.get()


@contextmanager
def tracing(tracer) -> Iterator:
    """Within the block (and thread), op calls are recorded by ``tracer``."""
    token = _TRACER.set(tracer)
    try:
        yield tracer
    finally:
        _TRACER.reset(token)
