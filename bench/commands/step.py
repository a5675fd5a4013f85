"""`decodebench step`: one decode step of a whole model, stage by stage (bench/serving/step.py): bytes,
FLOPs, time, share of the step and the binding ceiling per stage, projected; on a GPU each stage one rank
can run is also run at its shape and timed (bench/measure/step_timing.py).

    decodebench step MODEL [--tp T] [--ep E] [--dp D] [--pp P] [--batch B] [--context L] [--kv bf16|fp8]
                           [--weights bf16|fp8] [--host-us US] [--gpu h100|h200|RESULTS]
                           [--interconnect nvlink|pcie|ib|FILE] [--config PATH] [--json FILE] [--plot PNG]
"""

import json

import torch

from bench.commands.arguments import checked, json_file, output_file, positive_int, ready_to_write
from bench.commands.model_inputs import INTERCONNECT_HELP, model_gpu_and_link, precision_arguments, sources
from bench.format import table
from bench.measure import plots
from bench.serving.step import Deployment, Layout, seconds_by_bound, step_stages


def register(sub) -> None:
    step = sub.add_parser(
        "step", help="one decode step of a whole model, stage by stage (projected; timed on a GPU)"
    )
    step.add_argument("model")
    step.add_argument("--config", type=json_file, help="a Hugging Face config.json describing MODEL")
    for flag in ("--dp", "--tp", "--pp", "--ep"):
        step.add_argument(flag, type=positive_int, default=1)
    step.add_argument(
        "--dedup", action="store_true", help="EP: one row per (token, rank) on the wire (ep_dispatch dedup)"
    )
    step.add_argument("--batch", type=positive_int, default=64, help="sequences a replica decodes per step")
    step.add_argument(
        "--context", type=positive_int, default=8192, help="mean tokens in each sequence's KV cache"
    )
    precision_arguments(step)
    step.add_argument("--gpu", default="h200", help="h100, h200, or a gpu-check result folder")
    step.add_argument("--interconnect", default="nvlink", help=INTERCONNECT_HELP)
    step.add_argument("--json", type=output_file, help="write the step, stage by stage, here")
    step.add_argument(
        "--plot", type=output_file, help="also a stacked bar of the step's time by stage (plot extra)"
    )
    step.add_argument("--project", action="store_true", help="on a GPU too: the projection only, nothing run")
    step.set_defaults(func=main)


def step_point(spec, layout: Layout, args, hw) -> dict:
    """What a step document models, enough to project it again (``validate --gpu RESULTS`` does)."""
    return {
        "model": spec.name,
        "preset": args.config is None,
        "dp": layout.dp,
        "tp": layout.tp,
        "pp": layout.pp,
        "ep": layout.ep,
        "dedup": layout.dedup,
        "batch": args.batch,
        "context": args.context,
        "kv": args.kv,
        "weights": spec.precision,
        "host_us": hw.host_us,
        "hardware": hw.name,
    }


def step_document(stages, total: float, point: dict, timed: dict | None = None) -> dict:
    """``step --json``: the step's point, its total and every stage with its kind, time, bytes, FLOPs, bound
    and source; where a GPU timed a stage, its measured ms a step (null: kept its projection), whether it
    was verified against its reference, and the note."""
    document = {"point": point, "total_ms": total * 1e3, "stages": []}
    for s in stages:
        entry = {
            "name": s.name,
            "kind": s.kind,
            "ms": s.step_seconds * 1e3,
            "bytes": s.bytes * s.per_step,
            "flops": s.flops * s.per_step,
            "bound": s.bound,
            "source": s.source,
        }
        if timed:
            t = timed[s.name]
            entry["measured_ms"] = None if t.seconds is None else t.seconds * s.per_step * 1e3
            entry["verified"], entry["note"] = t.verified, t.note
        document["stages"].append(entry)
    return document


def main(args) -> int:
    spec, hw, link = model_gpu_and_link(args)
    layout = Layout(dp=args.dp, tp=args.tp, pp=args.pp, ep=args.ep, dedup=args.dedup)
    dep = checked(Deployment, spec, layout, hw, link, 1 if args.kv == "fp8" else 2)  # checks the layout
    stages = step_stages(dep, args.batch, args.context)
    total = sum(s.step_seconds for s in stages)
    timed = {}
    if torch.cuda.is_available() and not args.project:
        from bench.measure.step_timing import time_stages

        timed = time_stages(spec, layout, args.batch, args.context, stages)
    if args.json:
        document = step_document(stages, total, step_point(spec, layout, args, hw), timed)
        ready_to_write(args.json).write_text(json.dumps(document, indent=1))
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
    print(f"\nceilings:\n{sources(hw, link)}")
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
