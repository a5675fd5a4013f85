"""Facts about the machine a result comes from: GPU, driver, versions, and the copy bandwidth measured once
per process (the peak every GB/s figure is held against)."""

import functools
import platform
import re
import shutil
import subprocess
from dataclasses import asdict, dataclass

import torch
import triton

from bench.measure.timing import time_cuda

# A device-to-device copy of this many bytes (read + written counts twice) far exceeds any L2.
_COPY_BYTES = 1 << 30


@dataclass(frozen=True)
class MachineInfo:
    gpu: str  # "NVIDIA H100 80GB HBM3", or "cpu" with no CUDA device
    slug: str  # folder name under bench/results/
    sm_count: int
    capability: str  # "sm_90"
    memory_gib: float
    driver: str
    cuda: str
    torch: str
    triton: str
    python: str
    host: str
    interpreter: bool

    def as_dict(self) -> dict:
        return asdict(self)


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def _driver_version() -> str:
    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            out = subprocess.run(
                [smi, "--query-gpu=driver_version", "--format=csv,noheader"],
                capture_output=True,
                text=True,
                timeout=20,
            )
            if out.returncode == 0 and out.stdout.strip():
                return out.stdout.strip().splitlines()[0]
        except (OSError, subprocess.TimeoutExpired):
            pass
    return "unknown"


def kernel_device() -> str:
    """The device whose tensors this process's kernels take: "cuda" where they are compiled on a GPU, "cpu"
    where they run in Triton's interpreter, or where no GPU exists at all (the static report's compiling
    child: it captures launches and launches nothing). Compiled launchers refuse CPU tensors on a GPU box."""
    from kernels import INTERPRETED

    return "cpu" if INTERPRETED or not torch.cuda.is_available() else "cuda"


@functools.cache
def machine_info() -> MachineInfo:
    from kernels import INTERPRETED

    common = dict(
        cuda=str(torch.version.cuda),
        torch=torch.__version__,
        triton=triton.__version__,
        python=platform.python_version(),
        host=platform.node(),
        interpreter=INTERPRETED,
    )
    if not torch.cuda.is_available():
        return MachineInfo(
            gpu="cpu", slug="cpu", sm_count=0, capability="none", memory_gib=0.0, driver="none", **common
        )
    props = torch.cuda.get_device_properties(0)
    major, minor = torch.cuda.get_device_capability(0)
    return MachineInfo(
        gpu=props.name,
        slug=slug(props.name),
        sm_count=props.multi_processor_count,
        capability=f"sm_{major}{minor}",
        memory_gib=round(props.total_memory / 2**30, 1),
        driver=_driver_version(),
        **common,
    )


@functools.cache
def copy_bandwidth_gbps() -> float:
    """Device-to-device copy bandwidth (bytes read + written per second, 1e9), measured once per process."""
    src = torch.empty(_COPY_BYTES // 4, dtype=torch.float32, device="cuda").fill_(1.0)
    dst = torch.empty_like(src)
    timing = time_cuda(lambda: dst.copy_(src), label="peak: device copy", flush=False, rep_ms=200)
    return 2 * _COPY_BYTES / (timing.median_ms * 1e-3) / 1e9


@functools.cache
def matmul_tflops() -> float:
    """bf16 8192^3 matrix-product throughput, measured once per process: the compute ceiling of a roofline."""
    a = torch.randn(8192, 8192, dtype=torch.bfloat16, device="cuda")
    b = torch.randn_like(a)
    timing = time_cuda(lambda: a @ b, label="peak: bf16 matmul", flush=False, rep_ms=100)
    return 2 * 8192**3 / (timing.median_ms * 1e-3) / 1e12


def host_ceilings() -> dict:
    """The dry run's stand-ins for the ceilings, on the host's wall clock: a 256 MiB copy and a 1024^3 fp32
    matmul on the CPU. They prove the plumbing; they are no GPU figure, and say so."""
    import time

    src = torch.ones(1 << 26)
    dst = torch.empty_like(src)
    a = torch.randn(1024, 1024)

    def best(fn, reps=5):
        fn()
        times = []
        for _ in range(reps):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return min(times)

    return {
        "copy_gbps": 2 * src.nbytes / best(lambda: dst.copy_(src)) / 1e9,
        "matmul_tflops": 2 * 1024**3 / best(lambda: a @ a) / 1e12,
        "matmul_label": "fp32 1024^3 matmul on the CPU",
        "clock": "host wall clock, dry run",
    }
