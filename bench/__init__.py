"""decodebench's measuring side: operators (cases, peers, tuning candidates), measurement, commands and system
models.

Importing bench prepares the process before any kernel module is imported (the kernels package itself
leaves the environment alone): Triton's interpreter where no CUDA device is present (``TRITON_INTERPRET=1``;
an explicit setting always wins), and multiply-add fusion pinned on, so the same kernels round the same way
on every Triton the GPU boxes and CI run (Triton 3.9 warns that its default flips in 3.10). Where kernels
run in the interpreter, it also takes two of the interpreter's Python overheads out (bench/interpreter.py).
"""

import os


def configure_triton() -> None:
    if "TRITON_INTERPRET" not in os.environ:
        import torch

        if not torch.cuda.is_available():
            os.environ["TRITON_INTERPRET"] = "1"
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")


def child_env(**overrides: str) -> dict[str, str]:
    """The environment for a child process of bench's (a compile, a test run, a profiled target): this
    one's, with the repo root on PYTHONPATH so ``python -m bench...`` imports this checkout, and
    ``overrides`` (``TRITON_INTERPRET="0"`` for a compiling child, say)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    path = os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONPATH": path, **overrides}


configure_triton()

import kernels  # noqa: E402  (after the environment is set: @triton.jit reads it at decoration)

if kernels.INTERPRETED:  # Python overhead out of the interpreter's sort and topk: same bits, less time
    from bench.interpreter import speed_up

    speed_up()
