"""Reasoning workloads: the prompt and output lengths of an evaluation's requests, from
docs/facts.md#reasoning-workloads and, for NaturalReasoning, docs/facts.md#the-study-behind-the-suite."""

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class ReasoningWorkload:
    """Prompt and output lengths of a reasoning evaluation, drawn log-normally around the medians and
    clipped to the evaluation's generation cap; each question is answered by ``samples`` parallel samples
    that share its prompt."""

    name: str
    prompt_median: int
    output_median: int
    output_sigma: float  # log-normal spread of the output length
    max_output: int  # the evaluation's generation cap: what a contiguous reservation must hold
    samples: int
    prompt_sigma: float = 0.4
    max_prompt: int = 2048  # prompts are clipped to this

    @property
    def mean_output(self) -> float:
        """The mean output length before the cap: a log-normal's median x exp(sigma^2 / 2)."""
        return self.output_median * math.exp(self.output_sigma**2 / 2)

    def draw(self, questions: int, rng) -> tuple:
        """(prompt lengths [questions], output lengths [questions, samples]) as numpy int arrays."""
        prompts = rng.lognormal(math.log(self.prompt_median), self.prompt_sigma, questions)
        prompts = prompts.clip(min(32, self.max_prompt), self.max_prompt).astype(int)
        outputs = rng.lognormal(math.log(self.output_median), self.output_sigma, (questions, self.samples))
        return prompts, outputs.clip(min(64, self.max_output), self.max_output).astype(int)


def fixed_workload(prompt: int, output: int) -> ReasoningWorkload:
    """Every request the same lengths: ``prompt`` tokens in, ``output`` out (as serving benchmarks run)."""
    if prompt < 1 or output < 1:
        raise ValueError(f"workload: expected fixed:ISL:OSL with positive lengths, got {prompt}:{output}")
    return ReasoningWorkload(
        name=f"fixed {prompt}/{output}",
        prompt_median=prompt,
        output_median=output,
        output_sigma=0.0,
        max_output=output,
        samples=1,
        prompt_sigma=0.0,
        max_prompt=prompt,
    )


#: MATH-500 / GSM8K-like: outputs of 1K to 3K tokens; AIME / GPQA-like: 10K to 12K with a tail to the 32K cap.
WORKLOADS: dict[str, ReasoningWorkload] = {
    w.name: w
    for w in (
        ReasoningWorkload(
            name="MATH-500-like",
            prompt_median=200,
            output_median=2000,
            output_sigma=0.6,
            max_output=32768,
            samples=4,
        ),
        ReasoningWorkload(
            name="AIME-like",
            prompt_median=250,
            output_median=10500,
            output_sigma=0.55,
            max_output=32768,
            samples=16,
        ),
        # The scaling study's (arXiv 2605.19775): 77% of prompts 50 to 150 tokens, 45% of responses over
        # 5,000 tokens (median 4,470, sigma 0.9: P(> 5,000) = 0.45; prompts median 95, sigma 0.45:
        # P(50..150) = 0.77). One answer each.
        ReasoningWorkload(
            name="NaturalReasoning-like",
            prompt_median=95,
            output_median=4470,
            output_sigma=0.9,
            max_output=32768,
            samples=1,
            prompt_sigma=0.45,
        ),
    )
}
