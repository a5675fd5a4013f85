"""Two speed-ups for Triton's interpreter, applied by ``bench`` (its entry points and the test suite) when
kernels run in it; the kernels package itself patches nothing.

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
