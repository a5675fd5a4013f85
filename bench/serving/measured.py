"""NVIDIA's measured H200 and H100 kernel times (AIConfigurator's tables), as the command read them: through
its package when it is installed, from the committed extracts (bench/serving/data/aiconfigurator_h200.json,
aiconfigurator_h100.json) otherwise (bench/commands/validate.py).

AIConfigurator (github.com/ai-dynamo/aiconfigurator, Apache-2.0; docs/facts.md#measured-ground-truth-for-
the-decode-step-model) ships parquet tables of kernel latencies measured on each system (h200_sxm,
h100_sxm, ...). Each table here is one of its files, reduced to a map from a key (the shape) to
milliseconds; where several kernels were measured for one shape the fastest is kept (what an engine's
kernel choice gets). vLLM's tables are used (the paper's
engine); SGLang's for the MLA attention kernel alone (vLLM's measures the whole MLA module only);
TensorRT-LLM's MoE table for the rows the step model's MoE rates are taken from (not compared).

Lookups between measured shapes interpolate linearly along each numeric axis from the bracketing grid
points (and extend the last segment past the grid's edge); every row a lookup reads is recorded, which is
how the committed extracts are made (``decodebench validate --write-extract``). Only the command's reader of
the package needs pandas; lookups are plain Python.
"""

import json
from dataclasses import dataclass, field

SYSTEM = "h200_sxm"  # the default: the published runs are H200's
SYSTEMS = ("h200_sxm", "h100_sxm")  # what the package's tables hold and validate reads


@dataclass(frozen=True)
class TableSpec:
    """One AIConfigurator file: its path under systems/data/<system>/, the rows kept (column == value),
    the key columns (exact ones first, then the numeric axes interpolated over) and the latency column."""

    path: str
    exact: tuple
    axes: tuple
    where: dict = field(default_factory=dict)
    latency: str = "latency"
    to_ms: float = 1.0  # the file's latency unit in ms (its all-to-all table is in us)


# A fused-MoE table's exact key (vLLM's and TensorRT-LLM's share it): the layer's shape and split, routing.
_MOE_KEY = (
    "moe_dtype",
    "hidden_size",
    "inter_size",
    "topk",
    "num_experts",
    "moe_tp_size",
    "moe_ep_size",
    "distribution",
)

TABLES = {
    "gemm": TableSpec("gemm/vllm/0.24.0/gemm_perf.parquet", ("gemm_dtype",), ("m", "n", "k")),
    "attention": TableSpec(
        "attention/vllm/0.24.0/generation_attention_perf.parquet",
        ("kv_cache_dtype", "num_heads", "num_key_value_heads", "head_dim"),
        ("batch_size", "step"),
        {"window_size": 0, "kernel_source": "vllm_flash_attn_fa3"},
    ),
    "mla": TableSpec(
        "mla/vllm/0.24.0/mla_generation_module_perf.parquet",
        ("kv_cache_dtype", "gemm_type", "num_heads"),
        ("batch_size", "step"),
    ),
    # FlashAttention-3's MLA decode kernel alone (SGLang's table: vLLM's measures the whole module only);
    # num_heads is per rank, step the tokens cached before the new one.
    "mla_attention": TableSpec(
        "mla/sglang/0.5.14/generation_mla_perf.parquet",
        ("kv_cache_dtype", "num_heads"),
        ("batch_size", "step"),
        {"kernel_source": "flash_attention"},
    ),
    "allreduce": TableSpec(
        "comm/vllm/0.24.0/custom_allreduce_perf.parquet",
        ("num_gpus",),
        ("message_size",),
        {"backend": "vllm_graph"},
    ),
    "moe": TableSpec("moe/vllm/0.24.0/moe_perf.parquet", _MOE_KEY, ("num_tokens",)),
    # TensorRT-LLM's fused MoE, the source of the step model's MoE rates by rows an expert
    # (bench/serving/hardware.py MOE_RATES); validate compares nothing against it.
    "moe_trtllm": TableSpec("moe/trtllm/1.3.0rc20/moe_perf.parquet", _MOE_KEY, ("num_tokens",)),
    "a2a": TableSpec(
        "comm/vllm/0.24.0/moe_a2a_perf.parquet",
        ("comm_backend", "phase", "ep_size", "hidden_size", "topk", "num_experts"),
        ("num_tokens",),
        to_ms=1e-3,
    ),
}


