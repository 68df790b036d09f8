"""Reading regions of a checkpoint's tensors from its pieces, every piece touched checked
(stored shape and dtype before allocating, then its checksum): a truncated, corrupt or
crafted file is refused with an error naming it."""
from __future__ import annotations

import os

import numpy as np
from safetensors import SafetensorError, safe_open

from .format import Region, full_region, overlap, sha256, value_error

_ST_DTYPES = {"F16": "float16", "BF16": "bfloat16", "F32": "float32", "F64": "float64", "I32": "int32",
              "I64": "int64", "U8": "uint8", "U16": "uint16", "BOOL": "bool"}   # safetensors' names


class PieceReader:
    """Reads regions of the tensors of one checkpoint, checking every piece it touches."""

    def __init__(self, directory: str, manifest: dict, verify: bool = True):
        self.directory, self.tensors, self.verify = directory, manifest["tensors"], verify
        self._files: dict[str, object] = {}

    def close(self) -> None:
        for f in self._files.values():
            f.__exit__(None, None, None)
        self._files.clear()

    def _slice(self, name: str, piece: dict):
        file = piece["file"]
        where = f"{os.path.join(self.directory, file)}: tensor {name!r}"
        try:
            if file not in self._files:
                handle = safe_open(os.path.join(self.directory, file), framework="numpy")
                self._files[file] = handle.__enter__()
            f = self._files[file]
            keys = list(f.keys())   # safe_open is not a dict
            if piece["key"] not in keys:
                raise value_error(where, "key", f"{piece['key']!r} in the file", f"keys {sorted(keys)[:5]}")
            sl = f.get_slice(piece["key"])
            stored_shape, stored_dtype = tuple(sl.get_shape()), _ST_DTYPES.get(sl.get_dtype(), sl.get_dtype())
        except (SafetensorError, OSError) as err:
            raise value_error(where, "file", "a readable safetensors file", f"{type(err).__name__}: {err}",
                              "the file is truncated or corrupt; restore it or use another checkpoint") from None
        want = tuple(b - a for a, b in piece["region"])
        if stored_shape != want:
            raise value_error(where, "stored shape", f"{want} (its region {piece['region']})", str(stored_shape))
        if stored_dtype != self.tensors[name]["dtype"]:
            raise value_error(where, "stored dtype", self.tensors[name]["dtype"], stored_dtype)
        return sl, where

    def piece(self, name: str, piece: dict) -> np.ndarray:
        """A whole piece, its checksum verified."""
        _, where = self._slice(name, piece)
        try:
            array = self._files[piece["file"]].get_tensor(piece["key"])
        except SafetensorError as err:
            raise value_error(where, "data", "a readable tensor", str(err), "the file is corrupt") from None
        if sha256(array) != piece["sha256"]:
            raise value_error(where, "sha256", piece["sha256"], sha256(array), "the file is corrupt")
        return array

    def read(self, name: str, region: Region | None = None) -> np.ndarray:
        """The ``region`` (default: all) of tensor ``name``, from the pieces overlapping it."""
        entry = self.tensors[name]
        region = full_region(entry["shape"]) if region is None else region
        parts = []
        for piece in entry["pieces"]:
            own = tuple(tuple(r) for r in piece["region"])
            part = own if not region else overlap(own, region)
            if part is not None:   # stored shapes checked before allocating: a crafted shape cannot
                parts.append((piece, own, part, self._slice(name, piece)[0]))   # ask for huge memory
        out = np.empty(tuple(b - a for a, b in region), dtype=entry["dtype"])
        for piece, own, part, sl in parts:
            inner = tuple(slice(a - s, b - s) for (a, b), (s, _) in zip(part, own))
            if self.verify or part == own:
                block = self.piece(name, piece)[inner]
            else:   # only the slice this rank needs
                block = sl[inner]
            out[tuple(slice(a - s, b - s) for (a, b), (s, _) in zip(part, region))] = block
        return out


def read_all(directory: str, manifest: dict) -> dict[str, np.ndarray]:
    """Every tensor of a validated checkpoint, assembled whole, every piece verified."""
    reader = PieceReader(directory, manifest)
    try:
        return {name: reader.read(name) for name in manifest["tensors"]}
    finally:
        reader.close()
