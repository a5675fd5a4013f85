"""The jobs behind the CLI, one function each: verify a case against its reference, time it on a GPU,
count its traffic under the interpreter, and project its time from its byte model where no GPU is present."""

import time
from dataclasses import dataclass

import torch

from bench.measure import results
from bench.measure.device import copy_bandwidth_gbps, matmul_tflops
from bench.measure.static import compile_in_children, static_report
from bench.measure.timing import time_cuda, time_wall
from bench.measure.traffic import Traffic
from bench.measure.traffic import measure as measure_traffic
from bench.operators.base import Case, Inputs, PeerUnavailable, verify_and_prepare
from bench.serving.hardware import PROJECTION_GBPS
from bench.testing import seed_of
from kernels import INTERPRETED

#: The traffic ratio a bandwidth kernel must stay within (bytes it moves / bytes its model says must move).
TRAFFIC_LIMIT = 1.05


@dataclass
class Verification:
    kernel: str
    shape: str
    ok: bool
    max_error: float
    seconds: float
    message: str = ""


def verify(case: Case, shape, device) -> Verification:
    """Runs kernel and reference on the same fresh inputs (outputs poisoned, fenced by sentinels)."""
    start = time.perf_counter()
    inputs = case.build(shape, device, seed_of(f"{case.name}/{shape.label}"), guarded=True)
    _, ok, error, message = _verified(case, inputs, shape, with_reference=True)
    return Verification(case.name, shape.label, bool(ok), error, time.perf_counter() - start, message)


@dataclass(frozen=True)
class TrafficRow:
    kernel: str
    shape: str
    loaded: int
    stored: int
    model: int
    unique: int
    limit: float | None = TRAFFIC_LIMIT  # None: reported, not held to a limit

    @property
    def ratio(self) -> float:
        return (self.loaded + self.stored) / self.model

    @property
    def ok(self) -> bool:
        return self.limit is None or self.ratio <= self.limit


# Counted once per process: the count is a pure function of the case's program and its seeded inputs, and
# the CLI, the proxy baseline check and the traffic tests all ask for the same shapes.
_traffic_counted: dict[tuple, tuple[Inputs, Traffic]] = {}


def count_traffic(case: Case, shape) -> tuple[Inputs, Traffic]:
    """The inputs a case's kernel ran on under the traffic counter, and every access it counted."""
    key = (case.name, shape)
    if key not in _traffic_counted:
        inputs = case.build(shape, "cpu", seed_of(f"{case.name}/{shape.label}"))
        _traffic_counted[key] = inputs, measure_traffic(lambda: case.run_kernel(inputs))
    return _traffic_counted[key]


# Rows counted in this process, by (case name, shape): the interpreter's count is a pure function of the
# kernel source and the shape's seeded inputs, and the CLI, the proxy check and the traffic tests ask for the
# same ones (as the static report's compiles are kept).
_traffic: dict[tuple, TrafficRow] = {}


def traffic(case: Case, shape) -> TrafficRow:
    key = (case.name, shape)
    if key not in _traffic:
        _traffic[key] = _count(case, shape)
    return _traffic[key]


def _count(case: Case, shape) -> TrafficRow:
    _, counted = count_traffic(case, shape)
    return TrafficRow(
        case.name,
        shape.label,
        counted.loaded_bytes,
        counted.stored_bytes,
        case.byte_model(shape),
        counted.unique_bytes(),
        case.traffic_limit,
    )


def projection(case: Case, shape) -> dict:
    """The time a call would take moving its modelled bytes at each GPU's published copy bandwidth (the
    anchors, bench/serving/hardware.py PROJECTION_GBPS)."""
    nbytes = case.byte_model(shape)
    return {
        "kernel": case.name,
        "shape": shape.label,
        "bytes": nbytes,
        **{gpu: nbytes / (gbps * 1e9) for gpu, gbps in PROJECTION_GBPS.items()},
    }


def verify_all(cases, device: str = "cpu") -> list[Verification]:
    """Every case at its small shapes (the interpreter's sizes) against its reference."""
    return [verify(case, shape, device) for case in cases for shape in case.small_shapes()]


def traffic_rows(cases) -> list[TrafficRow]:
    return [traffic(case, shape) for case in cases for shape in case.traffic_shapes()]


def projections(cases) -> list[dict]:
    return [projection(case, shape) for case in cases for shape in case.default_shapes()]


def static_rows(cases, real: bool = False, timeout: float | None = None):
    """The static report of every case: the AOT compile for sm_90/sm_80 or, with ``real``, the cubin a
    launch on this GPU compiled."""
    cases = list(cases)
    if INTERPRETED and not real:  # compile every case's report at once, a child per core
        compile_in_children([case.name for case in cases], timeout=timeout)
    return [row for case in cases for row in static_report(case, real=real, timeout=timeout)]


