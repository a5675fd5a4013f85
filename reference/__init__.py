"""Plain-PyTorch twins of kernels/: same module names, same signatures, same semantics. Imports torch only."""
