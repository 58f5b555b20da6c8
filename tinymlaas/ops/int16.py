"""int16x8 operators beyond the ones int8.py registers for int8 and int16 (convolutions, pools, ADD/SUB/MUL, MEAN).

int16 activations have zero point 0 and a 65,536-value range, so the int8 trick of tabulating an elementwise
operator over every input does not fit a microcontroller. TFLite's int16 kernels instead interpolate small tables
(513 or 257 entries); we compute the same tables at compile time and interpolate the same way on the device:
- SOFTMAX: exp and 1/(1 + x) tables made as TFLite's Prepare makes them (`interpolation_table`), C kernel
  firmware/kernels/reference/softmax_s16.c.
- EXP, LOG, RSQRT, GELU: the interpreter interpolates a 513-entry table made from a float function; its entries
  are read back from the interpreter (`read_lut`) and checked on every input.
- LOGISTIC, TANH: the interpreter's kernel interpolates a fixed 256-entry sigmoid table. Its values are not a
  closed formula, so they are read back from the interpreter at the model's quantization (`sigmoid_table`) and the
  whole kernel is checked against the interpreter over all 65,536 inputs before it is used.
- RELU, RELU6, RELU_N1_TO_1, LEAKY_RELU, ABS, QUANTIZE (int -> int): one or two fixed-point rescales.
"""

from __future__ import annotations

import math

import numpy as np

from tinymlaas.errors import UnsupportedOperator
from tinymlaas.ops.emit import emit_kernel, extern
from tinymlaas.ops.interpreter_tables import interpreter_table
from tinymlaas.ops.quantization import activation_range, quantize_from_float, quantize_multiplier, round_away
from tinymlaas.ops.registry import register


def interpolation_table(func, in_scale: float, in_zero: int, out_scale: float, out_zero: int) -> np.ndarray:
    """TFLite's 513-entry int16 table of `func` (double arithmetic): 512 samples, each biased by half the error of
    linear interpolation at the midpoint of its step, plus the end point."""
    in_min, in_max = in_scale * (-32768 - in_zero), in_scale * (32767 - in_zero)
    out_min, out_max = out_scale * (-32768 - out_zero), out_scale * (32767 - out_zero)
    step = (in_max - in_min) / 512
    scaling = 65536 / (out_max - out_min)
    table = []
    for i in range(512):
        x = in_min + i * step
        sample = round_away(func(x) * scaling)
        interpolated = round_away((func(in_min + (i + 1) * step) * scaling + sample) / 2)
        bias = round_away((interpolated - round_away(func(x + step / 2) * scaling)) / 2)
        table.append(min(max(sample - bias, -32768), 32767))
    table.append(min(max(round_away(func(in_max) * scaling), -32768), 32767))
    return np.array(table, dtype=np.int16)


_RANGE = 65535.0
EXP_TABLE = interpolation_table(math.exp, 10.0 / _RANGE, 32767, 2.0 / _RANGE, 0)  # [-10, 0]
RECIPROCAL_TABLE = interpolation_table(lambda v: 1.0 / (1.0 + v), 1.0 / _RANGE, -32768, 2.0 / _RANGE, 0)  # [0, 1]


@register("SOFTMAX", "int16", implementations=("c",))
def softmax(ctx, op, impl):
    from tvm import relax

    x_t, out_t = ctx.tensor(op.inputs[0]), ctx.tensor(op.outputs[0])
    if x_t.zero_point != 0 or out_t.zero_point != 0:
        raise UnsupportedOperator([f"SOFTMAX #{op.index} int16 with a nonzero zero point"], ctx.graph.name)
    m, shift = quantize_multiplier(x_t.scale * float(op.opt("beta", 1.0)) / (10.0 / _RANGE))
    params = np.array([m, shift, out_t.shape[-1], out_t.size], dtype=np.int32)
    y = extern(ctx, "tinymlaas_softmax_s16", [ctx.input(op, 0), relax.const(EXP_TABLE), relax.const(RECIPROCAL_TABLE),
                                              relax.const(params)], out_t.shape, "int16")
    ctx.set_output(op, 0, y)


# --- LOGISTIC and TANH -------------------------------------------------------------------------------------------

