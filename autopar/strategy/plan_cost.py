"""What the cost model returns: the cost of one op under one sharding (:class:`NodeCost`),
of a whole plan (:class:`PlanCost`), and how ops run one after another add up
(:func:`issued_seconds`: summed on a CPU, the longer of host issue and device work on a GPU)."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from .profile import MachineProfile


@dataclass(frozen=True)
class NodeCost:
    """One op under one sharding, per rank: seconds and bytes."""
    compute_s: float           # forward + backward kernels
    comm_s: float              # collectives inside the kernels
    grad_s: float              # reduction of its parameters' gradients into their layouts
    update_s: float            # optimizer update of the parameters it owns
    param_bytes: int           # weights it owns (local)
    grad_bytes: int
    state_bytes: int           # optimizer states (local, after optimizer-parallel division)
    activation_bytes: int      # kept for backward
    flops: float = 0.0         # forward + backward, local
    bytes_moved: float = 0.0   # forward + backward, local (what op_rate divides)
    backward_s: float = 0.0    # the part of compute_s its backward runs (recompute and gradient sums included)
    flight_bytes: int = 0      # its output's gradient, in its output layout (the op search's memory proxy)
    # compute_s and update_s in parts: the device's work and the host's issue (the same on a
    # CPU, whose compute_s is their sum; on a GPU, whose host runs ahead, a stage or step
    # takes the longer of the two sums: ``async_seconds``)
    work_s: float = 0.0
    host_s: float = 0.0
    update_work_s: float = 0.0
    update_host_s: float = 0.0
    gather_s: float = 0.0      # level3: the weights' per-use all-gathers in grad_s (what prefetch may hide)

    @property
    def seconds(self) -> float:
        return self.compute_s + self.comm_s + self.grad_s + self.update_s

    @property
    def bytes(self) -> int:
        return self.param_bytes + self.grad_bytes + self.state_bytes + self.activation_bytes


@dataclass(frozen=True)
class PlanCost:
    """Predicted step of a plan, per rank of the stage."""
    compute_s: float
    comm_s: float              # redistributions between ops + in-kernel collectives + gradient reductions
    update_s: float
    param_bytes: int
    grad_bytes: int
    state_bytes: int
    activation_bytes: int      # kept for backward: all alive at the end of forward
    per_op: tuple = field(default=(), repr=False)   # (node name, strategy, layout, comm_s, seconds)
    backward_peak_bytes: int | None = None   # max over backward of gradients made + activations still kept
    backward_working_bytes: int = 0   # the same without the gradients (a later micro-batch's, which add into them)
    grad_comm_s: float = 0.0   # the weight gradients' reductions (buckets under comm_fusion), all of them
    grad_exposed_s: float = 0.0   # the part of grad_comm_s not hidden behind backward (what comm_s holds)
    gather_comm_s: float = 0.0    # level3: the weights' per-use all-gathers, all of them
    gather_exposed_s: float = 0.0   # the part of gather_comm_s not hidden by prefetch (what comm_s holds)

    @property
    def step_seconds(self) -> float:
        return self.compute_s + self.comm_s + self.update_s

    @property
    def memory_bytes(self) -> int:
        """The step's peak, the larger of its two phases (module docstring)::

            weights + states + max(activations at the end of forward,
                                   max over backward of gradients so far + activations still kept)

        Without ``backward_peak_bytes`` (a cost built by hand): everything added up."""
        if self.backward_peak_bytes is None:
            return self.param_bytes + self.grad_bytes + self.state_bytes + self.activation_bytes
        return self.param_bytes + self.state_bytes + max(self.activation_bytes, self.backward_peak_bytes)

    def summary(self) -> dict:
        return {"step_seconds": self.step_seconds, "memory_bytes_per_rank": self.memory_bytes,
                "breakdown": {"compute_s": self.compute_s, "comm_s": self.comm_s, "update_s": self.update_s,
                              "param_bytes": self.param_bytes, "grad_bytes": self.grad_bytes,
                              "state_bytes": self.state_bytes, "activation_bytes": self.activation_bytes,
                              "grad_comm_s": self.grad_comm_s, "grad_exposed_s": self.grad_exposed_s}}


def issued_seconds(costs: Sequence[NodeCost], profile: MachineProfile) -> tuple[float, float]:
    """(compute, update) seconds of ``costs`` run one after another. Summed op by op; on an
    asynchronous device (a GPU profile) the host queues kernels while the device runs earlier
    ones, so a run takes the longer of the host's issue and the device's work, each summed
    (the per-op longer-of-the-two, what the op search adds up, overcounts wherever host-bound
    and device-bound ops alternate)."""
    if not profile.asynchronous:
        return sum(c.compute_s for c in costs), sum(c.update_s for c in costs)
    return (max(sum(c.work_s for c in costs), sum(c.host_s for c in costs)),
            max(sum(c.update_work_s for c in costs), sum(c.update_host_s for c in costs)))
