"""The continuous-batching simulator's invariants, on small hand-made request sets (milliseconds each): the
pool is never overdrawn, every request finishes exactly once, a tight pool preempts and recomputes,
admission is first come first served, arrivals spread over time, and forked samples share their prompt."""

import numpy as np
import pytest

from bench.serving.batching import Batching, Requests, simulate


def _requests(prompts, outputs, samples=1) -> Requests:
    """Questions of the given prompt lengths, each answered by ``samples`` samples of the given outputs."""
    outputs = np.asarray(outputs).reshape(len(prompts), samples)
    return Requests.from_draw(np.asarray(prompts), outputs)


def _random_requests(questions, samples, seed) -> Requests:
    rng = np.random.default_rng(seed)
    return _requests(rng.integers(20, 200, questions), rng.integers(1, 400, questions * samples), samples)


CONFIGS = [
    dict(policy="paged-16"),
    dict(policy="paged-16", fork=True),
    dict(policy="paged-1", fork=True, max_num_seqs=12),
    dict(policy="contiguous", cap=400),
    dict(policy="pow2"),
]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: " ".join(f"{k}={v}" for k, v in c.items()))
def test_the_pool_is_never_overdrawn_and_every_request_finishes_once(config):
    requests = _random_requests(questions=30, samples=3, seed=1)
    result = simulate(Batching(pool_tokens=2000, stride=8, **config), requests)
    assert 1800 < result.peak_slots <= 2000  # 90 sequences of up to 600 tokens: the pool is tight
    assert result.sequences_done == len(requests) and result.questions_done == 30
    assert result.output_tokens_done == requests.output.sum()


def test_a_tight_pool_preempts_the_newest_and_recomputes_them():
    # Two sequences of 16 + 64 tokens fit 96 slots at admission but not once both have grown past 48.
    requests = _requests([16, 16], [64, 64])
    tight = simulate(Batching(pool_tokens=96, stride=16, watermark=0.0), requests)
    assert tight.preemptions >= 1 and tight.recomputed_tokens > 0
    assert tight.sequences_done == 2 and tight.peak_slots <= 96
    roomy = simulate(Batching(pool_tokens=4096, stride=16), requests)
    assert roomy.preemptions == 0 and roomy.recomputed_tokens == 0
    assert tight.steps > roomy.steps  # the preempted one ran again


def test_admission_is_first_come_first_served():
    # The second request needs the whole pool: it waits for the first to finish, and the small third one
    # waits behind it rather than starting beside the first (which would make two run at once).
    requests = _requests([16, 200, 16], [32, 16, 32])
    result = simulate(Batching(pool_tokens=224, stride=16, watermark=0.0), requests)
    assert result.peak_sequences == 1 and result.sequences_done == 3
    # With room for all three, they do run together.
    assert simulate(Batching(pool_tokens=4096, stride=16), requests).peak_sequences == 3


def test_admission_keeps_the_watermark_free():
    # Two prompts of 47 blocks (48 with their first token) in a pool of 100 blocks: both fit, but not with
    # 5 blocks kept free; the second then starts when the first is done.
    requests = _requests([16 * 47, 16 * 47], [16, 16])
    assert simulate(Batching(pool_tokens=1600, stride=16, watermark=0.05), requests).peak_sequences == 1
    assert simulate(Batching(pool_tokens=1600, stride=16, watermark=0.0), requests).peak_sequences == 2


def test_every_running_sequence_holds_its_window_slots():
    # Ten sequences of 5 blocks (prompt 64 + 16 answer) in a pool of 100 blocks all fit; with 9 blocks of
    # sliding-window pages each (gpt-oss's 144 slots) only 7 do (14 blocks each).
    requests = _requests([64] * 10, [16] * 10)
    assert simulate(Batching(pool_tokens=1600, stride=16, watermark=0.0), requests).peak_sequences == 10
    windowed = Batching(pool_tokens=1600, stride=16, watermark=0.0, window_slots=144)
    result = simulate(windowed, requests)
    assert result.peak_sequences == 7 and result.peak_slots <= 1600


