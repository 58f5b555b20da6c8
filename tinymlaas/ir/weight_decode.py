"""Weights below eight bits, unpacked into RAM right before the layer that reads them.

The C micro-kernels (firmware/kernels/) read int8 (or widened int16) weights through a pointer: they cannot decode a
value per read the way a TIR kernel can (ir/weight_storage.py). So a constant of 4-bit values, or of a few values
(a palette), is kept in flash packed, and a small C kernel (firmware/kernels/optimized/unpack_weights.c) unpacks it
into an arena buffer just before the call; the memory planner gives that buffer a slot for the call's lifetime only.
The layer runs the same kernel on the same values at its usual speed, plus the unpacking (a few instructions per
weight, once per inference); the RAM it costs is the largest such layer's weights at their kernel's width.
- int4: eight values per word read, in a nibble order chosen for it (the C kernels' constants; a TIR kernel decodes
  its own nibbles);
- palette: each value an index of 2-6 bits into a table of the constant's values (every kernel's constants).
One kernel reads a palette itself: the one-row fully connected C kernel (gemv) takes a layer of at most 16 values
as 4-bit indices and a 256-entry table of index pairs (`palette_gemv`: 1 KiB of flash a layer, no RAM). Two read
4-bit values themselves (ops/int8.py picks them, and `decode_weights` leaves their calls alone): gemv_w4 (one row)
and gemm_w4 (convolutions and fully connected batches on int8 weights with a proven requantization).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from tinymlaas.ir.weight_storage import MIN_ELEMENTS


def packable(c: np.ndarray) -> bool:
    """A constant whose values all fit in four bits (int8 or int16 storage)."""
    return c.dtype in (np.int8, np.int16) and c.size >= MIN_ELEMENTS and c.min() >= -8 and c.max() <= 7


def pack_words(c: np.ndarray) -> np.ndarray:
    """Values in -8..7, row-major, as unpack_weights.c's int4 kernels read them: each as value + 8 in a nibble,
    groups of eight in four bytes, byte i holding value i (low nibble) and value i + 4 (high nibble); padded to
    whole groups."""
    values = c.ravel().astype(np.int16) + 8
    values = np.concatenate([values, np.zeros(-values.size % 8, np.int16)]).reshape(-1, 2, 4)
    return (values[:, 0, :] | (values[:, 1, :] << 4)).astype(np.uint8).ravel().view(np.int8)


def unpack_words(packed: np.ndarray, n: int) -> np.ndarray:
    """pack_words's inverse (a reference for tests)."""
    b = packed.view(np.uint8).astype(np.int16).reshape(-1, 4)
    return (np.concatenate([b & 0xF, b >> 4], axis=1).ravel()[:n] - 8).astype(np.int8)


def pack_palette(c: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray] | None:
    """(packed indices, table) of a constant of at most 2^bits values, as unpack_weights.c's palette kernels read
    them: 32 // bits indices to a little-endian word, the first in the low bits; None if it has more values."""
    if c.dtype not in (np.int8, np.int16) or c.size < MIN_ELEMENTS:
        return None
    table, index = np.unique(c.ravel(), return_inverse=True)
    if table.size > 2 ** bits:
        return None
    per_word = 32 // bits
    index = np.concatenate([index, np.zeros(-index.size % per_word, index.dtype)]).reshape(-1, per_word)
    words = (index.astype(np.uint64) << (np.arange(per_word, dtype=np.uint64) * bits)).sum(axis=1)
    return words.astype("<u4").view(np.int8), table.astype(c.dtype)


def unpack_palette(packed: np.ndarray, table: np.ndarray, bits: int, n: int) -> np.ndarray:
    """pack_palette's inverse (a reference for tests)."""
    per_word = 32 // bits
    words = packed.view("<u4").astype(np.uint64)
    index = (words.reshape(-1, 1) >> (np.arange(per_word, dtype=np.uint64) * bits)) & ((1 << bits) - 1)
    return table[index.ravel()[:n].astype(np.int64)]


@dataclass(frozen=True)
class Unpacking:
    """A constant as it stays in flash and the C kernel that unpacks it: symbol(*inputs, out)."""

    symbol: str
    inputs: tuple  # numpy arrays: the packed values, then the kernel's other inputs (a table, its parameters)

    @property
    def flash(self) -> int:
        return sum(a.nbytes for a in self.inputs)


def int4_unpacking(c: np.ndarray) -> Unpacking | None:
    if not packable(c):
        return None
    return Unpacking("tinymlaas_unpack_int4_s8" if c.dtype == np.int8 else "tinymlaas_unpack_int4_s16",
                     (pack_words(c), np.array([c.size], np.int32)))


