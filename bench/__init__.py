"""decodebench's measuring side: cases, timing, device facts, static and traffic reports, results, CLI.

Importing bench imports kernels first, which selects Triton's interpreter on a machine with no GPU.
"""

import kernels  # noqa: F401  (sets TRITON_INTERPRET before any kernel module is imported)