def test_max_num_seqs_caps_the_batch_and_the_clock_counts_each_step():
    requests = _requests([16] * 6, [64] * 6)
    one_second = Batching(
        pool_tokens=4096,
        stride=16,
        max_num_seqs=2,
        step_time=lambda batch, context: (1.0, {"launch": 1.0}),
        prefill_s_per_token=0.01,
    )
    result = simulate(one_second, requests)
    assert result.peak_sequences == 2
    # Three pairs one after the other, 64 decode steps of a second each, and 6 x 16 prompt tokens of
    # prefill; every token waited one second.
    assert result.seconds == pytest.approx(3 * 64 + 0.96) and result.tpot_s == pytest.approx(1.0)
    assert result.by_bound == {"launch": pytest.approx(3 * 64)}
    assert result.kv_wait_seconds == 0.0  # waiting on max_num_seqs, not on the pool


def test_arrivals_spread_the_work_over_time():
    requests = _random_requests(questions=40, samples=2, seed=2)
    at_once = simulate(Batching(pool_tokens=100_000, stride=8), requests)
    trickle = simulate(Batching(pool_tokens=100_000, stride=8, arrival_rate=0.5, seed=3), requests)
    assert trickle.sequences_done == at_once.sequences_done == len(requests)
    assert trickle.steps > 40 / 0.5 * 0.5  # 40 questions at half a question a step take tens of steps
    assert trickle.steps > at_once.steps and trickle.peak_sequences < at_once.peak_sequences
    assert trickle.free > 0.9 and trickle.preemptions == 0  # a light load leaves the pool mostly free


def test_forked_samples_share_their_prompts_full_blocks():
    # One question of a 64-token prompt (4 full blocks of 16), 4 samples: after one token each, a fork
    # holds the 4 shared blocks once and one block a sample; without forks each sample holds 5 blocks.
    requests = _requests([64], [32, 32, 32, 32], samples=4)
    fork = simulate(Batching(pool_tokens=4096, stride=1, fork=True, steps=1), requests)
    copies = simulate(Batching(pool_tokens=4096, stride=1, steps=1), requests)
    assert fork.peak_slots == 64 + 4 * 16 and copies.peak_slots == 4 * 80
    assert fork.held * 4096 == pytest.approx(64 + 4)  # token states: the prompt once, a token a sample
    assert copies.held * 4096 == pytest.approx(4 * 65)
    # 192 slots: all four samples start together only when they share the prompt.
    assert simulate(Batching(pool_tokens=200, stride=1, fork=True, steps=1), requests).peak_sequences == 4
    assert simulate(Batching(pool_tokens=200, stride=1, steps=1), requests).peak_sequences == 2


def test_a_request_that_cannot_fit_an_empty_pool_ends_the_run():
    result = simulate(Batching(pool_tokens=64, stride=16), _requests([16, 500, 16], [16, 16, 16]))
    assert result.sequences_done == 1  # the first; the second can never start, the third waits behind it


@pytest.mark.parametrize(
    "fields, why",
    [
        (dict(policy="paged-0"), "policy"),
        (dict(policy="buddy"), "policy"),
        (dict(policy="contiguous"), "cap"),
        (dict(stride=0), "stride"),
        (dict(max_num_seqs=0), "max_num_seqs"),
        (dict(arrival_rate=0.0), "arrival_rate"),
    ],
)
def test_an_impossible_configuration_names_its_field(fields, why):
    with pytest.raises(ValueError, match=f"^{why}:"):
        Batching(pool_tokens=100, **fields)


def test_a_preempted_sequence_prefills_what_it_had_generated_and_decodes_on():
    """vLLM's recompute: readmitted, a preempted sequence prefills its prompt and its tokens so far in one go
    and decodes only what is left, so every output token is decoded once; the prefill clock pays for the
    recomputed tokens."""
    requests = _requests([16, 16], [64, 64])
    config = dict(pool_tokens=96, stride=16, watermark=0.0, prefill_s_per_token=1e-3)
    tight = simulate(Batching(step_time=lambda batch, context: (1.0, {}), **config), requests)
    assert tight.preemptions >= 1 and tight.recomputed_tokens > 0
    assert tight.decoded_tokens == requests.output.sum()
    no_prefill = simulate(
        Batching(step_time=lambda b, c: (1.0, {}), **{**config, "prefill_s_per_token": 0.0}), requests
    )
    # every prompt once, and each preemption's prompt (16) and generated tokens again
    prefilled = requests.prompt.sum() + 16 * tight.preemptions + tight.recomputed_tokens
    assert tight.seconds - no_prefill.seconds == pytest.approx(prefilled * 1e-3)
