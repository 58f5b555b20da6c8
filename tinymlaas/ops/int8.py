"""Quantized operators: integer kernels with TFLite's exact arithmetic, bit-exact with the interpreter (int8, and
the int16x8 paths that share the int8 formulas: convolutions, fully connected, pools, ADD/SUB/MUL, MEAN, ...;
what only int16 needs is in int16.py).

TVM's frontend expands every quantized operator into dequantize -> float op -> quantize, which needs
an FPU and is not bit-exact. This stage recognises the quantized operators at the TFLite level and
emits one integer kernel per operator into the Relax graph (`int8_kernels`), with TFLite's
requantization parameters computed here exactly as TFLite computes them (in double, then
QuantizeMultiplier). Weights stay int8, biases and multipliers int32; no float is left.
Softmax is a C kernel (`firmware/kernels/softmax_s8.c`, gemmlowp fixed point) called from the graph.
"""

from __future__ import annotations

import math

import numpy as np

import tinymlaas.ops.int8_te as k
from tinymlaas.errors import UnsupportedOperator
from tinymlaas.ops.registry import register

# Convolutions and fully connected layers offer, per layer: integer TIR ("tir"); DSP micro-kernels
# (firmware/kernels/gemm_dsp.c) with the int8 weights ("dsp"); or with the weights pre-widened to int16 in flash
# ("dsp16": faster, twice the weight flash; for 3x3 depthwise layers on DSP cores, the kernel over a window of
# widened input rows, whose weights are int16 too).

# TFLite enums (schema.fbs)
_SAME, _VALID = 0, 1
_ACT_NONE, _ACT_RELU, _ACT_RELU_N1_TO_1, _ACT_RELU6 = 0, 1, 2, 3


def _round_away(x: float) -> int:
    """std::round: half away from zero."""
    return math.floor(abs(x) + 0.5) * (1 if x >= 0 else -1)


def quantize_multiplier(real: float) -> tuple[int, int]:
    """TFLite QuantizeMultiplier: real = m * 2**(shift - 31), m in [2**30, 2**31)."""
    if real == 0.0:
        return 0, 0
    q, shift = math.frexp(real)
    q_fixed = _round_away(q * (1 << 31))
    if q_fixed == 1 << 31:
        q_fixed //= 2
        shift += 1
    if shift < -31:
        shift, q_fixed = 0, 0
    return q_fixed, shift


def activation_range(act: int, scale: float, zero_point: int, dtype: str = "int8") -> tuple[int, int]:
    """TFLite CalculateActivationRangeQuantized (quantization of the bounds in float32)."""
    lo, hi = int(np.iinfo(dtype).min), int(np.iinfo(dtype).max)

    def q(x: float) -> int:
        return zero_point + _round_away(float(np.float32(x) / np.float32(scale)))

    if act == _ACT_RELU:
        return max(lo, q(0.0)), hi
    if act == _ACT_RELU6:
        return max(lo, q(0.0)), min(hi, q(6.0))
    if act == _ACT_RELU_N1_TO_1:
        return max(lo, q(-1.0)), min(hi, q(1.0))
    if act == _ACT_NONE:
        return lo, hi
    raise ValueError(f"fused activation {act}")


