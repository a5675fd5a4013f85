"""Process groups for the multi-rank benchmarks and tests: start them (under torchrun, or spawned here on
127.0.0.1), keep them from hanging, name a rank that died, and reduce per-rank figures to the slowest rank.

- Every group gets a timeout: a collective a peer never joins ends with an error, never a hang.
- Liveness: each rank bumps a counter in the rendezvous store from a daemon thread. When a collective
  fails, ``guard`` waits a few beats and names the ranks whose counter stopped (dead, or hung with their
  interpreter), so the error says which rank to look at; gloo's own says only "connection reset by peer".
- ``spawn(fn, world)``: the tests', ``decodebench run``'s and ``decodebench dist --nproc``'s launcher on
  one machine (a fork server's children; gloo or NCCL). The parent holds the
  store (so it outlives any rank), the ranks bind 127.0.0.1 only, and the parent collects each rank's
  result or error, killing whatever is left at its deadline.
"""

import datetime
import multiprocessing
import os
import pickle
import queue
import shutil
import socket
import subprocess
import threading
import time
import traceback
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

#: A collective waits this long for its peers before the group gives up (tests use less).
DEFAULT_TIMEOUT_S = 120.0
_BEAT_S = 0.2
_LOCAL = "127.0.0.1"


@dataclass
class Rank:
    """This process's place in the group: rank, world size, backend, the device its tensors live on, and
    the store its liveness counter lives in."""

    rank: int
    world: int
    backend: str
    device: torch.device
    store: object
    liveness: "Liveness | None" = field(default=None, repr=False)

    def close(self) -> None:
        if self.liveness is not None:
            self.liveness.stop()
        if dist.is_initialized():
            dist.destroy_process_group()


class Liveness:
    """A counter per rank in the store, bumped every beat by a daemon thread while the process lives."""

    def __init__(self, store, rank: int, world: int):
        self.store, self.rank, self.world = store, rank, world
        self._stop = threading.Event()
        self.store.add(self._key(rank), 1)
        self._thread = threading.Thread(target=self._beat, name="decodebench-liveness", daemon=True)
        self._thread.start()

    @staticmethod
    def _key(rank: int) -> str:
        return f"decodebench/alive/{rank}"

    def _beat(self) -> None:
        while not self._stop.wait(_BEAT_S):
            try:
                self.store.add(self._key(self.rank), 1)
            except Exception:  # the store's host is gone: nothing left to tell
                return

    def _counts(self) -> list[int | None]:
        counts = []
        for rank in range(self.world):
            try:
                counts.append(self.store.add(self._key(rank), 0))
            except Exception:
                counts.append(None)
        return counts

    def unresponsive(self, beats: int = 5) -> list[int] | None:
        """Ranks whose counter did not move over ``beats`` beats; None when the store itself is gone (its
        host died: rank 0 under a plain env:// launch)."""
        before = self._counts()
        time.sleep(beats * _BEAT_S)
        after = self._counts()
        if any(c is None for c in before + after):
            return None
        return [r for r in range(self.world) if r != self.rank and after[r] == before[r]]

    def stop(self) -> None:
        self._stop.set()


class PeerFailure(RuntimeError):
    """A collective failed on this rank; the message names the ranks that stopped responding."""


@contextmanager
def guard(rank: Rank, what: str):
    """Turns a failed collective into a PeerFailure naming the unresponsive ranks. ValueError (bad input,
    raised on every rank before any collective) passes through untouched."""
    try:
        yield
    except ValueError:
        raise
    except Exception as error:
        if rank.liveness is None:
            raise
        silent = rank.liveness.unresponsive()
        if silent is None:
            who = "the rendezvous store is gone (its host, rank 0 or the launcher, died)"
        elif silent:
            who = f"rank{'s' if len(silent) > 1 else ''} {', '.join(map(str, silent))} stopped responding"
            who += " (died or hung)"
        else:
            who = "every rank still responds (one may be waiting in another collective)"
        raise PeerFailure(f"rank {rank.rank} of {rank.world}: {what} failed: {who}; {error}") from error


