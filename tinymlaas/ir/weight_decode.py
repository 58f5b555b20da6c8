"""4-bit weights of the C kernels, decoded into RAM right before the layer that reads them.

The C micro-kernels (firmware/kernels/) read int8 (or widened int16) weights through a pointer: they cannot decode a
nibble per read the way a TIR kernel can (ir/weight_storage.py). So a C kernel's constant of 4-bit values is kept in
flash two to a byte and a small TIR kernel unpacks it into an arena buffer just before the call; the memory planner
gives that buffer a slot for the call's lifetime only. The unpacking is itself a C kernel
(firmware/kernels/optimized/unpack_int4.c): eight values per word read, in a nibble order chosen for it. The layer runs the same kernel on the same values at its
int8 speed, plus the unpacking (a few instructions per weight, once per inference); the RAM it costs is the largest
such layer's weights at their kernel's width.
"""

from __future__ import annotations

import numpy as np

from tinymlaas.ir.weight_storage import MIN_ELEMENTS


def packable(c: np.ndarray) -> bool:
    """A constant the C kernels read whose values all fit in four bits (int8 or int16 storage)."""
    return c.dtype in (np.int8, np.int16) and c.size >= MIN_ELEMENTS and c.min() >= -8 and c.max() <= 7


def pack_words(c: np.ndarray) -> np.ndarray:
    """Values in -8..7, row-major, as firmware/kernels/optimized/unpack_int4.c reads them: each as value + 8 in a
    nibble, groups of eight in four bytes, byte i holding value i (low nibble) and value i + 4 (high nibble); padded
    to whole groups."""
    values = c.ravel().astype(np.int16) + 8
    values = np.concatenate([values, np.zeros(-values.size % 8, np.int16)]).reshape(-1, 2, 4)
    return (values[:, 0, :] | (values[:, 1, :] << 4)).astype(np.uint8).ravel().view(np.int8)


def unpack_words(packed: np.ndarray, n: int) -> np.ndarray:
    """pack_words's inverse (a reference for tests)."""
    b = packed.view(np.uint8).astype(np.int16).reshape(-1, 4)
    return (np.concatenate([b & 0xF, b >> 4], axis=1).ravel()[:n] - 8).astype(np.int8)


def decode_extern_weights(mod, taking: dict):
    """`mod` (fused, before planning) with every C-kernel constant of 4-bit values stored packed and unpacked by a
    kernel call right before its reader. `taking` (lower._operators_taking) learns that the packed constant belongs
    to the operators of the one it replaces (so the unpacking counts in their layer's profile). Returns (module,
    [(bytes in flash before, after, RAM the unpacked values need)])."""
    import tvm
    from tvm import relax

    call_dps = tvm.ir.Op.get("relax.call_dps_packed")
    decoded: list = []

    @relax.expr_functor.mutator
    class Decode(relax.PyExprMutator):
        def visit_call_(self, call):
            call = super().visit_call_(call)
            if not call.op.same_as(call_dps) or not isinstance(call.args[1], relax.Tuple) \
                    or "_w4" in str(call.args[0].global_symbol):  # a kernel reading 4-bit weights itself
                return call
            args, changed = list(call.args[1].fields), False
            for k, a in enumerate(args):
                if not isinstance(a, tvm.ir.expr.Constant) or not packable(c := a.value.numpy()):
                    continue
                packed = relax.const(pack_words(c), "int8")
                taking[packed] = taking.get(a, set())
                symbol = "tinymlaas_unpack_int4_s8" if c.dtype == np.int8 else "tinymlaas_unpack_int4_s16"
                args[k] = self.builder_.emit(relax.call_dps_packed(
                    symbol, [packed, relax.const(np.array([c.size], np.int32), "int32")],
                    relax.TensorType(list(c.shape), str(c.dtype))))
                decoded.append((c.nbytes, (c.size + 1) // 2, c.nbytes))
                changed = True
            return relax.Call(call.op, [call.args[0], relax.Tuple(args)], call.attrs, call.ty_args) if changed else call

    mutator = Decode(mod)
    for gv, func in mod.functions.items():
        if isinstance(func, relax.Function):
            mutator.builder_.update_func(gv, mutator.visit_expr(func))
    return mutator.builder_.get(), decoded
