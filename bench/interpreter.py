"""How bench's entry points prepare the process for the kernels: ``setup()``, called by the CLI, the root
conftest and each spawned rank before any kernel module is imported (the kernels package itself leaves the
environment alone and patches nothing).

- Triton's interpreter where no CUDA device is present (``TRITON_INTERPRET=1``; an explicit setting always
  wins): ``@triton.jit`` reads it when a kernel module is imported.
- Multiply-add fusion pinned on, so the same kernels round the same way on every Triton the GPU boxes and CI
  run (Triton 3.9 warns that its default flips in 3.10).
- Where kernels run in the interpreter, two speed-ups (below).

Neither changes a result; both remove Python overhead that made tl.sort / tl.topk (route's selection) cost
seconds a program:

- Every call of one @triton.jit function from another re-patches triton.language (inspect.getmembers over
  tl, tl.core, tl.tensor and tl.math: about 4 ms), although the modules it patches are still patched from
  the first call; a sort makes dozens of such calls. A call whose modules are all still patched skips it.
- ``xor_sum`` (which every compare-and-swap of tl.sort and tl.topk takes) reduces through the generic path,
  one Python call per element; xor is associative and commutative, so numpy's reduce gives the same bits.

Each is applied only when the interpreter has the internals it relies on (checked here), so another Triton
version without them runs unpatched, only slower.
"""

import os

import numpy as np


def _patch_lang_once(interpreter, tl):
    original = interpreter._patch_lang

    def patch_lang(fn):
        langs = [value for value in fn.__globals__.values() if value is tl or value is tl.core]
        # tl.where stands for the whole set one _patch_lang call installs (and its scope restores) at once.
        if langs and all(not tl.core.is_builtin(lang.where) for lang in langs):
            return interpreter._LangPatchScope()  # nothing to restore: the caller that patched restores
        return original(fn)

    interpreter._patch_lang = patch_lang


def _numpy_xor_sum(interpreter, tl):
    original = interpreter.ReduceOps.apply_impl

    def apply_impl(self, input):
        if self.combine_fn is tl.standard._xor_combine:
            x = input[0]
            data = np.bitwise_xor.reduce(x.handle.data, axis=self.axis, keepdims=self.keep_dims)
            return self.to_tensor(data, x.dtype)
        return original(self, input)

    interpreter.ReduceOps.apply_impl = apply_impl


def speed_up() -> None:
    import triton.language as tl
    from triton.runtime import interpreter

    if all(hasattr(interpreter, name) for name in ("_patch_lang", "_LangPatchScope")) and hasattr(
        tl.core, "is_builtin"
    ):
        _patch_lang_once(interpreter, tl)
    if hasattr(getattr(interpreter, "ReduceOps", None), "apply_impl") and hasattr(
        tl.standard, "_xor_combine"
    ):
        _numpy_xor_sum(interpreter, tl)


def setup() -> None:
    """Prepares the process for the kernels; call it before any kernel module is imported (a second call
    changes nothing)."""
    if "TRITON_INTERPRET" not in os.environ:
        import torch

        if not torch.cuda.is_available():
            os.environ["TRITON_INTERPRET"] = "1"
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    import kernels  # after the environment is set: @triton.jit reads it at decoration

    if kernels.INTERPRETED and not _applied:
        _applied.append(True)
        speed_up()


_applied: list = []  # speed_up patches the interpreter once a process
