"""Static report: compile each kernel's real launch configuration for sm_90 and sm_80 with no GPU, and read
registers, spills, shared memory and the width of every global load and store from the cubin.

The launch is captured, not restated: the case's launcher runs with its @triton.jit kernels swapped for
recorders, so the compile sees the same grid, constexprs, num_warps and the same specialization a real
launch gets (16-byte-aligned pointers and integers divisible by 16 marked), without which a masked bf16 copy
compiles to 2-byte loads instead of 16-byte ones. On a GPU, ``real=True`` launches the kernel instead and
reads the cubin the launch compiled.

Where kernels run in Triton's interpreter (no GPU), the report is made in a child process with
TRITON_INTERPRET=0: there every @triton.jit (Triton's own helpers included) is a real JITFunction, and the
launchers pass what they pass on a GPU (``INTERPRETER_*`` workarounds off), so the compile is the GPU's.
Capturing needs no driver: nothing is launched. The captured inputs live where this process's kernels take
them (bench.measure.device.kernel_device): the CPU there, the GPU on a GPU box, whose compiled launchers
refuse CPU tensors.

The cubin is read with cuobjdump from the Triton wheel: ``--dump-resource-usage`` gives REG, STACK, SHARED
and LOCAL (local memory per thread: spills), ``--dump-sass`` the LDG/STG instructions and their widths.
This compile is also the only proof, on a machine with no GPU, that a kernel compiles for one at all. The
tuner (bench/measure/tuning.py) reads its candidates' compiles with the same functions, its access widths
from the PTX instead (``access_widths(..., listing="ptx")``).
"""

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from types import ModuleType

import triton
from triton.runtime.jit import JITFunction

from bench import child_env
from bench.operators import CASES, STATIC_ONLY
from bench.operators.base import Case
from kernels import INTERPRETED

#: The targets the static report compiles for: sm_90 (the lent H100/H200) and sm_80. DECODEBENCH_ARCHS
#: ("90" for one) narrows it: the test suite compiles sm_90 only, to fit CI's budget (conftest.py).
ARCHS = tuple(int(a) for a in os.environ.get("DECODEBENCH_ARCHS", "90,80").split(",") if a.strip())


@dataclass
class Launch:
    kernel: str  # the @triton.jit function's name
    fn: object  # the undecorated Python function
    grid: tuple
    args: tuple
    kwargs: dict
    jit: object = None  # the @triton.jit kernel itself (to launch it for real)


@dataclass
class StaticRow:
    kernel: str
    shape: str
    arch: str  # "sm_90"
    source: str  # "aot" (compiled here for the target) or "launch" (the cubin a real launch compiled)
    num_warps: int = 0
    registers: int | None = None
    spill_bytes: int | None = None  # local memory per thread
    stack_bytes: int | None = None
    shared_bytes: int | None = None
    widest_load: int | None = None  # bytes per thread per global load instruction
    widest_store: int | None = None
    load_widths: dict = field(default_factory=dict)  # width in bytes -> instruction count
    store_widths: dict = field(default_factory=dict)
    atomics: int = 0  # global atomic and reduction instructions (ATOMG, RED): racecheck's business
    error: str | None = None  # why it could not compile (fp8 e4m3 on sm_80, say)

    def __post_init__(self):  # JSON turns the width keys into strings
        self.load_widths = {int(k): v for k, v in self.load_widths.items()}
        self.store_widths = {int(k): v for k, v in self.store_widths.items()}

    def as_dict(self) -> dict:
        return asdict(self)


def _is_triton_kernel(obj) -> bool:
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(obj, (JITFunction, InterpretedFunction))


class _Recorder:
    def __init__(self, name, kernel, launches):
        self.name, self.kernel, self.launches = name, kernel, launches

    def __getitem__(self, grid):
        def record(*args, **kwargs):
            self.launches.append(Launch(self.name, self.kernel.fn, tuple(grid), args, kwargs, self.kernel))

        return record


@contextmanager
def capture_launches(module: ModuleType):
    """Inside the block, every @triton.jit kernel of ``module`` and of the kernel modules it builds on (any
    loaded ``kernels.*`` module: mla_decode launches paged_decode's merge through paged_attention) records
    its launches instead of running."""
    launches: list[Launch] = []
    modules = {module.__name__: module}
    modules.update((name, m) for name, m in list(sys.modules.items()) if name.startswith("kernels.") and m)
    originals = [
        (m, name, obj) for m in modules.values() for name, obj in vars(m).items() if _is_triton_kernel(obj)
    ]
    try:
        for m, name, kernel in originals:
            setattr(m, name, _Recorder(name, kernel, launches))
        yield launches
    finally:
        for m, name, kernel in originals:
            setattr(m, name, kernel)


