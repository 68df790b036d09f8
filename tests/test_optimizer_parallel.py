"""Optimizer parallel (ZeRO stage 1) on in-process ranks: PanGu-α tiny under dp2, dp4 and
dp2 x mp2 with ``enable_parallel_optimizer`` trains like serial for SGD-momentum, Adam and
AdamWeightDecay (dropout and global-norm clipping on); each rank holds optimizer state for
its slice only (bytes counted exactly); the threshold keeps small weights whole; gradients
are reduce-scattered and weights all-gathered instead of all-reduced; checkpoints of sliced
states load serially and onto other plans."""
import math

import numpy as np
import pytest

from autopar import nn
from autopar.comm import run_in_process
from autopar.context import bound_world, parallel_context
from autopar.ir.layout import Layout
from autopar.ir.mesh import Mesh
from autopar.models.pangu_alpha import PanguAlphaConfig, PanguAlphaWithLoss
from autopar.runtime.shards import gather
from autopar.strategy.optimizer_shard import slice_layout
from autopar.train import SGD, Adam, AdamWeightDecay
from autopar.train import checkpoint as ckpt

CONFIG = PanguAlphaConfig.preset("tiny", dropout_rate=0.1)     # float32, as users train
BATCHES = [np.random.default_rng(k).integers(0, CONFIG.vocab_size, (4, CONFIG.seq_length + 1)).astype(np.int32)
           for k in range(5)]
CLIP = 0.5          # below the first steps' gradient norms: clipping acts
RTOL = 1e-5
OPTIMIZERS = {
    "sgd_momentum": lambda ps: SGD(ps, 0.1, momentum=0.9),
    "adam": lambda ps: Adam(ps, 1e-2),
    "adamw": lambda ps: AdamWeightDecay(ps, 1e-2, weight_decay=0.01),
}
# Adam's step m / (sqrt(v) + eps) is scale-free: where a gradient element is near zero, its
# float32 rounding (which differs between any two summation orders) moves the update by up
# to ~2e-3 of the learning rate. Sharding without optimizer parallel shows the same
# differences (test_reduce_scatter_and_all_gather_replace_all_reduce shows the two runs
# agree); SGD's update is linear in the gradient and stays within rounding.
# The third step's gradients inherit those weight differences (relative to the largest
# gradient element: up to ~1e-5 for Adam, rounding for SGD).
WEIGHT_ATOL = {"sgd_momentum": 1e-7, "adam": 5e-5, "adamw": 5e-5}
GRAD_ATOL = {"sgd_momentum": RTOL, "adam": 1e-4, "adamw": 1e-4}   # times the largest gradient element
PLANS = {"dp2": (2, 1, "data_parallel"), "dp4": (4, 1, "data_parallel"), "dp2xmp2": (2, 2, "semi_auto_parallel")}


def state_bytes(opt) -> int:
    return sum(a.nbytes for states in opt.states for a in states.values())


def train_steps(net, optimizer: str, batches, comm=None, full=True, measure_step=1):
    """Train on ``batches`` (this rank's slice of each when ``full`` is False). Returns the
    losses, gradient norms, the gradients the optimizer got on the last step (whole), the
    weights, the optimizer's state bytes, the comm stats of step ``measure_step`` and the
    trainer."""
    opt = OPTIMIZERS[optimizer](net.trainable_params())
    train = nn.TrainOneStepCell(net, opt, clip_norm=CLIP)
    feed = [b if full or comm is None else np.split(b, comm.size)[comm.rank] for b in batches]
    prog = train.build(feed[0])
    last = []
    update = opt.step
    opt.step = lambda grads: (last.__setitem__(slice(None), [g.copy() for g in grads]), update(grads))
    losses, norms, stats = [], [], None
    for k, ids in enumerate(feed):
        if comm is not None and k == measure_step:
            comm.stats.reset()
        losses.append(float(train(ids)))
        norms.append(train.last_grad_norm)
        if comm is not None and k == measure_step:
            stats = comm.stats.snapshot()
    grads = prog.gathered(last) if hasattr(prog, "gathered") else last
    weights = {p.name: p.asnumpy() for p in net.trainable_params()}
    return {"losses": losses, "norms": norms, "grads": dict(zip(weights, grads)), "weights": weights,
            "state_bytes": state_bytes(opt), "stats": stats, "train": train, "prog": prog}


