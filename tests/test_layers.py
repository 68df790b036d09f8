"""Layers point down (../shared/DESIGN.md, "Layers"): a module of autopar imports only its
own layer and the layers below it, at module level and inside functions alike.

    errors, dtype  <  ir  <  backend  <  ops  <  comm  <  strategy  <  context  <  runtime
                   <  nn  <  train  <  models  <  calibrate, plan (the CLIs)  <  autopar/__init__

The test parses every module's imports (nothing is imported). ``KNOWN_UPWARD`` would list
an upward import the tree must keep for a while, with its reason; it is empty. A new upward
import fails the test; so does a listed one that is gone, so the list only shrinks.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent / "autopar"
LAYERS = ("errors", "dtype", "ir", "backend", "ops", "comm", "strategy", "context", "runtime", "nn", "train",
          "models", "calibrate", "plan", "__init__")

KNOWN_UPWARD: set[tuple[str, str]] = set()   # none left; an entry here would need its reason


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def imported_modules(path: Path, root: Path) -> set[str]:
    """Every autopar module ``path`` imports, anywhere in it (``from .. import ops`` names
    ``autopar.ops``; ``from ..ops import X`` names ``autopar.ops``)."""
    module = module_name(path, root)
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for alias in node.names:      # a submodule imported by name is what is imported
                sub = f"{target}.{alias.name}"
                is_module = (root.parent / Path(*sub.split("."))).with_suffix(".py").is_file() or \
                    (root.parent / Path(*sub.split("."))).is_dir()
                found.add(sub if is_module else target)
    return {m for m in found if m == root.name or m.startswith(root.name + ".")}


def upward_imports(root: Path = ROOT) -> set[tuple[str, str]]:
    """(importer, imported) for every import that points up the layer order."""
    pairs = set()
    for path in sorted(root.rglob("*.py")):
        module = module_name(path, root)
        for target in imported_modules(path, root):
            if LAYERS.index(layer(target)) > LAYERS.index(layer(module)):
                pairs.add((module, target))
    return pairs


def test_every_module_is_in_a_known_layer():
    unknown = sorted({layer(module_name(p, ROOT)) for p in ROOT.rglob("*.py")} - set(LAYERS))
    assert not unknown, f"add these to LAYERS (and to DESIGN.md's layer list): {unknown}"


def test_no_new_upward_import_and_the_known_ones_only_shrink():
    found = upward_imports()
    assert not found - KNOWN_UPWARD, f"upward imports (fix them, do not list them): {sorted(found - KNOWN_UPWARD)}"
    assert not KNOWN_UPWARD - found, f"gone, remove from KNOWN_UPWARD: {sorted(KNOWN_UPWARD - found)}"


@pytest.mark.parametrize("line, caught", [
    ("from ..runtime.graph import Graph", True),          # module level, upward
    ("def f():\n    from ..nn import Cell\n", True),      # inside a function: counted too
    ("from .. import models", True),                      # a package named in the import list
    ("from ..errors import format_error", False),         # downward
    ("import numpy as np", False),                        # not autopar
])
def test_the_check_sees_an_upward_import_wherever_it_is(tmp_path, line, caught):
    root = tmp_path / "autopar"
    for sub in ("ops", "runtime", "nn", "models"):
        (root / sub).mkdir(parents=True)
        (root / sub / "__init__.py").write_text("")
    (root / "__init__.py").write_text("")
    (root / "errors.py").write_text("")
    (root / "runtime" / "graph.py").write_text("")
    (root / "ops" / "rule.py").write_text(line + "\n")
    assert bool(upward_imports(root)) is caught
