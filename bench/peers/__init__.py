"""Other implementations timed beside a kernel, one module per kernel module. A peer either runs verified
against the reference at the shape it is timed, or is skipped with the reason (not installed, or this shape
is not supported); any other failure is reported as a failure.

A ``Peer`` has two steps: ``prepare(inputs, shape)`` does every piece of set-up (copies into the peer's
layout, plans, compiles, host lists) outside the timing and returns a ``Prepared`` whose ``call`` is the
peer's work alone; ``check(result, expected, shape)`` holds the call's result, brought to the kernel's output
layout, against the expected ``Inputs`` at the case's own tolerance. ``verify_and_prepare`` does both, right
before a peer is timed.
"""

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # bench.cases.base re-exports PeerUnavailable from here: no import back at run time
    from bench.cases.base import Case, Inputs


class PeerUnavailable(Exception):
    """A peer cannot run here: it is not installed, or it does not support this shape. The message says
    why (it is reported). Nothing else may be raised as PeerUnavailable: a peer that fails is a failure."""


@dataclass(frozen=True)
class Prepared:
    """A peer ready to time. ``call`` is the timed call: nothing but the peer's work. ``reset`` puts stateful
    inputs back (a host pool a timed allocate keeps filling); run before each call, outside the timing."""

    call: Callable[[], Any]
    reset: Callable[[], None] | None = None


@dataclass(frozen=True)
class Peer:
    """Another implementation of a case's kernel.

    ``prepare(inputs, shape)``: set-up outside the timing; raises PeerUnavailable (with the reason) only for
    "not installed" or "this shape is not supported", decided up front; any other error propagates.
    ``check(result, expected, shape)``: the call's result against ``expected`` (Inputs after a run of the
    reference, or of the kernel: args and result); returns the max error, raises AssertionError when wrong.
    ``host_only``: the call does its work on the host and launches nothing (the host pool): it is timed on
    the host clock, since CUDA events around it would time an idle device.
    """

    name: str
    prepare: Callable[["Inputs", Any], Prepared]
    check: Callable[[Any, "Inputs", Any], float]
    host_only: bool = False


def kernel_expected(case: "Case", inputs: "Inputs") -> "Inputs":
    """The kernel's own run on ``inputs`` (put back as built first, and again after), as an expected Inputs:
    written arguments copied out, the result kept. For shapes where the reference is too slow to run."""
    from bench.cases.base import Inputs

    if inputs.reset:
        inputs.reset()
    result = case.kernel(**inputs.args)
    args = {
        k: v.clone() if k in inputs.outputs and hasattr(v, "clone") else v for k, v in inputs.args.items()
    }
    if inputs.reset:
        inputs.reset()
    return Inputs(args, inputs.outputs, result=result)


def verify_and_prepare(case: "Case", name: str, inputs: "Inputs", shape, expected) -> tuple[Prepared, float]:
    """Prepares peer ``name`` of ``case`` on ``inputs`` (first put back as built), runs its call once (after
    its reset), checks the result, and returns the prepared peer and its max error. Use it right before
    timing, at every shape a peer is timed.

    ``expected``: the reference's Inputs at this shape (args and result after the reference's run on a copy
    of ``inputs``). Where the reference is too slow for the shape, pass None: the peer is then checked
    against the kernel's own result on ``inputs`` (so it agrees with the kernel, which the tests hold to the
    reference at smaller shapes). Raises PeerUnavailable when the peer cannot run here, AssertionError when
    its result is wrong; any other error of the peer propagates.
    """
    peer = case.peers[name]
    if inputs.reset:
        inputs.reset()
    prepared = peer.prepare(inputs, shape)
    if prepared.reset:
        prepared.reset()
    result = prepared.call()
    if expected is None:
        expected = kernel_expected(case, inputs)
    return prepared, peer.check(result, expected, shape)


__all__ = ["Peer", "PeerUnavailable", "Prepared", "kernel_expected", "verify_and_prepare"]