# The interpreter's int16 sigmoid table has 256 steps of 1/24 over [0, 10.7) in Q0.16; the closed form below is
# its starting guess, within a few units of every entry.
_SIGMOID_GUESS = np.minimum(np.round(65536 / (1 + np.exp(-np.arange(256) / 24.0))), 65535).astype(np.int64)
_FRACTION_BITS = {"LOGISTIC": 9, "TANH": 8}


def input_rescale(scale: float) -> tuple[int, int]:
    """TFLite's (multiplier, right shift) taking an int16 input to units of 1/(3 * 4096) (power-of-two scales of
    2^-12 and, for TANH, 2^-11 take 3 << shift)."""
    log2 = math.log2(scale)
    if log2 == round(log2) and 12 + round(log2) in (0, 1):
        return 3 << (12 + round(log2)), 0
    m, shift = scale * 4096.0 * 3.0, 0
    while m <= 32767.0 / 2.0 and shift <= 30:
        shift, m = shift + 1, m * 2.0
    return int(m), shift


def scale_inputs(x: np.ndarray, mult: int, shift: int) -> np.ndarray:
    rounding = (1 << (shift - 1)) if shift > 0 else 0
    return (x.astype(np.int64) * mult + rounding) >> shift


def interpolate(opcode: str, d: np.ndarray, table: np.ndarray) -> np.ndarray:
    """The interpreter's LOGISTIC / TANH of scaled inputs d, in numpy (what the device kernel computes)."""
    step = np.minimum(np.abs(d) >> _FRACTION_BITS[opcode], 254)
    return _between(opcode, d, table[step], table[step + 1])


def _between(opcode: str, d: np.ndarray, lo, hi) -> np.ndarray:
    """The kernel's output for scaled inputs d given the table entries around them (broadcasting)."""
    bits = _FRACTION_BITS[opcode]
    a = np.abs(d)
    frac = a & ((1 << bits) - 1)
    if opcode == "LOGISTIC":
        r = np.where(a >> bits >= 255, 0x7FFF << 10, (lo << 9) + frac * (hi - lo))
        r = np.where(d >= 0, r + (1 << 9), (1 << 25) - r + (1 << 9) - 1) >> 10
    else:
        r = np.where(a >> bits >= 255, 0xFFFF << 8, (lo << 8) + frac * (hi - lo))
        r = np.where(d >= 0, r - (1 << 23) + (1 << 7), -r + (1 << 23) + (1 << 7) - 1) >> 8
    return np.clip(r, -32768, 32767)


def sigmoid_table(opcode: str, scaled: np.ndarray, expected: np.ndarray) -> np.ndarray | None:
    """The 256-entry table (plus the end point) that reproduces `expected` (the interpreter's outputs for every
    int16 input, scaled to `scaled`), or None. Each table step is constrained by the outputs it interpolates;
    a dynamic programme picks, among the entries consistent with both neighbouring steps, the ones nearest the
    closed form."""
    bits = _FRACTION_BITS[opcode]
    a = np.abs(scaled)
    step = a >> bits
    offsets = np.arange(-3, 4)  # the closed form is within 1 of every entry measured; 3 leaves room
    guess = _SIGMOID_GUESS
    allowed: list[set[tuple[int, int]] | None] = []
    for k in range(255):
        sel = step == k
        if not sel.any():
            allowed.append(None)  # unconstrained
            continue
        lo = (guess[k] + offsets)[:, None, None]
        hi = (guess[min(k + 1, 255)] + offsets)[None, :, None]
        fits = (_between(opcode, scaled[sel][None, None, :], lo, hi) == expected[sel]).all(axis=2)
        pairs = {(int(guess[k] + offsets[i]), int(guess[min(k + 1, 255)] + offsets[j])) for i, j in zip(*np.nonzero(fits))}
        if not pairs:
            return None
        allowed.append(pairs)
    # best[v] = (cost, previous choices) over values v of entry k
    best = {int(v): (abs(int(v) - int(guess[0])), [int(v)]) for v in guess[0] + offsets}
    for k in range(255):
        nxt = {}
        for v, (cost, path) in best.items():
            for w in guess[k + 1] + offsets:
                w = int(w)
                if allowed[k] is not None and (v, w) not in allowed[k]:
                    continue
                c = cost + abs(w - int(guess[k + 1]))
                if w not in nxt or c < nxt[w][0]:
                    nxt[w] = (c, path + [w])
        if not nxt:
            return None
        best = nxt
    return np.array(min(best.values())[1], dtype=np.int64)


