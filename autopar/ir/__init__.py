"""The plain values every layer shares; imports nothing else from autopar.

    spec      TensorSpec: shape and dtype, no data
    graph     Graph, Node, Value: the traced program
    mesh      Mesh: ranks as a device matrix
    layout    Layout: how a tensor lives on a mesh (split, partial, replicated)
    strategy  Strategy: MindSpore's per-op split counts
    random    the counter-based RNG (parameters, dropout masks)
    tracing   the tracing context: which tracer records op calls
"""
