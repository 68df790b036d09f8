"""PLACEHOLDER: being written; replace this whole file."""
from .primitive import Primitive

class ArgMax(Primitive):
    pass


class Cumsum(Primitive):
    pass


class ReduceMax(Primitive):
    pass


class ReduceMean(Primitive):
    pass


class ReduceMin(Primitive):
    pass


class ReduceSum(Primitive):
    pass


