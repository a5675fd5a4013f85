"""Metadata-only argument checks shared by the launchers.

Every check reads shapes, dtypes, strides and devices, never tensor data, so the launchers stay free of host
syncs. A failed check raises ValueError that names the argument and says what was expected; since checks run
before any launch, a rejected call leaves every buffer as it was. The first tensor a launcher checks (device
None) must be on a device the kernels run on; the others on its device.
"""

import math
from collections.abc import Iterable, Sequence

import torch

from kernels import INTERPRETED


def runs_on(device: torch.device) -> bool:
    """Whether kernels take tensors of ``device``: CUDA; the CPU too in Triton's interpreter, and on a machine
    with no GPU at all (where the static report captures launches with CPU tensors and launches nothing)."""
    if device.type == "cuda":
        return True
    return device.type == "cpu" and (INTERPRETED or not torch.cuda.is_available())


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
    if device is None and not runs_on(x.device):
        kinds = "a CUDA or CPU" if runs_on(torch.device("cpu")) else "a CUDA"
        raise ValueError(f"{name}: expected a tensor on {kinds} device, got one on {x.device}")


def check_int(name: str, value, low: int, high: int | None = None) -> int:
    """A Python int (not a bool) in [low, high] (high None: no upper bound)."""
    if (
        isinstance(value, bool)
        or not isinstance(value, int)
        or value < low
        or (high is not None and value > high)
    ):
        span = f"[{low}, {high}]" if high is not None else f">= {low}"
        raise ValueError(f"{name}: expected an integer {span}, got {value!r}")
    return value


def check_device(name: str, device) -> torch.device:
    """A constructor's device argument (None: torch's default device), resolved: one the kernels take
    tensors of (runs_on) and that this machine has."""
    try:
        resolved = torch.get_default_device() if device is None else torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ValueError(f"{name}: expected a torch.device or a device string, got {device!r}") from None
    if not runs_on(resolved) or (resolved.type == "cuda" and not torch.cuda.is_available()):
        raise ValueError(
            f"{name}: expected a device the kernels take tensors of (CUDA, or the CPU where they are "
            f"interpreted), got {resolved}"
        )
    return resolved


def check_shape(name: str, x: torch.Tensor, expected: Sequence[int | None], what: str) -> None:
    """``expected`` holds a size per dimension, None for any size; ``what`` names the dimensions."""
    if len(expected) != x.dim() or any(e is not None and e != s for e, s in zip(expected, x.shape)):
        shown = tuple("*" if e is None else e for e in expected)
        raise ValueError(f"{name}: expected shape {shown} {what}, got {tuple(x.shape)}")


def check_contiguous(name: str, x: torch.Tensor) -> None:
    if not x.is_contiguous():
        raise ValueError(f"{name}: expected a contiguous tensor, got strides {x.stride()}")


def check_buffer(
    name: str, tensor, shape: tuple, dtype: torch.dtype, device, *, what: str = "", hint: str = ""
):
    """A caller-owned (workspace) buffer: a contiguous tensor of exactly this shape, dtype and device."""
    if (
        isinstance(tensor, torch.Tensor)
        and tuple(tensor.shape) == tuple(shape)
        and tensor.dtype == dtype
        and tensor.device == device
        and tensor.is_contiguous()
    ):
        return
    got = (
        f"{tuple(tensor.shape)} {dtype_name(tensor.dtype)} on {tensor.device}"
        if isinstance(tensor, torch.Tensor)
        else type(tensor).__name__
    )
    raise ValueError(
        f"{name}: expected {what}contiguous {shape} {dtype_name(dtype)} on {device}{hint}, got {got}"
    )


def _byte_extent(x: torch.Tensor) -> tuple[int, int] | None:
    """[first, last + 1) bytes any element of ``x`` can occupy: data_ptr (the storage's address plus the
    storage offset) up to the farthest element its sizes and strides reach. None when it holds no memory
    (no elements, or on meta)."""
    if x.numel() == 0 or x.device.type == "meta":
        return None
    start = x.data_ptr()
    reach = sum((size - 1) * stride for size, stride in zip(x.shape, x.stride()))
    return start, start + (reach + 1) * x.element_size()


