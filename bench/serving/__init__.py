"""System models built from the kernels' costs: KV capacity under allocation policies (and, to come, the
decode-step model and the parallelism advisor)."""
