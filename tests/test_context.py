"""The parallel context: validation, MindSpore's setters and getters, reset, the with-block, init."""
import numpy as np
import pytest

import autopar
from autopar import context as ctx_module
from autopar import (ParallelContext, ParallelMode, get_auto_parallel_context, get_group_size, get_rank,
                     init, parallel_context, reset_auto_parallel_context, set_auto_parallel_context)

DEFAULTS = dict(parallel_mode="stand_alone", device_num=1, global_rank=0, gradients_mean=False,
                full_batch=False, dataset_strategy="data_parallel", search_mode="dynamic_programming",
                pipeline_stages=1, enable_parallel_optimizer=False, parallel_optimizer_threshold=64,
                strategy_ckpt_save_file="", strategy_ckpt_load_file="", cost_profile="", auto_pipeline=False,
                comm_fusion={}, parallel_optimizer_config={"optimizer_level": "level1",
                                                           "optimizer_weight_shard_size": -1,
                                                           "gradient_accumulation_shard": False},
                all_reduce_fusion_config=[],
                strategy_ckpt_config={"load_file": "", "save_file": "", "only_trainable_params": True},
                grad_accumulation_step=1)


@pytest.fixture(autouse=True)
def fresh_state(monkeypatch):
    """Each test starts before init() with default settings, and leaves nothing behind."""
    monkeypatch.setattr(ctx_module._STATE, "world", None)
    monkeypatch.setattr(ctx_module._STATE, "context", ParallelContext())


class FakeWorld:
    def __init__(self, rank, size):
        self.rank, self.size = rank, size


def fake_mpiexec(monkeypatch, rank, size):
    """Pretend mpiexec started ``size`` processes; returns the list of worlds init() made.
    (init() would install the abort handler over pytest's hooks: it is recorded instead.)"""
    made = []
    monkeypatch.setattr(ctx_module, "_world", lambda checks: made.append(FakeWorld(rank, size)) or made[-1])
    monkeypatch.setattr(ctx_module, "install_abort_handler", lambda: None)
    return made


# --- the value ---------------------------------------------------------------------------

def test_defaults():
    assert ParallelContext().as_dict() == DEFAULTS
    assert ctx_module.FIELD_NAMES == tuple(DEFAULTS)
    assert {n: get_auto_parallel_context(n) for n in DEFAULTS} == DEFAULTS
    assert ParallelMode.MODES == ("stand_alone", "data_parallel", "semi_auto_parallel", "auto_parallel")


NON_DEFAULT = dict(parallel_mode="semi_auto_parallel", device_num=8, global_rank=5, gradients_mean=True,
                   full_batch=True, dataset_strategy="full_batch", search_mode="sharding_propagation",
                   pipeline_stages=2, enable_parallel_optimizer=True, parallel_optimizer_threshold=0,
                   strategy_ckpt_save_file="out.json", strategy_ckpt_load_file="in.json",
                   cost_profile="a100-8", auto_pipeline=True,
                   comm_fusion={"allreduce": {"mode": "index", "config": [2, 5]},
                                "allgather": {"mode": "size", "config": 32}},
                   parallel_optimizer_config={"optimizer_level": "level3", "optimizer_weight_shard_size": 2,
                                              "gradient_accumulation_shard": True},
                   all_reduce_fusion_config=[2, 5],
                   strategy_ckpt_config={"load_file": "in.json", "save_file": "out.json",
                                         "only_trainable_params": False},
                   grad_accumulation_step=4)


@pytest.mark.parametrize("name", list(NON_DEFAULT))
def test_set_get_round_trip_each_field(name):
    set_auto_parallel_context(device_num=8)  # room for global_rank and pipeline_stages
    set_auto_parallel_context(**NEEDS.get(name, {}))
    set_auto_parallel_context(**{name: NON_DEFAULT[name]})
    assert get_auto_parallel_context(name) == NON_DEFAULT[name]
    others = {n: v for n, v in DEFAULTS.items()
              if n not in (name, "device_num") + VIEWS.get(name, ()) + tuple(NEEDS.get(name, {}))}
    assert {n: get_auto_parallel_context(n) for n in others} == others


# keys that need another set first
NEEDS = {"grad_accumulation_step": {"parallel_mode": "semi_auto_parallel"}}
# keys that are two views of one setting: setting one changes what the other reads
VIEWS = {"strategy_ckpt_save_file": ("strategy_ckpt_config",), "strategy_ckpt_load_file": ("strategy_ckpt_config",),
         "strategy_ckpt_config": ("strategy_ckpt_save_file", "strategy_ckpt_load_file"),
         "all_reduce_fusion_config": ("comm_fusion",)}


