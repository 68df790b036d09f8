"""The compile cache is keyed on everything that changes a program: changing a context field
(search mode, optimizer parallel, dataset strategy, the strategy file) between two calls
compiles the program that field asks for, never the old one silently."""
from __future__ import annotations

import numpy as np

from autopar import context, nn
from autopar.comm import run_in_process
from autopar.context import bound_world, parallel_context
from autopar.models.pangu_alpha import PanguAlphaConfig, PanguAlphaWithLoss
from autopar.runtime.compiled import grad_program
from autopar.runtime.optimizer_parallel import SliceShard
from autopar.train import SGD

CONFIG = PanguAlphaConfig.preset("tiny", num_layers=1)
IDS = np.random.default_rng(0).integers(0, CONFIG.vocab_size, (4, CONFIG.seq_length + 1)).astype(np.int32)


def switch(comm, **changes) -> None:
    """Change the (process-wide) context between two calls, with every rank between calls."""
    comm.barrier()
    if comm.rank == 0:
        context.set_auto_parallel_context(**changes)
    comm.barrier()


def call(comm, net, ids):
    """(loss, collectives counted by this call, the program it ran)."""
    before = comm.stats.snapshot()["count"]
    train = nn.TrainOneStepCell(net, SGD(net.trainable_params(), 0.0))   # lr 0: weights stay
    loss = float(train(ids))
    after = comm.stats.snapshot()["count"]
    prog = grad_program(net, (ids,), {}, train.params)
    return loss, {k: after[k] - before.get(k, 0) for k in after if after[k] != before.get(k, 0)}, prog


def cached_and_fresh(comm, net, ids):
    """The same call on the net compiled before (cached) and on a fresh copy of it; each
    called twice, the second call compared (the first after a change also moves the
    parameters from the old program's layout into the new one's)."""
    fresh = PanguAlphaWithLoss(CONFIG.replace(model_parallel=net.config.model_parallel))
    return [[call(comm, n, ids) for _ in range(2)][1] for n in (net, fresh)]


def body(comm, path):
    with bound_world(comm):
        rows = np.split(IDS, comm.size)[comm.rank]
        results = {}
        net = PanguAlphaWithLoss(CONFIG)
        first = call(comm, net, rows)
        switch(comm, enable_parallel_optimizer=True, parallel_optimizer_threshold=0)
        results["optimizer parallel"] = (*cached_and_fresh(comm, net, rows), first[2])
        switch(comm, dataset_strategy="full_batch")
        results["dataset strategy"] = (*cached_and_fresh(comm, net, IDS), first[2])

        mp = PanguAlphaWithLoss(CONFIG.replace(model_parallel=2))
        switch(comm, parallel_mode="auto_parallel", dataset_strategy="full_batch", enable_parallel_optimizer=False,
               search_mode="sharding_propagation", strategy_ckpt_save_file=path)
        first = call(comm, mp, IDS)            # rule-made strategies (mp2), written to the file
        switch(comm, search_mode="dynamic_programming", strategy_ckpt_save_file="")
        results["search mode"] = (*cached_and_fresh(comm, mp, IDS), first[2])
        switch(comm, search_mode="sharding_propagation", strategy_ckpt_load_file=path)
        results["strategy file"] = (*cached_and_fresh(comm, mp, IDS), first[2])
        return results


def test_changing_a_context_field_between_calls_compiles_the_program_it_asks_for(tmp_path):
    with parallel_context(parallel_mode="data_parallel", device_num=2):
        per_rank = run_in_process(2, body, str(tmp_path / "plan.json"))
    for results in per_rank:
        for change, ((loss, counts, prog), (fresh_loss, fresh_counts, _), before) in results.items():
            assert prog is not before, f"{change}: the program compiled before the change ran again"
            assert loss == fresh_loss, change
            assert counts == fresh_counts, (change, counts, fresh_counts)
        zero = results["optimizer parallel"][0]
        assert any(isinstance(s, SliceShard) for s in zero[2].shards)          # the ZeRO program
        assert zero[1].get("reduce_scatter", 0) > 0
        whole, rows = results["dataset strategy"][0][0], results["optimizer parallel"][0][0]
        assert whole != rows                                                 # the batch read whole