def _extents(named: dict) -> list[tuple[str, torch.device, int, int]]:
    """(name, device, first byte, end byte) of each tensor holding memory; other values are skipped."""
    found = []
    for name, x in named.items():
        extent = _byte_extent(x) if isinstance(x, torch.Tensor) else None
        if extent is not None:
            found.append((name, x.device, *extent))
    return found


def _meet(a: tuple, b: tuple) -> bool:
    return a[1] == b[1] and a[2] < b[3] and b[2] < a[3]


def may_overlap(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two tensors' memory can overlap, from metadata only: their byte extents meet on one device.
    Conservative: interleaved views that share no element (x[::2], x[1::2]) count as overlapping. Tensors
    on different devices, or without memory, never overlap; different allocations have disjoint extents."""
    found = _extents({"a": a, "b": b})
    return len(found) == 2 and _meet(*found)


def check_disjoint(tensors: dict, others: dict | None = None) -> None:
    """No two of ``tensors`` (argument name -> tensor), and none of them and one of ``others``, may share
    memory (may_overlap); ``others`` may share memory among themselves. A call passes what it writes as
    ``tensors`` and what it reads as ``others`` (or what it reads as ``tensors`` and what it writes as
    ``others``, to name the read one first). Raises ValueError naming both arguments. Non-tensors (checked
    elsewhere) and None are skipped. Each extent is computed once: a few microseconds a call."""
    firsts, seconds = _extents(tensors), _extents(others or {})
    for i, first in enumerate(firsts):
        for second in firsts[i + 1 :] + seconds:
            if _meet(first, second):
                raise ValueError(
                    f"{first[0]}: expected no memory shared with {second[0]}, got overlapping byte ranges "
                    f"({first[3] - first[2]} bytes at {first[2]:#x} and {second[3] - second[2]} bytes at "
                    f"{second[2]:#x})"
                )


def is_positive_finite(value) -> bool:
    """A Python int or float (not a bool) in (0, inf); NaN, inf and ints past float's range are not."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return 0 < float(value) < math.inf
    except OverflowError:
        return False


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _check_scale(name: str, scale, device: torch.device):
    """None means 1.0; a float stays a float (a kernel argument); a tensor must be one fp32 element."""
    if scale is None:
        return 1.0
    if isinstance(scale, torch.Tensor):
        check_tensor(name, scale, dtypes=(torch.float32,), device=device)
        if scale.numel() != 1:
            raise ValueError(f"{name}: expected one per-tensor scale, got shape {tuple(scale.shape)}")
        return scale
    if is_positive_finite(scale):
        return float(scale)
    raise ValueError(
        f"{name}: expected None, a positive finite float or a one-element fp32 tensor, got {scale!r}"
    )


def check_fp8_scale(name: str, scale, cache_dtype: torch.dtype, device: torch.device):
    """One per-tensor scale, ready for a kernel: (scale, scale_in_memory). fp8 e4m3 caches take a float
    (passed by value) or a one-element fp32 device tensor (read by the kernel); other caches take none."""
    if cache_dtype != torch.float8_e4m3fn:
        if scale is not None:
            raise ValueError(f"{name}: a scale applies only to float8_e4m3fn caches, got {scale!r}")
        return 1.0, False
    scale = _check_scale(name, scale, device)
    return scale, isinstance(scale, torch.Tensor)


def check_fp8_scales(k_scale, v_scale, cache_dtype: torch.dtype, device: torch.device):
    """Per-tensor K and V scales, ready for a kernel: (k_scale, v_scale, scales_in_memory). Each as
    check_fp8_scale takes it, both of one kind (floats, or tensors). Neither way reads the device or
    allocates."""
    k_scale, k_in_memory = check_fp8_scale("k_scale", k_scale, cache_dtype, device)
    v_scale, v_in_memory = check_fp8_scale("v_scale", v_scale, cache_dtype, device)
    if k_in_memory != v_in_memory:
        raise ValueError("v_scale: expected the same kind as k_scale (both floats or both tensors)")
    return k_scale, v_scale, k_in_memory
