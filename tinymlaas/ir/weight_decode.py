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


# the matrix kernels whose palettized weights are decoded a block of channels at a time into a scratch in the arena
# (unpack_weights.c's gemm_p8, gemm_p16, gemm4_p16, gemv_p8(_pt), gemv_p16(_pt)) instead of whole; all take (input,
# weights, scratch, rq, params). A layer whose weights fit in the arena beside the tensors alive at it (below the
# peak that other layers' tensors set: _arena_room's estimate) takes one block of all of them: no second gather.
GEMM_PALETTE = {"tinymlaas_gemm_w8": "tinymlaas_gemm_p8", "tinymlaas_gemm_w16": "tinymlaas_gemm_p16",
                "tinymlaas_gemm4_w16": "tinymlaas_gemm4_p16"}
GEMV_BLOCKS = {"tinymlaas_gemv_w8": "tinymlaas_gemv_p8", "tinymlaas_gemv_w16": "tinymlaas_gemv_p16",
               "tinymlaas_gemv_w8_pt": "tinymlaas_gemv_p8_pt", "tinymlaas_gemv_w16_pt": "tinymlaas_gemv_p16_pt"}
# elsewhere a block's weights at most this many bytes (or the room, when more), but at least PALETTE_MIN_PAIRS channel
# pairs: each block gathers every pixel's patch again (one row: a unit of four channels, widened again per block).
# Measured on Cortex-M4 palette4 with the scratch on the stack and no room rule (instructions, RAM): KWS 4.44 M /
# 18,652 B at 1 KiB, 4.20 M / 19,676 B at 2 KiB, 4.04 M / 21,724 B at 4 KiB (one block a layer); VWW 13.90 M and
# 13.41 M at 1 and 2 KiB, both 59,164 B (its 256-channel layers' four pairs: 2 KiB either way)
PALETTE_SCRATCH = 2048
PALETTE_MIN_PAIRS = 4