def _verified(
    case: Case, inputs: Inputs, shape, with_reference: bool | None = None
) -> tuple[Inputs | None, bool | None, float, str]:
    """Runs the kernel on ``inputs`` (built guarded: outputs poisoned inside sentinel fences) and the
    reference on a clone (``with_reference``; default: where it is affordable at this shape), and compares
    them. Returns (the reference's inputs after its run or None, verified or None when not checked, max
    error, message)."""
    expected = None
    if case.reference_affordable(shape) if with_reference is None else with_reference:
        expected = inputs.clone()
        case.run_reference(expected)
    case.run_kernel(inputs)
    if expected is None:
        return None, None, float("nan"), "reference too slow at this shape: not verified here"
    try:
        return expected, True, case.compare(inputs, expected, shape), ""
    except AssertionError as failure:
        return expected, False, float("nan"), str(failure)


def measure(
    case: Case,
    shape,
    *,
    graph: bool = True,
    with_reference: bool = True,
    peers=None,
    device: str = "cuda",
) -> list[dict]:
    """One shape of one case, start to finish: inputs built once (the build's seconds reported as
    ``setup_s``), the kernel verified on them against the reference, then timed eagerly and, with ``graph``,
    as a CUDA-graph replay (the headline for decode-size calls); the reference and every peer (of ``peers``,
    default all) timed eagerly, each peer verified at this very shape right before its timing.

    A peer that is not installed or cannot take this shape is skipped with its reason (``peers_skipped``);
    one that raises anything else, or disagrees with the reference, is a failure (``peers_failed``) and is
    not timed. A host-only peer (``Peer.host_only``: the host pool) is timed on the host clock, without the
    L2 flush (CUDA events would time the idle device), and its entry says ``"timer": "host"``. On
    ``device="cpu"`` (``gpu-check --dry-run``) every time is wall-clock, labelled as such, with no graphs.
    Returns pytest-benchmark entries with GB/s and % of the copy bandwidth in extra_info.
    """
    on_gpu = device == "cuda"
    peak = copy_bandwidth_gbps() if on_gpu else None
    peak_tflops = matmul_tflops() if on_gpu else None
    start = time.perf_counter()
    inputs = case.build(shape, device, seed_of(f"{case.name}/{shape.label}"), guarded=True)
    setup_s = time.perf_counter() - start
    expected, verified, error, message = _verified(case, inputs, shape)
    kernel_info = {"verified": verified, "max_error": error, "setup_s": round(setup_s, 4)}
    if message:
        kernel_info["verify_message"] = message[:300]
    if case.launch_config is not None:  # which configuration ran, and from where (tuned table or heuristic)
        kernel_info["launch_config"] = case.launch_config(inputs)

    timed = []  # (impl, callable, reset, graph, extra info, on the host clock)
    if graph and on_gpu:
        timed.append(("triton", lambda: case.kernel(**inputs.args), inputs.reset, True, kernel_info, False))
    timed.append(("triton", lambda: case.kernel(**inputs.args), inputs.reset, False, kernel_info, not on_gpu))
    if with_reference and expected is not None and inputs.reset is None:  # stateful inputs: not re-runnable
        reference_inputs = inputs.clone()
        reference = lambda: case.reference(**reference_inputs.args)  # noqa: E731
        timed.append(("reference", reference, None, False, {}, not on_gpu))
    skipped, failed = {}, {}
    for name in case.peers:
        if peers is not None and name not in peers:
            skipped[name] = "left out of this run"
            continue
        start = time.perf_counter()
        try:
            prepared, peer_error = verify_and_prepare(case, name, inputs, shape, expected)
        except PeerUnavailable as why:
            skipped[name] = str(why)
            continue
        except Exception as failure:  # a peer that runs but fails, or disagrees: shown, never hidden
            failed[name] = f"{type(failure).__name__}: {str(failure).strip()[:300]}"
            continue
        info = {
            "verified": True,
            "max_error": peer_error,
            "checked_against": "reference" if expected is not None else "kernel",
            "setup_s": round(time.perf_counter() - start, 4),
        }
        on_host = case.peers[name].host_only or not on_gpu
        timed.append((name, prepared.call, prepared.reset, False, info, on_host))
    kernel_info.update(peers_skipped=skipped, peers_failed=failed)

    entries = []
    for impl, fn, reset, as_graph, extra, on_host in timed:
        label = f"{case.name}[{impl}{' graph' if as_graph else ''}] {shape.label}"
        try:
            if on_host:  # CUDA events would time the device, idle through a host-only step
                timing = time_wall(fn, label=label, setup=reset)
            else:
                timing = time_cuda(fn, label=label, cuda_graph=as_graph, setup=reset)
        except Exception as failure:
            if not as_graph:
                raise
            kernel_info["graph_error"] = f"{type(failure).__name__}: {str(failure).strip()[:300]}"
            continue
        info = {
            **results.cost_info(case, shape, timing.median_ms * 1e-3, peak, peak_tflops),
            **extra,
            "impl": impl,
            "cuda_graph": as_graph,
            "clock": _clock_label(on_gpu, on_host),
            "timer": "host" if on_host else "cuda-events",
        }
        entries.append(results.entry(label, case.name, timing, info))
    if on_gpu:
        torch.cuda.synchronize()
    return entries


def _clock_label(on_gpu: bool, on_host: bool) -> str:
    if not on_gpu:
        return "wall-clock (dry run)"
    return "host clock (host-only work)" if on_host else "cuda-events"
