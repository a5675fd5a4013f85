"""What every operator module provides, so that ``decodebench run``, ``gpu-check``, ``tune``, the
pytest-benchmark files and the traffic and static tests read one recipe per kernel: the Case (launcher,
reference, shapes, inputs, cost models, comparison), its peers and its tuning candidates.

Peers are other implementations timed beside a kernel. A peer either runs verified against the reference at
the shape it is timed, or is skipped with the reason (not installed, or this shape is not supported); any
other failure is reported as a failure. A ``Peer`` has two steps: ``prepare(inputs, shape)`` does every piece
of set-up (copies into the peer's layout, plans, compiles, host lists) outside the timing and returns a
``Prepared`` whose ``call`` is the peer's work alone; ``check(result, expected, shape)`` holds the call's
result, brought to the kernel's output layout, against the expected ``Inputs`` at the case's own tolerance.
``verify_and_prepare`` does both, right before a peer is timed.
"""

import importlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

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

    def written_out(self, launcher: str):
        """After a call: every guard checked, then the tensor ``launcher`` wrote, ``out`` where the caller
        passed one (the launcher must return that very tensor, or nothing), else what it returned."""
        for name, guard in self.guards.items():
            guard.check(name)
        out = self.args.get("out")
        if out is None:
            return self.result
        if self.result is not None and self.result.data_ptr() != out.data_ptr():
            raise AssertionError(f"{launcher}: returned a tensor other than out")
        return out


# --- peers --------------------------------------------------------------------------------------------------


class PeerUnavailable(Exception):
    """A peer cannot run here: it is not installed, or it does not support this shape. The message says
    why (it is reported). Nothing else may be raised as PeerUnavailable: a peer that fails is a failure."""


@dataclass(frozen=True)
class Prepared:
    """A peer ready to time. ``call`` is the timed call: nothing but the peer's work. ``reset`` puts stateful
    inputs back (a host pool a timed allocate keeps filling); run before each call, outside the timing."""

    call: Callable[[], Any]
    reset: Callable[[], None] | None = None


@dataclass(frozen=True)
class Peer:
    """Another implementation of a case's kernel.

    ``prepare(inputs, shape)``: set-up outside the timing; raises PeerUnavailable (with the reason) only for
    "not installed" or "this shape is not supported", decided up front; any other error propagates.
    ``check(result, expected, shape)``: the call's result against ``expected`` (Inputs after a run of the
    reference, or of the kernel: args and result); returns the max error, raises AssertionError when wrong.
    ``host_only``: the call does its work on the host and launches nothing (the host pool): it is timed on
    the host clock, since CUDA events around it would time an idle device.
    """

    name: str
    prepare: Callable[[Inputs, Any], Prepared]
    check: Callable[[Any, Inputs, Any], float]
    host_only: bool = False


# --- tuning -------------------------------------------------------------------------------------------------


def pow2_between(low: int, high: int) -> Callable[[int], bool]:
    """A limit for a tunable knob: powers of two from ``low`` to ``high``."""
    return lambda v: low <= v <= high and v & (v - 1) == 0


@dataclass(frozen=True)
class TuneSpec:
    """How ``decodebench tune`` tunes a case: its tunable knobs (the launcher's), candidates around the
    heuristic, the @triton.jit kernel those knobs shape, and a cheap shape with the same launch
    configuration."""

    primary: str  # the kernel whose static figures are reported (every launch is checked for spills)
    tunable: tuple[str, ...]
    changes: tuple[Callable[[dict], dict], ...]  # heuristic knobs -> knobs to change (the heuristic first)
    limits: dict[str, Callable[[int], bool]]
    cheap: Callable[[Any], Any]  # default shape -> a small one the launcher configures alike

    def candidates(self, heuristic: dict) -> list[dict]:
        """The heuristic first, then each change that stays within the limits, without repeats."""
        base = {k: heuristic[k] for k in self.tunable}
        out = [base]
        for change in self.changes:
            knobs = {**base, **change(base)}
            if knobs not in out and all(self.limits[k](v) for k, v in knobs.items()):
                out.append(knobs)
        return out


# --- cases --------------------------------------------------------------------------------------------------


#: The Case fields ``Case.by_convention`` takes from an operator module's functions of the same name.
CONVENTIONAL_FUNCTIONS = (
    "build",
    "byte_model",
    "flop_model",
    "sweep",
    "default_shapes",
    "small_shapes",
    "static_shapes",
    "traffic_shapes",
    "compare",
    "launch_config",
)


