"""Continuous batching, simulated: the one scheduler model the capacity study (bench/serving/capacity.py) and
the advisor (bench/serving/advisor.py) both run their requests through.

A replica's KV pool holds ``pool_tokens`` token slots. Each simulated step:

1. arrivals: every request is waiting at the start, or questions arrive at ``arrival_rate`` a step
   (Poisson), each with its parallel samples;
2. admission, first come, first served: waiting sequences (preempted ones first, in arrival order, then
   new ones) start while their first slots fit above the watermark (``watermark`` of the pool kept free,
   1% as vLLM's block manager keeps; KV-aware) and, with ``max_num_seqs``, while fewer than that run. A
   sequence that does not fit stops admission: no later one jumps the queue;
3. decode: every running sequence gains ``stride`` tokens (fewer where it finishes sooner);
4. preemption: when the pool cannot hold what the running sequences now need, the newest are preempted
   (their slots freed) and later recomputed: readmitted, a sequence prefills its prompt and the tokens it
   had generated in one go (vLLM's recompute: the output so far is kept, its KV computed again), then
   decodes on from there;
5. finished sequences free their slots.

What a sequence holds depends on the reservation policy: ``paged-B``, whole blocks of B slots as its tokens
arrive (PagedAttention), and with ``fork`` the parallel samples of one question share their prompt's full
blocks, counted once; ``contiguous``, its prompt plus the generation cap reserved at admission (a server
without paging cannot know the output's length); ``pow2``, the next power of two of its length, doubled when
outgrown. With ``step_time`` (the decode-step model: the seconds one decode step, a token for every running
sequence, takes for a batch at a mean context) the simulation keeps a clock: each step's decode time by
bound, prompts' prefill at ``prefill_s_per_token``, and the time admission waited on the pool.
"""

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

#: The share of GPU memory a serving engine takes (vLLM's gpu_memory_utilization default).
MEMORY_UTILISATION = 0.9
#: Memory kept for activations beside the weights and the KV pool.
ACTIVATION_RESERVE_GIB = 2.0
ACTIVATION_RESERVE_BYTES = ACTIVATION_RESERVE_GIB * 2**30


def kv_pool_bytes(memory_bytes: float, weights: float) -> float:
    """A rank's KV pool, vLLM's rule: the memory an engine may use (MEMORY_UTILISATION of the GPU's), less
    its weights and the activations' reserve. The capacity study and the advisor's memory plan both."""
    return memory_bytes * MEMORY_UTILISATION - weights - ACTIVATION_RESERVE_BYTES


def kv_pool_bytes_of_free(memory_bytes: float, weights: float) -> float:
    """A rank's KV pool, TensorRT-LLM's rule: MEMORY_UTILISATION of what the weights and the activations'
    reserve leave free (free_gpu_memory_fraction, default 0.9; TensorRT-LLM docs, How to Change KV Cache
    Behavior)."""
    return MEMORY_UTILISATION * (memory_bytes - weights - ACTIVATION_RESERVE_BYTES)


#: The share of the pool kept free at admission, as vLLM's block manager does.
WATERMARK = 0.01
#: New sequences considered for admission in one step (a bound that keeps the vectors short; a step of a
#: saturated capacity run admits far fewer).
ADMISSION_WINDOW = 4096

StepTime = Callable[[int, float], tuple[float, dict]]


@dataclass(frozen=True)
class Requests:
    """The sequences to serve, in arrival order: each one's prompt and output lengths (tokens) and the
    question it answers; a question's parallel samples are consecutive, questions numbered from 0 up."""

    prompt: np.ndarray
    output: np.ndarray
    question: np.ndarray

    @classmethod
    def from_draw(cls, prompts: np.ndarray, outputs: np.ndarray) -> "Requests":
        """From a workload's draw: prompt lengths [questions], output lengths [questions, samples]."""
        questions, samples = outputs.shape
        question = np.repeat(np.arange(questions), samples)
        return cls(
            prompt=np.asarray(prompts, dtype=np.int64)[question],
            output=np.asarray(outputs, dtype=np.int64).reshape(-1),
            question=question,
        )

    def __len__(self) -> int:
        return len(self.prompt)