def _bind(jit: JITFunction, launch: Launch) -> tuple[dict, dict]:
    """(values by parameter name, compile options such as num_warps)."""
    values = dict(zip(jit.arg_names, launch.args))
    options = {}
    for key, value in launch.kwargs.items():
        (values if key in jit.arg_names else options)[key] = value
    return values, options


def missing_aot_api() -> str | None:
    """Why compile_aot cannot run under this Triton (the private specialization API it uses is gone), or
    None when it can."""
    try:
        from triton.backends.compiler import BaseBackend  # noqa: F401
        from triton.runtime.jit import native_specialize_impl  # noqa: F401
    except ImportError as error:
        return (
            f"Triton {triton.__version__} lacks the private specialization API the AOT compile uses: {error}"
        )
    return None


def _specialize(value) -> tuple[str, str | None]:
    """Triton's own launch-time specialization: ('*bf16', 'D') for a 16-byte-aligned bf16 pointer."""
    from triton.backends.compiler import BaseBackend
    from triton.runtime.jit import native_specialize_impl

    ty, key = native_specialize_impl(BaseBackend, value, False, True, True)[:2]
    return ty, key


def compile_aot(launch: Launch, arch: int):
    """Compiles one captured launch for sm_<arch> as a real launch would specialize it; no GPU needed."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.compiler.compiler import make_backend

    jit = JITFunction(launch.fn)
    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    values, options = _bind(jit, launch)
    signature, constexprs, attrs = {}, {}, {}
    for index, param in enumerate(jit.params):
        value = values[param.name]
        if param.is_constexpr:
            signature[param.name], constexprs[param.name] = "constexpr", value
            continue
        ty, key = _specialize(value)
        signature[param.name] = ty
        if ty == "constexpr":  # an integer 1 or None is baked in, as at launch
            constexprs[param.name] = value
        elif key:
            attrs[(index,)] = backend.parse_attr(key)
    source = ASTSource(fn=jit, signature=signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(source, target=target, options=options)


def cuobjdump() -> str:
    bundled = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    found = bundled if os.path.exists(bundled) else shutil.which("cuobjdump")
    if not found:
        raise RuntimeError("cuobjdump not found: neither in the Triton wheel nor on PATH")
    return found


def _dump(cubin: bytes, flag: str) -> str:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([cuobjdump(), flag, f.name], capture_output=True, text=True, check=True).stdout


_RESOURCE = re.compile(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)")
# LDGSTS is cp.async: a global load straight into shared memory (how Triton pipelines a loop's loads).
_ACCESS = re.compile(r"\b(LDGSTS|LDG|STG)(?![A-Z])((?:\.[A-Z0-9_]+)*)")
_ATOMIC = re.compile(r"\b(ATOMG|ATOM|RED)(?:\.[A-Z0-9_]+)+")
_WIDTH = {"128": 16, "64": 8, "U16": 2, "S16": 2, "U8": 1, "S8": 1}
# PTX: ld.global / st.global with their vector (v2, v4) and type (b16, f32...) suffixes, and cp.async's copy
# size (its global load into shared memory).
_PTX_ACCESS = re.compile(r"\b(ld|st)\.global((?:\.[A-Za-z0-9_:]+)*)")
_PTX_CP_ASYNC = re.compile(r"\bcp\.async\.\w+\.shared\.global[^,]*,[^,]*,\s*(0x[0-9a-fA-F]+|\d+)")
_PTX_LANES = re.compile(r"v[248]")
_PTX_BITS = re.compile(r"[bsuf](8|16|32|64)")


def resource_usage(cubin: bytes) -> dict:
    match = _RESOURCE.search(_dump(cubin, "--dump-resource-usage"))
    if not match:
        raise RuntimeError("cuobjdump printed no resource usage")
    reg, stack, shared, local = map(int, match.groups())
    return {"registers": reg, "stack_bytes": stack, "shared_bytes": shared, "spill_bytes": local}


def compiled_usage(compiled) -> dict:
    """A compiled kernel's registers, stack, spills and shared memory (resource_usage of its cubin)."""
    usage = resource_usage(compiled.asm["cubin"])
    # cuobjdump counts static shared memory only; Triton's tiles live in dynamic shared memory.
    usage["shared_bytes"] = max(usage["shared_bytes"], int(getattr(compiled.metadata, "shared", 0) or 0))
    return usage


