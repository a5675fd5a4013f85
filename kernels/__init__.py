"""Triton kernels for the decode-side hot spots, each with a thin launcher that never syncs the host.

The package leaves the process environment alone. Triton decides between compiling and interpreting when
a ``@triton.jit`` is evaluated, so on a machine with no CUDA device set ``TRITON_INTERPRET=1`` before the
first kernel module is imported; decodebench's entry points (``bench``, the root ``conftest.py``) do it.
"""

import os

#: True when kernels run in Triton's interpreter (TRITON_INTERPRET set when the package was imported).
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