class MissingShape(LookupError):
    """No measured row shares a lookup's exact key."""


class Table:
    """Measured milliseconds by key: ``rows[(exact..., axes...)] = ms``."""

    def __init__(self, name: str, spec: TableSpec, rows: dict):
        self.name, self.spec, self.rows = name, spec, rows
        self.used: set = set()
        self._grids: dict = {}

    def grid(self, exact: tuple) -> dict:
        """The measured points of one exact key: {axes tuple: ms}."""
        if exact not in self._grids:
            n = len(exact)
            self._grids[exact] = {key[n:]: ms for key, ms in self.rows.items() if key[:n] == exact}
        return self._grids[exact]

    def ms(self, exact: tuple, point: tuple) -> float:
        """Milliseconds at ``point`` (a value per axis), interpolated from the measured grid of ``exact``."""
        grid = self.grid(tuple(exact))
        if not grid:
            raise MissingShape(f"{self.name}: no measured rows for {dict(zip(self.spec.exact, exact))}")
        return self._interpolate(tuple(exact), grid, (), tuple(point))

    def _interpolate(self, exact, grid, fixed, rest) -> float:
        if not rest:
            self.used.add(exact + fixed)
            return grid[fixed]
        depth = len(fixed)
        values = sorted({k[depth] for k in grid if k[:depth] == fixed})
        x = rest[0]
        if x in values or len(values) == 1:
            chosen = x if x in values else values[0]
            return self._interpolate(exact, grid, fixed + (chosen,), rest[1:])
        below = [v for v in values if v < x]
        above = [v for v in values if v > x]
        lo, hi = (below[-1], above[0]) if below and above else (values[-2:] if below else values[:2])
        y_lo = self._interpolate(exact, grid, fixed + (lo,), rest[1:])
        y_hi = self._interpolate(exact, grid, fixed + (hi,), rest[1:])
        y = y_lo + (y_hi - y_lo) * (x - lo) / (hi - lo)
        return max(y, min(y_lo, y_hi) * 0.5)  # a short extension below the grid never goes near zero


@dataclass
class Tables:
    """Every table, and where they came from ("aiconfigurator-core 0.12.0 (installed)" or the extract)."""

    tables: dict
    source: str
    system: str = SYSTEM

    def __getitem__(self, name: str) -> Table:
        return self.tables[name]

    def extract(self) -> dict:
        """The rows lookups read so far, as the committed extract holds them."""
        out = {"source": self.source.replace(" (installed)", ""), "system": self.system, "tables": {}}
        for name, table in self.tables.items():
            spec = table.spec
            out["tables"][name] = {
                "file": spec.path,
                "where": spec.where,
                "columns": list(spec.exact + spec.axes) + ["latency_ms"],
                "rows": [list(key) + [round(table.rows[key], 7)] for key in sorted(table.used, key=str)],
            }
        return out

    def extract_text(self) -> str:
        """The extract as JSON with one measured row a line (diffs stay readable)."""
        document = self.extract()
        rows = {name: table.pop("rows") for name, table in document["tables"].items()}
        lines = [
            "{",
            f' "source": {json.dumps(document["source"])},',
            f' "system": {json.dumps(document["system"])},',
            ' "tables": {',
        ]
        for index, (name, table) in enumerate(document["tables"].items()):
            head = json.dumps(table)[1:-1]
            body = ",\n".join("   " + json.dumps(row) for row in rows[name])
            close = "}" if index == len(rows) - 1 else "},"
            lines += [f'  "{name}": {{{head}, "rows": [', body, f"  ]{close}"]
        return "\n".join(lines + [" }", "}"]) + "\n"


def tables_from_rows(rows: dict, source: str, system: str = SYSTEM) -> Tables:
    """Tables from ``rows`` (table name -> {key tuple: ms}), as the command read them from the package."""
    tables = {name: Table(name, spec, rows.get(name, {})) for name, spec in TABLES.items()}
    return Tables(tables, source, system)


def tables_from_extract(document: dict, origin: str) -> Tables:
    """Tables from the committed extract's contents (``origin``: its file name, for the source)."""
    tables = {}
    for name, spec in TABLES.items():
        found = document["tables"].get(name, {"rows": []})
        width = len(spec.exact) + len(spec.axes)
        tables[name] = Table(name, spec, {tuple(row[:width]): float(row[width]) for row in found["rows"]})
    return Tables(tables, f"{document['source']}: the committed extract, {origin}", document["system"])