def run_plan(plan: str, optimizer: str, enable: bool = True, threshold: int = 0, batches=BATCHES[:3]):
    """``train_steps`` on every rank of ``plan``; per rank a dict without the trainer, plus
    the sliced weights' names and the expected state bytes of that rank."""
    dp, mp, mode = PLANS[plan]
    full = mode == "semi_auto_parallel"

    def body(comm):
        with bound_world(comm):
            net = PanguAlphaWithLoss(CONFIG.replace(data_parallel=dp, model_parallel=mp))
            out = train_steps(net, optimizer, batches, comm, full)
            prog = out.pop("prog")
            out.pop("train")
            out["sliced"] = {s.name for s, whole in zip(prog.shards, prog.param_shards) if s is not whole}
            out["expected_bytes"] = expected_state_bytes(prog.param_shards, optimizer, threshold if enable else None)
            out["replicas"] = {s.name: replicas(s.layout) for s in prog.param_shards}
            return out
    with parallel_context(parallel_mode=mode, device_num=dp * mp, full_batch=full,
                          enable_parallel_optimizer=enable, parallel_optimizer_threshold=threshold):
        return run_in_process(dp * mp, body)


def replicas(layout: Layout) -> int:
    """How many ranks hold the same block of a weight in ``layout``."""
    return math.prod(layout.mesh.shape[a] for a in layout.replicated_axes())


