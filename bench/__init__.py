"""decodebench's measuring side: operators, measurement, the whole-model package and commands.

Importing bench changes nothing in the process. Entry points (the CLI, the root conftest, spawned ranks)
call ``bench.interpreter.setup()`` before any kernel module is imported: it selects Triton's interpreter
where no CUDA device is present and takes two of its Python overheads out (bench/interpreter.py).
"""

import os


def child_env(**overrides: str) -> dict[str, str]:
    """The environment for a child process of bench's (a compile, a test run, a profiled target): this
    one's, with the repo root on PYTHONPATH so ``python -m bench...`` imports this checkout, and
    ``overrides`` (``TRITON_INTERPRET="0"`` for a compiling child, say)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    path = os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONPATH": path, **overrides}
