"""`decodebench advise`: the data / tensor / pipeline (and expert) parallel layout of N GPUs that serves a
reasoning workload fastest, from the decode-step model and a simulation of the requests through continuous
batching (bench/serving/advisor.py).

    decodebench advise MODEL --gpus N [--gpu ...] [--interconnect ...] [--workload NAME|fixed:ISL:OSL]
                           [--requests R] [--kv bf16|fp8] [--weights bf16|fp8] [--host-us US]
                           [--max-seqs S] [--max-tpot MS] [--json FILE] [--plot PNG] [--config PATH]

MODEL is a preset (bench/serving/models.py: MODEL_SPECS) or, with --config, a name for a Hugging Face
config.json; the GPU, the interconnect and the precision flags as for `decodebench step`
(bench/commands/model_inputs.py).
"""

import json
import time

from bench.commands.arguments import (
    UsageError,
    checked,
    json_file,
    output_file,
    positive_int,
    positive_number,
    ready_to_write,
)
from bench.commands.model_inputs import INTERCONNECT_HELP, model_gpu_and_link, precision_arguments, sources
from bench.format import table
from bench.measure import plots
from bench.serving import advisor
from bench.serving.workloads import WORKLOADS, fixed_workload

WORKLOAD_ALIASES = {
    "natural-reasoning": "NaturalReasoning-like",
    "math500": "MATH-500-like",
    "aime": "AIME-like",
}


def workload_of(text: str):
    """A named workload (or its alias), or fixed:ISL:OSL: every request the same lengths."""
    if text.startswith("fixed:"):
        parts = text.split(":")
        try:
            prompt, output = (int(part) for part in parts[1:])
        except ValueError:
            raise UsageError(f"--workload: expected fixed:ISL:OSL with two integers, got {text}") from None
        return checked(fixed_workload, prompt, output)
    name = WORKLOAD_ALIASES.get(text, text)
    if name not in WORKLOADS:
        choices = ", ".join([*WORKLOADS, *WORKLOAD_ALIASES, "fixed:ISL:OSL"])
        raise UsageError(f"--workload: expected one of {choices}, got {text}")
    return WORKLOADS[name]


def headline(run: dict) -> str:
    """What was asked, from the run's description (the JSON document's header fields)."""
    limit = f", time per output token at most {run['max_tpot_ms']:g} ms" if run["max_tpot_ms"] else ""
    return (
        f"{run['model']} ({run['weights']} weights, KV {run['kv']}) on {run['gpus']} x {run['gpu']} over "
        f"{run['interconnect']}: {run['requests']} {run['workload']} requests, all arriving at once; each "
        f"layout at its best max_num_seqs of {run['max_num_seqs']}{limit}\n"
    )


def cmd_advise(args) -> int:
    spec, hw, link = model_gpu_and_link(args)
    workload = workload_of(args.workload)
    sweep = (args.max_seqs,) if args.max_seqs else advisor.MAX_NUM_SEQS
    kv_bytes = 1 if args.kv == "fp8" else 2
    start = time.perf_counter()
    outcomes = advisor.advise(
        spec,
        args.gpus,
        hw,
        link,
        workload,
        args.requests,
        sweep=sweep,
        kv_bytes=kv_bytes,
        max_tpot_ms=args.max_tpot,
    )
    seconds = time.perf_counter() - start
    fitting = [o for o in outcomes if o.fits]
    if not fitting:
        why = "; ".join(f"{o.layout.label}: {o.why}" for o in outcomes[:4])
        raise UsageError(f"{spec.name} fits no layout of {args.gpus} GPUs ({why})")
    run = {
        "model": spec.name,
        "gpus": args.gpus,
        "gpu": hw.name,
        "interconnect": link.name,
        "workload": workload.name,
        "requests": args.requests,
        "weights": spec.precision,
        "kv": args.kv,
        "max_num_seqs": list(sweep),
        "max_tpot_ms": args.max_tpot,
    }
    print(headline(run))
    rows = []
    for o in outcomes:
        r = o.row()
        rows.append(
            [
                r["layout"],
                r["max_num_seqs"] or "",
                f"{o.seconds:,.0f}" if o.fits else "-",
                f"{o.tokens_per_s:,.0f}" if o.fits else "-",
                f"{o.tokens_per_s_per_gpu:,.0f}" if o.fits else "-",
                f"{o.steady_tokens_per_s / o.layout.gpus:,.0f}" if o.fits else "-",
                f"{o.tpot_ms:.1f}" if o.fits else "-",
                o.peak_sequences if o.fits else "-",
                f"{r.get('weights_gb_per_rank', 0):.0f}",
                f"{r.get('kv_pool_tokens', 0):,}",
                f"{r.get('sequences_held', 0):,}",
                o.bound if o.fits else f"does not fit: {o.why}",
            ]
        )
    headers = [
        "layout",
        "max seqs",
        "makespan s",
        "tokens/s",
        "tokens/s a GPU",
        "steady a GPU",
        "TPOT ms",
        "peak seqs",
        "weights GB/rank",
        "KV pool tokens",
        "seqs it holds",
        "binding constraint",
    ]
    print(table(rows, headers))
    if len(fitting) > 1:
        print(
            f"\nbest: {fitting[0].layout.label}; runner-up {fitting[1].layout.label} takes "
            f"{fitting[1].seconds / fitting[0].seconds:.2f}x as long"
        )
    print(f"\nprojected, not measured; ceilings:\n{sources(hw, link)}\n({seconds:.1f} s)")
    if args.json:
        document = advisor.as_json(outcomes, **run, sources=hw.sources, projected=True)
        ready_to_write(args.json).write_text(json.dumps(document, indent=1))
        print(f"written: {args.json}")
    if args.plot:
        print(plots.advise_bars(fitting, f"{spec.name} on {args.gpus} GPUs", ready_to_write(args.plot)))
    return 0


def register(sub) -> None:
    advise = sub.add_parser("advise", help="the fastest parallel layout for a model, workload and GPU count")
    advise.add_argument("model")
    advise.add_argument("--config", type=json_file, help="a Hugging Face config.json describing MODEL")
    advise.add_argument("--gpus", type=positive_int, required=True)
    advise.add_argument("--gpu", default="h200", help="h100, h200, or a gpu-check result folder")
    advise.add_argument("--interconnect", default="nvlink", help=INTERCONNECT_HELP)
    advise.add_argument(
        "--workload",
        default="natural-reasoning",
        help=f"the requests' lengths: {', '.join([*WORKLOADS, *WORKLOAD_ALIASES])} or fixed:ISL:OSL "
        "(default: NaturalReasoning-like, the scaling study's, arXiv 2605.19775)",
    )
    advise.add_argument("--requests", type=positive_int, default=2048)
    precision_arguments(advise)
    advise.add_argument("--max-seqs", type=positive_int, help="sequences a replica runs at once (no sweep)")
    advise.add_argument(
        "--max-tpot",
        type=positive_number(),
        help="ms: the best throughput with the time per output token at most this",
    )
    advise.add_argument("--json", type=output_file, help="write the ranked layouts here")
    advise.add_argument("--plot", type=output_file, help="also the layouts' makespans as bars (plot extra)")
    advise.set_defaults(func=cmd_advise)