def expected_state_bytes(shards, optimizer: str, threshold_kb) -> int:
    """The spec, from shapes alone: a weight of at least ``threshold_kb`` KB whose local block
    has a dim divisible by its replica count r keeps 1/r of the block's state per rank."""
    n_states = {"sgd_momentum": 1, "adam": 2, "adamw": 2}[optimizer]
    total = 0
    for s in shards:
        local, r = math.prod(s.shape), replicas(s.layout)
        sliced = (threshold_kb is not None and s.param.nbytes >= threshold_kb * 1024 and r > 1
                  and any(n % r == 0 for n in s.shape))
        total += n_states * (local // r if sliced else local) * np.dtype(s.dtype).itemsize
    return total


_SERIAL: dict = {}


def serial(optimizer: str, steps: int = 3):
    key = (optimizer, steps)
    if key not in _SERIAL:
        _SERIAL[key] = train_steps(PanguAlphaWithLoss(CONFIG), optimizer, BATCHES[:steps])
    return _SERIAL[key]


# ---- sharded == serial, state bytes cut -----------------------------------------------------

@pytest.mark.parametrize("optimizer", list(OPTIMIZERS))
@pytest.mark.parametrize("plan", list(PLANS))
def test_three_steps_with_optimizer_parallel_equal_serial(plan, optimizer):
    want = serial(optimizer)
    res = run_plan(plan, optimizer)
    dp = PLANS[plan][0]
    grad_scale = max(np.abs(g).max() for g in want["grads"].values())
    for rank, r in enumerate(res):
        np.testing.assert_allclose(r["losses"], want["losses"], rtol=RTOL)
        np.testing.assert_allclose(r["norms"], want["norms"], rtol=RTOL)   # each element counted once
        assert min(want["norms"]) > CLIP                                 # so clipping acted every step
        for name, g in want["grads"].items():   # atol: e.g. the key bias's gradient is zero up to rounding
            np.testing.assert_allclose(r["grads"][name], g, rtol=RTOL, atol=GRAD_ATOL[optimizer] * grad_scale,
                                       err_msg=name)
        for name, w in want["weights"].items():
            np.testing.assert_allclose(r["weights"][name], w, rtol=RTOL, atol=WEIGHT_ATOL[optimizer], err_msg=name)
        # threshold 0: every weight is sliced (PanGu-α tiny's dims all divide by 4) ...
        assert r["sliced"] == set(want["weights"]), rank
        # ... and the state bytes are exactly 1/replicas of each weight's block
        assert r["state_bytes"] == r["expected_bytes"], rank
    if PLANS[plan][2] == "data_parallel":    # every weight is replicated over the dp ranks
        assert set(res[0]["replicas"].values()) == {dp}
        assert res[0]["state_bytes"] * dp == want["state_bytes"]
    # the figures (SGD keeps one state array, the Adams two)
    per_state = {"dp2": 84544, "dp4": 42272, "dp2xmp2": 42272}[plan]
    assert want["state_bytes"] == 169088 * (2 if optimizer != "sgd_momentum" else 1)
    assert [r["state_bytes"] for r in res] == [per_state * (2 if optimizer != "sgd_momentum" else 1)] * len(res)


# ---- the threshold ----------------------------------------------------------------------------

def test_threshold_keeps_small_weights_whole():
    """8 KB on dp2 x mp2: only the FFN weights (16 KB) and the word table (12 KB) are sliced."""
    res = run_plan("dp2xmp2", "adamw", threshold=8, batches=BATCHES[:2])
    want = serial("adamw")
    sizes = {name: w.nbytes for name, w in want["weights"].items()}
    big = {name for name, n in sizes.items() if n >= 8 * 1024}
    assert big == {"word_embedding.embedding_table"} | {
        f"{block}.output.{layer}.weight" for block in ("blocks.0", "blocks.1", "query_layer")
        for layer in ("mapping", "projection")}
    for r in res:
        assert r["sliced"] == big
        assert r["state_bytes"] == r["expected_bytes"]
        np.testing.assert_allclose(r["losses"], serial("adamw", 2)["losses"], rtol=RTOL)
    everything_whole = run_plan("dp2xmp2", "adamw", threshold=1 << 20, batches=BATCHES[:1])
    assert everything_whole[0]["sliced"] == set()
    assert everything_whole[0]["state_bytes"] == everything_whole[0]["expected_bytes"] == 188032


# ---- the collectives ------------------------------------------------------------------------

@pytest.mark.parametrize("plan", ["dp4", "dp2xmp2"])
def test_reduce_scatter_and_all_gather_replace_all_reduce(plan):
    """Against the same plan without optimizer parallel: the collectives of a step, and the
    same losses and weights (the reduce-scatter sums what the all-reduce summed and the
    update is elementwise, so nothing changes but where the update runs)."""
    on = run_plan(plan, "adamw", batches=BATCHES[:2])[0]
    off = run_plan(plan, "adamw", enable=False, batches=BATCHES[:2])[0]
    np.testing.assert_allclose(on["losses"], off["losses"], rtol=1e-6)
    for name, w in off["weights"].items():
        np.testing.assert_allclose(on["weights"][name], w, rtol=1e-6, atol=1e-9, err_msg=name)
    # model parallelism alone keeps 188032 B of AdamWeightDecay state per rank on dp2 x mp2
    assert (on["state_bytes"], off["state_bytes"]) == {"dp4": (84544, 338176), "dp2xmp2": (84544, 188032)}[plan]
    n = len(on["sliced"])
    c_on, c_off = on["stats"]["count"], off["stats"]["count"]
    assert c_off.get("reduce_scatter", 0) == 0
    # one all-gather of the new slices per sliced weight per step
    assert c_on["allgather"] - c_off.get("allgather", 0) == n
    # every reduce-scatter takes the place of one all-reduce
    assert c_off["allreduce"] - c_on["allreduce"] == c_on["reduce_scatter"]
    if plan == "dp4":
        # every gradient is reduce-scattered; the all-reduces left are scalars (loss, norm)
        assert c_on["reduce_scatter"] == n == 53
        assert c_on["allreduce"] == 3
        # the reduce-scatters take the same gradient buffers the all-reduces took (16 B: scalars)
        assert on["stats"]["bytes"]["reduce_scatter"] == off["stats"]["bytes"]["allreduce"] - 16
        assert on["stats"]["bytes"]["allgather"] * 4 == on["stats"]["bytes"]["reduce_scatter"]
    else:
        # three tables are the exceptions: the position and top-query tables' gradients are
        # computed whole on every rank (nothing to reduce, each rank slices its part), and
        # the word table's two partial gradients (lookup and tied head, in different
        # layouts) are all-reduced before they are added, as without optimizer parallel
        assert c_on["reduce_scatter"] == n - 3 == 50


# ---- checkpoints -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def dp2_checkpoint(tmp_path_factory):
    """Two AdamWeightDecay steps under dp2 with optimizer parallel, a checkpoint, two more
    steps (the uninterrupted run)."""
    path = str(tmp_path_factory.mktemp("zero") / "ck")

    def body(comm):
        with bound_world(comm):
            net = PanguAlphaWithLoss(CONFIG.replace(data_parallel=2))
            opt = AdamWeightDecay(net.trainable_params(), 1e-2, weight_decay=0.01)
            train = nn.TrainOneStepCell(net, opt, clip_norm=CLIP)
            first = [float(train(np.split(BATCHES[k], 2)[comm.rank])) for k in range(2)]
            ckpt.save_checkpoint(train, path, extra={"next_batch": 2})
            values = {p.name: p.asnumpy() for p in net.trainable_params()}
            for t, states in zip(opt.params, opt.states):
                for s, a in states.items():
                    values[f"{s}.{t.name}"] = gather(a, t.layout, t.param.shape, comm)
            rest = [float(train(np.split(BATCHES[k], 2)[comm.rank])) for k in range(2, 4)]
            return first, rest, values, {t.name: str(t.layout) for t in opt.params}
    with parallel_context(parallel_mode="data_parallel", device_num=2, enable_parallel_optimizer=True,
                          parallel_optimizer_threshold=0):
        res = run_in_process(2, body)
    return path, res[0]


def test_sliced_states_are_saved_once_per_slice(dp2_checkpoint):
    path, (_, _, values, layouts) = dp2_checkpoint
    assert layouts["blocks.0.output.mapping.weight"] == "[S(data), R]"   # the state's slice layout
    _, manifest = ckpt.read_manifest(path)
    assert set(manifest["tensors"]) == set(values)
    for name, e in manifest["tensors"].items():
        files = sorted(p["file"] for p in e["pieces"])
        if e["kind"] == "state":      # each rank wrote the half it updates
            assert files == ["rank0.safetensors", "rank1.safetensors"], name
            assert e["layout"]["tensor_map"][0] == 0, name
        else:                         # weights are whole on both ranks: written once
            assert files == ["rank0.safetensors"], name
    loaded = ckpt.load_checkpoint(path)
    for name, want in values.items():
        np.testing.assert_array_equal(loaded[name], want, err_msg=name)


def test_sliced_checkpoint_resumes_serially(dp2_checkpoint):
    path, (_, rest, _, _) = dp2_checkpoint
    net = PanguAlphaWithLoss(CONFIG)
    train = nn.TrainOneStepCell(net, AdamWeightDecay(net.trainable_params(), 1e-2, weight_decay=0.01),
                                clip_norm=CLIP)
    assert ckpt.load_distributed_checkpoint(train, path) == {"next_batch": 2}
    assert train.optimizer.step_count == 2
    np.testing.assert_allclose([float(train(BATCHES[k])) for k in (2, 3)], rest, rtol=RTOL)


@pytest.mark.parametrize("enable", [True, False])
def test_sliced_checkpoint_resumes_on_dp2_mp2(dp2_checkpoint, enable):
    """Onto another plan, with the states sliced another way (or whole over dp)."""
    path, (_, rest, values, _) = dp2_checkpoint

    def body(comm):
        with bound_world(comm):
            net = PanguAlphaWithLoss(CONFIG.replace(data_parallel=2, model_parallel=2))
            train = nn.TrainOneStepCell(net, AdamWeightDecay(net.trainable_params(), 1e-2, weight_decay=0.01),
                                        clip_norm=CLIP)
            extra = ckpt.load_distributed_checkpoint(train, path, inputs=(BATCHES[2],))
            for t, states in zip(train.optimizer.params, train.optimizer.states):   # this rank's regions
                for s, a in states.items():
                    np.testing.assert_array_equal(a, values[f"{s}.{t.name}"][t.region])
            return extra, [float(train(BATCHES[k])) for k in (2, 3)], state_bytes(train.optimizer)
    with parallel_context(parallel_mode="semi_auto_parallel", device_num=4, full_batch=True,
                          enable_parallel_optimizer=enable, parallel_optimizer_threshold=0):
        res = run_in_process(4, body)
    for extra, losses, nbytes in res:
        assert extra == {"next_batch": 2}
        np.testing.assert_allclose(losses, rest, rtol=RTOL)
        assert nbytes == (84544 if enable else 188032)


# ---- the slice layout ---------------------------------------------------------------------------

def test_slice_layout_worked_example():
    mesh = Mesh((2, 2), ("x", "y"))
    weight = Layout(mesh, ((1,), ()))                                # [S(y), R], replicated over x
    sliced = slice_layout(weight, (128, 32), 4, threshold_kb=0)
    assert str(sliced) == "[S(y,x), R]"
    rank = mesh.rank_at((1, 0))                                      # x=1, y=0
    assert weight.slices(rank, (128, 32))[0] == slice(0, 64)
    assert sliced.slices(rank, (128, 32))[0] == slice(32, 64)


def test_slice_layout_leaves_weights_whole_when_it_must():
    dp4 = Mesh((4,), ("dp",))
    rep = Layout.replicated(dp4, 2)
    assert slice_layout(rep, (6, 10), 4, 0) is None                   # no dim divides by 4
    assert str(slice_layout(rep, (6, 8), 4, 0)) == "[R, S(dp)]"       # the first dim that does
    assert str(slice_layout(rep, (16, 16), 4, 1)) == "[S(dp), R]"     # 1024 B: at the threshold
    assert slice_layout(rep, (16, 15), 4, 1) is None                  # 960 B < 1 KB
    assert slice_layout(Layout(dp4, ((0,), ())), (8, 8), 4, 0) is None  # split, not replicated


def test_dp2_mp2_optimizer_parallel_with_every_layer_recomputed_equals_serial():
    """ZeRO-1 slices and recompute together (dropout on: the rebuilt masks must match)."""
    serial = train_steps(PanguAlphaWithLoss(CONFIG), "adamw", BATCHES[:3])

    def body(comm):
        with bound_world(comm):
            net = PanguAlphaWithLoss(CONFIG.replace(data_parallel=2, model_parallel=2))
            for layer in list(net.backbone.blocks) + [net.backbone.query_layer]:
                layer.recompute()
            out = train_steps(net, "adamw", BATCHES[:3], comm, True)
            return out["losses"], out["weights"], out["state_bytes"]
    with parallel_context(parallel_mode="semi_auto_parallel", device_num=4, full_batch=True,
                          enable_parallel_optimizer=True, parallel_optimizer_threshold=0):
        res = run_in_process(4, body)
    for losses, weights, nbytes in res:
        np.testing.assert_allclose(losses, serial["losses"], rtol=RTOL)
        for name, w in serial["weights"].items():
            np.testing.assert_allclose(weights[name], w, rtol=RTOL, atol=WEIGHT_ATOL["adamw"], err_msg=name)
        assert nbytes < serial["state_bytes"] / 2       # states sliced: mp halves, dp halves again where replicated
