"""Per-GPU launch-configuration tables chosen by measurement, and the lookup the launchers share.

A launcher's heuristics (tile sizes, warps, pipeline depth) are pure functions of shapes; what is fastest
on one GPU is an empirical fact about that GPU. ``decodebench tune`` times each launcher's candidates on a
GPU and writes ``kernels/configs/<gpu-slug>.json``; a launcher asks ``choose(kernel, key, device, ...)``
and gets the table's entry for its key when the running GPU has a table and the table has the key, its
heuristic otherwise. The key is a string the launcher derives from metadata only (dtypes, head_dim, group
size, row width...), never from device data, so choosing costs a dict lookup and no host sync.

Table layout (written by ``decodebench tune``, bench/measure/tuning.py; committed by a human with
``decodebench tune --install``):

    {"gpu": "NVIDIA H100 80GB HBM3", "slug": "nvidia-h100-80gb-hbm3", "triton": "3.6.0", ...,
     "kernels": {"paged_decode": {"q=bfloat16 kv=bfloat16 group=4 head_dim=128":
                                  {"BLOCK_N": 64, "num_warps": 4, "num_stages": 2}}}}

Keys spell dtypes as torch names them (``bfloat16``, ``float8_e4m3fn``), without the ``torch.`` prefix.

Only the knobs a launcher declares tunable are taken from an entry; the rest (padded sizes derived from
the shape) stay the heuristic's. Tensors on a CPU, or kernels in Triton's interpreter, look up the slug
"cpu", for which no table is committed: nothing changes there.
"""

import functools
import json
import re
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

from kernels import INTERPRETED

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
HEURISTIC = "heuristic"
FORCED = "forced"

# Set by ``forced``: kernel name -> knobs every launch of it takes (how tune times a candidate).
_forced: dict[str, dict] = {}


@dataclass(frozen=True)
class LaunchChoice:
    """The configuration one launch takes and where it came from.

    Invariant: ``config`` holds every knob the launcher reads; ``source`` is "heuristic", "forced" (a tune
    run timing a candidate) or "tuned:<gpu-slug>" (an entry of that GPU's table).
    """

    kernel: str
    key: str
    config: dict = field(hash=False)
    source: str = HEURISTIC

    def as_info(self) -> dict:
        """JSON-ready, for a result's extra_info."""
        return {"kernel": self.kernel, "key": self.key, "source": self.source, "config": dict(self.config)}


def slug(name: str) -> str:
    """A GPU name as a file name: "NVIDIA H100 80GB HBM3" -> "nvidia-h100-80gb-hbm3"."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


@functools.cache
def _cuda_slug(index: int) -> str:
    return slug(torch.cuda.get_device_name(index))


def device_slug(device: torch.device) -> str:
    """The table a launch on ``device`` reads: the GPU's slug, or "cpu" off a GPU and in the interpreter."""
    if INTERPRETED or device.type != "cuda":
        return "cpu"
    return _cuda_slug(device.index if device.index is not None else torch.cuda.current_device())


def _valid(name: str, value) -> bool:
    """Knob values a launcher can take: positive ints, powers of two except the pipeline depth."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        return False
    if name == "num_stages":
        return value <= 8
    return value & (value - 1) == 0


@functools.cache
def table(gpu_slug: str) -> dict[str, dict[str, dict]]:
    """kernel -> shape key -> knobs, from CONFIG_DIR/<gpu_slug>.json (read once per process); {} when there is
    none. An entry with a value no launcher can take is dropped with a warning, not raised at launch."""
    path = CONFIG_DIR / f"{gpu_slug}.json"
    if not path.is_file():
        return {}
    kernels = json.loads(path.read_text()).get("kernels", {})
    checked: dict[str, dict[str, dict]] = {}
    for kernel, entries in kernels.items():
        for key, knobs in entries.items():
            bad = {k: v for k, v in knobs.items() if not _valid(k, v)}
            if bad:
                warnings.warn(f"{path.name}: {kernel} [{key}] dropped, invalid knobs {bad}", stacklevel=2)
                continue
            checked.setdefault(kernel, {})[key] = dict(knobs)
    return checked


def clear_cache() -> None:
    """Forget the tables read so far (tests, or a table installed while the process runs)."""
    table.cache_clear()
    _cuda_slug.cache_clear()


def choose(kernel: str, key: str, device: torch.device, heuristic: dict, tunable: tuple[str, ...]):
    """The launch configuration for ``kernel`` at ``key`` on ``device``: the heuristic's, with the tunable
    knobs of a forced candidate or of the running GPU's table entry laid over it. Metadata only."""
    if kernel in _forced:
        knobs, source = _forced[kernel], FORCED
    else:
        gpu = device_slug(device)
        knobs = table(gpu).get(kernel, {}).get(key)
        if knobs is None:
            return LaunchChoice(kernel, key, dict(heuristic), HEURISTIC)
        source = f"tuned:{gpu}"
    return LaunchChoice(kernel, key, {**heuristic, **{k: knobs[k] for k in tunable if k in knobs}}, source)


@contextmanager
def forced(kernel: str, knobs: dict):
    """Inside the block every launch of ``kernel`` in this process takes ``knobs`` over its heuristic,
    whatever the tables say: how ``decodebench tune`` verifies and times one candidate. Not thread-safe."""
    previous = _forced.get(kernel)
    _forced[kernel] = dict(knobs)
    try:
        yield
    finally:
        if previous is None:
            _forced.pop(kernel, None)
        else:
            _forced[kernel] = previous
