"""Other implementations timed beside a kernel, one module per kernel module. A peer either runs verified
against the reference at the shape it is timed, or is skipped with the reason (not installed, or this shape
is not supported); any other failure is reported as a failure."""
