"""`decodebench step` and `decodebench advise`: a whole decode step stage by stage, and the parallel layout
that serves a reasoning workload fastest (bench/serving/step.py, bench/serving/advisor.py).

    decodebench step MODEL [--tp T] [--ep E] [--dp D] [--pp P] [--batch B] [--context L] [--kv bf16|fp8]
                           [--weights bf16|fp8] [--host-us US] [--gpu h100|h200|RESULTS]
                           [--interconnect nvlink|pcie|ib] [--config PATH] [--json FILE] [--plot PNG]
    decodebench advise MODEL --gpus N [--gpu ...] [--interconnect ...] [--workload NAME|fixed:ISL:OSL]
                           [--requests R] [--kv bf16|fp8] [--weights bf16|fp8] [--host-us US]
                           [--max-seqs S] [--max-tpot MS] [--json FILE] [--plot PNG] [--config PATH]

MODEL is a preset (bench/serving/models.py: MODEL_SPECS) or, with --config, a name for a Hugging Face
config.json. --gpu RESULTS: a gpu-check result folder; its measured ceilings and kernel efficiencies replace
the anchors. The files are read here (bench.measure.results) and handed to bench/serving as their contents.
"""

import json
import time
from dataclasses import replace
from pathlib import Path

import torch

from bench.commands.arguments import (
    UsageError,
    checked,
    json_file,
    output_file,
    positive_int,
    positive_number,
    ready_to_write,
)
from bench.format import table
from bench.measure import plots, results
from bench.serving import advisor
from bench.serving.hardware import GPUS, INTERCONNECTS, Hardware, Interconnect
from bench.serving.models import MODEL_SPECS, ModelSpec, model_from_hf_config
from bench.serving.step import Layout, check_layout, seconds_by_bound, step_stages
from bench.serving.workloads import WORKLOADS, fixed_workload

INTERCONNECT_HELP = "nvlink, pcie, ib, or a `decodebench dist allreduce --out` file measured on 2+ GPUs"
#: The short names the command line takes for the workloads.
WORKLOAD_ALIASES = {
    "natural-reasoning": "NaturalReasoning-like",
    "math500": "MATH-500-like",
    "aime": "AIME-like",
}


def load_model_config(path, name: str | None = None) -> ModelSpec:
    """A ModelSpec from a Hugging Face config.json file: ValueError "config: <file>: why" when the file is
    no JSON object or describes no possible model."""
    try:
        fields = results.read_json_object(path)
    except ValueError as error:
        raise ValueError(f"config: {error}") from None
    return model_from_hf_config(fields, source=str(path), name=name)


def model_of(name: str, config: str | None) -> ModelSpec:
    if config:
        return checked(load_model_config, config, name)
    if name not in MODEL_SPECS:
        raise UsageError(f"MODEL: unknown {name}; presets: {', '.join(MODEL_SPECS)} (or --config PATH)")
    return MODEL_SPECS[name]


def hardware_of(gpu: str) -> Hardware:
    """A preset's anchors, or a result folder's measurements over the anchors of the GPU it names."""
    if gpu in GPUS:
        return GPUS[gpu]
    folder = Path(gpu)
    if not (folder / "machine.json").is_file():
        raise UsageError(f"--gpu: expected {', '.join(GPUS)} or a gpu-check result folder, got {gpu}")
    machine = checked(results.read_machine_json, folder / "machine.json")
    run = folder / "run.json"
    benchmarks = checked(results.load, run)["benchmarks"] if run.exists() else []
    base = GPUS["h200"] if "h200" in machine.get("gpu", "").lower() else GPUS["h100"]
    return Hardware.from_results(base, machine, benchmarks, origin=folder.name)


def interconnect_of(name: str) -> Interconnect:
    """A preset's anchors, or alpha and beta fitted to an all-reduce result file (decodebench dist)."""
    if name in INTERCONNECTS:
        return INTERCONNECTS[name]
    if not Path(name).is_file():
        raise UsageError(f"--interconnect: expected {', '.join(INTERCONNECTS)} or an all-reduce result file")
    try:
        return Interconnect.from_all_reduce(results.load(Path(name)), name)
    except ValueError as error:  # ResultFileError included: the file named, one line
        raise UsageError(f"--interconnect: {error}") from None