def access_widths(text: str, listing: str = "sass") -> tuple[Counter, Counter]:
    """Counts global load and store instructions by width in bytes, from a kernel's SASS (``listing``
    "sass", cuobjdump --dump-sass: LDG.E.128 is 16, LDG.E.U16 is 2) or its PTX ("ptx": ld.global.v4.b32 is
    16, cp.async's copy size is its load's). SASS is what runs; PTX needs no disassembly, and ptxas keeps
    the widths PTX asks for."""
    if listing == "sass":
        return _sass_widths(text)
    if listing == "ptx":
        return _ptx_widths(text)
    raise ValueError(f"listing: expected 'sass' or 'ptx', got {listing!r}")


def _sass_widths(sass: str) -> tuple[Counter, Counter]:
    loads, stores = Counter(), Counter()
    for op, suffixes in _ACCESS.findall(sass):
        width = next((_WIDTH[s] for s in suffixes.split(".") if s in _WIDTH), 4)
        (stores if op == "STG" else loads)[width] += 1
    return loads, stores


def _ptx_widths(ptx: str) -> tuple[Counter, Counter]:
    loads, stores = Counter(int(size, 0) for size in _PTX_CP_ASYNC.findall(ptx)), Counter()
    for op, suffixes in _PTX_ACCESS.findall(ptx):
        parts = suffixes.split(".")
        lanes = next((int(p[1:]) for p in parts if _PTX_LANES.fullmatch(p)), 1)
        bits = next((int(p[1:]) for p in parts if _PTX_BITS.fullmatch(p)), 32)
        (stores if op == "st" else loads)[lanes * bits // 8] += 1
    return loads, stores


def describe(compiled, kernel: str, shape: str, arch: str, source: str, num_warps: int) -> StaticRow:
    sass = _dump(compiled.asm["cubin"], "--dump-sass")
    loads, stores = access_widths(sass)
    return StaticRow(
        kernel,
        shape,
        arch,
        source,
        num_warps,
        **compiled_usage(compiled),
        widest_load=max(loads, default=None),
        widest_store=max(stores, default=None),
        load_widths=dict(sorted(loads.items())),
        store_widths=dict(sorted(stores.items())),
        atomics=len(_ATOMIC.findall(sass)),
    )


def capture(case: Case, shape, device: str | None = None) -> list[Launch]:
    """The launches ``case``'s launcher makes at ``shape``, recorded, none run. The inputs are built on
    ``device``, by default the one this process's kernels take (a GPU box's compiled launchers refuse CPU
    tensors)."""
    from bench.measure.device import kernel_device

    device = device or kernel_device()
    if hasattr(case, "launch"):  # a StaticOnly kernel: no inputs to build, it calls its launcher itself
        with capture_launches(case.kernel_module) as launches:
            case.launch(shape, device)
        return launches
    inputs = case.build(shape, device, seed=0)
    with capture_launches(case.kernel_module) as launches:
        case.run_kernel(inputs)
    return launches


def static_report(
    case: Case, archs=ARCHS, real: bool = False, timeout: float | None = None
) -> list[StaticRow]:
    """One row per (static shape, kernel launched, arch). ``real``: launch on this GPU and read that cubin.
    ``timeout``: seconds the compiling child process may take (where kernels are interpreted here)."""
    if real:
        return _launched(case)
    if INTERPRETED:
        return _in_compiling_process(case.name, archs, timeout)
    rows = []
    for shape in case.static_shapes():
        for launch in capture(case, shape):
            num_warps = launch.kwargs.get("num_warps", 4)
            for arch in archs:
                try:
                    compiled = compile_aot(launch, arch)
                except Exception as error:  # a target that cannot take the kernel: report why, go on
                    reason = str(error).strip().splitlines()[-1][:200]
                    rows.append(
                        StaticRow(launch.kernel, shape.label, f"sm_{arch}", "aot", num_warps, error=reason)
                    )
                    continue
                rows.append(describe(compiled, launch.kernel, shape.label, f"sm_{arch}", "aot", num_warps))
    return rows


def _launched(case: Case) -> list[StaticRow]:
    import torch

    major, minor = torch.cuda.get_device_capability()
    rows = []
    for shape in case.static_shapes():
        for launch in capture(case, shape, device="cuda"):
            compiled = launch.jit[launch.grid](*launch.args, **launch.kwargs)
            num_warps = launch.kwargs.get("num_warps", 4)
            rows.append(
                describe(compiled, launch.kernel, shape.label, f"sm_{major}{minor}", "launch", num_warps)
            )
    return rows


# Rows compiled in child processes, by (case name, archs): a compile is a pure function of the kernel source
# and the launch, and the CLI, the proxy check and the static tests ask for the same cases.
_compiled: dict[tuple[str, tuple[int, ...]], list[StaticRow]] = {}


def _in_compiling_process(case_name: str, archs: tuple[int, ...], timeout: float | None) -> list[StaticRow]:
    compile_in_children([case_name], archs, timeout)
    return _compiled[(case_name, archs)]


def compiled(case_name: str, archs=ARCHS) -> bool:
    """Whether this process already holds ``case_name``'s static report from a child's compile."""
    return (case_name, tuple(archs)) in _compiled


@dataclass
class _Compiling:
    """A child process compiling its share of the cases; its output goes to files, so that a child started
    in the background never blocks on a full pipe."""

    share: list[str]
    archs: tuple[int, ...]
    child: subprocess.Popen
    out: object  # temporary files
    err: object


_running: list[_Compiling] = []


def _start(case_names, archs) -> list[_Compiling]:
    busy = {(name, job.archs) for job in _running for name in job.share}
    todo = [n for n in dict.fromkeys(case_names) if (n, archs) not in _compiled and (n, archs) not in busy]
    cores = max(1, os.cpu_count() or 1)
    env = child_env(TRITON_INTERPRET="0")
    started = []
    for share in (todo[i::cores] for i in range(min(len(todo), cores))):
        out, err = tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")
        command = [sys.executable, "-m", "bench.measure.static", ",".join(share), *map(str, archs)]
        child = subprocess.Popen(command, stdout=out, stderr=err, text=True, env=env)
        started.append(_Compiling(share, archs, child, out, err))
    _running.extend(started)
    return started


def _stop(jobs) -> None:
    for job in list(jobs):
        if job.child.poll() is None:
            job.child.kill()
            job.child.wait()
        job.out.close()
        job.err.close()
        _running.remove(job)


def start_compiles(case_names, archs=ARCHS) -> None:
    """Starts compiling the static reports of ``case_names`` (those neither compiled nor being compiled) and
    returns at once: the interpreter's work (verification, traffic, the other tests) runs beside the
    compile, which uses the cores it leaves idle. compile_in_children collects them; stop_compiles ends
    them unread."""
    _start(case_names, archs)


def stop_compiles() -> None:
    _stop(_running)


def compile_in_children(case_names, archs=ARCHS, timeout: float | None = None) -> None:
    """Compiles the static reports of ``case_names`` not compiled yet in child processes (TRITON_INTERPRET=0),
    one per core, each taking its share of the cases in turn (the compiles are independent and
    single-threaded; a child pays torch's import once, not once a case), and collects those started
    earlier by start_compiles. Past ``timeout`` seconds it raises subprocess.TimeoutExpired, having killed
    the children this call started; those started in the background run on, for a later call."""
    import time

    wanted = {(name, archs) for name in case_names}
    started = _start(case_names, archs)
    deadline = None if timeout is None else time.monotonic() + timeout
    try:
        for job in [j for j in _running if any((n, j.archs) in wanted for n in j.share)]:
            left = None if deadline is None else max(deadline - time.monotonic(), 0.01)
            job.child.wait(timeout=left)
            job.out.seek(0)
            job.err.seek(0)
            out, err = job.out.read(), job.err.read()
            failed = job.child.returncode != 0
            _stop([job])
            if failed:
                raise RuntimeError(f"static report for {', '.join(job.share)} failed:\n{err[-3000:]}")
            for name, rows in json.loads(out).items():
                _compiled[(name, job.archs)] = [StaticRow(**row) for row in rows]
    except BaseException:
        _stop([job for job in started if job in _running])
        raise


def _main(argv: list[str]) -> None:
    """``python -m bench.measure.static CASE[,CASE...] [ARCH...]``: each case's rows, as JSON keyed by case
    (static_report's child process)."""
    archs = tuple(int(a) for a in argv[1:]) or ARCHS
    names = argv[0].split(",")
    known = {**CASES, **STATIC_ONLY}
    print(json.dumps({name: [row.as_dict() for row in static_report(known[name], archs)] for name in names}))


if __name__ == "__main__":
    _main(sys.argv[1:])
