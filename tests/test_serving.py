"""bench/serving's floor: the whole-model package imports nothing of bench but bench/format.py (and itself),
and never the kernels or their references, so it runs, and is read, without the measuring side."""

import ast
from pathlib import Path

SERVING = Path(__file__).resolve().parents[1] / "bench" / "serving"


def _imported_modules(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            found.add(node.module)
    return found


def test_serving_imports_only_the_format_module_and_itself():
    files = sorted(SERVING.glob("*.py"))
    assert {f.stem for f in files} >= {
        "models",
        "workloads",
        "hardware",
        "step",
        "batching",
        "capacity",
        "advisor",
    }
    for path in files:
        ours = {m for m in _imported_modules(path) if m.split(".")[0] in ("bench", "kernels", "reference")}
        outside = {m for m in ours if m != "bench.format" and not m.startswith("bench.serving")}
        assert not outside, f"{path.name} imports {sorted(outside)}"