_TABLES: dict[tuple, np.ndarray | None] = {}  # by operator and quantization: an unrolled LSTM repeats them


@register(("LOGISTIC", "TANH"), "int16", implementations=("interpolated",))
def sigmoid(ctx, op, impl):
    from tvm import relax

    import tinymlaas.ops.int8_te as k
    from tinymlaas.oracle import reference_resolver

    x_t, out_t = ctx.tensor(op.inputs[0]), ctx.tensor(op.outputs[0])
    if x_t.zero_point != 0 or out_t.zero_point != 0 or x_t.quant is None:
        raise UnsupportedOperator([f"{op.opcode} #{op.index} int16 with a nonzero zero point"], ctx.graph.name)
    mult, shift = input_rescale(x_t.scale)
    key = (op.opcode, x_t.scale, out_t.scale, op.version, reference_resolver(ctx.graph.source))
    if key not in _TABLES:
        x = np.arange(-32768, 32768, dtype=np.int16)
        expected = interpreter_table(ctx, op, x).astype(np.int64)
        scaled = scale_inputs(x, mult, shift)
        table = sigmoid_table(op.opcode, scaled, expected)
        exact = table is not None and np.array_equal(interpolate(op.opcode, scaled, table), expected)
        _TABLES[key] = table if exact else None
    table = _TABLES[key]
    if table is None:
        raise UnsupportedOperator([(f"{op.opcode} #{op.index} int16: the interpreter's kernel could not be "
                                    f"reproduced at input scale {x_t.scale:g}")], ctx.graph.name)
    y = emit_kernel(ctx, k.sigmoid_s16, [ctx.input(op, 0), relax.const(table.astype(np.int32))], opcode=op.opcode,
                    mult=mult, shift=shift)
    ctx.set_output(op, 0, y)


# --- operators the interpreter interpolates in a 513-entry table ---------------------------------------------------

def _wrap16(v):
    return ((np.asarray(v, dtype=np.int64) + 32768) & 0xFFFF) - 32768


def lut_interpolate(x: np.ndarray, table: np.ndarray) -> np.ndarray:
    """TFLite's int16 table lookup: table[256 + (x >> 7)] plus the int16 slope to the next entry times the low 7 bits,
    rounded; int16 arithmetic wraps as in the interpreter (what int8_te.lut_s16 computes on the device)."""
    x = x.astype(np.int64)
    index = 256 + (x >> 7)
    base, slope = table[index], _wrap16(table[index + 1] - table[index])
    return _wrap16(base + ((slope * (x & 0x7F) + 64) >> 7))


def read_lut(x: np.ndarray, expected: np.ndarray) -> np.ndarray | None:
    """The 513-entry table that makes `lut_interpolate` give `expected` on the inputs `x`, or None.

    Entry i is the output for the input 128 * (i - 256) (no interpolation there); entries whose input the
    interpreter does not accept, and the end point, are solved from the outputs that interpolate towards them."""
    table = np.zeros(513, dtype=np.int64)
    known = np.zeros(513, dtype=bool)
    at = {int(v): int(o) for v, o in zip(x, expected)}
    for i in range(512):
        if 128 * (i - 256) in at:
            table[i], known[i] = at[128 * (i - 256)], True
    cells = (x.astype(np.int64) >> 7) + 256
    candidates = np.arange(-32768, 32768, dtype=np.int64)
    for i in np.nonzero(~known)[0]:
        fits = np.ones(candidates.size, dtype=bool)
        for cell in (i - 1, i):  # cell i - 1 interpolates towards entry i; cell i starts at it
            sel = cells == cell
            if cell < 0 or cell > 511 or not sel.any():
                continue
            if (cell == i and not known[min(i + 1, 512)]) or (cell == i - 1 and not known[cell]):
                return None  # two unknown neighbours: not determined
            xs, want = x[sel].astype(np.int64), expected[sel]
            base = candidates[:, None] if cell == i else table[cell]
            nxt = table[cell + 1] if cell == i else candidates[:, None]
            got = _wrap16(base + ((_wrap16(nxt - base) * (xs & 0x7F) + 64) >> 7))
            fits &= (got == want).all(axis=1)
        if not fits.any():
            return None
        table[i] = candidates[fits][np.argmin(np.abs(candidates[fits] - table[i - 1]))] if i else candidates[fits][0]
        known[i] = True
    return table if np.array_equal(lut_interpolate(x, table), expected) else None


