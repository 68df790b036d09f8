"""Training steps the MPI tests compare with serial runs."""
import numpy as np

import autopar
from autopar import nn
from autopar.train import AdamWeightDecay


def train(net, cell, ids, steps=3):
    """Three AdamWeightDecay steps with clipping: (losses, trained weights on the host)."""
    opt = AdamWeightDecay(net.trainable_params(), learning_rate=1e-3, weight_decay=0.01)
    step = nn.TrainOneStepCell(cell, opt, clip_norm=1.0)
    losses = [float(step(ids)) for _ in range(steps)]
    return losses, {p.name: p.asnumpy() for p in net.trainable_params()}


def serial_run(make_net, ids, target: str = "GPU"):
    """The serial run on the CPU -- loss, gradients, three steps' losses and weights -- with
    the device target set back to ``target`` after."""
    autopar.set_context(device_target="CPU")
    try:
        loss, grads = autopar.value_and_grad(make_net().set_train(True))(ids)
        net = make_net()
        return loss, grads, train(net, net, ids)
    finally:
        autopar.set_context(device_target=target)


def assert_like_serial(got, serial, rtol: float, atol: float) -> None:
    """A parallel run's (loss, gradients, (losses, weights)) equal the serial run's."""
    (got_loss, got_grads, (got_losses, got_weights)), (loss, grads, (losses, weights)) = got, serial
    np.testing.assert_allclose(got_loss, loss, rtol=rtol)
    assert sorted(got_grads) == sorted(grads)
    for name, g in grads.items():
        np.testing.assert_allclose(got_grads[name], g, rtol=rtol, atol=atol, err_msg=name)
    np.testing.assert_allclose(got_losses, losses, rtol=rtol)
    for name, w in weights.items():
        np.testing.assert_allclose(got_weights[name], w, rtol=rtol, atol=atol, err_msg=name)
