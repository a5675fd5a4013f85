"""NVTX ranges around timed calls: the ``nvtx`` package when installed, torch's bindings otherwise, nothing
on a machine without CUDA. A range costs nothing when no profiler is attached."""

from contextlib import contextmanager

try:
    import nvtx as _nvtx
except ImportError:  # the GPU boxes here have no nvtx package; torch.cuda.nvtx does the same job
    _nvtx = None


@contextmanager
def nvtx_range(message: str, color: str = "green"):
    if _nvtx is not None:
        with _nvtx.annotate(message, color=color):  # default domain, as torch's ranges: one filter fits both
            yield
        return
    import torch

    if not torch.cuda.is_available():
        yield
        return
    torch.cuda.nvtx.range_push(message)
    try:
        yield
    finally:
        torch.cuda.nvtx.range_pop()