def palette_blob(c: np.ndarray, bits: int, scratch: int = PALETTE_SCRATCH, least: int = PALETTE_MIN_PAIRS,
                 compact: bool = False) -> np.ndarray | None:
    """A matrix kernel's weights ([OC/2][...], int8 or int16) of at most 2^bits values as gemm_p8/gemm_p16/
    gemm4_p16 read them (int32): {bits, channel pairs per block, values per pair, table words}, the table (2^bits
    values of c's type in whole words), the indices (pack_palette's words). None with more values. least: units a
    block takes even beyond `scratch`. compact: the kernel's requantization rows are compact_rows' (bits | 1 << 8)."""
    packed = pack_palette(c, bits)
    if packed is None or c.ndim < 2:
        return None
    words, table = packed
    pairs, per_pair = c.shape[0], int(np.prod(c.shape[1:]))
    full = np.zeros(2 ** bits, c.dtype)
    full[:table.size] = table
    table_bytes = np.concatenate([full.view(np.uint8), np.zeros(-full.nbytes % 4, np.uint8)])
    most = min(pairs, max(least, scratch // (per_pair * c.itemsize)))
    block = -(-pairs // -(-pairs // most))  # as many blocks as `most` needs, evened out: the least scratch
    header = np.array([bits | (compact << 8), block, per_pair, table_bytes.size // 4], np.int32)
    return np.concatenate([header, table_bytes.view("<i4"), words.view("<i4")]).astype(np.int32)


def _nbytes(expr) -> int:
    ty = getattr(expr, "ty", None)
    try:
        return int(np.prod([int(d) for d in ty.shape], dtype=np.int64)) * np.dtype(str(ty.dtype)).itemsize
    except (TypeError, AttributeError, ValueError):
        return 0


def _arena_room(mod) -> dict:
    """Each binding's call -> the bytes the arena has beside the tensors alive at it, by the tensors' lifetimes in
    binding order (each from its binding to its last use; the model's inputs are not in the arena): the peak of
    their sum less theirs at the call. A lower bound of the plan's arena, so an estimate of the room (a planned arena
    may also leave gaps)."""
    from tvm import relax

    room: dict = {}
    for func in mod.functions.values():
        if not isinstance(func, relax.Function) or not isinstance(func.body, relax.SeqExpr):
            continue
        bindings = [b for block in func.body.blocks for b in block.bindings]
        last: dict = {}
        for step, b in enumerate(bindings):
            for v in relax.analysis.free_vars(b.value):
                last[v] = step
        for v in relax.analysis.free_vars(func.body.body):
            last[v] = len(bindings)
        live = np.zeros(len(bindings) + 1, np.int64)
        for step, b in enumerate(bindings):
            live[step:last.get(b.var, step) + 1] += _nbytes(b.var)
        peak = int(live.max(initial=0))
        for step, b in enumerate(bindings):
            if isinstance(b.value, relax.Call):
                room[b.value] = peak - int(live[step])
    return room


def compact_rows(table: np.ndarray, zp_out: int) -> np.ndarray | None:
    """gemm_dsp.c's requantization rows {bias, multiplier, round, shift} (requant_table's) in 9 B a row instead of 16
    (unpack_weights.c expand_rows): {R, then {bias, multiplier} a row, then a byte of shift a row}, where each row's
    round is (1 << (shift - 1)) + (zp_out << shift), or the row is a constant output (multiplier 0, bias 0: its round
    kept in the bias word). None where a row is neither (a 4-bit layer's rows of a left shift)."""
    t = np.asarray(table, np.int64).reshape(-1, 4)
    b, m, r, e = t.T
    if ((e < 0) | (e > 30)).any():
        return None
    rounding = np.where(e >= 1, np.left_shift(1, np.maximum(e - 1, 0)) + np.left_shift(np.int64(zp_out), e), 0)
    if not (((m != 0) & (e >= 1) & (r == rounding)) | ((m == 0) & (b == 0))).all():
        return None
    pairs = np.stack([np.where(m == 0, r, b), m], axis=1).ravel()
    shifts = np.concatenate([e, np.zeros(-e.size % 4, np.int64)]).astype(np.int8).view("<i4")
    return np.concatenate([[t.shape[0]], pairs, shifts]).astype(np.int32)


def expanded_rows(compact: np.ndarray, zp_out: int) -> np.ndarray:
    """compact_rows' inverse, as expand_rows computes it (a reference for tests)."""
    count = int(compact[0])
    pairs = compact[1:1 + 2 * count].astype(np.int64).reshape(-1, 2)
    e = compact[1 + 2 * count:].view(np.int8)[:count].astype(np.int64)
    b, m = pairs.T
    rounding = (np.left_shift(1, np.maximum(e - 1, 0)) + np.left_shift(np.int64(zp_out), e)) & 0xFFFFFFFF
    rounding = np.where(rounding >= 2**31, rounding - 2**32, rounding)
    return np.stack([np.where(m != 0, b, 0), m, np.where(m != 0, rounding, b), e], axis=1).astype(np.int32)


def palette_block_scratch(blob: np.ndarray, itemsize: int, group: int = 2) -> int:
    """The bytes of palette_blob's scratch: one block's weights, and with compact rows their expansion behind them
    (16 B a channel of the block: `group` channels a unit)."""
    compact = int(blob[0]) >> 8
    return int(blob[1]) * int(blob[2]) * itemsize + compact * int(blob[1]) * group * 16


def palette_gemm(mod, taking: dict, unpacking_of, symbols: dict = GEMM_PALETTE):
    """`mod` with each call of `symbols` (GEMM_PALETTE, GEMV_BLOCKS) whose weights `unpacking_of` would unpack as a
    palette calling its palette twin on palette_blob instead, with a scratch of one block that palette_first_s8/s16
    fills with the first block right before (an arena tensor of that call to this one): decoded a block at a time.
    Returns (module, [(bytes before, in flash, the block scratch, compact rows)])."""
    import tvm
    from tvm import relax

    dps = tvm.ir.Op.get("relax.call_dps_packed")
    from tinymlaas.ops.conv_params import ConvParams

    done: list = []
    room = _arena_room(mod)

    @relax.expr_functor.mutator
    class Rewrite(relax.PyExprMutator):
        def visit_call_(self, call):
            free = room.get(call, 0)  # keyed by the call as it was
            call = super().visit_call_(call)
            if not call.op.same_as(dps) or not isinstance(call.args[0], relax.ExternFunc) \
                    or not isinstance(call.args[1], relax.Tuple):
                return call
            symbol, args = str(call.args[0].global_symbol), list(call.args[1].fields)
            if symbol not in symbols or len(args) != 4 or not all(isinstance(a, tvm.ir.expr.Constant) for a in args[1:]):
                return call
            weights = args[1].value.numpy()
            unpacking = unpacking_of(weights)
            if unpacking is None or not unpacking.symbol.startswith("tinymlaas_unpack_palette"):
                return call
            rq = args[2]
            compact = None if symbol.endswith("_pt") else compact_rows(
                rq.value.numpy(), ConvParams.from_array(args[3].value.numpy()).zp_out)
            # the scratch: the whole layer where the arena has room for it (and its expanded rows) beside the tensors
            # alive at this layer (one block: no second gather), else the room or PALETTE_SCRATCH, whichever is more
            whole = weights.nbytes + (int(compact[0]) * 16 if compact is not None else 0)
            budget = weights.nbytes if whole <= free else max(PALETTE_SCRATCH, free - (whole - weights.nbytes))
            # one row is widened again per block, a few instructions per input: a block of one unit costs little
            blob = palette_blob(weights, int(unpacking.inputs[2][1]), budget,
                                least=1 if symbols is GEMV_BLOCKS else PALETTE_MIN_PAIRS, compact=compact is not None)
            if blob is None:
                return call
            if compact is not None:  # the rows in 9 B instead of 16, expanded a block at a time
                rq = relax.const(compact, "int32")
                taking[rq] = taking.get(args[2], set())
            const = relax.const(blob, "int32")
            taking[const] = taking.get(args[1], set())
            scratch = palette_block_scratch(blob, weights.itemsize, 4 if symbols is GEMV_BLOCKS else 2)
            first = self.builder_.emit(relax.call_dps_packed(
                "tinymlaas_palette_first_s8" if weights.dtype == np.int8 else "tinymlaas_palette_first_s16", [const],
                relax.TensorType([scratch // weights.itemsize], str(weights.dtype))))
            done.append((weights.nbytes, blob.nbytes, scratch, compact is not None))
            return relax.Call(call.op, [relax.ExternFunc(symbols[symbol]),
                                        relax.Tuple([args[0], const, first, rq, args[3]])], call.attrs, call.ty_args)

    mutator = Rewrite(mod)
    for gv, func in mod.functions.items():
        if isinstance(func, relax.Function):
            mutator.builder_.update_func(gv, mutator.visit_expr(func))
    return mutator.builder_.get(), done
