"""Stage placement and stage-boundary transfers priced as the runtime runs them: stage s on
the stage-major ranks ``s*n .. s*n + n - 1`` (a stage straddling two nodes pays inter-node
collectives, a boundary between nodes inter-node sends), and each boundary value sent as
its local block in its own dtype, forward and its gradient back."""
import numpy as np
import pytest

from autopar import models  # noqa: F401  (registers the families)
from autopar.strategy.pipeline.registry import model_family
from autopar.strategy.pipeline.stage_search import StageCoster, boundary_crosses_nodes, transfer_seconds
from autopar.strategy.profile import MachineProfile, load_profile

TINY = dict(num_layers=5)          # 4 pipelined blocks + the query layer; hidden 32, sequence 16


def profile(per_node: int, same_links: bool = False) -> MachineProfile:
    """a100-8's figures with ``per_node`` devices a node; ``same_links``: inter-node links
    as fast as intra-node ones."""
    d = load_profile("a100-8").to_dict() | {"devices_per_node": per_node}
    if same_links:
        d |= {"inter_node_latency_s": d["intra_node_latency_s"],
              "inter_node_bandwidth_bytes_per_s": d["intra_node_bandwidth_bytes_per_s"]}
    return MachineProfile.from_dict(d)


def test_boundary_sends_are_the_local_block_in_the_values_dtype():
    fam = model_family("pangu_alpha", "tiny", **TINY)
    layer = StageCoster(fam, 8, profile(8)).parts(4, 2, 2, 8, False)[1]
    g = fam.graph(8, 2, 2, one_layer=True)
    x = next(n for n in g.nodes if n.scope.startswith("blocks.0")).inputs[0]     # the residual stream in
    itemsize = np.dtype(g.spec(x).dtype).itemsize
    local = 8 // 2 * 16 * 32 * itemsize          # (B/dp, S, H): split over dp, whole over mp
    assert layer.boundary_sends == (local,) and layer.boundary_grads == (local,)


def test_a_boundary_between_nodes_pays_inter_node_sends_and_one_inside_a_node_does_not():
    prof = profile(4)                            # 8 devices, 2 nodes; 4 stages of 2 ranks
    assert [boundary_crosses_nodes(b, 2, 4) for b in range(3)] == [False, True, False]
    layer = StageCoster(model_family("pangu_alpha", "tiny", **TINY), 8, prof).parts(2, 1, 2, 4, False)[1]
    nbytes = 4 * 16 * 32 * 4                     # (B, S, H) float32 per rank, forward and back
    intra = 2 * (prof.intra_node_latency_s + nbytes / prof.intra_node_bandwidth_bytes_per_s)
    inter = 2 * (prof.inter_node_latency_s + nbytes / prof.inter_node_bandwidth_bytes_per_s)
    got = [transfer_seconds(prof, 4, s, 2, layer) for s in range(4)]
    assert got == pytest.approx([intra, intra + inter, inter + intra, intra], rel=1e-12)


def test_a_stage_straddling_two_nodes_is_priced_with_inter_node_collectives():
    fam = model_family("pangu_alpha", "tiny", **TINY)
    # 3 devices a node, stages of 2: stage 1 holds ranks 2 and 3, on nodes 0 and 1
    straddling = StageCoster(fam, 6, profile(3)).parts(2, 1, 2, 4, False, first_rank=2)[1]
    at_zero = StageCoster(fam, 6, profile(3)).parts(2, 1, 2, 4, False, first_rank=0)[1]
    # its one model-parallel group {2, 3} crosses the nodes: every collective at inter-node figures
    slow_links = StageCoster(fam, 6, profile(1)).parts(2, 1, 2, 4, False)[1]
    assert straddling.comm_s == pytest.approx(slow_links.comm_s, rel=1e-12)
    assert straddling.comm_s > 2 * at_zero.comm_s
    same = StageCoster(fam, 6, profile(3, same_links=True)).parts(2, 1, 2, 4, False, first_rank=2)[1]
    assert same.comm_s == pytest.approx(at_zero.comm_s, rel=1e-12)
