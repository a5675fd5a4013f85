"""Plain-PyTorch twins of kernels/: same module names, same signatures, same semantics. Imports torch only
(and kernels._pool_reads, the block pools' torch-only host reads both pools share)."""
