"""`decodebench step` and `decodebench advise`: a whole decode step stage by stage, and the parallel layout
that serves a reasoning workload fastest (bench/serving/step.py, bench/serving/advisor.py).

    decodebench step MODEL [--tp T] [--ep E] [--dp D] [--pp P] [--batch B] [--context L] [--kv bf16|fp8]
                           [--gpu h100|h200|RESULTS] [--interconnect nvlink|pcie|ib] [--config PATH]
                           [--plot PNG]
    decodebench advise MODEL --gpus N [--gpu ...] [--interconnect ...] [--workload NAME] [--requests R]
                           [--json FILE] [--plot PNG] [--config PATH]

MODEL is a preset (bench/serving/models.py: MODEL_SPECS) or, with --config, a name for a Hugging Face
config.json. --gpu RESULTS: a gpu-check result folder; its measured ceilings and kernel efficiencies replace
the anchors. The files are read here (bench.measure.results) and handed to bench/serving as their contents.
"""

import json
import time
from pathlib import Path

import torch

from bench.commands.arguments import (
    UsageError,
    checked,
    json_file,
    output_file,
    positive_int,
    ready_to_write,
)
from bench.format import table
from bench.measure import results
from bench.serving import advisor
from bench.serving.hardware import GPUS, INTERCONNECTS, Hardware, Interconnect
from bench.serving.models import MODEL_SPECS, ModelSpec, model_from_hf_config
from bench.serving.step import Layout, check_layout, seconds_by_bound, step_stages
from bench.serving.workloads import WORKLOADS

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


def cmd_step(args) -> int:
    spec = model_of(args.model, args.config)
    hw, link = hardware_of(args.gpu), interconnect_of(args.interconnect)
    layout = Layout(dp=args.dp, tp=args.tp, pp=args.pp, ep=args.ep)
    checked(check_layout, spec, layout)
    kv_bytes = 1 if args.kv == "fp8" else 2
    stages = step_stages(spec, layout, args.batch, args.context, hw, link, kv_bytes=kv_bytes)
    total = sum(s.step_seconds for s in stages)
    timed = {}
    if torch.cuda.is_available() and not args.project:
        from bench.measure.step_timing import time_stages

        timed = time_stages(spec, layout, args.batch, args.context, stages)
    rows = []
    for s in stages:
        row = [
            s.name,
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
        f"\nstep: {total * 1e3:.2f} ms, {args.batch * layout.dp / total:,.0f} tokens/s on {layout.gpus} GPUs"
    )
    print("by bound: " + ", ".join(f"{k} {100 * v / total:.0f}%" for k, v in by_bound.items()))
    print(f"\nceilings:\n{_sources(hw, link)}")
    if args.plot:
        from bench.commands import plots

        print(
            plots.step_bars(
                stages,
                f"{spec.name} {layout.label} b={args.batch} ctx={args.context}",
                ready_to_write(args.plot),
            )
        )
    return 0


def cmd_advise(args) -> int:
    spec = model_of(args.model, args.config)
    hw, link = hardware_of(args.gpu), interconnect_of(args.interconnect)
    workload = WORKLOADS[WORKLOAD_ALIASES.get(args.workload, args.workload)]
    start = time.perf_counter()
    outcomes = advisor.advise(spec, args.gpus, hw, link, workload, args.requests)
    seconds = time.perf_counter() - start
    print(
        f"{spec.name} on {args.gpus} x {hw.name} over {link.name}: {args.requests} {workload.name} requests, "
        f"all arriving at once; each layout at its best max_num_seqs of {list(advisor.MAX_NUM_SEQS)}\n"
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
        "TPOT ms",
        "peak seqs",
        "weights GB/rank",
        "KV pool tokens",
        "seqs it holds",
        "binding constraint",
    ]
    print(table(rows, headers))
    fitting = [o for o in outcomes if o.fits]
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
            sources=hw.sources,
            projected=True,
        )
        ready_to_write(args.json).write_text(json.dumps(document, indent=1))
        print(f"written: {args.json}")
    if args.plot:
        from bench.commands import plots

        print(plots.advise_bars(fitting, f"{spec.name} on {args.gpus} GPUs", ready_to_write(args.plot)))
    return 0


def add_parsers(sub) -> None:
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
    step.add_argument("--kv", choices=("bf16", "fp8"), default="bf16")
    step.add_argument("--gpu", default="h200", help="h100, h200, or a gpu-check result folder")
    step.add_argument("--interconnect", default="nvlink", help=INTERCONNECT_HELP)
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
        choices=[*WORKLOADS, *WORKLOAD_ALIASES],
        default="natural-reasoning",
        help="the requests' lengths (default: NaturalReasoning-like, the scaling study's, arXiv 2605.19775)",
    )
    advise.add_argument("--requests", type=positive_int, default=2048)
    advise.add_argument("--json", type=output_file, help="write the ranked layouts here")
    advise.add_argument("--plot", type=output_file, help="also the layouts' makespans as bars (plot extra)")
    advise.set_defaults(func=cmd_advise)