def _sources(hw: Hardware, link: Interconnect) -> str:
    lines = [f"- {key}: {value}" for key, value in hw.sources.items()]
    lines.append(f"- interconnect: {link.source}")
    if hw.kernel_efficiency:
        lines.append(f"- kernel efficiencies measured: {', '.join(sorted(hw.kernel_efficiency))}")
    return "\n".join(lines)


def precision_of(spec: ModelSpec, args) -> tuple[ModelSpec, Hardware]:
    """The model with --weights applied (its preset's precision otherwise), and the GPU with --host-us."""
    hw = hardware_of(args.gpu)
    if args.weights:
        spec = replace(spec, weight_bytes=1 if args.weights == "fp8" else 2)
    if args.host_us is not None:
        sources = {**hw.sources, "host": f"given: {args.host_us:g} us a step (--host-us)"}
        hw = replace(hw, host_us=args.host_us, sources=sources)
    return spec, hw


def step_document(stages, total: float) -> dict:
    """``step --json``: the step's total and every stage with its kind, time, bytes, FLOPs, bound, source."""
    return {
        "total_ms": total * 1e3,
        "stages": [
            {
                "name": s.name,
                "kind": s.kind,
                "ms": s.step_seconds * 1e3,
                "bytes": s.bytes * s.per_step,
                "flops": s.flops * s.per_step,
                "bound": s.bound,
                "source": s.source,
            }
            for s in stages
        ],
    }


def cmd_step(args) -> int:
    spec, hw = precision_of(model_of(args.model, args.config), args)
    link = interconnect_of(args.interconnect)
    layout = Layout(dp=args.dp, tp=args.tp, pp=args.pp, ep=args.ep)
    checked(check_layout, spec, layout)
    kv_bytes = 1 if args.kv == "fp8" else 2
    stages = step_stages(spec, layout, args.batch, args.context, hw, link, kv_bytes=kv_bytes)
    total = sum(s.step_seconds for s in stages)
    if args.json:
        ready_to_write(args.json).write_text(json.dumps(step_document(stages, total), indent=1))
    timed = {}
    if torch.cuda.is_available() and not args.project:
        from bench.measure.step_timing import time_stages

        timed = time_stages(spec, layout, args.batch, args.context, stages)
    rows = []
    for s in stages:
        row = [
            s.name,
            s.kind,
            f"{s.seconds * 1e6:,.1f}",
            s.per_step,
            f"{s.step_seconds * 1e3:,.3f}",
            f"{s.bytes:,.0f}",
            f"{s.flops:,.0f}",
            f"{100 * s.step_seconds / total:.1f}",
            s.bound,
            s.source,
        ]
        if timed:
            t = timed[s.name]
            measured = "-" if t.seconds is None else f"{t.seconds * 1e6:,.1f}"
            verdict = {True: "yes", False: "WRONG", None: ""}[t.verified]
            row += [measured, verdict, t.note]
        rows.append(row)
    print(
        f"{spec.name}, {layout.label}, batch {args.batch} (per replica), context {args.context}, "
        f"KV {args.kv}, "
        f"on {hw.name} over {link.name}"
    )
    if timed:
        print(
            "Projected from each stage's bytes and FLOPs, and measured here: one rank's stages run at their"
        )
        print(
            "shapes (CUDA-graph replay, L2 cleared by reading; NVTX range step.<stage>), verified where the"
        )
        print("suite has a reference; collectives keep their projections on one GPU.\n")
    else:
        print("Projected from each stage's bytes and FLOPs against the ceilings below (not timed: no GPU).\n")
    headers = [
        "stage",
        "kind",
        "us a run",
        "runs/step",
        "ms/step",
        "bytes a run",
        "FLOPs a run",
        "% step",
        "bound",
        "eff.",
    ]
    if timed:
        headers += ["measured us", "verified", "note"]
    print(table(rows, headers))
    by_bound = {k: v for k, v in seconds_by_bound(stages).items() if v}
    print(
        f"\nstep: {total * 1e3:.2f} ms, {args.batch * layout.dp / total:,.0f} tokens/s on {layout.gpus} GPUs "
        f"({args.batch * layout.dp / total / layout.gpus:,.0f} a GPU)"
    )
    print("by bound: " + ", ".join(f"{k} {100 * v / total:.0f}%" for k, v in by_bound.items()))
    print(f"\nceilings:\n{_sources(hw, link)}")
    if args.json:
        print(f"written: {args.json}")
    if args.plot:
        print(
            plots.step_bars(
                stages,
                f"{spec.name} {layout.label} b={args.batch} ctx={args.context}",
                ready_to_write(args.plot),
            )
        )
    return 0


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


