"""A stand-in for CUDA graph capture on the CPU, for the tests of sdxl_core/text_graphs.py and its callers."""

from __future__ import annotations

from torch.utils._pytree import tree_flatten


def replay_by_rerun(fn, args):
    """What ``sdxl_core.text_graphs.capture_cuda_graph`` returns, without a GPU: ``replay()`` writes ``fn(*args)``
    into the recorded outputs' memory, as a graph replay does."""
    outputs = fn(*args)
    leaves, _ = tree_flatten(outputs)

    def replay():
        fresh, _ = tree_flatten(fn(*args))
        for old, new in zip(leaves, fresh, strict=True):
            old.copy_(new)

    return replay, outputs
