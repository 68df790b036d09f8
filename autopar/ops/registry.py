"""One registry of op kinds: name -> Primitive subclass.

Every op module registers its classes with :func:`register`; ``autopar/ops/__init__.py``
imports every module, so importing ``autopar.ops`` fills the registry. Plans and strategy
files name ops by kind; :func:`lookup` turns the name back into the class.
"""
from __future__ import annotations

from .primitive import Primitive

_OPS: dict[str, type[Primitive]] = {}


def register(cls: type[Primitive]) -> type[Primitive]:
    name = cls.__name__
    if name in _OPS and _OPS[name] is not cls:
        raise ValueError(f"op kind {name!r} registered twice ({_OPS[name].__module__} and {cls.__module__})")
    _OPS[name] = cls
    return cls


def lookup(name: str) -> type[Primitive]:
    try:
        return _OPS[name]
    except KeyError:
        raise ValueError(f"op kind: expected one of {sorted(_OPS)}, got {name!r}") from None


def all_ops() -> dict[str, type[Primitive]]:
    return dict(_OPS)
