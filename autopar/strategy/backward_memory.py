"""The backward pass's memory, walked op by op in reverse.

While op j's backward runs, a rank holds, beside the weights and optimizer states:

* the weight gradients made so far (ops >= j);
* the activations ops <= j keep for their backward (op j frees its own when done);
* what op j's recompute region rebuilt for it;
* the *activation gradients in flight*: the gradient of every value that some op after j
  has already sent a gradient into and whose producer (j or earlier) has not yet consumed
  it -- op j's output gradient (its ``dy``), the input gradients it makes (its ``dx``), and
  the gradients waiting across it (a residual stream's, while its branch runs backward).

A value v made by op p(v) and read, gradient-wise, last by op c(v) has its gradient alive
from c(v)'s backward to p(v)'s: over the ops p(v) <= j <= c(v). Without the last term the
peak of a transformer's last pipeline stage misses the (B, S, V) gradient of its logits,
as large as the logits themselves (issue 13: pipeline memory under-predicted by 12-19%).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from itertools import accumulate

from ..ir.graph import Node, gradient_inputs


def backward_peak(grads: list[int], freed: list[int], working: list[int] | None = None) -> int:
    """Peak of gradients + activations over a backward pass that walks the ops in reverse:
    op j's backward makes ``grads[j]`` bytes of gradients while the activations of ops
    0..j are still kept and ``working[j]`` bytes besides (the values its recompute region
    rebuilt, the activation gradients in flight), then frees ``freed[j]``."""
    alive, made, peak = sum(freed), 0, 0
    working = working or [0] * len(grads)
    for g, f, w in zip(reversed(grads), reversed(freed), reversed(working)):
        made += g
        peak = max(peak, made + alive + w)
        alive -= f
    return peak


def gradients_in_flight(forward: Sequence[Node], needs_grad, params, nbytes: Callable[[int], int]) -> list[int]:
    """Per op j of ``forward`` (in forward order): bytes of the activation gradients alive
    while j's backward runs, each value v over the ops p(v) <= j <= c(v) (module doc).
    ``nbytes(v)``: v's local bytes; weights' gradients are counted apart.

    A gradient that is a view of another is not counted twice: an op whose primitive
    declares its input gradients not fresh (a reshape, an add handing dy back) gives the
    only reader-made gradient of an input of its output's size in dy's own buffer, which
    then lives from the first value's producer to the last reader of the buffer's owner."""
    made = {v: j for j, n in enumerate(forward) for v in n.outputs}
    last: dict[int, int] = {}
    readers: dict[int, int] = {}
    for j, n in enumerate(forward):
        for v, wanted in zip(n.inputs, gradient_inputs(n, needs_grad)):
            if wanted and v in made and v not in params:
                last[v] = j
                readers[v] = readers.get(v, 0) + 1
    owner: dict[int, int] = {}                        # value -> the value whose gradient buffer it shares
    for v in sorted(last, key=last.get, reverse=True):     # backward order: a reader's output first
        n = forward[last[v]]
        out = n.outputs[0]
        shares = (readers[v] == 1 and out in owner and not n.prim.grads_are_fresh()
                  and nbytes(v) == nbytes(out))
        owner[v] = owner[out] if shares else v
    span: dict[int, tuple[int, int]] = {}             # buffer -> (first op, last op) it is alive over
    for v, o in owner.items():
        lo, hi = span.get(o, (made[v], last[v]))
        span[o] = (min(lo, made[v]), max(hi, last[v]))
    change = [0] * (len(forward) + 1)
    for o, (lo, hi) in span.items():
        b = nbytes(o)
        change[lo] += b
        change[hi + 1] -= b
    return list(accumulate(change[:-1]))


def recomputed_walk(grads: Sequence[int], layer: Sequence[int | None], kept: Sequence[int],
                    layer_inputs: dict[int, int], in_flight: Sequence[int]) -> tuple[int, int]:
    """(peak with the gradients made so far, peak without them) of one backward pass over
    ops in forward order whose stacked layers are all recomputed: op j in layer ``layer[j]``
    (None: outside the stack) keeps ``kept[j]`` bytes; a layer keeps only its inputs
    (``layer_inputs[k]``) until its backward rebuilds all its ops' ``kept`` at once; an op
    outside keeps its own. ``in_flight``: :func:`gradients_in_flight` per op."""
    outside = sum(b for b, k in zip(kept, layer) if k is None)
    inputs = sum(layer_inputs.values())
    whole: dict[int, int] = {}
    for b, k in zip(kept, layer):
        if k is not None:
            whole[k] = whole.get(k, 0) + b
    made = peak = bare = 0
    for j in reversed(range(len(grads))):
        k = layer[j]
        rebuilt = whole[k] if k is not None else 0  # while layer k runs backward, all of it rebuilt
        made += grads[j]
        alive = outside + inputs + rebuilt + in_flight[j]
        peak, bare = max(peak, made + alive), max(bare, alive)
        if k is None:
            outside -= kept[j]
        elif j == 0 or layer[j - 1] != k:           # layer k done: its input and rebuilt values go
            inputs -= layer_inputs.get(k, 0)
    return peak, bare
