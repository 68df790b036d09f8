"""autopar.nn: cells, parameters, layers, losses and training wrappers (MindSpore's names)."""
from .cell import Cell, CellList, SequentialCell
from .initializer import Constant, Initializer, Normal, One, TruncatedNormal, Uniform, Zero, as_initializer
from .layers import GELU, Dense, Dropout, Embedding, LayerNorm, RMSNorm, causal_mask
from .lm_loss import NextTokenLoss
from .loss import SoftmaxCrossEntropyWithLogits
from .loss_scale import DynamicLossScaleUpdateCell, FixedLossScaleUpdateCell, TrainOneStepWithLossScaleCell
from .optimizers import SGD, Adam, AdamWeightDecay, Optimizer  # MindSpore keeps optimizers in nn (nn.Adam)
from .parameter import Parameter
from .pipeline import GradAccumulationCell, PipelineCell, set_pipeline_stages
from .wrappers import TrainingDivergedError, TrainOneStepCell, WithLossCell, overflow