def reduce_multiplier(mult: np.ndarray, shift: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The 15-bit multiplier and total right shift of TFLite's rescale of int64 accumulators (int16x8 kernels)."""
    mult = np.asarray(mult, dtype=np.int64)
    reduced = np.where(mult < 0x7FFF0000, (mult + (1 << 15)) >> 16, 0x7FFF).astype(np.int32)
    return reduced, (15 - np.asarray(shift, dtype=np.int32)).astype(np.int32)


def accumulator(x_t, weights_by_output: np.ndarray, zp_weight: int = 0) -> str:
    """int32 unless the products of an int16 input could overflow it (then int64, as TFLite accumulates)."""
    if x_t.dtype != "int16":
        return "int32"
    bound = 32768 * int(np.abs(weights_by_output.astype(np.int64) - zp_weight).sum(axis=1).max(initial=0))
    return "int32" if bound < 2**31 else "int64"


def padding(kind: int, in_size: int, k: int, stride: int, dilation: int) -> tuple[int, int]:
    """TFLite ComputePaddingHeightWidth for one dimension: (before, after)."""
    eff = (k - 1) * dilation + 1
    if kind == _VALID:
        return 0, 0
    out = (in_size + stride - 1) // stride
    total = max((out - 1) * stride + eff - in_size, 0)
    return total // 2, total - total // 2


def softmax_params(beta: float, input_scale: float) -> tuple[int, int, int]:
    """TFLite PreprocessSoftmaxScaling + CalculateInputRadius with 5 integer bits for the scaled difference."""
    integer_bits = 5
    real = min(beta * input_scale * (1 << (31 - integer_bits)), float((1 << 31) - 1))
    multiplier, left_shift = quantize_multiplier(real)
    radius = math.floor(1.0 * ((1 << integer_bits) - 1) * (1 << (31 - integer_bits)) / (1 << left_shift))
    return multiplier, left_shift, -radius


def log_softmax_params(input_scale: float) -> tuple[int, int, int, int, int]:
    """TFLite PreprocessLogSoftmaxScalingExp (beta 1) + CalculateInputRadius: the input's multiplier and left shift,
    the reverse scaling's multiplier and exponent (<= 0), and the smallest difference to the row maximum."""
    multiplier, left_shift, diff_min = softmax_params(1.0, input_scale)
    reverse_multiplier, reverse_exponent = quantize_multiplier((1 << (31 - left_shift)) / float(multiplier))
    return multiplier, left_shift, reverse_multiplier, reverse_exponent, diff_min


def _emit_kernel(ctx, fn, args, *, elementwise: bool = False, **attrs):
    """Emit `fn` (a TE integer kernel) as one opaque call_tir.

    Not `bb.emit_te`: that builds PrimFuncs with int64 index types, which turns every integer
    expression into 64-bit arithmetic, slow on 32-bit cores.
    elementwise: each output element depends only on the input elements of its own index (after broadcasting):
    the memory planner may write the output over an input of its size (ir/memory.py).
    """
    from tvm import relax, te

    holders = []
    for i, a in enumerate(args):
        shape = [int(v) for v in (a.ty.shape.values if hasattr(a.ty.shape, "values") else a.ty.shape)]
        holders.append(te.placeholder(shape, str(a.ty.dtype), f"in{i}"))
    out = fn(*holders, **attrs)
    func = te.create_prim_func(holders + [out]).with_attrs({
        "op_pattern": 8,  # kOpaque: one kernel per operator
        "tinymlaas.int32_indices": True,  # int32 indices already; its int64 arithmetic is meant (64-bit products)
        **({"tinymlaas.elementwise": True} if elementwise else {}),
    })
    gv = ctx.bb.add_func(func, f"op{ctx.op.index}_{ctx.op.opcode.lower()}")
    return ctx.emit(relax.call_tir(gv, list(args), relax.TensorType([int(v) for v in out.shape], out.dtype)))


_LANES = (0, 2, 1, 3)  # SXTAB16 widens a word's bytes 0, 2 and 1, 3: int16 weights follow that order


def blocked_weights(w2d: np.ndarray, block: int, wide: bool) -> np.ndarray:
    """(OC, K) int8 -> [OC/block][K/4][block][4], zero-padded: gemm_dsp.c's layouts.

    int8 keeps k0 k1 k2 k3 (SXTB16 splits a word into k0 k2 | k1 k3 in the loop); int16 is stored split.
    """
    oc, k = w2d.shape
    oc_pad, k_pad = -(-oc // block) * block, -(-k // 4) * 4
    padded = np.zeros((oc_pad, k_pad), dtype=np.int16 if wide else np.int8)
    padded[:oc, :k] = w2d
    quads = padded.reshape(oc_pad // block, block, k_pad // 4, 4)
    if wide:
        quads = quads[..., _LANES]
    return np.ascontiguousarray(quads.transpose(0, 2, 1, 3))


def _requantize_exact(acc: int, mult: int, shift: int, single: bool) -> int | None:
    """TFLite's requantization of one accumulator in Python integers (None: int32 overflow in TFLite)."""
    if single:
        total = 31 - shift
        return (acc * mult + (1 << (total - 1))) >> total
    scaled = acc << max(shift, 0)
    if not -(2**31) <= scaled < 2**31:
        return None
    x, e = (scaled * mult + (1 << 30)) >> 31, max(-shift, 0)
    if e == 0:
        return x
    mask = (1 << e) - 1
    return (x >> e) + int((x & mask) > (mask >> 1) + int(x < 0))


def depthwise_rows_weights(w: np.ndarray, transposed: bool = False) -> np.ndarray:
    """TFLite depthwise 3x3 weights (1, 3, 3, C) -> [C][3 rows][w0 w1 w2 0] int16, doubled: the layout of
    gemm_dsp.c's depthwise3x3_rows (its accumulator is 2 * the sum); transposed: rows are the kernel's columns."""
    rows = np.zeros((w.shape[3], 3, 4), dtype=np.int16)
    rows[:, :, :3] = 2 * w[0].astype(np.int16).transpose((2, 1, 0) if transposed else (2, 0, 1))
    return rows


def requant_table(w2d: np.ndarray, bias: np.ndarray, mult: np.ndarray, shift: np.ndarray, zp_in: int, zp_out: int,
                  act: tuple[int, int], single: bool) -> np.ndarray | None:
    """Per output channel {bias, multiplier, round, shift} for gemm_dsp.c's requantization, or None.

    The C code skips 64-bit arithmetic, saturation and the sign tests of TFLite's formulas; that is exact
    only while no intermediate can overflow, which is proved here from the weights: |accumulator| is at
    most |bias| + max|x - zp_in| * sum|w|. The output zero point is folded into the rounding constant.
    A channel the proof fails for is still taken when its output cannot depend on the input
    (requantization is monotonic, so equal outputs at both accumulator bounds): trained models carry such
    dead channels (a huge bias, a zero multiplier); it becomes a constant (multiplier 0).
    """
    x_max = max(abs(-128 - zp_in), abs(127 - zp_in))
    spread = x_max * np.abs(w2d.astype(np.int64)).sum(axis=1)
    rows = []
    for b, m, s, d in zip(bias.tolist(), mult.tolist(), shift.tolist(), spread.tolist()):
        a = abs(b) + d
        if single:  # smmul(acc + bias, m) then >> (31 - s - 32)
            e, scaled = -s - 1, a // 2 + 1
            ok = 1 <= e <= 30 and a < 2**31
        else:  # smmulr(2 * (acc + bias), m) then rounding >> -s
            e, scaled = -s, a + 1
            ok = 1 <= e <= 30 and 2 * a < 2**31
        rnd = (1 << (e - 1)) + (zp_out << e) if ok else 0
        if ok and m > 0 and scaled + abs(rnd) + 1 < 2**31:
            rows.append((b if single else 2 * b, m, rnd, e))
            continue
        ends = [_requantize_exact(b + sign * d, m, s, single) for sign in (-1, 1)]
        if a >= 2**31 or None in ends:
            return None
        lo, hi = (min(max(v + zp_out, act[0]), act[1]) for v in ends)
        if lo != hi:
            return None
        rows.append((0, 0, 2 * lo, 1))  # (0 + 2 * lo) >> 1
    return np.array(rows, dtype=np.int32)


def _conv_params(n, h, w, c, oh, ow, oc, kh, kw, sh, sw, dh, dw, pt, pl, zp_in, zp_out, lo, hi, single=0):
    return np.array([n, h, w, c, oh, ow, oc, kh, kw, sh, sw, dh, dw, pt, pl, zp_in, zp_out, lo, hi, single], dtype=np.int32)




# --- converters -------------------------------------------------------------------------------------------------

def _dsp_applies(graph, op, target, impl) -> bool:
    """The DSP micro-kernels take convolutions, depthwise convolutions of depth multiplier 1 and fully connected
    layers with symmetric weights."""
    if impl == "tir":
        return True
    if op.opcode == "DEPTHWISE_CONV_2D":
        return int(op.opt("depthMultiplier", 1) or 1) == 1
    if op.opcode == "FULLY_CONNECTED":
        return graph.tensor(op.inputs[1]).zero_point == 0 and graph.tensor(op.inputs[1]).is_const
    return graph.tensor(op.inputs[1]).is_const


def _extern(ctx, symbol, args, shape, dtype="int8"):
    from tvm import relax

    return ctx.emit(relax.call_dps_packed(symbol, list(args), relax.TensorType(list(shape), dtype)))


def _requant_consts(ctx, in_idx: int, w_idx: int, out_idx: int, channels: int):
    in_scale, out_scale = ctx.tensor(in_idx).scale, ctx.tensor(out_idx).scale
    w_scales = ctx.tensor(w_idx).quant.scale
    pairs = [quantize_multiplier(in_scale * float(s) / out_scale) for s in w_scales]
    mult = np.array([m for m, _ in pairs], dtype=np.int32)
    shift = np.array([s for _, s in pairs], dtype=np.int32)
    if mult.size == 1 and channels > 1:
        mult, shift = np.repeat(mult, channels), np.repeat(shift, channels)
    return mult, shift


def _bias_of(ctx, op, k: int, channels: int) -> np.ndarray:
    """int32 for int8 kernels; int64 for int16x8 (TFLite's int16 kernels add either bias type to an int64 sum)."""
    dtype = np.int64 if ctx.tensor(op.outputs[0]).dtype == "int16" else np.int32
    if len(op.inputs) <= k or op.inputs[k] < 0:
        return np.zeros(channels, dtype=dtype)
    return np.asarray(ctx.tensor(op.inputs[k]).data, dtype=dtype).reshape(channels)


def _rescale(ctx, op, mult, shift):
    """The multipliers as the kernel of this precision takes them (int16x8: 15-bit, total shift)."""
    if ctx.tensor(op.outputs[0]).dtype == "int16":
        return reduce_multiplier(mult, shift)
    return mult, shift


def _const_weights(ctx, op, k=1) -> np.ndarray:
    t = ctx.tensor(op.inputs[k])
    if not t.is_const:
        raise UnsupportedOperator([f"{op.opcode} #{op.index} with computed weights (int8)"], ctx.graph.name)
    return np.asarray(t.data)


def _act(ctx, op):
    out = ctx.tensor(op.outputs[0])
    return activation_range(int(op.opt("fusedActivationFunction", 0) or 0), out.scale, out.zero_point, out.dtype)


@register(("CONV_2D", "DEPTHWISE_CONV_2D"), "int16", implementations=("tir",))
@register(("CONV_2D", "DEPTHWISE_CONV_2D"), "int8", implementations=("tir", "dsp", "dsp16"), applies=_dsp_applies)
def conv2d(ctx, op, impl):
    from tvm import relax

    name = op.opcode
    w = _const_weights(ctx, op)
    x_t, out_t = ctx.tensor(op.inputs[0]), ctx.tensor(op.outputs[0])
    n, h, wd, c = x_t.shape
    kh, kw = w.shape[1], w.shape[2]
    channels = w.shape[0] if name == "CONV_2D" else w.shape[3]
    sh, sw = op.opt("strideH", 1), op.opt("strideW", 1)
    dh, dw = op.opt("dilationHFactor", 1) or 1, op.opt("dilationWFactor", 1) or 1
    pt, pb = padding(op.opt("padding", 0), h, kh, sh, dh)
    pl, pr = padding(op.opt("padding", 0), wd, kw, sw, dw)
    if name == "CONV_2D" and w.shape[3] != c:
        raise UnsupportedOperator([f"CONV_2D #{op.index} grouped (int8)"], ctx.graph.name)
    mult, shift = _requant_consts(ctx, op.inputs[0], op.inputs[1], op.outputs[0], channels)
    zp_in, zp_out = x_t.zero_point, out_t.zero_point
    lo, hi = _act(ctx, op)
    common = {"stride": (sh, sw), "dilation": (dh, dw), "padding": (pt, pl, pb, pr), "zp_in": zp_in, "zp_out": zp_out,
              "act_min": lo, "act_max": hi}
    bias = _bias_of(ctx, op, 2, channels)
    x = ctx.input(op, 0)
    args = [x, relax.const(w), relax.const(bias), *map(relax.const, _rescale(ctx, op, mult, shift))]
    shape = out_t.shape
    if impl in ("dsp", "dsp16"):
        _, oh, ow, _ = shape
        conv_params = _conv_params(n, h, wd, c, oh, ow, channels, kh, kw, sh, sw, dh, dw, pt, pl, zp_in, zp_out, lo, hi)
        cp = relax.const(conv_params)
        wide = impl == "dsp16"
        # the window-of-rows kernel (its pairs of taps are SMLAD operands: DSP cores only)
        rows3x3 = (name == "DEPTHWISE_CONV_2D" and kh == kw == 3 and dh == dw == 1 and sh in (1, 2)
                   and sw in (1, 2) and wide and ctx.target.dsp)
        dw3x3 = name == "DEPTHWISE_CONV_2D" and kh == kw == 3 and c % 4 == 0 and dh == dw == 1
        w2d = w.reshape(channels, -1) if name == "CONV_2D" else w.reshape(kh * kw, channels).T
        table = None
        if name == "CONV_2D" or dw3x3 or rows3x3:
            table = requant_table(w2d, bias, mult, shift, zp_in, zp_out, (lo, hi), single=False)
        suffix = "_w16" if wide else "_w8"
        if table is not None and name == "CONV_2D":
            if c % 4 == 3 and ctx.target.dsp:  # gemm_dsp.c's tap_depth: each tap padded to whole words
                w2d = np.pad(w.reshape(channels, kh * kw, c), ((0, 0), (0, 0), (0, 1))).reshape(channels, -1)
            y = _extern(ctx, "tinymlaas_gemm" + suffix, [x, relax.const(blocked_weights(w2d, 2, wide)),
                                                         relax.const(table), cp], shape)
        elif table is not None and rows3x3:
            transposed = ow < oh  # rows along the longer output side: each row costs a fixed overhead
            params = np.append(conv_params, np.int32(transposed))
            y = _extern(ctx, "tinymlaas_depthwise3x3_rows", [x, relax.const(depthwise_rows_weights(w, transposed)),
                                                             relax.const(table), relax.const(params)], shape)
        elif table is not None:  # [C/4][9 taps][4 lanes]
            taps = w.reshape(9, channels // 4, 4).transpose(1, 0, 2)
            taps = taps[..., _LANES].astype(np.int16) if wide else taps
            y = _extern(ctx, "tinymlaas_depthwise3x3" + suffix, [x, relax.const(np.ascontiguousarray(taps)),
                                                                 relax.const(table), cp], shape)
        else:  # requantization that needs the general form (conv_s8.c)
            pointwise = name == "CONV_2D" and kh == kw == 1 and sh == sw == 1 and pt == pl == 0
            symbol = ("tinymlaas_conv1x1_s8" if pointwise else "tinymlaas_conv_s8" if name == "CONV_2D"
                      else "tinymlaas_depthwise3x3_s8" if dw3x3 else "tinymlaas_depthwise_s8")
            if dw3x3:  # [C/4][9 taps][4 lanes]: a channel block's tap words adjacent
                args[1] = relax.const(np.ascontiguousarray(w.reshape(9, channels // 4, 4).transpose(1, 0, 2)).reshape(w.shape))
            y = _extern(ctx, symbol, args + [cp], shape)
    elif name == "CONV_2D":
        y = _emit_kernel(ctx, k.conv2d_s8, args, **common, acc_dtype=accumulator(x_t, w.reshape(channels, -1)))
    else:
        y = _emit_kernel(ctx, k.depthwise_conv2d_s8, args, **common, depth_multiplier=int(op.opt("depthMultiplier", 1) or 1),
                         acc_dtype=accumulator(x_t, w.reshape(-1, channels).T))
    ctx.set_output(op, 0, y)


@register("FULLY_CONNECTED", "int16", implementations=("tir",))
@register("FULLY_CONNECTED", "int8", implementations=("tir", "dsp", "dsp16"), applies=_dsp_applies)
def fully_connected(ctx, op, impl):
    from tvm import relax

    w = _const_weights(ctx, op)
    out_features, depth = w.shape
    x_t, w_t, out_t = ctx.tensor(op.inputs[0]), ctx.tensor(op.inputs[1]), ctx.tensor(op.outputs[0])
    x = ctx.input(op, 0)
    batch = x_t.size // depth
    if x_t.shape != (batch, depth):
        x = ctx.emit(relax.op.reshape(x, (batch, depth)))
    mult, shift = _requant_consts(ctx, op.inputs[0], op.inputs[1], op.outputs[0], 1)
    lo, hi = _act(ctx, op)
    bias_values = _bias_of(ctx, op, 2, out_features)
    bias = relax.const(bias_values)
    zp_in, zp_out = x_t.zero_point, out_t.zero_point
    if impl in ("dsp", "dsp16"):
        cp = relax.const(_conv_params(batch, 1, 1, depth, 1, 1, out_features, 1, 1, 1, 1, 1, 1, 0, 0, zp_in, zp_out,
                                      lo, hi, single=1))
        reps = out_features if mult.size == 1 else 1
        mult, shift = np.repeat(mult, reps), np.repeat(shift, reps)
        table = requant_table(w, bias_values, mult, shift, zp_in, zp_out, (lo, hi), single=True)
        if table is not None:  # one row: four channels per step; a batch: the 2x2 product
            kernel, block = ("tinymlaas_gemv", 4) if batch == 1 else ("tinymlaas_gemm", 2)
            wide = impl == "dsp16"
            y = _extern(ctx, kernel + ("_w16" if wide else "_w8"),
                        [x, relax.const(blocked_weights(w, block, wide)), relax.const(table), cp], (batch, out_features))
        else:
            y = _extern(ctx, "tinymlaas_conv1x1_s8", [x, relax.const(w), bias, relax.const(mult), relax.const(shift), cp],
                        (batch, out_features))
    else:
        args = [x, relax.const(w), bias, relax.const(mult), relax.const(shift)]
        y = _emit_kernel(ctx, k.fully_connected_s8, args, zp_in=zp_in, zp_weight=w_t.zero_point, zp_out=zp_out,
                         act_min=lo, act_max=hi, acc_dtype=accumulator(x_t, w, w_t.zero_point))
    ctx.set_output(op, 0, y)


@register(("AVERAGE_POOL_2D", "MAX_POOL_2D"), ("int8", "int16"), implementations=("tir",))
def pool(ctx, op, impl):
    _, h, wd, _ = ctx.tensor(op.inputs[0]).shape
    kh, kw = op.opt("filterHeight", 1), op.opt("filterWidth", 1)
    sh, sw = op.opt("strideH", 1), op.opt("strideW", 1)
    pt, pb = padding(op.opt("padding", 0), h, kh, sh, 1)
    pl, pr = padding(op.opt("padding", 0), wd, kw, sw, 1)
    lo, hi = _act(ctx, op)
    fn = k.avg_pool2d_s8 if op.opcode == "AVERAGE_POOL_2D" else k.max_pool2d_s8
    y = _emit_kernel(ctx, fn, [ctx.input(op, 0)], pool=(kh, kw), stride=(sh, sw), padding=(pt, pl, pb, pr),
                     act_min=lo, act_max=hi)
    ctx.set_output(op, 0, y)


@register(("ADD", "SUB"), ("int8", "int16"), implementations=("tir",))
def add(ctx, op, impl):
    """TFLite int8 ADD/SUB: both inputs rescaled to twice the larger scale with 20 bits of headroom (int16: 15)."""
    a_t, b_t, out_t = ctx.tensor(op.inputs[0]), ctx.tensor(op.inputs[1]), ctx.tensor(op.outputs[0])
    left_shift = 15 if out_t.dtype == "int16" else 20
    twice_max = 2.0 * float(max(np.float32(a_t.scale), np.float32(b_t.scale)))
    ma, sha = quantize_multiplier(a_t.scale / twice_max)
    mb, shb = quantize_multiplier(b_t.scale / twice_max)
    mo, sho = quantize_multiplier(twice_max / ((1 << left_shift) * out_t.scale))
    lo, hi = _act(ctx, op)
    y = _emit_kernel(ctx, k.add_s8, [ctx.input(op, 0), ctx.input(op, 1)], elementwise=True, out_shape=out_t.shape,
                     subtract=op.opcode == "SUB", left_shift=left_shift,
                     zp_a=a_t.zero_point, zp_b=b_t.zero_point, zp_out=out_t.zero_point, mult_a=ma, shift_a=sha,
                     mult_b=mb, shift_b=shb, mult_out=mo, shift_out=sho, act_min=lo, act_max=hi)
    ctx.set_output(op, 0, y)


@register("MUL", ("int8", "int16"), implementations=("tir",))
def mul(ctx, op, impl):
    """TFLite int8/int16 MUL: (a - zp_a) * (b - zp_b) rescaled by scale_a * scale_b / scale_out (double rounding)."""
    a_t, b_t, out_t = ctx.tensor(op.inputs[0]), ctx.tensor(op.inputs[1]), ctx.tensor(op.outputs[0])
    # in float32, as the interpreter computes it (its scales are floats; only the quotient is widened to double)
    m, s = quantize_multiplier(float(np.float32(a_t.scale) * np.float32(b_t.scale) / np.float32(out_t.scale)))
    lo, hi = _act(ctx, op)
    y = _emit_kernel(ctx, k.mul_s8, [ctx.input(op, 0), ctx.input(op, 1)], elementwise=True, out_shape=out_t.shape,
                     zp_a=a_t.zero_point,
                     zp_b=b_t.zero_point, zp_out=out_t.zero_point, mult=m, shift=s, act_min=lo, act_max=hi,
                     out_dtype=out_t.dtype)
    ctx.set_output(op, 0, y)


@register(("MAXIMUM", "MINIMUM"), ("int8", "int16"), implementations=("tir",))
def maximum(ctx, op, impl):
    from tvm import relax

    from tinymlaas.ops.movement import same_quantization

    same_quantization(ctx, op, (0, 1))
    fn = relax.op.maximum if op.opcode == "MAXIMUM" else relax.op.minimum
    ctx.set_output(op, 0, fn(ctx.input(op, 0), ctx.input(op, 1)))


@register("SOFTMAX", "int8", implementations=("c",))
def softmax(ctx, op, impl):
    from tvm import relax

    out_t = ctx.tensor(op.outputs[0])
    shape = out_t.shape
    m, shift, diff_min = softmax_params(float(op.opt("beta", 1.0)), ctx.tensor(op.inputs[0]).scale)
    consts = np.array([m, shift, diff_min, shape[-1], int(np.prod(shape))], dtype=np.int32)
    ctx.set_output(op, 0, _extern(ctx, "tinymlaas_softmax_s8", [ctx.input(op, 0), relax.const(consts)], shape))


@register("LOG_SOFTMAX", "int8", implementations=("c",))
def log_softmax(ctx, op, impl):
    """C kernel (firmware/kernels/log_softmax_s8.c); the interpreter requires output scale 16/256, zero point 127."""
    from tvm import relax

    shape = ctx.tensor(op.outputs[0]).shape
    consts = np.array([*log_softmax_params(ctx.tensor(op.inputs[0]).scale), shape[-1], int(np.prod(shape))],
                      dtype=np.int32)
    ctx.set_output(op, 0, _extern(ctx, "tinymlaas_log_softmax_s8", [ctx.input(op, 0), relax.const(consts)], shape))


@register("REDUCE_PROD", ("int8", "int16"), implementations=("c",))
def reduce_prod(ctx, op, impl):
    """C kernel (firmware/kernels/reduce_prod_q.c) over rows of the reduced elements: the reduced axes are moved
    last. TFLite rescales the product at every step by input_scale / output_scale^(1/n), in double."""
    from tvm import relax

    from tinymlaas.ops.float32 import reduce_axes

    x_t, out_t = ctx.tensor(op.inputs[0]), ctx.tensor(op.outputs[0])
    axes = reduce_axes(ctx, op)
    kept = [a for a in range(len(x_t.shape)) if a not in axes]
    n = int(np.prod([x_t.shape[a] for a in axes], dtype=np.int64))
    rows = int(np.prod([x_t.shape[a] for a in kept], dtype=np.int64))
    x = ctx.input(op, 0)
    if kept + axes != list(range(len(x_t.shape))):
        x = ctx.emit(relax.op.permute_dims(x, kept + axes))
    x = ctx.emit(relax.op.reshape(x, (rows, n)))
    m, shift = quantize_multiplier(float(x_t.scale) / math.pow(float(out_t.scale), 1.0 / n))
    reduced, total = reduce_multiplier(np.array([m]), np.array([shift]))
    consts = np.array([rows, n, x_t.zero_point, out_t.zero_point, int(reduced[0]), int(total[0])], dtype=np.int32)
    symbol = "tinymlaas_reduce_prod_s16" if x_t.dtype == "int16" else "tinymlaas_reduce_prod_s8"
    y = _extern(ctx, symbol, [x, relax.const(consts)], (rows,), x_t.dtype)
    ctx.set_output(op, 0, relax.op.reshape(y, out_t.shape))


# Elementwise operators of one int8 input: the output depends on the input value only, so the interpreter's own
# reference kernel is tabulated at compile time over all 256 inputs (same quantization, same options) and the
# device does a table lookup. Bit-exact by construction, integer-only on the device, and one load per element.
LUT_OPS = ("LOGISTIC", "TANH", "HARD_SWISH", "ELU", "EXP", "LOG", "SQRT", "RSQRT", "ABS", "NEG", "LEAKY_RELU", "RELU",
           "RELU6", "RELU_N1_TO_1", "RELU_0_TO_1", "GELU", "SQUARE", "SIN", "COS", "QUANTIZE", "DEQUANTIZE", "FLOOR",
           "CEIL", "ROUND", "SIGN")


def lookup_table(graph, op, inputs: np.ndarray | None = None) -> np.ndarray:
    """The interpreter's outputs of `op` for every input value (-128..127 by default) in a one-operator model with the
    model's quantization and options, run with the kernels the model's reference uses."""
    import flatbuffers
    from ai_edge_litert import schema_py_generated as s
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    from tinymlaas.verify import reference_resolver

    inputs = np.arange(-128, 128, dtype=np.int8) if inputs is None else inputs
    src, dst = graph.tensor(op.inputs[0]), graph.tensor(op.outputs[0])
    tensors = []
    for t in (src, dst):
        tt = s.TensorT()
        tt.name, tt.shape, tt.buffer = t.name.encode(), np.array([len(inputs)], dtype=np.int32), 0
        tt.type = {v: k for k, v in _TYPES.items()}[t.dtype]
        if t.quant is not None:
            q = s.QuantizationParametersT()
            q.scale, q.zeroPoint = list(t.quant.scale), list(t.quant.zero_point)
            tt.quantization = q
        tensors.append(tt)
    code = s.OperatorCodeT()
    code.builtinCode = getattr(s.BuiltinOperator, op.opcode)
    code.deprecatedBuiltinCode = min(code.builtinCode, 127)
    code.version = op.version
    fb_op = s.OperatorT()
    fb_op.opcodeIndex, fb_op.inputs, fb_op.outputs = 0, np.array([0], np.int32), np.array([1], np.int32)
    if op.options_type:
        cls = {v: k for k, v in s.BuiltinOptions.__dict__.items() if not k.startswith("_")}[op.options_type]
        opts = getattr(s, cls + "T")()
        for key, value in op.options.items():
            setattr(opts, key, value)
        fb_op.builtinOptionsType, fb_op.builtinOptions = op.options_type, opts
    sg = s.SubGraphT()
    sg.tensors, sg.operators = tensors, [fb_op]
    sg.inputs, sg.outputs = np.array([0], np.int32), np.array([1], np.int32)
    model = s.ModelT()
    model.version, model.operatorCodes, model.subgraphs, model.buffers = 3, [code], [sg], [s.BufferT()]
    b = flatbuffers.Builder(1024)
    b.Finish(model.Pack(b), file_identifier=b"TFL3")
    # the kernels the whole model's reference runs: the reference kernels, or builtin ones where some are missing
    resolver = getattr(OpResolverType, reference_resolver(graph.source))
    it = Interpreter(model_content=bytes(b.Output()), experimental_op_resolver_type=resolver)
    it.allocate_tensors()
    it.set_tensor(it.get_input_details()[0]["index"], inputs)
    it.invoke()
    return it.get_tensor(it.get_output_details()[0]["index"]).copy()


_TYPES = {0: "float32", 2: "int32", 7: "int16", 9: "int8", 6: "bool"}


def interpreter_table(ctx, op, inputs: np.ndarray | None = None) -> np.ndarray:
    """`lookup_table`, with the interpreter's refusal (these quantization parameters, inputs outside the domain)
    reported as an unsupported operator naming it."""
    try:
        return lookup_table(ctx.graph, op, inputs)
    except (RuntimeError, ValueError) as e:
        raise UnsupportedOperator([f"{op.opcode} #{op.index} ({str(e).splitlines()[0][:120]})"], ctx.graph.name) from e


@register(LUT_OPS, "int8", implementations=("lut",))
def table_lookup(ctx, op, impl):
    from tvm import relax

    src = ctx.tensor(op.inputs[0])
    if op.opcode == "QUANTIZE" and src.dtype == "float32":  # arithmetic, not a table
        return quantize(ctx, op, impl)
    if src.dtype != "int8":
        raise UnsupportedOperator([f"{op.opcode} #{op.index} on {src.dtype} input"], ctx.graph.name)
    table = interpreter_table(ctx, op)
    y = _emit_kernel(ctx, k.lookup_s8, [ctx.input(op, 0), relax.const(table)], elementwise=True)
    ctx.set_output(op, 0, y)


@register("DEQUANTIZE", "int16", implementations=("relax",))
def dequantize_int16(ctx, op, impl):
    """int16 -> float32 at a model's edge: (x - zp) * scale in float32 (the product of a float32 and an int16 is
    exact in double, so rounding it once to float32 is what TFLite's double arithmetic gives)."""
    from tvm import relax

    src = ctx.tensor(op.inputs[0])
    v = relax.op.astype(relax.op.subtract(relax.op.astype(ctx.input(op, 0), "int32"), ctx.const(src.zero_point, "int32")),
                        "float32")
    ctx.set_output(op, 0, relax.op.multiply(v, ctx.const(np.float32(src.scale), "float32")))


def quantize(ctx, op, impl):
    """float32 -> int8 or int16: round(x / scale) + zero point, clamped (TFLite AffineQuantize, half away from zero)."""
    from tvm import relax

    dst = ctx.tensor(op.outputs[0])
    x = relax.op.divide(ctx.input(op, 0), ctx.const(np.float32(dst.scale), "float32"))
    t = relax.op.trunc(x)  # std::round: away from zero at one half (x - trunc(x) is exact)
    away = relax.op.greater_equal(relax.op.abs(relax.op.subtract(x, t)), ctx.const(0.5, "float32"))
    r = relax.op.where(away, relax.op.add(t, relax.op.sign(x)), t)
    q = relax.op.add(relax.op.astype(r, "int32"), ctx.const(dst.zero_point, "int32"))
    info = np.iinfo(dst.dtype)
    ctx.set_output(op, 0, relax.op.astype(relax.op.clip(q, int(info.min), int(info.max)), dst.dtype))


_COMPARE = {"EQUAL": "==", "NOT_EQUAL": "!=", "LESS": "<", "LESS_EQUAL": "<=", "GREATER": ">", "GREATER_EQUAL": ">="}


def quantize_multiplier_smaller_than_one(real: float) -> tuple[int, int]:
    """TFLite QuantizeMultiplierSmallerThanOneExp: as QuantizeMultiplier, for 0 < real < 1 (shift <= 0)."""
    m, shift = quantize_multiplier(real)
    if shift > 0:
        raise UnsupportedOperator([f"comparison of int8 tensors with a scale >= 1 ({real})"], "model")
    return m, shift


@register(tuple(_COMPARE), "int8", implementations=("tir",))
def compare(ctx, op, impl):
    """TFLite int8 comparisons: both inputs offset, shifted left by 8 and scaled by their own scale, then compared."""
    a_t, b_t = ctx.tensor(op.inputs[0]), ctx.tensor(op.inputs[1])
    ma, sa = quantize_multiplier_smaller_than_one(a_t.scale)
    mb, sb = quantize_multiplier_smaller_than_one(b_t.scale)
    y = _emit_kernel(ctx, k.compare_s8, [ctx.input(op, 0), ctx.input(op, 1)], out_shape=ctx.tensor(op.outputs[0]).shape,
                     relation=_COMPARE[op.opcode], zp_a=a_t.zero_point, zp_b=b_t.zero_point, mult_a=ma, shift_a=sa,
                     mult_b=mb, shift_b=sb)
    ctx.set_output(op, 0, y)


@register("PRELU", "int8", implementations=("tir",))
def prelu(ctx, op, impl):
    """TFLite int8 PRELU: x >= zero point: rescaled by in/out scale; else (x - zp) * (alpha - zp_alpha) rescaled by
    in * alpha / out scale."""
    x_t, a_t, out_t = ctx.tensor(op.inputs[0]), ctx.tensor(op.inputs[1]), ctx.tensor(op.outputs[0])
    m1, s1 = quantize_multiplier(x_t.scale / out_t.scale)
    m2, s2 = quantize_multiplier(x_t.scale * a_t.scale / out_t.scale)
    y = _emit_kernel(ctx, k.prelu_s8, [ctx.input(op, 0), ctx.input(op, 1)], out_shape=out_t.shape, zp_in=x_t.zero_point,
                     zp_alpha=a_t.zero_point, zp_out=out_t.zero_point, mult_pos=m1, shift_pos=s1, mult_neg=m2, shift_neg=s2)
    ctx.set_output(op, 0, y)


@register("TRANSPOSE_CONV", ("int8", "int16"), implementations=("tir",))
def transpose_conv(ctx, op, impl):
    """As float32: the input dilated by the stride and padded with its zero point, then an int8 convolution with the
    kernel flipped in space; TFLite requantizes per channel like a convolution."""
    from tvm import relax

    from tinymlaas.ops.float32 import dilate_and_pad, transpose_conv_geometry

    x_t, w_t, out_t = ctx.tensor(op.inputs[2]), ctx.tensor(op.inputs[1]), ctx.tensor(op.outputs[0])
    w = np.ascontiguousarray(_const_weights(ctx, op)[:, ::-1, ::-1, :])
    channels = w.shape[0]
    stride, pads = transpose_conv_geometry(op, x_t.shape, w_t.shape, out_t.shape)
    x = ctx.emit(dilate_and_pad(ctx.input(op, 2), x_t.shape, stride, pads, float(x_t.zero_point)))
    mult, shift = _requant_consts(ctx, op.inputs[2], op.inputs[1], op.outputs[0], channels)
    lo, hi = _act(ctx, op)
    bias = _bias_of(ctx, op, 3, channels)
    args = [x, relax.const(w), relax.const(bias), *map(relax.const, _rescale(ctx, op, mult, shift))]
    y = _emit_kernel(ctx, k.conv2d_s8, args, stride=(1, 1), dilation=(1, 1), padding=(0, 0, 0, 0),
                     zp_in=x_t.zero_point, zp_out=out_t.zero_point, act_min=lo, act_max=hi,
                     acc_dtype=accumulator(x_t, w.reshape(channels, -1)))
    ctx.set_output(op, 0, y)


@register("MEAN", ("int8", "int16"), implementations=("tir",))
def mean(ctx, op, impl):
    """The interpreter's integer MEAN: the int32 sum of (x - zp_in), one rescale by in/out scale with 1/n folded into
    the multiplier (its shift bounded as the interpreter bounds it), plus zp_out. Measured against the interpreter
    for 4-D spatial means with kept dims and for other axes; both take this path."""
    from tinymlaas.ops.float32 import reduce_axes

    x_t, out_t = ctx.tensor(op.inputs[0]), ctx.tensor(op.outputs[0])
    axes = reduce_axes(ctx, op)
    keep = bool(op.opt("keepDims", False))
    n = int(np.prod([x_t.shape[a] for a in axes]))
    mult, shift = quantize_multiplier(x_t.scale / out_t.scale)
    bits = min(n.bit_length() - 1, 32, 31 + shift)
    mult, shift = (mult << bits) // n, shift - bits
    info = np.iinfo(out_t.dtype)
    y = _emit_kernel(ctx, k.mean_s8, [ctx.input(op, 0)], axes=axes, keepdims=keep, n=n, zp_in=x_t.zero_point,
                     zp_out=out_t.zero_point, mult=mult, shift=shift, lo=int(info.min), hi=int(info.max),
                     out_dtype=out_t.dtype)
    ctx.set_output(op, 0, y)


@register("BATCH_MATMUL", ("int8", "int16"), implementations=("tir",))
def batch_matmul(ctx, op, impl):
    a_t, b_t, out_t = ctx.tensor(op.inputs[0]), ctx.tensor(op.inputs[1]), ctx.tensor(op.outputs[0])
    mult, shift = quantize_multiplier(a_t.scale * b_t.scale / out_t.scale)
    rounding, acc = "double", "int32"
    if out_t.dtype == "int16":  # int64 sums where int32 could overflow, the 64-bit rescale
        reduced, total = reduce_multiplier(np.array([mult]), np.array([shift]))
        mult, shift, rounding = int(reduced[0]), int(total[0]), "reduced"
        depth = a_t.shape[-2] if op.opt("adjX", False) else a_t.shape[-1]
        acc = "int64" if depth * 65536 * 65536 >= 2**31 else "int32"
    info = np.iinfo(out_t.dtype)
    y = _emit_kernel(ctx, k.batch_matmul_q, [ctx.input(op, 0), ctx.input(op, 1)], out_shape=out_t.shape,
                     adj_x=bool(op.opt("adjX", False)), adj_y=bool(op.opt("adjY", False)), zp_a=a_t.zero_point,
                     zp_b=b_t.zero_point, zp_out=out_t.zero_point, mult=mult, shift=shift, lo=int(info.min),
                     hi=int(info.max), rounding=rounding, acc_dtype=acc)
    ctx.set_output(op, 0, y)


@register("SQUARED_DIFFERENCE", "int8", implementations=("tir",))
def squared_difference(ctx, op, impl):
    """TFLite int8 SQUARED_DIFFERENCE: inputs rescaled to twice the larger scale with 7 bits of headroom."""
    a_t, b_t, out_t = ctx.tensor(op.inputs[0]), ctx.tensor(op.inputs[1]), ctx.tensor(op.outputs[0])
    left_shift = 7
    twice_max = 2.0 * max(a_t.scale, b_t.scale)
    ma, sa = quantize_multiplier(a_t.scale / twice_max)
    mb, sb = quantize_multiplier(b_t.scale / twice_max)
    mo, so = quantize_multiplier(twice_max * twice_max / ((1 << (2 * left_shift)) * out_t.scale))
    y = _emit_kernel(ctx, k.squared_difference_s8, [ctx.input(op, 0), ctx.input(op, 1)], out_shape=out_t.shape,
                     left_shift=left_shift, zp_a=a_t.zero_point, zp_b=b_t.zero_point, zp_out=out_t.zero_point,
                     mult_a=ma, shift_a=sa, mult_b=mb, shift_b=sb, mult_out=mo, shift_out=so, lo=-128, hi=127)
    ctx.set_output(op, 0, y)


@register("RESIZE_BILINEAR", ("int8", "int16"), implementations=("tir",))
def resize_bilinear(ctx, op, impl):
    from tinymlaas.ops.movement import same_quantization

    same_quantization(ctx, op)
    _, oh, ow, _ = ctx.tensor(op.outputs[0]).shape
    y = _emit_kernel(ctx, k.resize_bilinear_q, [ctx.input(op, 0)], out_hw=(oh, ow),
                     align_corners=bool(op.opt("alignCorners", False)), half_pixel=bool(op.opt("halfPixelCenters", False)))
    ctx.set_output(op, 0, y)


@register("DIV", ("int8", "int16"), implementations=("c",))
def div(ctx, op, impl):
    """TFLite's quantized DIV (C kernel firmware/kernels/div_s8.c); the inputs broadcast in the graph first."""
    from tvm import relax

    a_t, b_t, out_t = ctx.tensor(op.inputs[0]), ctx.tensor(op.inputs[1]), ctx.tensor(op.outputs[0])
    # in float32, as the interpreter's expression of float scales evaluates it
    mult, shift = quantize_multiplier(float(np.float32(a_t.scale) / (np.float32(b_t.scale) * np.float32(out_t.scale))))
    lo, hi = _act(ctx, op)
    params = np.array([mult, shift, a_t.zero_point, b_t.zero_point, out_t.zero_point, lo, hi, out_t.size], np.int32)
    args = [ctx.input(op, i) if ctx.tensor(op.inputs[i]).shape == out_t.shape
            else ctx.emit(relax.op.broadcast_to(ctx.input(op, i), out_t.shape)) for i in (0, 1)]
    symbol = "tinymlaas_div_s16" if out_t.dtype == "int16" else "tinymlaas_div_s8"
    ctx.set_output(op, 0, _extern(ctx, symbol, [*args, relax.const(params)], out_t.shape, out_t.dtype))


@register("SUM", ("int8", "int16"), implementations=("tir",))
def reduce_sum(ctx, op, impl):
    """TFLite's quantized SUM computes in float32 (scale and bias as its Prepare makes them); we do the same, so it
    needs float arithmetic on the device (soft-float without an FPU)."""
    from tinymlaas.ops.float32 import reduce_axes

    x_t, out_t = ctx.tensor(op.inputs[0]), ctx.tensor(op.outputs[0])
    axes = reduce_axes(ctx, op)
    n = int(np.prod([x_t.shape[a] for a in axes]))
    scale = np.float32(x_t.scale) / np.float32(out_t.scale)
    bias = np.float32(-x_t.zero_point) * scale * np.float32(n)
    info = np.iinfo(out_t.dtype)
    y = _emit_kernel(ctx, k.sum_q, [ctx.input(op, 0)], axes=axes, keepdims=bool(op.opt("keepDims", False)),
                     scale=float(scale), bias=float(bias), zp_out=out_t.zero_point, lo=int(info.min), hi=int(info.max),
                     out_dtype=out_t.dtype)
    ctx.set_output(op, 0, y)


@register("L2_NORMALIZATION", "int8", implementations=("c",))
def l2_normalization(ctx, op, impl):
    """TFLite's int8 L2_NORMALIZATION (C kernel firmware/kernels/l2norm_s8.c): output scale 1/128, zero point 0."""
    from tvm import relax

    x_t, out_t = ctx.tensor(op.inputs[0]), ctx.tensor(op.outputs[0])
    if out_t.zero_point != 0 or abs(out_t.scale - 1 / 128) > 1e-9:
        raise UnsupportedOperator([f"L2_NORMALIZATION #{op.index} int8 with output quantization other than 1/128, 0"],
                                  ctx.graph.name)
    params = np.array([x_t.zero_point, x_t.shape[-1], x_t.size], dtype=np.int32)
    ctx.set_output(op, 0, _extern(ctx, "tinymlaas_l2norm_s8", [ctx.input(op, 0), relax.const(params)], out_t.shape))