@dataclass(frozen=True)
class Batching:
    """How one replica batches: its pool, reservation policy, stride and limits, and optionally a clock.

    ``steps``: stop after this many steps (None: when every request is done, or none can ever fit);
    ``warmup_steps``: steps before the pool's shares are averaged."""

    pool_tokens: int
    policy: str = "paged-16"  # paged-B, contiguous or pow2
    cap: int = 0  # the generation cap a contiguous reservation holds beside the prompt
    stride: int = 16  # tokens every running sequence decodes in one simulated step
    max_num_seqs: int | None = None
    arrival_rate: float | None = None  # questions a step (Poisson); None: all waiting at the start
    fork: bool = False  # paged: a question's samples share their prompt's full blocks
    steps: int | None = None
    warmup_steps: int = 0
    step_time: StepTime | None = None  # (batch, mean context) -> (seconds a decode step, {bound: seconds})
    prefill_s_per_token: float = 0.0
    watermark: float = WATERMARK
    seed: int = 0  # of the arrival draws
    # Slots every running sequence holds beside its tokens': its sliding-window layers' pages
    # (ModelSpec.window_slots), a fixed window however long the sequence.
    window_slots: int = 0

    def __post_init__(self):
        kind, _, block = self.policy.partition("-")
        paged = kind == "paged" and block.isdigit() and int(block) > 0
        if not paged and self.policy not in ("contiguous", "pow2"):
            raise ValueError(f"policy: expected paged-<block>, contiguous or pow2, got {self.policy!r}")
        if self.policy == "contiguous" and self.cap < 1:
            raise ValueError(f"cap: a contiguous reservation needs the generation cap, got {self.cap}")
        if self.stride < 1:
            raise ValueError(f"stride: expected a positive integer, got {self.stride}")
        if self.pool_tokens < 0:
            raise ValueError(f"pool_tokens: expected a non-negative integer, got {self.pool_tokens}")
        if self.arrival_rate is not None and not self.arrival_rate > 0:
            raise ValueError(f"arrival_rate: expected a positive number or None, got {self.arrival_rate}")
        if self.window_slots < 0:
            raise ValueError(f"window_slots: expected a non-negative integer, got {self.window_slots}")
        if self.max_num_seqs is not None and self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs: expected a positive integer or None, got {self.max_num_seqs}")

    @property
    def block(self) -> int:
        """Slots a sequence's allocation grows by: the page (paged), one slot otherwise."""
        return int(self.policy.split("-")[1]) if self.policy.startswith("paged-") else 1


@dataclass(frozen=True)
class BatchingResult:
    """What one simulation saw. Shares of the pool (they add up to 1) and ``sequences`` are averaged over
    the steps after warm-up; the seconds are the clock's (0 without a step_time)."""

    pool_tokens: int
    steps: int
    held: float  # slots holding token states
    slack: float  # paged: allocated blocks' unused slots
    reserved_unused: float  # contiguous, pow2: reserved for tokens not yet generated
    free: float
    sequences: float  # running at once
    peak_sequences: int
    peak_slots: int  # the most slots the running sequences held once a step's preemptions were done
    preemptions: int
    recomputed_tokens: int  # generated tokens whose KV a preemption dropped (prefilled again on readmission)
    sequences_done: int
    questions_done: int  # every sample finished
    output_tokens_done: int  # of the finished sequences
    seconds: float  # the makespan
    kv_wait_seconds: float  # decode time while admission waited on the pool
    decoded_tokens: int
    token_seconds: float  # each decoded token's step time, summed: token_seconds / decoded_tokens is TPOT
    by_bound: dict = field(default_factory=dict)  # decode seconds by what bound each step

    @property
    def tpot_s(self) -> float:
        return self.token_seconds / self.decoded_tokens if self.decoded_tokens else 0.0


def _first_of_question(questions: np.ndarray) -> np.ndarray:
    """True where a sequence is its question's first in running order (the one a shared prompt is counted
    on: preemption drops the newest, so a question's shared blocks go only with its last sequence)."""
    first = np.zeros(len(questions), dtype=bool)
    first[np.unique(questions, return_index=True)[1]] = True
    return first


