"""Language-model data: a flat token file, fixed windows, and a deterministic loader.

    TokenFile(path)                 the whole corpus as one flat array, memory-mapped (T,)
    LMDataset(tokens, S)            sample i = tokens[i*(S+1) : (i+1)*(S+1)]        (S+1,)
    LMLoader(dataset, B, ...)       step k -> global batch k, this rank's rows      (b, S+1)

PanGu-α trains on 1025-token chunks: the model reads ``[:-1]`` and predicts ``[1:]``
(PanguAlphaWithLoss shifts by one). Windows do not overlap; a tail shorter than a window
is not used.

The loader's order is a pure function of ``(seed, step)``::

    steps_per_epoch  P = N // B          (drop_last)   or ceil(N / B)
    epoch            e = step // P
    order of epoch e     np.random.default_rng((seed, e)).permutation(N)   (arange(N) without shuffle)
    global batch         order[(step % P) * B : (step % P + 1) * B]        (B rows; the last one of an
                                                                            epoch shorter without drop_last)
    this rank's rows     global rows [rank * B/dp : (rank + 1) * B/dp]     (full_batch=False)
                         all B rows                                         (full_batch=True)

so ``loader.batch(k)`` is random access, and resuming at step k (``loader.from_step(k)``
or ``load_state_dict``) yields exactly what an uninterrupted run would have seen. Changing
``dp_size`` between runs changes only the slicing, never the global batch.

Under a ``dataset_strategy`` tuple a rank is fed its block of each input, which
:func:`rank_block` cuts from the global batch (``LMLoader(..., full_batch=True)`` gives it).

With ``eod_reset`` each batch also carries ``position_ids`` and ``attention_mask``
computed from the input tokens as PanguAlpha computes them in the graph
(:func:`eod_reset_masks`).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

import numpy as np

from ..context import ParallelContext
from ..errors import check_int, format_error
from ..ir.mesh import Mesh
from ..strategy.sharding_plan import fed_layout, fed_splits

STATE_KEYS = ("seed", "step", "epoch", "step_in_epoch", "global_batch", "num_samples", "shuffle", "drop_last")


class TokenFile:
    """A flat file of token ids (``arr.astype(np.uint16).tofile(path)``), memory-mapped read-only.

    ``len(f)`` is the number of tokens; ``f[a:b]`` reads a slice; ``f.array`` is the memmap (T,).
    """

    def __init__(self, path, dtype=np.uint16):
        where = "TokenFile"
        self.path = os.fspath(path)
        self.dtype = np.dtype(dtype)
        if self.dtype.kind not in "iu":
            raise TypeError(format_error(where, "dtype", "an integer dtype such as uint16", self.dtype.name))
        if not os.path.isfile(self.path):
            raise FileNotFoundError(format_error(where, "path", "an existing token file", repr(self.path),
                                                 "write one with arr.astype(np.uint16).tofile(path)"))
        size = os.path.getsize(self.path)
        if size % self.dtype.itemsize:
            raise ValueError(format_error(
                where, f"size of {self.path!r}",
                f"a multiple of {self.dtype.itemsize} bytes (one {self.dtype.name} token each)",
                f"{size} bytes ({size % self.dtype.itemsize} extra)",
                "check the dtype the file was written with, or whether it was truncated"))
        if size == 0:  # np.memmap cannot map an empty file
            self.array = np.zeros(0, self.dtype)
        else:
            self.array = np.memmap(self.path, dtype=self.dtype, mode="r")    # (T,)

    def __len__(self) -> int:
        return int(self.array.shape[0])

    def __getitem__(self, index):
        return self.array[index]

    def __repr__(self) -> str:
        return f"TokenFile({self.path!r}, {self.dtype.name}, {len(self)} tokens)"


class LMDataset:
    """Consecutive non-overlapping windows of ``seq_length + 1`` tokens.

    ``tokens`` is a TokenFile or a 1-D integer array (T,). ``ds[i]`` is window i as int32
    (S+1,); ``ds.samples(idx)`` stacks several (n, S+1). ``len(ds) = T // (S+1)``.
    """

    def __init__(self, tokens, seq_length: int):
        where = "LMDataset"
        check_int(where, "seq_length", seq_length, 1)
        array = tokens.array if isinstance(tokens, TokenFile) else tokens
        if not isinstance(array, np.ndarray) or array.ndim != 1 or array.dtype.kind not in "iu":
            desc = f"{type(array).__name__} {getattr(array, 'shape', '')} {getattr(array, 'dtype', '')}"
            raise TypeError(format_error(where, "tokens", "a TokenFile or a 1-D integer numpy array", desc.strip()))
        window = seq_length + 1
        if array.shape[0] < window:
            raise ValueError(format_error(where, "seq_length",
                                          f"seq_length + 1 <= the number of tokens ({array.shape[0]})",
                                          f"seq_length={seq_length}", "use a shorter sequence or more data"))
        self.tokens = array                  # (T,)
        self.seq_length = int(seq_length)    # S
        self.window = window                 # S + 1
        self._len = array.shape[0] // window

    def __len__(self) -> int:
        return self._len

    def _check_index(self, i) -> int:
        return check_int("LMDataset", "sample index", i, 0, self._len - 1,
                         expected=f"an int in [0, {self._len})", error=IndexError)

    def __getitem__(self, i) -> np.ndarray:
        start = self._check_index(i) * self.window
        return np.asarray(self.tokens[start:start + self.window], dtype=np.int32)     # (S+1,)

    def samples(self, indices) -> np.ndarray:
        """Windows ``indices`` stacked: (n,) -> (n, S+1) int32."""
        rows = [self[int(i)] for i in np.asarray(indices).reshape(-1)]
        if not rows:
            return np.zeros((0, self.window), np.int32)
        return np.stack(rows)

    def __repr__(self) -> str:
        return f"LMDataset({len(self)} samples of {self.seq_length} + 1 tokens)"


def eod_reset_masks(tokens: np.ndarray, eod_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Positions and attention for documents packed into rows, as PanguAlpha does in the graph.

    tokens (b, S) -> position_ids int32 (b, S), attention_mask bool (b, S, S).

    An EOD token ends the document it belongs to; the next token starts a new one at
    position 0. Query i may attend key j iff j <= i and no EOD lies in tokens[j:i].
    Example, eod = 8: tokens [5, 8, 7, 8, 8, 3] -> positions [0, 1, 0, 1, 0, 0].
    """
    tokens = np.asarray(tokens)
    if tokens.ndim != 2:
        raise ValueError(format_error("eod_reset_masks", "tokens shape", "(batch, seq)", str(tokens.shape)))
    b, s = tokens.shape
    is_eod = tokens == eod_id                                                   # (b, S)
    doc = np.cumsum(is_eod, axis=1) - is_eod                                    # (b, S) document index per token
    causal = np.tril(np.ones((s, s), dtype=bool))                              # (S, S)
    attention_mask = (doc[:, :, None] == doc[:, None, :]) & causal             # (b, S, S)
    starts_doc = np.ones((b, s), dtype=bool)                                    # token i opens a document
    starts_doc[:, 1:] = is_eod[:, :-1]
    arange = np.arange(s)
    doc_start = np.maximum.accumulate(np.where(starts_doc, arange, 0), axis=1)  # (b, S)
    position_ids = (arange - doc_start).astype(np.int32)
    return position_ids, attention_mask