def cmd_advise(args) -> int:
    spec, hw = precision_of(model_of(args.model, args.config), args)
    link = interconnect_of(args.interconnect)
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
    limit = f", time per output token at most {args.max_tpot:g} ms" if args.max_tpot else ""
    print(
        f"{spec.name} ({'fp8' if spec.weight_bytes == 1 else 'bf16'} weights, KV {args.kv}) on {args.gpus} x "
        f"{hw.name} over {link.name}: {args.requests} {workload.name} requests, all arriving at once; each "
        f"layout at its best max_num_seqs of {list(sweep)}{limit}\n"
    )
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
    print(f"\nprojected, not measured; ceilings:\n{_sources(hw, link)}\n({seconds:.1f} s)")
    if args.json:
        document = advisor.as_json(
            outcomes,
            model=spec.name,
            gpus=args.gpus,
            gpu=hw.name,
            interconnect=link.name,
            workload=workload.name,
            requests=args.requests,
            weights="fp8" if spec.weight_bytes == 1 else "bf16",
            kv=args.kv,
            max_num_seqs=list(sweep),
            max_tpot_ms=args.max_tpot,
            sources=hw.sources,
            projected=True,
        )
        ready_to_write(args.json).write_text(json.dumps(document, indent=1))
        print(f"written: {args.json}")
    if args.plot:
        print(plots.advise_bars(fitting, f"{spec.name} on {args.gpus} GPUs", ready_to_write(args.plot)))
    return 0


def _precision_arguments(parser) -> None:
    parser.add_argument("--kv", choices=("bf16", "fp8"), default="bf16", help="the KV cache's precision")
    parser.add_argument(
        "--weights", choices=("bf16", "fp8"), help="the weights' precision (default: the preset's)"
    )
    parser.add_argument(
        "--host-us", type=positive_number(), help="host work a step per engine process, us (default: none)"
    )


def register(sub) -> None:
    step = sub.add_parser(
        "step", help="one decode step of a whole model, stage by stage (projected; timed on a GPU)"
    )
    step.add_argument("model")
    step.add_argument("--config", type=json_file, help="a Hugging Face config.json describing MODEL")
    for flag in ("--dp", "--tp", "--pp", "--ep"):
        step.add_argument(flag, type=positive_int, default=1)
    step.add_argument("--batch", type=positive_int, default=64, help="sequences a replica decodes per step")
    step.add_argument(
        "--context", type=positive_int, default=8192, help="mean tokens in each sequence's KV cache"
    )
    _precision_arguments(step)
    step.add_argument("--gpu", default="h200", help="h100, h200, or a gpu-check result folder")
    step.add_argument("--interconnect", default="nvlink", help=INTERCONNECT_HELP)
    step.add_argument("--json", type=output_file, help="write the step, stage by stage, here")
    step.add_argument(
        "--plot", type=output_file, help="also a stacked bar of the step's time by stage (plot extra)"
    )
    step.add_argument("--project", action="store_true", help="on a GPU too: the projection only, nothing run")
    step.set_defaults(func=cmd_step)

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
    _precision_arguments(advise)
    advise.add_argument("--max-seqs", type=positive_int, help="sequences a replica runs at once (no sweep)")
    advise.add_argument(
        "--max-tpot",
        type=positive_number(),
        help="ms: the best throughput with the time per output token at most this",
    )
    advise.add_argument("--json", type=output_file, help="write the ranked layouts here")
    advise.add_argument("--plot", type=output_file, help="also the layouts' makespans as bars (plot extra)")
    advise.set_defaults(func=cmd_advise)