def _default_backend() -> str:
    return "nccl" if torch.cuda.is_available() else "gloo"


def _start(rank: int, world: int, backend: str, store, timeout_s: float) -> Rank:
    bound = {}
    if backend == "nccl":
        local = int(os.environ.get("LOCAL_RANK", rank))
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
        bound["device_id"] = device  # the communicator bound to this GPU up front (torch warns without)
    else:
        device = torch.device("cpu")
    dist.init_process_group(
        backend,
        store=dist.PrefixStore("pg", store),
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=timeout_s),
        **bound,
    )
    return Rank(rank, world, backend, device, store, Liveness(store, rank, world))


def under_torchrun() -> bool:
    return all(name in os.environ for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"))


def init_from_env(backend: str | None = None, timeout_s: float = DEFAULT_TIMEOUT_S) -> Rank:
    """The group torchrun describes in the environment (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT); the
    store is a client of torchrun's, so it outlives any rank."""
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    store = dist.TCPStore(
        os.environ["MASTER_ADDR"],
        int(os.environ["MASTER_PORT"]),
        world_size=world,
        is_master=False,
        timeout=datetime.timedelta(seconds=timeout_s),
        wait_for_workers=False,
    )
    return _start(rank, world, backend or _default_backend(), store, timeout_s)


# --- spawning ranks on this machine -------------------------------------------------------------------------


@dataclass(frozen=True)
class RankOutcome:
    """What one spawned rank left: its exit code (None if killed at the deadline), its function's return
    value, or the error it raised (type and message)."""

    rank: int
    exitcode: int | None
    result: object = None
    error: str | None = None


def loopback_only() -> None:
    """gloo's and NCCL's sockets on the loopback interface, whatever the environment named (a preset eth0
    would otherwise win): nothing a rank on this machine opens leaves it."""
    os.environ["GLOO_SOCKET_IFNAME"] = os.environ["NCCL_SOCKET_IFNAME"] = "lo"


def _spawned(payload: bytes, rank, world, port, backend, timeout_s, results) -> None:
    loopback_only()
    if backend == "gloo":  # gloo moves CPU tensors: the kernels run where they are, in the interpreter
        os.environ["TRITON_INTERPRET"] = "1"
    from bench.interpreter import setup

    setup()  # before any kernel module is imported, as in the parent

    fn, args = pickle.loads(payload)  # only now: unpickling imports the kernel modules
    os.environ["LOCAL_RANK"] = str(rank)  # rank r on GPU r, whatever the launching shell had set

    store = dist.TCPStore(
        _LOCAL, port, world_size=world, is_master=False, timeout=datetime.timedelta(seconds=timeout_s)
    )
    ctx = None
    try:
        ctx = _start(rank, world, backend, store, timeout_s)
        results.put((rank, fn(ctx, *args), None))
    except BaseException as error:  # reported to the parent, then the process exits non-zero
        results.put((rank, None, f"{type(error).__name__}: {error}\n{traceback.format_exc(limit=4)}"))
        raise SystemExit(1) from None
    finally:
        if ctx is not None:
            ctx.close()


def _ranks_context():
    """Ranks start from a fork server that imported torch and triton once: a rank starts in a fraction of a
    second instead of paying torch's import (seconds on CI's two cores) each time. The server imports none
    of the suite (a rank decides whether its kernels are interpreted before it imports them), never runs a
    kernel, starts a thread pool or touches CUDA, so forking it is as clean as a spawn."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["torch", "torch.distributed", "triton", "triton.language"])
    return context


def spawn(
    fn: Callable,
    world: int,
    *,
    args: tuple = (),
    backend: str = "gloo",
    timeout_s: float = 20.0,
    deadline_s: float = 120.0,
) -> list[RankOutcome]:
    """Runs ``fn(rank: Rank, *args)`` on ``world`` fresh processes (from a fork server: no CUDA, OpenMP or
    thread state of this process is inherited) in a ``backend`` group on 127.0.0.1 (gloo: kernels
    interpreted; nccl: rank r on GPU r, NCCL's sockets on the loopback interface); ``fn`` must be
    importable by name. Returns each rank's outcome; a rank still running at ``deadline_s`` is
    killed and reported with exitcode None, and so is one still running ``timeout_s`` (and a grace of
    10 s) after another failed: a peer left in NCCL's communicator set-up, or in a graph-replayed
    collective (which no process-group timeout watches), would otherwise wait out the deadline."""
    listener = _loopback_listener()
    store = dist.TCPStore(
        _LOCAL,
        listener.getsockname()[1],
        world_size=world,
        is_master=True,
        wait_for_workers=False,
        master_listen_fd=listener.fileno(),
        use_libuv=True,
    )
    listener.detach()  # the store owns the descriptor now, and closes it
    context = _ranks_context()
    results = context.Queue()
    payload = pickle.dumps((fn, args))
    processes = [
        context.Process(
            target=_spawned,
            args=(payload, rank, world, store.port, backend, timeout_s, results),
            name=f"decodebench-rank{rank}",
        )
        for rank in range(world)
    ]
    for process in processes:
        process.start()
    reported: dict[int, tuple] = {}
    end = time.monotonic() + deadline_s
    while len(reported) < world and time.monotonic() < end:
        try:
            rank, result, error = results.get(timeout=0.1)
            reported[rank] = (result, error)
        except queue.Empty:
            if all(not p.is_alive() for p in processes):
                break
        failed = any(error for _, error in reported.values())
        if failed or any(p.exitcode not in (None, 0) for p in processes):
            end = min(end, time.monotonic() + timeout_s + 10.0)
    outcomes = []
    for rank, process in enumerate(processes):
        process.join(max(0.0, min(5.0, end - time.monotonic())))
        if process.is_alive():
            process.kill()
            process.join()
            exitcode = None
        else:
            exitcode = process.exitcode
        result, error = reported.get(rank, (None, None))
        if error is None and exitcode not in (0, None) and rank not in reported:
            error = f"exited with code {exitcode} before reporting"
        outcomes.append(RankOutcome(rank, exitcode, result, error))
    del store
    return outcomes


def _loopback_listener() -> socket.socket:
    """A listening socket on 127.0.0.1 for the store: given its descriptor, TCPStore serves on it instead of
    binding every interface (its own bind takes the wildcard address whatever host it is given)."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((_LOCAL, 0))
    listener.listen(128)
    return listener


# --- reductions and facts -----------------------------------------------------------------------------------


def gather_floats(rank: Rank, values: list[float]) -> list[list[float]]:
    """Every rank's list of floats (same length on every rank), on every rank."""
    mine = torch.tensor(values, dtype=torch.float64, device=rank.device)
    everyone = [torch.empty_like(mine) for _ in range(rank.world)]
    dist.all_gather(everyone, mine)
    return [t.tolist() for t in everyone]


def nccl_version() -> str | None:
    if not torch.cuda.is_available():
        return None
    try:
        version = torch.cuda.nccl.version()
    except (AttributeError, RuntimeError):
        return None
    return ".".join(map(str, version)) if isinstance(version, tuple) else str(version)


def interconnect() -> str:
    """``nvidia-smi topo -m`` where present (the links between the GPUs), else what is known."""
    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            out = subprocess.run([smi, "topo", "-m"], capture_output=True, text=True, timeout=20)
            if out.returncode == 0 and out.stdout.strip():
                return out.stdout.strip()
        except (OSError, subprocess.TimeoutExpired):
            pass
    return "no nvidia-smi: CPU processes on one host (loopback)"