@dataclass(frozen=True)
class Case:
    """One kernel: its launcher, its reference, how to build inputs for a shape, and its cost models.

    ``shape`` objects are the operator module's own frozen dataclasses with a ``label`` property.
    """

    name: str  # the launcher's name, e.g. "write_kv"
    # kernels/<module>.py, reference/<module>.py, bench/operators/<module>.py, tests/test_<module>.py,
    # bench/benchmarks/bench_<module>.py
    module: str
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
    # Other implementations timed beside the kernel (in the same operator module), by name.
    peers: dict[str, Peer] = field(default_factory=dict)
    # Above this many modelled bytes the reference is too slow to time or to verify against (None: never).
    reference_max_bytes: int | None = None
    # The traffic ratio its traffic shapes must stay within; None: reported, not held to a limit (a
    # latency-bound kernel that makes several passes over a few kilobytes).
    traffic_limit: float | None = 1.05
    # (inputs) -> the launch configuration the kernel takes for them and where it came from (a per-GPU
    # table, "tuned:<gpu>", or "heuristic"), as LaunchChoice.as_info() gives it; None: nothing tunable.
    launch_config: Callable[[Inputs], dict] | None = None
    # The candidates `decodebench tune` times (bench/measure/tuning.py); None: left out of tuning (the
    # operator module says why).
    tune: TuneSpec | None = None

    @classmethod
    def by_convention(
        cls, namespace: dict, name: str, prefix: str = "", module: str | None = None, **explicit
    ) -> "Case":
        """The Case for launcher ``name`` of the operator module whose ``globals()`` is ``namespace``.

        The module is the operator module's own (bench/operators/<module>.py) unless ``module`` names
        another (moe_gemm.py also holds kernels.moe_layer's case); the kernel and the reference
        are ``kernels.<module>.<name>`` and ``reference.<module>.<name>``. Every other field is picked up
        from the namespace by its conventional name, ``prefix`` first where a module holds several cases
        (``prefix="copy_"``: copy_build, copy_byte_model, ...): the functions CONVENTIONAL_FUNCTIONS names,
        and the constants ``PEERS`` and ``TUNE`` (``COPY_PEERS``, ``COPY_TUNE``). ``explicit`` keywords
        win over the namespace; a required field neither gives is a TypeError, as for Case(...).
        """
        module = module or namespace["__name__"].rsplit(".", 1)[-1]
        conventional = {field: f"{prefix}{field}" for field in CONVENTIONAL_FUNCTIONS}
        conventional |= {"peers": f"{prefix.upper()}PEERS", "tune": f"{prefix.upper()}TUNE"}
        found = {field: namespace[attr] for field, attr in conventional.items() if attr in namespace}
        launchers = {
            "kernel": getattr(importlib.import_module(f"kernels.{module}"), name),
            "reference": getattr(importlib.import_module(f"reference.{module}"), name),
        }
        return cls(name=name, module=module, **(launchers | found | explicit))

    def reference_affordable(self, shape) -> bool:
        return self.reference_max_bytes is None or self.byte_model(shape) <= self.reference_max_bytes

    @property
    def kernel_module(self) -> ModuleType:
        return importlib.import_module(f"kernels.{self.module}")

    def run_kernel(self, inputs: Inputs) -> None:
        inputs.result = self.kernel(**inputs.args)

    def run_reference(self, inputs: Inputs) -> None:
        inputs.result = self.reference(**inputs.args)


@dataclass(frozen=True)
class StaticOnly:
    """A kernel with a static report but no case: EP's regroup (it needs a process group around it), the
    pool's fork and free; only its static report, from the launches its launcher makes at each static
    shape."""

    name: str
    module: str
    static_shapes: Callable[[], Sequence[Any]]
    # launch(shape, device): calls the launcher (or its helper) as the kernel's users do; the static report
    # captures the launches it makes (bench.measure.static.capture_launches)
    launch: Callable[[Any, str], None]
    traffic_shapes: Callable[[], Sequence[Any]] = tuple

    @property
    def kernel_module(self) -> ModuleType:
        return importlib.import_module(f"kernels.{self.module}")


# --- running peers ------------------------------------------------------------------------------------------


def kernel_expected(case: Case, inputs: Inputs) -> Inputs:
    """The kernel's own run on ``inputs`` (put back as built first, and again after), as an expected Inputs:
    written arguments copied out, the result kept. For shapes where the reference is too slow to run."""
    if inputs.reset:
        inputs.reset()
    result = case.kernel(**inputs.args)
    args = {
        k: v.clone() if k in inputs.outputs and hasattr(v, "clone") else v for k, v in inputs.args.items()
    }
    if inputs.reset:
        inputs.reset()
    return Inputs(args, inputs.outputs, result=result)


def verify_and_prepare(case: Case, name: str, inputs: Inputs, shape, expected) -> tuple[Prepared, float]:
    """Prepares peer ``name`` of ``case`` on ``inputs`` (first put back as built), runs its call once (after
    its reset), checks the result, and returns the prepared peer and its max error. Use it right before
    timing, at every shape a peer is timed.

    ``expected``: the reference's Inputs at this shape (args and result after the reference's run on a copy
    of ``inputs``). Where the reference is too slow for the shape, pass None: the peer is then checked
    against the kernel's own result on ``inputs`` (so it agrees with the kernel, which the tests hold to the
    reference at smaller shapes). Raises PeerUnavailable when the peer cannot run here, AssertionError when
    its result is wrong; any other error of the peer propagates.
    """
    peer = case.peers[name]
    if inputs.reset:
        inputs.reset()
    prepared = peer.prepare(inputs, shape)
    if prepared.reset:
        prepared.reset()
    result = prepared.call()
    if expected is None:
        expected = kernel_expected(case, inputs)
    return prepared, peer.check(result, expected, shape)


__all__ = [
    "Case",
    "Inputs",
    "Peer",
    "PeerUnavailable",
    "Prepared",
    "StaticOnly",
    "TuneSpec",
    "kernel_expected",
    "pow2_between",
    "verify_and_prepare",
]