def test_two_views_of_one_setting_agree():
    set_auto_parallel_context(strategy_ckpt_config={"save_file": "s.json", "only_trainable_params": False})
    assert get_auto_parallel_context("strategy_ckpt_save_file") == "s.json"
    set_auto_parallel_context(strategy_ckpt_load_file="l.json")
    assert get_auto_parallel_context("strategy_ckpt_config") == {"load_file": "l.json", "save_file": "s.json",
                                                                 "only_trainable_params": False}
    set_auto_parallel_context(all_reduce_fusion_config=[3])
    assert get_auto_parallel_context("comm_fusion") == {"allreduce": {"mode": "index", "config": [3]}}
    with pytest.raises(ValueError, match=r"all_reduce_fusion_config: expected the comm_fusion allreduce rule"):
        set_auto_parallel_context(comm_fusion={"allreduce": {"mode": "auto"}})
    with pytest.raises(ValueError, match=r"strategy_ckpt_config: expected a dict with keys among"):
        set_auto_parallel_context(strategy_ckpt_config={"save": "x.json"})


def test_set_all_fields_at_once():
    set_auto_parallel_context(**NON_DEFAULT)
    assert ctx_module.current_context().as_dict() == NON_DEFAULT
    assert ctx_module.current_context().as_dict() == ParallelContext(**NON_DEFAULT).as_dict()
    assert ctx_module.current_context().explicit == set(NON_DEFAULT)   # what the joint search leaves alone


def test_explicit_records_what_the_user_fixed_even_at_a_default():
    set_auto_parallel_context(device_num=4, parallel_mode="auto_parallel", pipeline_stages=1)
    ctx = ctx_module.current_context()
    assert ctx.is_set("pipeline_stages") and not ctx.is_set("enable_parallel_optimizer")
    assert ParallelContext(device_num=4, pipeline_stages=2).is_set("pipeline_stages")   # away from the default
    assert not ParallelContext(device_num=4).is_set("pipeline_stages")


def test_dataset_strategy_tuple_normalised_and_hashable():
    set_auto_parallel_context(dataset_strategy=[[2, np.int64(1)], (2, 1)])
    value = get_auto_parallel_context("dataset_strategy")
    assert value == ((2, 1), (2, 1))
    assert all(type(s) is int for split in value for s in split)
    hash(ctx_module.current_context())


def test_int_fields_accept_numpy_ints_and_store_python_ints():
    c = ParallelContext(device_num=np.int64(8), global_rank=np.int32(3))
    assert (c.device_num, c.global_rank) == (8, 3)
    assert type(c.device_num) is int and type(c.global_rank) is int


BAD = [
    ("parallel_mode", "model_parallel", {}),
    ("parallel_mode", "SEMI_AUTO_PARALLEL", {}),
    ("parallel_mode", None, {}),
    ("device_num", 0, {}),
    ("device_num", -4, {}),
    ("device_num", 2.0, {}),
    ("device_num", "8", {}),
    ("device_num", True, {}),
    ("global_rank", -1, {}),
    ("global_rank", 8, {"device_num": 8}),
    ("global_rank", 1, {}),
    ("global_rank", 1.5, {"device_num": 8}),
    ("gradients_mean", 1, {}),
    ("gradients_mean", "yes", {}),
    ("full_batch", None, {}),
    ("dataset_strategy", "model_parallel", {}),
    ("dataset_strategy", (), {}),
    ("dataset_strategy", (2, 1), {}),
    ("dataset_strategy", ((2, 1), ()), {}),
    ("dataset_strategy", ((2, 0),), {}),
    ("dataset_strategy", ((2, 1.5),), {}),
    ("dataset_strategy", ((2, True),), {}),
    ("dataset_strategy", 4, {}),
    ("search_mode", "brute_force", {}),
    ("search_mode", "", {}),
    ("pipeline_stages", 0, {}),
    ("pipeline_stages", 3, {"device_num": 8}),
    ("pipeline_stages", 2, {}),
    ("enable_parallel_optimizer", "True", {}),
    ("parallel_optimizer_threshold", -1, {}),
    ("parallel_optimizer_threshold", 64.0, {}),
    ("strategy_ckpt_save_file", None, {}),
    ("strategy_ckpt_load_file", 3, {}),
]


@pytest.mark.parametrize("name, bad, before", BAD, ids=[f"{n}={b!r}" for n, b, _ in BAD])
def test_invalid_value_names_field_and_value(name, bad, before):
    set_auto_parallel_context(**before)
    kept = ctx_module.current_context()
    with pytest.raises(ValueError) as err:
        set_auto_parallel_context(**{name: bad})
    msg = str(err.value)
    assert f"{name}:" in msg and repr(bad) in msg, msg
    assert ctx_module.current_context() is kept  # a failed set changes nothing
    with pytest.raises(ValueError, match=name):
        ParallelContext(**{**before, name: bad})


