"""autopar.nn: cells, parameters, layers, losses and training wrappers (MindSpore's names)."""
from .cell import Cell, CellList, SequentialCell
from .initializer import Constant, Initializer, Normal, One, TruncatedNormal, Uniform, Zero
from .parameter import Parameter
