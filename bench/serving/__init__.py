"""The whole-model package: model presets, workloads, the GPU and its links, the decode-step model, the
continuous-batching simulator, and the capacity study and the parallelism advisor built on them. It imports
nothing of bench but bench/format.py. A user's files are read by the commands and passed in as plain data;
the presets' own config.json files (data/configs/) are read by models.py."""
