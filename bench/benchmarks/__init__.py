"""pytest-benchmark files, one per kernel module (bench_<module>.py).

Run on a GPU: ``pytest bench/ --benchmark-json F`` (``--sweep default`` for the default shapes)."""
