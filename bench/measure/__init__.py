"""Measurement: CUDA-event timing, device facts and ceilings, the static report of the sm_90/sm_80
compile, the interpreter's traffic counter, profiler runs, the results schema, and the jobs that verify
and time a case."""
