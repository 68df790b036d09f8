"""Property-based: random strategies, layouts, meshes and configs fed to the validators give
a valid value or a ValueError/TypeError -- never another exception, never a hang."""
import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from autopar import ops
from autopar.context import ParallelContext
from autopar.ir.layout import Layout
from autopar.ir.mesh import Mesh
from autopar.models.pangu_alpha import PanguAlphaConfig
from autopar.ops.sharding import from_strategy

ANY = st.one_of(st.none(), st.booleans(), st.integers(-3, 9), st.floats(-2, 9), st.just(float("nan")),
                st.text(max_size=3), st.lists(st.integers(-2, 5), max_size=3))
SPLITS = st.lists(st.one_of(st.lists(st.one_of(st.integers(-2, 9), st.floats(0, 4), st.none()), max_size=4),
                            st.integers(0, 4)), max_size=3)
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def only_user_errors(fn, *args, **kwargs):
    try:
        return fn(*args, **kwargs)
    except (ValueError, TypeError):
        return None


@FUZZ
@given(SPLITS)
def test_shard_accepts_or_rejects_cleanly(splits):
    only_user_errors(ops.MatMul().shard, splits)


@FUZZ
@given(st.lists(st.integers(-1, 4), min_size=1, max_size=3), st.lists(st.integers(-1, 9), max_size=9),
       st.lists(st.lists(st.integers(-1, 4), max_size=3), max_size=4), st.lists(st.integers(-1, 4), max_size=3))
def test_mesh_and_layout_validate(shape, ranks, dims, partial):
    mesh = only_user_errors(Mesh, tuple(shape), (), tuple(ranks))
    if mesh is None:
        return
    lay = only_user_errors(Layout, mesh, tuple(map(tuple, dims)), tuple(partial))
    if lay is not None:
        only_user_errors(lay.local_shape, (8,) * lay.ndim)
        only_user_errors(lay.to_mindspore)


@FUZZ
@given(st.lists(st.lists(st.integers(1, 5), min_size=2, max_size=2), min_size=2, max_size=2),
       st.sampled_from([1, 2, 3, 4, 6, 8]))
def test_user_strategies_plan_or_fail_cleanly(strategy, devices):
    mm = ops.MatMul()
    specs = [ops.TensorSpec((8, 6), np.dtype(np.float32)), ops.TensorSpec((6, 4), np.dtype(np.float32))]
    indexing = mm.indexing(specs, mm.infer(*specs))
    sharding = only_user_errors(from_strategy, indexing, strategy, [s.shape for s in specs], Mesh((devices,)))
    if sharding is not None:  # a valid plan: its layouts divide the shapes
        for i, s in enumerate(specs):
            sharding.input_layout(i).local_shape(s.shape)


@FUZZ
@given(st.dictionaries(st.sampled_from(["vocab_size", "seq_length", "hidden_size", "num_layers", "num_heads",
                                        "ffn_hidden_size", "dropout_rate", "eod_id", "pad_id", "compute_dtype",
                                        "layer_order", "data_parallel", "model_parallel", "vocab_emb_dp"]),
                       ANY, max_size=4))
def test_model_config_validates(changes):
    try:
        PanguAlphaConfig.preset("tiny", **changes)
    except (ValueError, TypeError):
        pass


@FUZZ
@given(st.dictionaries(st.sampled_from(["parallel_mode", "device_num", "global_rank", "gradients_mean",
                                        "full_batch", "dataset_strategy", "search_mode", "pipeline_stages",
                                        "enable_parallel_optimizer", "strategy_ckpt_save_file"]),
                       ANY, max_size=4))
def test_parallel_context_validates(changes):
    only_user_errors(ParallelContext, **changes)
