"""PLACEHOLDER: being written; replace this whole file."""
from .primitive import Primitive

class BroadcastTo(Primitive):
    pass


class Concat(Primitive):
    pass


class ExpandDims(Primitive):
    pass


class Reshape(Primitive):
    pass


class Slice(Primitive):
    pass


class Squeeze(Primitive):
    pass


class StridedSlice(Primitive):
    pass


class Tile(Primitive):
    pass


class Transpose(Primitive):
    pass


def getitem(x, index):
    raise NotImplementedError
