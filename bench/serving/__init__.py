"""The whole-model package: model presets, workloads, the GPU and its links, the decode-step model, the
continuous-batching simulator, and the capacity study and the parallelism advisor built on them. It imports
nothing of bench but bench/format.py: files are read by the commands and passed in as plain data."""