def palette_unpacking(most_bits: int, skip_int4: bool = False):
    """Constants of at most 2^most_bits values, each at the fewest bits its values need (2 at least); with
    skip_int4, not those of 4-bit values (kept in their int4 forms)."""
    def unpacking(c: np.ndarray) -> Unpacking | None:
        if c.dtype not in (np.int8, np.int16) or c.size < MIN_ELEMENTS or (skip_int4 and packable(c)):
            return None
        bits = max(2, int(np.ceil(np.log2(max(np.unique(c).size, 2)))))
        packed = pack_palette(c, bits) if bits <= most_bits else None
        if packed is None:
            return None
        suffix = "s8" if c.dtype == np.int8 else "s16"
        return Unpacking(f"tinymlaas_unpack_palette_{suffix}", (*packed, np.array([c.size, bits], np.int32)))
    return unpacking


def decode_weights(mod, taking: dict, unpacking_of, tir_readers: bool):
    """`mod` (fused, before planning) with every constant `unpacking_of` packs (C kernels' arguments, and TIR
    kernels' with `tir_readers`) kept packed and unpacked by a kernel call right before its reader. `taking`
    (lower._operators_taking) learns that the packed constant belongs to the operators of the one it replaces (so
    the unpacking counts in their layer's profile). Returns (module, [(bytes before, in flash, in RAM)])."""
    import tvm
    from tvm import relax

    readers = [tvm.ir.Op.get("relax.call_dps_packed")] + ([tvm.ir.Op.get("relax.call_tir")] if tir_readers else [])
    decoded: list = []

    @relax.expr_functor.mutator
    class Decode(relax.PyExprMutator):
        def visit_call_(self, call):
            call = super().visit_call_(call)
            if not any(call.op.same_as(r) for r in readers) or not isinstance(call.args[1], relax.Tuple):
                return call
            if isinstance(call.args[0], relax.ExternFunc) and "_w4" in str(call.args[0].global_symbol):
                return call  # a kernel that reads 4-bit weights itself
            args, changed = list(call.args[1].fields), False
            for k, a in enumerate(args):
                if not isinstance(a, tvm.ir.expr.Constant) or (u := unpacking_of(c := a.value.numpy())) is None:
                    continue
                inputs = [relax.const(x, str(x.dtype)) for x in u.inputs]
                taking[inputs[0]] = taking.get(a, set())
                args[k] = self.builder_.emit(relax.call_dps_packed(u.symbol, inputs,
                                                                   relax.TensorType(list(c.shape), str(c.dtype))))
                decoded.append((c.nbytes, u.flash, c.nbytes))
                changed = True
            return relax.Call(call.op, [call.args[0], relax.Tuple(args)], call.attrs, call.ty_args) if changed else call

    mutator = Decode(mod)
    for gv, func in mod.functions.items():
        if isinstance(func, relax.Function):
            mutator.builder_.update_func(gv, mutator.visit_expr(func))
    return mutator.builder_.get(), decoded


# the one-row C kernels that read palettized weights themselves (gemm_dsp.c's gemv_p4)
GEMV_PALETTE = {"tinymlaas_gemv_w8": "tinymlaas_gemv_p4", "tinymlaas_gemv_w8_pt": "tinymlaas_gemv_p4_pt",
                "tinymlaas_gemv_w16": "tinymlaas_gemv_p4", "tinymlaas_gemv_w16_pt": "tinymlaas_gemv_p4_pt"}
# Below this many weights a layer's pair table (1 KiB) costs more flash than its indices save: such a layer is
# unpacked into RAM like the others, unless no other layer needs the unpacking kernel (whose code, 2.2 KiB, and RAM
# copy then cost more: AD01's two 128 x 8 layers unpacked, 236 B more flash and 920 B more RAM than read in place).
GEMV_PALETTE_MIN = 4096