def test_cross_field_errors_name_the_other_field():
    with pytest.raises(ValueError, match=r"global_rank: expected an int in \[0, device_num\) = \[0, 8\), got 9"):
        ParallelContext(device_num=8, global_rank=9)
    with pytest.raises(ValueError, match=r"pipeline_stages: expected a divisor of device_num = 6, got 4"):
        ParallelContext(device_num=6, pipeline_stages=4)
    with pytest.raises(ValueError, match="full_batch"):
        ParallelContext(full_batch=True, dataset_strategy=((2, 1),))


def test_lowering_device_num_below_set_rank_is_rejected():
    set_auto_parallel_context(device_num=8, global_rank=5, pipeline_stages=4)
    with pytest.raises(ValueError, match=r"global_rank: .*\[0, 4\), got 5"):
        set_auto_parallel_context(device_num=4)
    with pytest.raises(ValueError, match="pipeline_stages: .*device_num = 6, got 4"):
        set_auto_parallel_context(device_num=6, global_rank=0)
    assert get_auto_parallel_context("device_num") == 8


def test_unknown_names_list_the_valid_ones():
    for call in (lambda: set_auto_parallel_context(device_nums=8),
                 lambda: get_auto_parallel_context("micro_batch_num"),
                 lambda: ParallelContext().replace(mode="data_parallel"),
                 lambda: parallel_context(stages=2).__enter__()):
        with pytest.raises(ValueError) as err:
            call()
        assert "'device_num'" in str(err.value) and "'pipeline_stages'" in str(err.value)


def test_setting_one_field_at_a_time_merges():
    set_auto_parallel_context(parallel_mode=ParallelMode.SEMI_AUTO_PARALLEL)
    set_auto_parallel_context(device_num=8)
    set_auto_parallel_context(global_rank=5)
    set_auto_parallel_context(pipeline_stages=2)
    assert ctx_module.current_context() == ParallelContext(parallel_mode="semi_auto_parallel", device_num=8,
                                                           global_rank=5, pipeline_stages=2)


def test_replace_returns_new_value_and_leaves_old():
    a = ParallelContext(device_num=8)
    b = a.replace(global_rank=7, gradients_mean=True)
    assert (a.global_rank, a.gradients_mean) == (0, False)
    assert (b.device_num, b.global_rank, b.gradients_mean) == (8, 7, True)
    with pytest.raises(ValueError, match="global_rank"):
        a.replace(global_rank=8)


def test_frozen():
    with pytest.raises(AttributeError):
        ParallelContext().device_num = 4


def test_hash_and_equality():
    a = ParallelContext(device_num=8, dataset_strategy=((2, 1), (2, 1)))
    b = ParallelContext(device_num=np.int64(8), dataset_strategy=[[2, 1], [2, 1]])
    c = a.replace(global_rank=1)
    assert a == b and hash(a) == hash(b)
    assert a != c
    assert len({a, b, c}) == 2


def test_prints_in_one_short_line_with_non_defaults_only():
    assert repr(ParallelContext()) == "ParallelContext()"
    c = ParallelContext(parallel_mode="semi_auto_parallel", device_num=8, pipeline_stages=2)
    assert str(c) == "ParallelContext(parallel_mode='semi_auto_parallel', device_num=8, pipeline_stages=2)"
    assert eval(repr(c), {"ParallelContext": ParallelContext}) == c


def test_derived_properties():
    c = ParallelContext(parallel_mode="semi_auto_parallel", device_num=8, pipeline_stages=4)
    assert c.stage_device_num == 2
    assert c.is_parallel
    assert not c.replace(parallel_mode="stand_alone").is_parallel
    assert not ParallelContext(parallel_mode="data_parallel", device_num=1).is_parallel
    assert ParallelContext(full_batch=True).loads_full_batch
    assert ParallelContext(dataset_strategy="full_batch").loads_full_batch
    assert not ParallelContext().loads_full_batch


# --- reset and the with-block --------------------------------------------------------------

def test_reset_restores_defaults():
    set_auto_parallel_context(**NON_DEFAULT)
    reset_auto_parallel_context()
    assert ctx_module.current_context() == ParallelContext()
    assert {n: get_auto_parallel_context(n) for n in DEFAULTS} == DEFAULTS


def test_context_manager_sets_and_restores():
    set_auto_parallel_context(device_num=8, global_rank=3)
    before = ctx_module.current_context()
    with parallel_context(parallel_mode="auto_parallel", pipeline_stages=2) as inside:
        assert ctx_module.current_context() is inside
        assert inside == before.replace(parallel_mode="auto_parallel", pipeline_stages=2)
        with parallel_context(global_rank=7):
            assert get_auto_parallel_context("global_rank") == 7
        assert get_auto_parallel_context("global_rank") == 3
    assert ctx_module.current_context() is before


