"""Forward-only calls under a parallel context: sharded by the plan (semi_auto_parallel),
local under data parallelism; the results are the serial call's."""
import numpy as np

from autopar.comm import run_in_process
from autopar.context import bound_world, parallel_context
from autopar.models.pangu_alpha import PanguAlpha, PanguAlphaConfig

CONFIG = PanguAlphaConfig.preset("tiny", param_dtype="float64", compute_dtype="float64", init_std=0.5)
IDS = np.random.default_rng(0).integers(0, CONFIG.vocab_size, (4, CONFIG.seq_length)).astype(np.int32)


def run(n: int, mode: str, full_batch: bool, make_model, feed):
    """Per rank: (logits, collective counts, bytes of the weights it holds)."""
    def body(comm):
        with bound_world(comm):
            model = make_model()
            comm.stats.reset()
            out = model(feed(comm.rank))
            held = sum(p._shard[0].data.nbytes if p._shard is not None else p.nbytes
                       for p in model.get_parameters())
            return out, comm.stats.snapshot()["count"], held
    with parallel_context(parallel_mode=mode, full_batch=full_batch):
        return run_in_process(n, body)


def test_model_parallel_forward_equals_serial_with_megatron_communication():
    model = PanguAlpha(CONFIG)
    want = model(IDS)
    res = run(2, "semi_auto_parallel", True, lambda: PanguAlpha(CONFIG.replace(model_parallel=2)), lambda r: IDS)
    for logits, count, held in res:
        np.testing.assert_allclose(logits, want, rtol=1e-10, atol=1e-12)
        # one all-reduce after each row-parallel layer (attention output, FFN down) per layer,
        # one all-gather of the vocabulary-split logits
        assert count == {"allreduce": 2 * CONFIG.num_layers, "allgather": 1}
        assert held < 0.75 * sum(p.nbytes for p in model.get_parameters())   # the big weights are halved


def test_forward_without_full_batch_gives_each_rank_its_rows():
    want = PanguAlpha(CONFIG)(IDS)
    res = run(4, "semi_auto_parallel", False, lambda: PanguAlpha(CONFIG.replace(data_parallel=2, model_parallel=2)),
              lambda r: IDS[r:r + 1])
    for r, (logits, _, _) in enumerate(res):
        np.testing.assert_allclose(logits, want[r:r + 1], rtol=1e-10, atol=1e-12)


def test_data_parallel_forward_runs_locally():
    want = PanguAlpha(CONFIG)(IDS)
    res = run(2, "data_parallel", False, lambda: PanguAlpha(CONFIG), lambda r: IDS[2 * r:2 * r + 2])
    for r, (logits, count, _) in enumerate(res):
        np.testing.assert_allclose(logits, want[2 * r:2 * r + 2], rtol=1e-10, atol=1e-12)
        assert count == {}


def test_carried_state_is_checked():
    import pytest

    from autopar.models.pangu_alpha.generate import PanguAlphaDecoder
    from autopar.runtime.sharded_forward import ShardedForwardProgram

    def body(comm):
        decoder = PanguAlphaDecoder(PanguAlpha(CONFIG.replace(model_parallel=2)))
        b, s, n, d = 1, CONFIG.seq_length, CONFIG.num_heads, CONFIG.head_dim
        ints = np.zeros((b, 1), np.int32)
        args = (ints, ints, ints, np.zeros((b, 1, 1, s)), np.zeros((b, 1, s, 1), bool)) + \
            tuple(np.zeros((b, n, s, d)) for _ in range(2 * CONFIG.num_layers))
        for carry, match in (({99: 5}, "output 99: expected an index below 7"),
                             ({1: 0}, r"output 1 -> argument 0: expected the same shape and dtype"),
                             ({1: 42}, "output 1 -> argument 42: expected the index of an array argument")):
            with pytest.raises(ValueError, match=match):
                ShardedForwardProgram(decoder, args, {}, "semi_auto_parallel", comm, True, None, carry)
        prog = ShardedForwardProgram(decoder, args, {}, "semi_auto_parallel", comm, True, None, decoder.carry())
        with pytest.raises(ValueError, match="a program with carried state takes local shards"):
            prog(args, {})
        return prog.local_zeros(5).shape, prog.local_zeros(0).shape
    for cache, ids in run_in_process(2, body):
        assert cache == (1, CONFIG.num_heads // 2, CONFIG.seq_length, CONFIG.head_dim) and ids == (1, 1)
