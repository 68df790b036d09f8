"""benchmarks/_common.py's gc_watch: what the GPU step benchmark prints about garbage collection."""
import gc
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from _common import gc_watch  # noqa: E402


def test_gc_watch_counts_the_collections_inside_the_block_by_generation():
    gc.collect()
    with gc_watch() as seen:
        gc.collect(0)
        gc.collect(2)
        gc.collect(2)
    counts = list(seen["collections"])
    assert counts[2] == 2 and counts[0] >= 1    # the collector may run generation 0 on its own too
    assert seen["seconds"] > 0.0
    gc.collect(1)                                # after the block: not counted, the callback is gone
    assert seen["collections"][1] == counts[1]