def test_context_manager_restores_when_block_raises():
    before = ctx_module.current_context()
    with pytest.raises(RuntimeError, match="boom"):
        with parallel_context(device_num=4, parallel_mode="data_parallel"):
            assert get_auto_parallel_context("device_num") == 4
            raise RuntimeError("boom")
    assert ctx_module.current_context() is before


def test_context_manager_restores_over_sets_inside_block():
    with parallel_context(device_num=4):
        set_auto_parallel_context(global_rank=2)
    assert ctx_module.current_context() == ParallelContext()


def test_context_manager_with_invalid_value_changes_nothing():
    with pytest.raises(ValueError, match="pipeline_stages"):
        with parallel_context(pipeline_stages=3):
            pass
    assert ctx_module.current_context() == ParallelContext()


# --- init and the world ---------------------------------------------------------------------

def test_rank_and_size_before_init():
    assert (get_rank(), get_group_size()) == (0, 1)


def test_init_without_mpiexec_is_rank_0_of_1_and_keeps_settings():
    set_auto_parallel_context(device_num=8, global_rank=3)  # planning 8 ranks on one process
    init()
    assert (get_rank(), get_group_size()) == (0, 1)
    assert ctx_module.current_context() == ParallelContext(device_num=8, global_rank=3)
    init()  # idempotent
    assert (get_rank(), get_group_size()) == (0, 1)


def test_init_under_mpiexec_sets_device_num_and_rank(monkeypatch):
    made = fake_mpiexec(monkeypatch, rank=2, size=4)
    set_auto_parallel_context(parallel_mode="semi_auto_parallel")
    init("nccl")
    assert (get_rank(), get_group_size()) == (2, 4)
    assert ctx_module.current_context() == ParallelContext(parallel_mode="semi_auto_parallel",
                                                           device_num=4, global_rank=2)
    set_auto_parallel_context(pipeline_stages=2)
    init()  # idempotent: one world, and the context is not touched again
    assert len(made) == 1
    assert get_auto_parallel_context("pipeline_stages") == 2
    reset_auto_parallel_context()  # keeps the world's device_num and rank
    assert ctx_module.current_context() == ParallelContext(device_num=4, global_rank=2)


def test_init_accepts_matching_explicit_device_num(monkeypatch):
    fake_mpiexec(monkeypatch, rank=3, size=4)
    set_auto_parallel_context(device_num=4, pipeline_stages=2)
    init()
    assert ctx_module.current_context() == ParallelContext(device_num=4, global_rank=3, pipeline_stages=2)


def test_init_rejects_conflicting_device_num(monkeypatch):
    fake_mpiexec(monkeypatch, rank=0, size=4)
    set_auto_parallel_context(device_num=8)
    with pytest.raises(ValueError, match=r"init: device_num: expected 4 .*got 8"):
        init()
    assert (get_rank(), get_group_size()) == (0, 1)  # init did not happen


def test_init_rejects_conflicting_global_rank(monkeypatch):
    fake_mpiexec(monkeypatch, rank=1, size=4)
    set_auto_parallel_context(device_num=4, global_rank=3)
    with pytest.raises(ValueError, match=r"init: global_rank: expected 1 .*got 3"):
        init()


def test_init_rejects_unknown_backend():
    with pytest.raises(ValueError, match="backend_name.*'gloo'"):
        init("gloo")
    assert ctx_module._STATE.world is None


def test_public_names_exported():
    for name in ("init", "get_rank", "get_group_size", "set_auto_parallel_context", "get_auto_parallel_context",
                 "reset_auto_parallel_context", "ParallelContext", "ParallelMode", "parallel_context"):
        assert name in autopar.__all__ and getattr(autopar, name) is getattr(ctx_module, name)


@pytest.mark.parametrize("name", sorted(ctx_module.NOT_SUPPORTED))
def test_mindspore_keys_autopar_does_not_take_are_refused_by_name_with_what_to_do(name):
    before = ctx_module.current_context()
    with pytest.raises(ValueError) as err:
        set_auto_parallel_context(**{name: 1}, search_mode="recursive_programming")
    text = str(err.value)
    assert f"set_auto_parallel_context: {name}: expected a key autopar supports" in text
    assert ctx_module.NOT_SUPPORTED[name] in text
    assert ctx_module.current_context() is before          # nothing was set, not even the valid key beside it


def test_hybrid_parallel_mode_is_refused_by_name_with_the_alternative():
    with pytest.raises(ValueError, match=r"parallel_mode: expected one of .*\(hybrid_parallel is not supported\), "
                                         r"got 'hybrid_parallel'; autopar inserts every collective itself"):
        set_auto_parallel_context(parallel_mode="hybrid_parallel")
