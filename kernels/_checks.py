"""Metadata-only argument checks shared by the launchers.

Every check reads shapes, dtypes, strides and devices, never tensor data, so the launchers stay free of host
syncs. A failed check raises ValueError that names the argument and says what was expected; since checks run
before any launch, a rejected call leaves every buffer as it was.
"""

from collections.abc import Iterable, Sequence

import torch


def check_tensor(
    name: str,
    x,
    *,
    ndim: int | None = None,
    dtypes: Iterable[torch.dtype] | None = None,
    device: torch.device | None = None,
) -> None:
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    if ndim is not None and x.dim() != ndim:
        raise ValueError(f"{name}: expected {ndim} dimensions, got shape {tuple(x.shape)}")
    if dtypes is not None:
        dtypes = tuple(dtypes)
        if x.dtype not in dtypes:
            allowed = ", ".join(str(d).removeprefix("torch.") for d in dtypes)
            raise ValueError(
                f"{name}: expected dtype in ({allowed}), got {str(x.dtype).removeprefix('torch.')}"
            )
    if device is not None and x.device != device:
        raise ValueError(f"{name}: expected a tensor on {device}, got one on {x.device}")


def check_shape(name: str, x: torch.Tensor, expected: Sequence[int | None], what: str) -> None:
    """``expected`` holds a size per dimension, None for any size; ``what`` names the dimensions."""
    if len(expected) != x.dim() or any(e is not None and e != s for e, s in zip(expected, x.shape)):
        shown = tuple("*" if e is None else e for e in expected)
        raise ValueError(f"{name}: expected shape {shown} {what}, got {tuple(x.shape)}")


def check_contiguous(name: str, x: torch.Tensor) -> None:
    if not x.is_contiguous():
        raise ValueError(f"{name}: expected a contiguous tensor, got strides {x.stride()}")


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
