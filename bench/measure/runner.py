"""The jobs behind the CLI, one function each: verify a case against its reference, time it on a GPU,
count its traffic under the interpreter, and project its time from its byte model where no GPU is present."""

import time
from dataclasses import dataclass

import torch

from bench.cases.base import Case, Inputs, PeerUnavailable
from bench.measure import results
from bench.measure.device import PROJECTION_GBPS, copy_bandwidth_gbps
from bench.measure.timing import time_cuda
from bench.measure.traffic import measure as measure_traffic
from bench.testing import seed_of

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
    expected = inputs.clone()
    try:
        case.run_kernel(inputs)
        case.run_reference(expected)
        error = case.compare(inputs, expected, shape)
    except AssertionError as failure:
        return Verification(
            case.name, shape.label, False, float("nan"), time.perf_counter() - start, str(failure)
        )
    return Verification(case.name, shape.label, True, error, time.perf_counter() - start)


@dataclass
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


def traffic(case: Case, shape) -> TrafficRow:
    inputs = case.build(shape, "cpu", seed_of(f"{case.name}/{shape.label}"))
    counted = measure_traffic(lambda: case.run_kernel(inputs))
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
    """The time a call would take moving its modelled bytes at each GPU's measured copy bandwidth."""
    nbytes = case.byte_model(shape)
    return {
        "kernel": case.name,
        "shape": shape.label,
        "bytes": nbytes,
        **{gpu: nbytes / (gbps * 1e9) for gpu, gbps in PROJECTION_GBPS.items()},
    }


def implementations(case: Case, shape, inputs: Inputs, with_reference: bool = True, peers=None):
    """(name, zero-argument callable) for the kernel, its reference and each peer that can run here (of
    ``peers``, default all), and {peer: reason} for those that cannot or were left out."""
    ready = [("triton", lambda: case.kernel(**inputs.args))]
    if with_reference:
        ready.append(("reference", lambda: case.reference(**inputs.args)))
    skipped = {}
    for name, factory in case.peers.items():
        if peers is not None and name not in peers:
            skipped[name] = "left out of this run"
            continue
        try:
            ready.append((name, factory(inputs, shape)))
        except PeerUnavailable as why:
            skipped[name] = str(why)
    return ready, skipped


def measure(
    case: Case, shape, *, cuda_graph: bool = False, with_reference: bool = True, peers=None
) -> list[dict]:
    """Verifies the kernel at this shape, then times it, its reference and its peers on the GPU. Returns
    pytest-benchmark entries whose extra_info carries GB/s, % of the copy bandwidth measured in this
    process, whether the kernel agreed with the reference here, and why any peer did not run. Where the
    reference is too slow for the shape, it is neither timed nor verified against (verified: None)."""
    peak = copy_bandwidth_gbps()
    affordable = case.reference_affordable(shape)
    checked = verify(case, shape, "cuda") if affordable else None
    inputs = case.build(shape, "cuda", seed_of(f"{case.name}/{shape.label}"))
    ready, skipped = implementations(case, shape, inputs, with_reference and affordable, peers)
    entries = []
    for impl, fn in ready:
        label = f"{case.name}[{impl}] {shape.label}"
        graph = cuda_graph and impl == "triton"  # references and peers may sync: never captured
        timing = time_cuda(fn, label=label, cuda_graph=graph, setup=inputs.reset)
        info = {
            **results.cost_info(case, shape, timing.median_ms * 1e-3, peak),
            "impl": impl,
            "cuda_graph": graph,
        }
        if impl == "triton":
            info.update(verified=checked.ok if checked else None, peers_skipped=skipped)
            info["launch_config"] = case.launch_config(inputs) if case.launch_config else None
        entries.append(results.entry(label, case.name, timing, info))
    torch.cuda.synchronize()
    return entries
