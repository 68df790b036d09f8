"""Training steps the MPI tests compare with serial runs."""
from autopar import nn
from autopar.train import AdamWeightDecay


def train(net, cell, ids, steps=3):
    """Three AdamWeightDecay steps with clipping: (losses, trained weights on the host)."""
    opt = AdamWeightDecay(net.trainable_params(), learning_rate=1e-3, weight_decay=0.01)
    step = nn.TrainOneStepCell(cell, opt, clip_norm=1.0)
    losses = [float(step(ids)) for _ in range(steps)]
    return losses, {p.name: p.asnumpy() for p in net.trainable_params()}