def gemv_palette(blocked: np.ndarray, channels: int, depth: int) -> tuple[np.ndarray, np.ndarray] | None:
    """gemv_w8's weights ([OC/4][K/4][channel 0..3][k0 k1 k2 k3], int8; `channels` x `depth` of them real, the rest
    padding) of at most 16 values as gemv_p4 reads them: per channel and quad two bytes of 4-bit indices, k0 | k2 << 4
    then k1 | k3 << 4 (the lanes SMLAD pairs with the widened input), and the table of every byte's two values as an
    int16 pair; None with more values. Padding takes index 0: it meets zero inputs, or makes outputs never stored."""
    if blocked.dtype != np.int8 or blocked.ndim != 4 or blocked.shape[-1] != 4:
        return None
    blocks, quads = blocked.shape[:2]
    real = np.zeros((blocks * 4, quads * 4), bool)
    real[:channels, :depth] = True
    real = real.reshape(blocks, 4, quads, 4).transpose(0, 2, 1, 3)  # the blocked layout's order
    values = np.unique(blocked[real])
    if values.size > 16:
        return None
    index = np.where(real, np.searchsorted(values, blocked), 0).astype(np.uint8)
    packed = np.stack([index[..., 0] | (index[..., 2] << 4), index[..., 1] | (index[..., 3] << 4)], axis=-1)
    table = np.zeros(16, np.int64)
    table[:values.size] = values
    byte = np.arange(256)
    pairs = ((table[byte & 15] & 0xFFFF) | (table[byte >> 4] << 16)).astype(np.int64) & 0xFFFFFFFF
    return np.ascontiguousarray(packed).ravel().view(np.int8), pairs.astype(np.uint32).view(np.int32)


def _gemv_weights(call, dps):
    """The weights constant of a gemv_w8 call (None for any other call)."""
    import tvm
    from tvm import relax

    if not call.op.same_as(dps) or not isinstance(call.args[0], relax.ExternFunc):
        return None
    args = list(call.args[1].fields) if isinstance(call.args[1], relax.Tuple) else []
    if str(call.args[0].global_symbol) not in GEMV_PALETTE or len(args) != 4:
        return None
    return args[1] if isinstance(args[1], tvm.ir.expr.Constant) else None


def palette_gemv(mod, taking: dict, unpacking_of):
    """`mod` with each gemv_w8 call whose weights take at most 16 values calling gemv_p4 on their indices instead
    (no unpacked copy in RAM): every such layer when no other constant would be unpacked (`unpacking_of`), else those
    of GEMV_PALETTE_MIN weights or more. Returns (module, [(bytes before, in flash, 0)])."""
    import tvm
    from tvm import relax

    from tinymlaas.ops.conv_params import ConvParams

    dps = tvm.ir.Op.get("relax.call_dps_packed")
    readers = (dps, tvm.ir.Op.get("relax.call_tir"))
    done: list = []
    others = []

    @relax.expr_functor.visitor
    class Others(relax.PyExprVisitor):  # constants the unpacking kernel would take, beside gemv layers' weights
        def visit_call_(self, call):
            super().visit_call_(call)
            if not any(call.op.same_as(r) for r in readers) or not isinstance(call.args[1], relax.Tuple):
                return
            mine = _gemv_weights(call, dps)
            others.extend(a for a in call.args[1].fields if isinstance(a, tvm.ir.expr.Constant)
                          and (mine is None or not a.same_as(mine)) and unpacking_of(a.value.numpy()) is not None)

    for func in mod.functions.values():
        if isinstance(func, relax.Function):
            Others().visit_expr(func)
    smallest = GEMV_PALETTE_MIN if others else 0

    @relax.expr_functor.mutator
    class Rewrite(relax.PyExprMutator):
        def visit_call_(self, call):
            call = super().visit_call_(call)
            constant = _gemv_weights(call, dps)
            if constant is None or constant.value.numpy().size < smallest:
                return call
            symbol, args = str(call.args[0].global_symbol), list(call.args[1].fields)
            weights = constant.value.numpy()
            if weights.dtype == np.int16:  # the widened layout's lanes (k0 k2 k1 k3) back in k order, as int8
                weights = weights[..., [0, 2, 1, 3]].astype(np.int8)
            params = ConvParams.from_array(args[3].value.numpy()) if isinstance(args[3], tvm.ir.expr.Constant) else None
            found = gemv_palette(weights, params.oc, params.c) if params is not None else None
            if found is None:
                return call
            packed, pairs = (relax.const(a, str(a.dtype)) for a in found)
            taking[packed] = taking[pairs] = taking.get(args[1], set())
            done.append((weights.nbytes, found[0].nbytes + found[1].nbytes, 0))
            return relax.Call(call.op, [relax.ExternFunc(GEMV_PALETTE[symbol]),
                                        relax.Tuple([args[0], packed, pairs, *args[2:]])], call.attrs, call.ty_args)

    mutator = Rewrite(mod)
    for gv, func in mod.functions.items():
        if isinstance(func, relax.Function):
            mutator.builder_.update_func(gv, mutator.visit_expr(func))
    return mutator.builder_.get(), done