@register(("EXP", "LOG", "RSQRT", "GELU"), "int16", implementations=("interpolated",))
def interpolated(ctx, op, impl):
    """The table read back from the interpreter at the model's quantization and checked on every input it accepts
    (its tables come from float functions whose out-of-domain values are not specified: NaN, infinities)."""
    from tvm import relax

    import tinymlaas.ops.int8_te as k

    x = np.arange(-32768, 32768, dtype=np.int16)
    try:
        expected = interpreter_table(ctx, op, x)
    except UnsupportedOperator:  # RSQRT, LOG: the interpreter refuses inputs outside the domain; take the rest
        x = x[x.astype(np.int32) > ctx.tensor(op.inputs[0]).zero_point]
        expected = interpreter_table(ctx, op, x)
    table = read_lut(x, expected.astype(np.int64))
    if table is None:
        raise UnsupportedOperator([f"{op.opcode} #{op.index} int16: the interpreter's table could not be read back"],
                                  ctx.graph.name)
    y = emit_kernel(ctx, k.lut_s16, [ctx.input(op, 0), relax.const(table.astype(np.int32))])
    ctx.set_output(op, 0, y)


# --- rescaling elementwise operators -----------------------------------------------------------------------------

def _rescale_kernel(ctx, op, positive: float, negative: float | None, act: int = 0, absolute: bool = False):
    """out = zp_out + rescale(x - zp_in) by `positive` (x >= zp_in) or `negative`, clamped to the activation range."""
    import tinymlaas.ops.int8_te as k

    x_t, out_t = ctx.tensor(op.inputs[0]), ctx.tensor(op.outputs[0])
    mp, sp = quantize_multiplier(positive)
    mn, sn = quantize_multiplier(negative if negative is not None else positive)
    lo, hi = activation_range(act, out_t.scale, out_t.zero_point, out_t.dtype)
    y = emit_kernel(ctx, k.rescale_q, [ctx.input(op, 0)], zp_in=x_t.zero_point, zp_out=out_t.zero_point,
                    mult_pos=mp, shift_pos=sp, mult_neg=mn, shift_neg=sn, lo=lo, hi=hi, absolute=absolute,
                    out_dtype=out_t.dtype)
    ctx.set_output(op, 0, y)


_RELU_ACT = {"RELU": 1, "RELU_N1_TO_1": 2, "RELU6": 3}


@register(("RELU", "RELU6", "RELU_N1_TO_1"), "int16", implementations=("tir",))
def relu(ctx, op, impl):
    """TFLite's quantized ReLU: rescaled by in/out scale, clamped to the quantized activation bounds."""
    ratio = ctx.tensor(op.inputs[0]).scale / ctx.tensor(op.outputs[0]).scale
    _rescale_kernel(ctx, op, ratio, None, act=_RELU_ACT[op.opcode])


@register("LEAKY_RELU", "int16", implementations=("tir",))
def leaky_relu(ctx, op, impl):
    ratio = ctx.tensor(op.inputs[0]).scale / ctx.tensor(op.outputs[0]).scale
    alpha = float(np.float32(op.opt("alpha", 0.2)))
    _rescale_kernel(ctx, op, ratio, ratio * alpha)


@register("ABS", "int16", implementations=("tir",))
def absolute(ctx, op, impl):
    ratio = ctx.tensor(op.inputs[0]).scale / ctx.tensor(op.outputs[0]).scale
    _rescale_kernel(ctx, op, ratio, None, absolute=True)


@register("QUANTIZE", "int16", implementations=("tir",))
def quantize(ctx, op, impl):
    """float32 -> int16 at a model's edge, or a requantization between integer types (the interpreter's Requantize:
    rescaled by in/out scale, offset, clamped to the output type)."""
    src = ctx.tensor(op.inputs[0])
    if src.dtype == "float32":
        return quantize_from_float(ctx, op)
    if src.dtype not in ("int8", "int16"):
        raise UnsupportedOperator([f"QUANTIZE #{op.index} from {src.dtype}"], ctx.graph.name)
    _rescale_kernel(ctx, op, src.scale / ctx.tensor(op.outputs[0]).scale, None)