@dataclass(frozen=True, eq=False)
class Batch:
    """One step's rows for this rank. ``net(*batch.inputs())`` feeds PanguAlphaWithLoss.

    input_ids (b, S+1) int32; with eod_reset also position_ids (b, S) int32 and
    attention_mask (b, S, S) bool of the inputs ``input_ids[:, :-1]``; ``sample_ids`` (b,)
    are the dataset indices of the rows.
    """
    step: int
    epoch: int
    sample_ids: np.ndarray
    input_ids: np.ndarray
    position_ids: Optional[np.ndarray] = None
    attention_mask: Optional[np.ndarray] = None

    def inputs(self) -> tuple:
        if self.position_ids is None:
            return (self.input_ids,)
        return (self.input_ids, self.position_ids, self.attention_mask)


class LMLoader:
    """Deterministic, epoch-aware batches of an LMDataset; see the module docstring.

    Iterating yields batches from ``self.step`` on, without end, advancing ``self.step``;
    ``batch(step)`` is the same batch by random access and changes nothing.
    ``state_dict()`` holds ints only, for a JSON checkpoint manifest.
    """

    def __init__(self, dataset: LMDataset, global_batch: int, seed: int = 0, shuffle: bool = True,
                 dp_rank: int = 0, dp_size: int = 1, full_batch: bool = False, eod_reset: bool = False,
                 eod_id: int = 8, drop_last: bool = True):
        where = "LMLoader"
        if not isinstance(dataset, LMDataset):
            raise TypeError(format_error(where, "dataset", "an LMDataset", type(dataset).__name__))
        check_int(where, "global_batch", global_batch, 1)
        check_int(where, "seed", seed, 0)
        check_int(where, "dp_size", dp_size, 1)
        check_int(where, "eod_id", eod_id, 0)
        check_int(where, "dp_rank", dp_rank, 0, dp_size - 1, expected=f"an int in [0, dp_size={dp_size})")
        n = len(dataset)
        if drop_last and n < global_batch:
            raise ValueError(format_error(where, "global_batch", f"<= the number of samples ({n})",
                                          str(global_batch), "use a smaller batch, more data or drop_last=False"))
        if not full_batch and global_batch % dp_size:
            raise ValueError(format_error(where, "global_batch", f"a multiple of dp_size={dp_size}",
                                          str(global_batch), "or pass full_batch=True to give every rank all rows"))
        last = n % global_batch
        if not drop_last and not full_batch and last % dp_size:
            raise ValueError(format_error(where, "drop_last",
                                          f"True, or a last batch ({n} % {global_batch} = {last} samples) "
                                          f"divisible by dp_size={dp_size}", "False", "pass drop_last=True"))
        self.dataset = dataset
        self.global_batch = int(global_batch)
        self.seed = int(seed)
        self.shuffle = bool(shuffle)
        self.dp_rank, self.dp_size = int(dp_rank), int(dp_size)
        self.full_batch = bool(full_batch)
        self.eod_reset, self.eod_id = bool(eod_reset), int(eod_id)
        self.drop_last = bool(drop_last)
        self.num_samples = n
        self.steps_per_epoch = n // global_batch if drop_last else -(-n // global_batch)
        self.step = 0                         # the next step iteration yields
        self._order_cache: tuple[int, np.ndarray] | None = None

    # ---- the order: pure functions of (seed, step) ----

    def epoch_order(self, epoch: int) -> np.ndarray:
        """The sample order of ``epoch``: (N,) int64, a permutation of range(N)."""
        check_int("LMLoader.epoch_order", "epoch", epoch, 0)
        if self._order_cache is not None and self._order_cache[0] == epoch:
            return self._order_cache[1]
        if self.shuffle:
            order = np.random.default_rng((self.seed, int(epoch))).permutation(self.num_samples)
        else:
            order = np.arange(self.num_samples)
        order.setflags(write=False)           # cached: callers get a read-only view
        self._order_cache = (int(epoch), order)
        return order

    def global_sample_ids(self, step: int) -> np.ndarray:
        """Dataset indices of global batch ``step``: (B,) (shorter at an epoch's end without drop_last)."""
        check_int("LMLoader.batch", "step", step, 0)
        epoch, k = divmod(int(step), self.steps_per_epoch)
        b = self.global_batch
        return self.epoch_order(epoch)[k * b:(k + 1) * b].copy()

    def sample_ids(self, step: int) -> np.ndarray:
        """This rank's dataset indices at ``step``: (B,) with full_batch, else (B/dp,)."""
        ids = self.global_sample_ids(step)                                 # (B,)
        if self.full_batch:
            return ids
        local = len(ids) // self.dp_size
        return ids[self.dp_rank * local:(self.dp_rank + 1) * local]        # (B/dp,)

    def batch(self, step: int) -> Batch:
        """This rank's batch at ``step``, exactly what iteration yields there."""
        ids = self.sample_ids(step)
        input_ids = self.dataset.samples(ids)                              # (b, S+1)
        pos = mask = None
        if self.eod_reset:
            pos, mask = eod_reset_masks(input_ids[:, :-1], self.eod_id)    # (b, S), (b, S, S)
        return Batch(int(step), int(step) // self.steps_per_epoch, ids, input_ids, pos, mask)

    # ---- iteration and resumption ----

    def from_step(self, step: int) -> "LMLoader":
        """A copy of this loader whose iteration starts at ``step``."""
        check_int("LMLoader.from_step", "step", step, 0)
        other = object.__new__(LMLoader)
        other.__dict__.update(self.__dict__)
        other.step = int(step)
        return other

    def __iter__(self):
        return self

    def __next__(self) -> Batch:
        out = self.batch(self.step)
        self.step += 1
        return out

    @property
    def epoch(self) -> int:
        return self.step // self.steps_per_epoch

    def state_dict(self) -> dict:
        """Ints only: where iteration stands and what fixes the order."""
        return {"seed": self.seed, "step": self.step, "epoch": self.epoch,
                "step_in_epoch": self.step % self.steps_per_epoch, "global_batch": self.global_batch,
                "num_samples": self.num_samples, "shuffle": int(self.shuffle), "drop_last": int(self.drop_last)}

    def load_state_dict(self, state: dict) -> None:
        """Resume: take ``seed`` and ``step``; the rest must match this loader (dp may differ)."""
        where = "LMLoader.load_state_dict"
        missing = [k for k in STATE_KEYS if k not in state]
        if missing:
            raise ValueError(format_error(where, "state", f"keys {list(STATE_KEYS)}", f"missing {missing}"))
        for key in STATE_KEYS:
            check_int(where, key, state[key], 0)
        for key in ("global_batch", "num_samples", "shuffle", "drop_last"):
            mine = self.state_dict()[key]
            if state[key] != mine:
                raise ValueError(format_error(where, key, f"{mine} (this loader's)", str(state[key]),
                                              "the saved run had another data order; build the loader as it was"))
        epoch, k = divmod(int(state["step"]), self.steps_per_epoch)
        if (state["epoch"], state["step_in_epoch"]) != (epoch, k):
            raise ValueError(format_error(where, "epoch, step_in_epoch", f"({epoch}, {k}) for step {state['step']}",
                                          f"({state['epoch']}, {state['step_in_epoch']})"))
        self.seed = int(state["seed"])
        self.step = int(state["step"])
        self._order_cache = None

    def __repr__(self) -> str:
        split = "full batch" if self.full_batch else f"rank {self.dp_rank}/{self.dp_size}"
        return (f"LMLoader(B={self.global_batch}, {split}, seed={self.seed}, step={self.step}, "
                f"{self.steps_per_epoch} steps/epoch)")


def rank_block(arrays, ctx: ParallelContext, rank: int) -> tuple[np.ndarray, ...]:
    """Rank ``rank``'s block of each array of a global batch, as a sharded program under
    ``ctx`` expects to be fed (``device_num`` set to the ranks running): the whole array
    with ``full_batch`` / an all-1s tuple or ``stand_alone``; its rows ``[p * B/n : (p + 1)
    * B/n]`` under ``"data_parallel"`` (p: the rank's position in its stage of n devices);
    under a ``dataset_strategy`` tuple its block on the device matrix ``(s0, s1, ..., R)``
    of the stage (:func:`autopar.strategy.sharding_plan.fed_layout`). On 4 devices::

        ((2, 1),)   ranks 0, 1: rows 0:B/2    ranks 2, 3: rows B/2:B
        ((2, 2),)   rank 2*i + j: rows block i of 2, columns block j of 2
    """
    arrays = [np.asarray(a) for a in arrays]
    n = ctx.stage_device_num
    check_int("rank_block", "rank", rank, 0, ctx.device_num - 1, expected=f"a rank below device_num={ctx.device_num}")
    whole = ctx.loads_full_batch or not ctx.is_parallel
    splits = fed_splits([a.shape for a in arrays], n, whole, ctx.dataset_strategy)
    stage = Mesh((n,), ("devices",))
    out = []
    for k, (a, s) in enumerate(zip(arrays, splits)):
        for d, (size, ways) in enumerate(zip(a.shape, s)):
            if size % ways:
                raise ValueError(format_error("rank_block", f"input {k} dim {d}", f"a size divisible by its split "
                                              f"{ways} ({s} over {n} devices)", str(size),
                                              "use a batch whose dims the splits divide"))
        out.append(fed_layout(s, stage).shard(a, rank % n))
    return tuple(out)
