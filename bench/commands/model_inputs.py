"""What `decodebench step`, `advise` and `validate` share: the model (a preset or a config.json), the GPU
(h100, h200, or a gpu-check result folder whose measured ceilings replace the anchors), the interconnect
(a name or a `decodebench dist allreduce` result), and the precision flags. Files are read here
(bench.measure.results) and handed to bench/serving as their contents."""

from dataclasses import replace
from pathlib import Path

from bench.commands.arguments import UsageError, checked, positive_number
from bench.measure import results
from bench.serving.hardware import GPUS, INTERCONNECTS, Hardware, Interconnect
from bench.serving.models import MODEL_SPECS, ModelSpec, model_from_hf_config

INTERCONNECT_HELP = "nvlink, pcie, ib, or a `decodebench dist allreduce --out` file measured on 2+ GPUs"


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
    base = GPUS[preset_for(machine.get("gpu", ""))]
    return Hardware.from_results(base, machine, benchmarks, origin=folder.name)


def preset_for(gpu_name: str) -> str:
    """The anchors' preset for a card by its name: the H100's for an H100, the H200's otherwise (the newer
    card's ceilings for one the presets do not know)."""
    return "h100" if "h100" in gpu_name.lower() else "h200"


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


def sources(hw: Hardware, link: Interconnect) -> str:
    lines = [f"- {key}: {value}" for key, value in hw.sources.items()]
    lines.append(f"- interconnect: {link.source}")
    if hw.kernel_times:
        lines.append(f"- kernel times measured: {', '.join(sorted(hw.kernel_times))}")
    return "\n".join(lines)


def precision_of(spec: ModelSpec, args) -> tuple[ModelSpec, Hardware]:
    """The model with --weights applied to every weight, its routed experts' too (its preset's precision
    otherwise), and the GPU with --host-us."""
    hw = hardware_of(args.gpu)
    if args.weights:
        spec = spec.with_weights(args.weights)
    if args.host_us is not None:
        sources = {**hw.sources, "host": f"given: {args.host_us:g} us a step (--host-us)"}
        hw = replace(hw, host_us=args.host_us, sources=sources)
    return spec, hw


def model_gpu_and_link(args) -> tuple[ModelSpec, Hardware, Interconnect]:
    """What step and advise model: MODEL (or --config) under the precision flags, the --gpu (with
    --host-us) and the --interconnect."""
    spec, hw = precision_of(model_of(args.model, args.config), args)
    return spec, hw, interconnect_of(args.interconnect)


def precision_arguments(parser) -> None:
    parser.add_argument("--kv", choices=("bf16", "fp8"), default="bf16", help="the KV cache's precision")
    parser.add_argument(
        "--weights", choices=("bf16", "fp8"), help="the weights' precision (default: the preset's)"
    )
    parser.add_argument(
        "--host-us", type=positive_number(), help="host work a step per engine process, us (default: none)"
    )
