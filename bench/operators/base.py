"""What every kernel's case module provides, so that ``decodebench run``, ``gpu-check``, the pytest-benchmark
files and the traffic and static tests read one recipe per kernel."""

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

from bench.peers import Peer, PeerUnavailable
from bench.testing import Guarded


@dataclass
class Inputs:
    """Keyword arguments for one call of a kernel (or its reference), and what the call leaves behind.

    ``outputs`` names the arguments written in place; ``guards`` holds the poisoned, sentinel-fenced
    buffers behind them when the inputs were built for verification; ``result`` is the call's return value.
    """

    args: dict[str, Any]
    outputs: tuple[str, ...]
    guards: dict[str, Guarded] = field(default_factory=dict)
    result: Any = None
    # Puts stateful arguments back as built (a block pool a timed allocate keeps filling): run before every
    # timed call, outside the timing. None when calls leave their inputs fit for the next call.
    reset: Callable[[], None] | None = None

    def clone(self) -> "Inputs":
        """Fresh copies of every tensor (and of anything else with a clone(), a block pool), for the
        reference run (no guards: the reference is trusted)."""
        cloned = {k: v.clone() if hasattr(v, "clone") else v for k, v in self.args.items()}
        return Inputs(cloned, self.outputs)


@dataclass(frozen=True)
class Case:
    """One kernel: its launcher, its reference, how to build inputs for a shape, and its cost models.

    ``shape`` objects are the case module's own frozen dataclasses with a ``label`` property.
    """

    name: str  # the launcher's name, e.g. "write_kv"
    module: str  # kernels/<module>.py, reference/<module>.py, tests/test_<module>.py, bench/bench_<module>.py
    kernel: Callable
    reference: Callable
    build: Callable[..., Inputs]  # build(shape, device, seed, guarded=False) -> Inputs
    byte_model: Callable[[Any], int]  # bytes that must move for one call
    flop_model: Callable[[Any], int]
    sweep: Callable[[], Sequence[Any]]  # benchmark shapes (pytest bench/, gpu-check)
    default_shapes: Callable[[], Sequence[Any]]  # `decodebench run` on a GPU
    small_shapes: Callable[[], Sequence[Any]]  # interpreter: verification and traffic
    static_shapes: Callable[[], Sequence[Any]]  # launch configurations compiled for the static report
    traffic_shapes: Callable[[], Sequence[Any]]  # interpreter: bytes moved held against the byte model
    # (kernel's inputs, reference's inputs, shape) -> max error; raises AssertionError when wrong
    compare: Callable[[Inputs, Inputs, Any], float]
    # Other implementations timed beside the kernel (bench/peers/<module>.py), by name.
    peers: dict[str, Peer] = field(default_factory=dict)
    # Above this many modelled bytes the reference is too slow to time or to verify against (None: never).
    reference_max_bytes: int | None = None
    # The traffic ratio its traffic shapes must stay within; None: reported, not held to a limit (a
    # latency-bound kernel that makes several passes over a few kilobytes).
    traffic_limit: float | None = 1.05
    # (inputs) -> the launch configuration the kernel takes for them and where it came from (a per-GPU
    # table, "tuned:<gpu>", or "heuristic"), as LaunchChoice.as_info() gives it; None: nothing tunable.
    launch_config: Callable[[Inputs], dict] | None = None

    def reference_affordable(self, shape) -> bool:
        return self.reference_max_bytes is None or self.byte_model(shape) <= self.reference_max_bytes

    @property
    def kernel_module(self) -> ModuleType:
        import importlib

        return importlib.import_module(f"kernels.{self.module}")

    def run_kernel(self, inputs: Inputs) -> None:
        inputs.result = self.kernel(**inputs.args)

    def run_reference(self, inputs: Inputs) -> None:
        inputs.result = self.reference(**inputs.args)


@dataclass(frozen=True)
class StaticOnly:
    """A kernel the single-process registry cannot drive (EP's regroup needs a process group around it):
    only its static report, from the launches its launcher makes at each static shape."""

    name: str
    module: str
    static_shapes: Callable[[], Sequence[Any]]
    # launch(shape, device): calls the launcher (or its helper) as the kernel's users do; the static report
    # captures the launches it makes (bench.measure.static.capture_launches)
    launch: Callable[[Any, str], None]
    traffic_shapes: Callable[[], Sequence[Any]] = tuple

    @property
    def kernel_module(self) -> ModuleType:
        import importlib

        return importlib.import_module(f"kernels.{self.module}")


__all__ = [
    "Case",
    "Inputs",
    "PeerUnavailable",
    "StaticOnly",
]  # PeerUnavailable lives in bench.peers; kept here for callers
