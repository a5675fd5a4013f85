"""Triton kernels for the decode-side hot spots, each with a thin launcher that never syncs the host.

On a machine with no CUDA device the kernels run in Triton's interpreter: ``TRITON_INTERPRET`` must be set
before the first ``@triton.jit`` is evaluated, so it is decided here, before any kernel module is imported.
An explicit ``TRITON_INTERPRET`` in the environment always wins.
"""

import os


def _interpret_without_gpu() -> bool:
    if "TRITON_INTERPRET" not in os.environ:
        import torch

        if not torch.cuda.is_available():
            os.environ["TRITON_INTERPRET"] = "1"
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


#: True when kernels run in Triton's interpreter (no GPU, or TRITON_INTERPRET=1 set by the user).
INTERPRETED = _interpret_without_gpu()

if INTERPRETED:
    from kernels._interpreter import speed_up

    speed_up()

# Triton 3.9 warns that its default for fusing multiply-adds flips in 3.10. Keep it on, explicitly, so the
# same kernels round the same way on every Triton version the GPU boxes and CI run.
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