class _Replica:
    """The simulation's state: the running sequences (ids into the requests, lengths, reservations, in
    admission order) and the slots they hold, the waiting ones (preempted ids, then the unadmitted requests
    from ``head``), and the tallies."""

    def __init__(self, config: Batching, requests: Requests):
        self.config, self.requests = config, requests
        self.target = requests.prompt + requests.output
        self.block, self.paged = config.block, config.policy.startswith("paged-")
        # The fewest slots a newcomer can take: a block, pow2's smallest reservation, or prompt + the cap.
        self.min_slots = self.block if self.paged else (16 if config.policy == "pow2" else config.cap)
        self.shared = requests.prompt // self.block * self.block if config.fork and self.paged else None
        self.usable = config.pool_tokens // self.block * self.block
        self.reserve = int(config.watermark * (config.pool_tokens // self.block)) * self.block
        self.seq, self.length, self.reserved = (np.zeros(0, dtype=np.int64) for _ in range(3))
        self.held = np.zeros(0, dtype=np.int64)  # slots each running sequence holds
        self.used = 0  # and all of them
        self.requeued = np.zeros(0, dtype=np.int64)
        self.generated = np.zeros(len(requests), dtype=np.int64)  # tokens a preempted sequence had made
        self.head = 0
        self.arrived = len(requests) if config.arrival_rate is None else 0
        self.arrived_questions = 0
        self.arrivals = np.random.default_rng(config.seed)
        self.unfinished = np.bincount(requests.question)
        tallies = ("peak", "peak_slots", "preemptions", "recomputed", "done", "questions", "output")
        self.tally = dict.fromkeys(tallies, 0)
        self.clock = dict(seconds=0.0, kv_wait=0.0, decoded=0, token_seconds=0.0)
        self.by_bound: dict[str, float] = {}
        self.shares, self.measured_steps, self.sequences_total = np.zeros(4), 0, 0.0

    # -- what the sequences hold -----------------------------------------------------------------------------

    def reservation(self, length: np.ndarray) -> np.ndarray:
        if self.config.policy == "contiguous":
            return length + self.config.cap
        if self.config.policy == "pow2":
            return (2 ** np.ceil(np.log2(np.maximum(length, 16)))).astype(np.int64)
        return np.zeros_like(length)

    def shared_elsewhere(self, seq: np.ndarray) -> np.ndarray | int:
        """Prompt slots each sequence (in running order) shares with an earlier one of its question: 0
        without forks."""
        if self.shared is None:
            return 0
        return self.shared[seq] * ~_first_of_question(self.requests.question[seq])

    def slots(self, seq: np.ndarray, length: np.ndarray, reserved: np.ndarray) -> np.ndarray:
        """Slots each sequence holds, in running order: whole blocks for its tokens (paged; a shared prompt's
        full blocks on its question's first sequence only), or its reservation; and its window_slots."""
        if not self.paged:
            return reserved + self.config.window_slots
        return -(-length // self.block) * self.block - self.shared_elsewhere(seq) + self.config.window_slots

    # -- one step --------------------------------------------------------------------------------------------

    def arrive(self) -> None:
        if self.config.arrival_rate is None:
            return
        self.arrived_questions += int(self.arrivals.poisson(self.config.arrival_rate))
        self.arrived = int(np.searchsorted(self.requests.question, self.arrived_questions))

    def waiting(self) -> bool:
        return bool(len(self.requeued)) or self.head < self.arrived

    def admit(self) -> None:
        """First come, first served while the newcomers' first slots fit above the watermark."""
        room = self.usable - self.reserve - self.used
        window = min(ADMISSION_WINDOW, room // max(self.min_slots, 1))  # no more could fit
        if self.config.max_num_seqs is not None:
            window = min(window, self.config.max_num_seqs - len(self.seq))
        requeued = self.requeued[: max(window, 0)]
        fresh = np.arange(self.head, min(self.head + window - len(requeued), self.arrived))
        candidates = np.concatenate([requeued, fresh])
        if not len(candidates):
            return
        # What each prefills: its prompt, and a preempted one's tokens so far with it. Contiguous reserves
        # the prompt plus the cap, as at its first admission.
        prompt, generated = self.requests.prompt[candidates], self.generated[candidates]
        reserved = self.reservation(prompt if self.config.policy == "contiguous" else prompt + generated)
        prompt = prompt + generated
        seq = np.concatenate([self.seq, candidates])
        first_token = np.concatenate([self.length, prompt + 1])  # room for the first token it decodes
        slots = self.slots(seq, first_token, np.concatenate([self.reserved, reserved]))[len(self.seq) :]
        admitted = int(np.searchsorted(np.cumsum(slots), room, side="right"))
        from_requeue = min(admitted, len(requeued))
        self.requeued = self.requeued[from_requeue:]
        self.head += admitted - from_requeue
        self.seq = seq[: len(self.seq) + admitted]
        self.length = np.concatenate([self.length, prompt[:admitted]])
        self.reserved = np.concatenate([self.reserved, reserved[:admitted]])
        self.clock["seconds"] += self.config.prefill_s_per_token * int(prompt[:admitted].sum())

    def decode(self, blocked: bool) -> None:
        """``stride`` tokens of every running sequence, at the step model's time for this batch and its mean
        context (halfway through the stride)."""
        config = self.config
        grow = np.minimum(config.stride, self.target[self.seq] - self.length)
        if config.step_time is not None:
            mean = int(self.length.sum()) / len(self.seq)
            seconds, bounds = config.step_time(len(self.seq), mean + config.stride / 2)
            steps, tokens = int(grow.max()), int(grow.sum())
            self.clock["seconds"] += seconds * steps
            self.clock["kv_wait"] += seconds * steps if blocked else 0.0
            self.clock["decoded"] += tokens
            self.clock["token_seconds"] += seconds * tokens
            for bound, share in bounds.items():
                self.by_bound[bound] = self.by_bound.get(bound, 0.0) + share * steps
        self.length = self.length + grow
        if config.policy == "pow2":  # reservations double when outgrown
            self.reserved = np.maximum(self.reserved, self.reservation(self.length))

    def preempt(self) -> None:
        """The newest sequences out until the rest fit the pool; back to the queue in arrival order."""
        self.held = self.slots(self.seq, self.length, self.reserved)
        held = np.cumsum(self.held)
        keep = int(np.searchsorted(held, self.usable, side="right"))
        self.tally["peak_slots"] = max(self.tally["peak_slots"], int(held[keep - 1]) if keep else 0)
        if keep == len(self.seq):
            return
        self.held = self.held[:keep]
        out = self.seq[keep:]
        self.tally["preemptions"] += len(out)
        self.generated[out] = self.length[keep:] - self.requests.prompt[out]
        self.tally["recomputed"] += int(self.generated[out].sum())
        self.requeued = np.sort(np.concatenate([self.requeued, out]))
        self.seq, self.length, self.reserved = self.seq[:keep], self.length[:keep], self.reserved[:keep]

    def finish(self) -> None:
        """Finished sequences leave (a question is done with its last sample); the slots held now."""
        done = self.length >= self.target[self.seq]
        if done.any():
            finished = self.seq[done]
            questions = self.requests.question[finished]
            np.subtract.at(self.unfinished, questions, 1)
            self.tally["questions"] += int((self.unfinished[np.unique(questions)] == 0).sum())
            self.tally["done"] += len(finished)
            self.tally["output"] += int(self.requests.output[finished].sum())
            keep = ~done
            self.seq, self.length, self.reserved = self.seq[keep], self.length[keep], self.reserved[keep]
            # A shared prompt passes to its question's next sequence: recount; else the rest hold as before.
            self.held = (
                self.slots(self.seq, self.length, self.reserved)
                if self.shared is not None
                else self.held[keep]
            )
        self.used = int(self.held.sum())

    def measure(self) -> None:
        """The pool's shares now: slots holding token states (a shared prompt counted once), last-block slack
        (paged), reserved but unused, free."""
        tokens = int(self.length.sum()) + self.config.window_slots * len(self.seq)  # a window holds states
        if self.shared is not None:
            tokens -= int(self.shared_elsewhere(self.seq).sum())
        slack = self.used - tokens if self.paged else 0
        self.shares += (tokens, slack, self.used - tokens - slack, self.config.pool_tokens - self.used)
        self.sequences_total += len(self.seq)
        self.measured_steps += 1

    def result(self, steps: int) -> BatchingResult:
        measured = max(1, self.measured_steps)
        held, slack, reserved_unused, free = self.shares / measured / max(self.config.pool_tokens, 1)
        return BatchingResult(
            pool_tokens=self.config.pool_tokens,
            steps=steps,
            held=float(held),
            slack=float(slack),
            reserved_unused=float(reserved_unused),
            free=float(free),
            sequences=self.sequences_total / measured,
            peak_sequences=self.tally["peak"],
            peak_slots=self.tally["peak_slots"],
            preemptions=self.tally["preemptions"],
            recomputed_tokens=self.tally["recomputed"],
            sequences_done=self.tally["done"],
            questions_done=self.tally["questions"],
            output_tokens_done=self.tally["output"],
            seconds=self.clock["seconds"],
            kv_wait_seconds=self.clock["kv_wait"],
            decoded_tokens=self.clock["decoded"],
            token_seconds=self.clock["token_seconds"],
            by_bound=self.by_bound,
        )


def simulate(config: Batching, requests: Requests) -> BatchingResult:
    """``requests`` through one replica batching as ``config`` says, for ``config.steps`` steps or until
    every request is done (or the first waiting one cannot fit even an empty pool)."""
    replica = _Replica(config, requests)
    limit = math.inf if config.steps is None else config.steps
    step = 0
    while step < limit:
        replica.arrive()
        replica.admit()
        running = len(replica.seq)
        if not running and (replica.waiting() or replica.head == len(requests)):
            break  # all done, or nothing fits an empty pool
        replica.tally["peak"] = max(replica.tally["peak"], running)
        limited = config.max_num_seqs is not None and running >= config.max_num_seqs
        if running:
            replica.decode(blocked=replica.waiting() and not limited)
            replica.preempt()
            replica.finish()
        if step >= config.warmup_steps:
            replica.measure()
        step += 1
    return replica.result(step)
