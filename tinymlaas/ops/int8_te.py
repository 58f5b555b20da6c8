"""Integer kernels in TE with TFLite's exact arithmetic.

int8: int8 activations and weights, int32 accumulation and bias, requantization with a fixed-point
multiplier and shift (saturating rounding doubling high multiply, then rounding divide by a power
of two), zero points and clamping, exactly as TFLite's reference kernels compute them.
int16x8: int16 activations (zero point 0), int8 weights, int64 bias; the accumulator is int64 where
int32 could overflow, and the rescale is TFLite's 64-bit one (a 15-bit multiplier, one rounding).
"""

from __future__ import annotations


def _i32(v):
    from tvm import tirx

    return tirx.const(v, "int32")


def _let(value, body, name="t"):
    """`body(value)`. A TIR Let here would be cleaner, but TVM's loop unrolling duplicates Let
    bindings and its analyzer then rejects the function; LLVM removes the common subexpressions."""
    if hasattr(value, "asobject"):  # a te.TensorSlice such as shift[o]
        value = value.asobject()
    return body(value)


def srdhm(a, b):
    """gemmlowp SaturatingRoundingDoublingHighMul for int32, b a quantized multiplier.

    TFLite computes trunc((a*b + nudge) / 2**31) with nudge = 2**30 or 1 - 2**30 by sign; for every
    int64 product that equals floor((a*b + 2**30) / 2**31), one add and one arithmetic shift. Multipliers
    are in [0, 2**31), so the one saturating case (a == b == INT32_MIN) cannot occur.
    """
    from tvm import tirx

    ab = a.astype("int64") * b.astype("int64")
    return ((ab + tirx.const(1 << 30, "int64")) >> tirx.const(31, "int64")).astype("int32")


def rounding_divide_by_pot(x, exponent):
    """gemmlowp RoundingDivideByPOT: x / 2**exponent, rounding half away from zero."""
    from tvm import tirx

    def divide(x, e):
        mask = (_i32(1) << e) - _i32(1)
        threshold = (mask >> _i32(1)) + tirx.Select(x < _i32(0), _i32(1), _i32(0))
        return (x >> e) + tirx.Select((x & mask) > threshold, _i32(1), _i32(0))

    if isinstance(exponent, (int, tirx.IntImm)):
        return _let(x, lambda xv: divide(xv, exponent), "x")
    return _let(x, lambda xv: _let(exponent, lambda ev: divide(xv, ev), "e"), "x")


def multiply_by_quantized_multiplier(x, multiplier, shift):
    """TFLite MultiplyByQuantizedMultiplier (double rounding): shift > 0 is a left shift."""
    from tvm import tirx

    return _let(
        shift,
        lambda s: rounding_divide_by_pot(srdhm(x * (_i32(1) << tirx.Max(s, _i32(0))), multiplier), tirx.Max(-s, _i32(0))),
        "shift",
    )


def multiply_by_quantized_multiplier_single_rounding(x, multiplier, shift):
    """x * multiplier * 2**(shift - 31) with one rounding: TFLite's int8 FULLY_CONNECTED in the interpreter."""
    from tvm import tirx

    def scaled(total):
        rounding = tirx.const(1, "int64") << (total - tirx.const(1, "int64"))
        return ((x.astype("int64") * multiplier.astype("int64") + rounding) >> total).astype("int32")

    return _let((_i32(31) - shift).astype("int64"), scaled, "total")


def multiply_by_quantized_multiplier_64(x, reduced_multiplier, total_shift):
    """TFLite's MultiplyByQuantizedMultiplier of an int64 accumulator: (x * m15 + round) >> (15 - shift), truncated to
    int32. The caller passes the 15-bit multiplier and 15 - shift (see int8.reduce_multiplier)."""
    from tvm import tirx

    def scaled(total):
        rounding = tirx.const(1, "int64") << (total - tirx.const(1, "int64"))
        return ((x.astype("int64") * reduced_multiplier.astype("int64") + rounding) >> total).astype("int32")

    return _let(total_shift.astype("int64"), scaled, "total")


def _clamp(v, lo: int, hi: int, dtype: str):
    from tvm import tirx

    return _let(v, lambda x: tirx.Min(tirx.Max(x, _i32(lo)), _i32(hi)).astype(dtype), "v")


_RESCALE = {  # how TFLite's kernels rescale an accumulator
    "double": multiply_by_quantized_multiplier,  # int8 convolutions
    "single": multiply_by_quantized_multiplier_single_rounding,  # FULLY_CONNECTED, int8 and int16x8
    "reduced": multiply_by_quantized_multiplier_64,  # int16x8 convolutions (int64 accumulator)
}


def _requantize(acc, multiplier, shift, zp_out: int, act_min: int, act_max: int, rounding: str = "double",
                out_dtype: str = "int8"):
    return _clamp(_RESCALE[rounding](acc, multiplier, shift) + _i32(zp_out), act_min, act_max, out_dtype)


def _product(a, b, acc_dtype: str):
    """a * b in the accumulator's type (int32 operands)."""
    return a * b if acc_dtype == "int32" else a.astype(acc_dtype) * b.astype(acc_dtype)


def _conv_geometry(data, kh, kw, stride, dilation, padding, zp_in, fold_zero_point=False):
    """Output size, and the input minus its zero point with padding reading as 0 (TFLite skips it). With
    fold_zero_point the input as it is, padding reading as the zero point: the caller's bias carries
    -zero_point x the sum of the weights, so each tap's product differs by the same zero_point x weight."""
    from tvm import tirx

    n, h, w, c = (int(v) for v in data.shape)
    (sh, sw), (dh, dw), (pt, pl, pb, pr) = stride, dilation, padding
    oh = (h + pt + pb - (kh - 1) * dh - 1) // sh + 1
    ow = (w + pl + pr - (kw - 1) * dw - 1) // sw + 1

    unpadded = not any(padding)  # every read inside: no test (what a tensorized inner product can match)

    def value(b, y, x, ch):
        inside = tirx.all(y >= 0, y < h, x >= 0, x < w)
        if unpadded:
            return data[b, y, x, ch].astype("int32") - (_i32(0) if fold_zero_point else _i32(zp_in))
        if fold_zero_point:
            return tirx.if_then_else(inside, data[b, y, x, ch], tirx.const(zp_in, data.dtype)).astype("int32")
        return tirx.if_then_else(inside, data[b, y, x, ch].astype("int32") - _i32(zp_in), _i32(0))

    return n, c, oh, ow, value


def conv2d_s8(data, weight, bias, multiplier, shift, *, stride, dilation, padding, zp_in, zp_out, act_min, act_max,
              acc_dtype="int32", fold_zero_point=False, proven=False, lanes=False, split_rounding=False):
    """NHWC int8 (or int16x8) convolution, weights OHWI, per-channel requantization (proven: bias, multiplier and
    shift are the columns of requantize_proven; lanes: int16 weights in lane order, ir/arm_intrinsics.py).
    Grouped (the filter holds a fraction of the input's channels): output channel o reads its group's channels."""
    from tvm import te

    from tinymlaas.ir.arm_intrinsics import lane

    oc, kh, kw, ic = (int(v) for v in weight.shape)
    (sh, sw), (dh, dw), (pt, pl, _, _) = stride, dilation, padding
    n, c, oh, ow, value = _conv_geometry(data, kh, kw, stride, dilation, padding, zp_in, fold_zero_point)
    ry, rx, rc = te.reduce_axis((0, kh), "ry"), te.reduce_axis((0, kw), "rx"), te.reduce_axis((0, ic), "rc")
    per_group = oc // (c // ic)  # output channels per group (all of them when not grouped)
    channel = (lambda o: rc) if ic == c else (lambda o: o // _i32(per_group) * _i32(ic) + rc)

    acc = te.compute(
        (n, oh, ow, oc),
        lambda b, y, x, o: te.sum(
            _product(value(b, y * sh + ry * dh - pt, x * sw + rx * dw - pl, channel(o)),
                     weight[o, ry, rx, lane(rc) if lanes else rc].astype("int32"), acc_dtype),
            axis=[ry, rx, rc],
        ),
        name="acc",
    )
    return _requantize_channels(acc, bias, multiplier, shift, zp_out, act_min, act_max, data.dtype, proven,
                                split_rounding)


def transpose_conv2d_s8(data, weight, bias, multiplier, shift, *, stride, before, out_hw, zp_in, zp_out, act_min,
                        act_max, acc_dtype="int32"):
    """NHWC int8 (or int16x8) transposed convolution, weights OHWI as TFLite holds them: a gather over the taps on the
    stride's grid (geometry.transpose_conv_taps), (x - zp_in) x w summed, requantized per channel as a convolution."""
    from tvm import te, tirx

    from tinymlaas.ops.geometry import transpose_conv_taps

    (ry, rx, rc), taps = transpose_conv_taps(data.shape, weight.shape, stride, before)

    def product(b, y, x, o):
        iy, ix, wy, wx, inside = taps(y, x)
        term = _product(data[b, iy, ix, rc].astype("int32") - _i32(zp_in), weight[o, wy, wx, rc].astype("int32"),
                        acc_dtype)
        return tirx.if_then_else(inside, term, tirx.const(0, acc_dtype))

    shape = (int(data.shape[0]), *out_hw, int(weight.shape[0]))
    acc = te.compute(shape, lambda b, y, x, o: te.sum(product(b, y, x, o), axis=[ry, rx, rc]), name="acc")
    return _requantize_channels(acc, bias, multiplier, shift, zp_out, act_min, act_max, data.dtype)


def requantize_proven(acc, bias, multiplier, round_shift, *, act_min, act_max, single: bool,
                      split_rounding: bool = False):
    """The requantization of gemm_dsp.c without 64-bit rounding steps or saturation tests, for a layer where
    dsp_layouts.requant_table proved it exact (its columns: `bias` doubled unless `single`, `multiplier`, and
    `round_shift` [C, 2] = the rounding constant with the output zero point, the shift):
    double: x = (2 (acc + bias) m + 2^31) >> 32, then (x + round - (x < 0)) >> shift; single: ((acc + bias) m >> 32
    + round) >> shift; then clamped. Sums wrap in int32 where a folded zero point makes a partial sum large: the
    total is proved to fit. split_rounding: the rounded high word as the high word plus bit 31 of the low one (the
    same value; on cores without Arm's SMMULR, which takes the first form in one instruction, it is two
    instructions fewer than a 64-bit add)."""
    from tvm import te, tirx

    lo, hi = max(act_min, -128), min(act_max, 127)
    # the int32 total in a stage of its own (one register): inlined, TVM would widen the sum before the product
    # and LLVM could no longer take the product of two 32-bit values
    total = te.compute(acc.shape, lambda *i: (acc(*i) if single else acc(*i) * _i32(2)) + bias[i[-1]],
                       name="keep_total")

    def f(*i):
        o = i[-1]
        m = multiplier[o].astype("int64")
        if single:
            x = ((total(*i).astype("int64") * m) >> tirx.const(32, "int64")).astype("int32")
            v = (x + round_shift[o, 0]) >> round_shift[o, 1]
        else:
            product = total(*i).astype("int64") * m
            if split_rounding:
                x = ((product >> tirx.const(32, "int64")).astype("int32")
                     + ((product >> tirx.const(31, "int64")).astype("int32") & _i32(1)))
            else:
                x = ((product + tirx.const(1 << 31, "int64")) >> tirx.const(32, "int64")).astype("int32")
            v = _let(x, lambda xv: (xv + round_shift[o, 0] + (xv >> _i32(31))) >> round_shift[o, 1], "x")
        return _clamp(v, lo, hi, "int8")

    return te.compute(acc.shape, f, name="requantize")


def _requantize_channels(acc, bias, multiplier, shift, zp_out, act_min, act_max, out_dtype, proven=False,
                         split_rounding=False):
    from tvm import te

    if proven:
        return requantize_proven(acc, bias, multiplier, shift, act_min=act_min, act_max=act_max, single=False,
                                 split_rounding=split_rounding)

    def f(*i):
        o = i[-1]
        total = acc(*i).astype(bias.dtype) + bias[o]
        rounding = "reduced" if str(out_dtype) == "int16" else "double"
        return _requantize(total, multiplier[o], shift[o], zp_out, act_min, act_max, rounding, str(out_dtype))

    return te.compute(acc.shape, f, name="requantize")


def depthwise_conv2d_s8(
    data, weight, bias, multiplier, shift, *, stride, dilation, padding, depth_multiplier, zp_in, zp_out, act_min, act_max,
    acc_dtype="int32", fold_zero_point=False, proven=False, split_rounding=False,
):
    """NHWC int8 (or int16x8) depthwise convolution, weights 1HWC (C = in channels * depth multiplier)."""
    from tvm import te

    _, kh, kw, oc = (int(v) for v in weight.shape)
    (sh, sw), (dh, dw), (pt, pl, _, _) = stride, dilation, padding
    n, _, oh, ow, value = _conv_geometry(data, kh, kw, stride, dilation, padding, zp_in, fold_zero_point)
    ry, rx = te.reduce_axis((0, kh), "ry"), te.reduce_axis((0, kw), "rx")

    acc = te.compute(
        (n, oh, ow, oc),
        lambda b, y, x, o: te.sum(
            _product(value(b, y * sh + ry * dh - pt, x * sw + rx * dw - pl, o // depth_multiplier),
                     weight[0, ry, rx, o].astype("int32"), acc_dtype),
            axis=[ry, rx],
        ),
        name="acc",
    )
    return _requantize_channels(acc, bias, multiplier, shift, zp_out, act_min, act_max, data.dtype, proven,
                                split_rounding)


def fully_connected_s8(data, weight, bias, multiplier, shift, *, zp_in, zp_weight, zp_out, act_min, act_max,
                       acc_dtype="int32", fold_zero_point=False, proven=False, lanes=False):
    """[batch, in] x [out, in]^T int8 (or int16x8), per-tensor or per-channel requantization (multiplier/shift of
    length out).

    The interpreter rescales FULLY_CONNECTED with a single rounding of the full multiplier, int8 and int16x8 alike
    (unlike its convolutions; measured), so we do too.
    """
    from tvm import te

    from tinymlaas.ir.arm_intrinsics import lane

    batch, depth = (int(v) for v in data.shape)
    out_features = int(weight.shape[0])
    per_channel = int(multiplier.shape[0]) > 1
    k = te.reduce_axis((0, depth), "k")
    acc = te.compute(
        (batch, out_features),
        lambda b, o: te.sum(
            _product(data[b, k].astype("int32") - _i32(0 if fold_zero_point else zp_in),
                     weight[o, lane(k) if lanes else k].astype("int32") - _i32(zp_weight),
                     acc_dtype),
            axis=k,
        ),
        name="acc",
    )
    if proven:
        return requantize_proven(acc, bias, multiplier, shift, act_min=act_min, act_max=act_max, single=True)
    return te.compute(
        (batch, out_features),
        lambda b, o: _requantize(
            acc[b, o].astype(bias.dtype) + bias[o],
            multiplier[o if per_channel else 0],
            shift[o if per_channel else 0],
            zp_out,
            act_min,
            act_max,
            rounding="single",
            out_dtype=str(data.dtype),
        ),
        name="requantize",
    )


def _pool_window(h, w, kh, kw, sh, sw, pt, pl, y, x):
    from tvm import tirx

    y0, x0 = y * sh - pt, x * sw - pl
    fy0, fx0 = tirx.Max(-y0, _i32(0)), tirx.Max(-x0, _i32(0))
    fy1, fx1 = tirx.Min(_i32(kh), _i32(h) - y0), tirx.Min(_i32(kw), _i32(w) - x0)
    return y0, x0, fy0, fx0, fy1, fx1


def _pool_geometry(data, pool, stride, padding):
    from tvm import te

    n, h, w, c = (int(v) for v in data.shape)
    (kh, kw), (sh, sw), (pt, pl, pb, pr) = pool, stride, padding
    oh, ow = (h + pt + pb - kh) // sh + 1, (w + pl + pr - kw) // sw + 1
    return n, h, w, c, kh, kw, sh, sw, pt, pl, oh, ow, te.reduce_axis((0, kh), "ry"), te.reduce_axis((0, kw), "rx")


def avg_pool2d_s8(data, *, pool, stride, padding, act_min, act_max):
    """TFLite int8 average pool: sum over the valid part of the window, divide rounding half away from zero."""
    from tvm import te, tirx

    n, h, w, c, kh, kw, sh, sw, pt, pl, oh, ow, ry, rx = _pool_geometry(data, pool, stride, padding)

    def inside(y, x):
        return tirx.all(y >= 0, y < h, x >= 0, x < w)

    total = te.compute(
        (n, oh, ow, c),
        lambda b, y, x, ch: te.sum(
            tirx.if_then_else(
                inside(y * sh + ry - pt, x * sw + rx - pl),
                data[b, y * sh + ry - pt, x * sw + rx - pl, ch].astype("int32"),
                _i32(0),
            ),
            axis=[ry, rx],
        ),
        name="sum",
    )

    def finish(b, y, x, ch):
        _, _, fy0, fx0, fy1, fx1 = _pool_window(h, w, kh, kw, sh, sw, pt, pl, y.astype("int32"), x.astype("int32"))
        count = (fy1 - fy0) * (fx1 - fx0)
        acc = total[b, y, x, ch]
        half = tirx.truncdiv(count, _i32(2))
        q = tirx.Select(acc > _i32(0), tirx.truncdiv(acc + half, count), tirx.truncdiv(acc - half, count))
        return tirx.Min(tirx.Max(q, _i32(act_min)), _i32(act_max)).astype(data.dtype)

    return te.compute((n, oh, ow, c), finish, name="average")


def max_pool2d_s8(data, *, pool, stride, padding, act_min, act_max):
    from tvm import te, tirx

    n, h, w, c, _, _, sh, sw, pt, pl, oh, ow, ry, rx = _pool_geometry(data, pool, stride, padding)

    def value(b, y, x, ch):
        inside = tirx.all(y >= 0, y < h, x >= 0, x < w)
        return tirx.if_then_else(inside, data[b, y, x, ch], tirx.min_value(data.dtype))

    m = te.compute(
        (n, oh, ow, c),
        lambda b, y, x, ch: te.max(value(b, y * sh + ry - pt, x * sw + rx - pl, ch), axis=[ry, rx]),
        name="max",
    )
    return te.compute(
        (n, oh, ow, c),
        lambda *i: tirx.Min(tirx.Max(m(*i), tirx.const(act_min, data.dtype)), tirx.const(act_max, data.dtype)),
        name="clamp",
    )


def broadcast(x, out_shape, index):
    """x read at an output index, numpy-style broadcasting (dimensions of size 1 repeat, leading ones added)."""
    rank = len(x.shape)
    lead = len(out_shape) - rank
    idx = [0 if int(x.shape[d]) == 1 and int(out_shape[lead + d]) != 1 else index[lead + d] for d in range(rank)]
    return x[tuple(idx)]


# the quantization parameters add_s8 / mul_s8 may read from a buffer, in the buffer's order (int8.repeated_params)
ADD_PARAMETERS = ("zp_a", "zp_b", "zp_out", "mult_a", "mult_b", "mult_out")
MUL_PARAMETERS = ("zp_a", "zp_b", "zp_out", "mult")


def _parameters(params, names: tuple[str, ...], values: dict) -> dict:
    """Zero points and multipliers as immediates, or (params: an int32 buffer holding `names` in order) read from it:
    one kernel body then serves every step of an unrolled sequence whose shifts agree, whatever its scales (see
    int8.repeated_params). Shifts stay immediates: they shape the code (the rounding, a left shift or none)."""
    if params is None:
        return {k: _i32(values[k]) for k in names}
    return {k: params[i] for i, k in enumerate(names)}


def add_s8(a, b, params=None, *, out_shape, subtract, left_shift, zp_a, zp_b, zp_out, mult_a, shift_a, mult_b, shift_b,
           mult_out, shift_out, act_min, act_max):
    """TFLite int8 ADD/SUB (with broadcasting): both inputs rescaled to a common scale with 20 bits of headroom.
    params: the zero points and multipliers in a buffer instead of immediates (_parameters)."""
    from tvm import te

    q = _parameters(params, ADD_PARAMETERS, {"zp_a": zp_a, "zp_b": zp_b, "zp_out": zp_out, "mult_a": mult_a,
                                             "mult_b": mult_b, "mult_out": mult_out})

    def scaled(x, zp, mult, shift):
        v = (x.astype("int32") - zp) * _i32(1 << left_shift)
        return rounding_divide_by_pot(srdhm(v, mult), -shift)

    # The rescaled sum is its own stage, computed per element ("keep_": not inlined by the schedule),
    # so the output rescaling does not copy both input rescalings into one expression tree.
    def combine(*i):
        sa = scaled(broadcast(a, out_shape, i), q["zp_a"], q["mult_a"], shift_a)
        sb = scaled(broadcast(b, out_shape, i), q["zp_b"], q["mult_b"], shift_b)
        return sa - sb if subtract else sa + sb

    raw = te.compute(out_shape, combine, name="keep_sum")

    def f(*i):
        out = rounding_divide_by_pot(srdhm(raw(*i), q["mult_out"]), -shift_out) + q["zp_out"]
        return _clamp(out, act_min, act_max, str(a.dtype))

    return te.compute(out_shape, f, name="add")


def add_s8_tables(a, b, table_a, table_b, mult_out, *, out_shape, exponent, round_zp, act_min, act_max):
    """TFLite int8 ADD/SUB as add_s8 computes it, each input's rescaling looked up: table[x + 128] is twice its value
    for every int8 x, computed at build time (negated for SUB's second input). The doubled sum 2s is then
    requantized without 64-bit rounding steps, for a layer where the caller proved |2 s| < 2^31 and exponent >= 1:
    x = (2 s m + 2^31) >> 32 (SRDHM: one SMMULR; doubled in the tables, so that LLVM cannot fold the doubling into
    the multiplier), (x + round_zp - (x < 0)) >> exponent (RoundingDivideByPOT, the output zero point folded into
    the rounding constant), clamped. mult_out is a one-element buffer: with the multiplier a constant, LLVM
    rewrites the rounding high product into a 64-bit one of twice the multiplier (no SMMULR)."""
    from tvm import te, tirx

    def total(*i):
        va = table_a[broadcast(a, out_shape, i).astype("int32") + _i32(128)]
        return va + table_b[broadcast(b, out_shape, i).astype("int32") + _i32(128)]

    s = te.compute(out_shape, total, name="keep_sum")

    def f(*i):
        doubled = s(*i).astype("int64")
        x = (doubled * mult_out[0].astype("int64") + tirx.const(1 << 31, "int64")) >> tirx.const(32, "int64")
        x = x.astype("int32")
        v = (x + _i32(round_zp) + (x >> _i32(31))) >> _i32(exponent)
        return _clamp(v, act_min, act_max, "int8")

    return te.compute(out_shape, f, name="add")


def mul_s8(a, b, params=None, *, out_shape, zp_a, zp_b, zp_out, mult, shift, act_min, act_max, out_dtype="int8"):
    """TFLite int8 or int16 MUL (with broadcasting). params: as add_s8's."""
    from tvm import te, tirx

    q = _parameters(params, MUL_PARAMETERS, {"zp_a": zp_a, "zp_b": zp_b, "zp_out": zp_out, "mult": mult})

    def f(*i):
        prod = (broadcast(a, out_shape, i).astype("int32") - q["zp_a"]) * (broadcast(b, out_shape, i).astype("int32") - q["zp_b"])
        out = multiply_by_quantized_multiplier(prod, q["mult"], _i32(shift)) + q["zp_out"]
        return tirx.Min(tirx.Max(out, _i32(act_min)), _i32(act_max)).astype(out_dtype)

    return te.compute(out_shape, f, name="mul")


def lookup_s8(x, table):
    """table[x + 128]: an elementwise operator tabulated over all int8 inputs."""
    from tvm import te

    return te.compute(x.shape, lambda *i: table[x(*i).astype("int32") + _i32(128)], name="lookup")


def lookup_u8(x, table):
    """table[x]: an elementwise operator tabulated over all uint8 inputs."""
    from tvm import te

    return te.compute(x.shape, lambda *i: table[x(*i).astype("int32")], name="lookup")


def compare_s8(a, b, *, out_shape, relation, zp_a, zp_b, mult_a, shift_a, mult_b, shift_b):
    """TFLite int8 comparison (with broadcasting): each side ((x - zp) << 8) scaled by its own multiplier."""
    from tvm import te

    def side(x, zp, mult, shift):
        return multiply_by_quantized_multiplier((x.astype("int32") - _i32(zp)) * _i32(256), _i32(mult), _i32(shift))

    def f(*i):
        va = side(broadcast(a, out_shape, i), zp_a, mult_a, shift_a)
        vb = side(broadcast(b, out_shape, i), zp_b, mult_b, shift_b)
        return {"==": va == vb, "!=": va != vb, "<": va < vb, "<=": va <= vb, ">": va > vb, ">=": va >= vb}[relation]

    return te.compute(out_shape, f, name="compare")


def prelu_s8(x, alpha, *, out_shape, zp_in, zp_alpha, zp_out, mult_pos, shift_pos, mult_neg, shift_neg):
    from tvm import te, tirx

    def f(*i):
        v = broadcast(x, out_shape, i).astype("int32") - _i32(zp_in)
        a = broadcast(alpha, out_shape, i).astype("int32") - _i32(zp_alpha)
        pos = multiply_by_quantized_multiplier(v, _i32(mult_pos), _i32(shift_pos))
        neg = multiply_by_quantized_multiplier(v * a, _i32(mult_neg), _i32(shift_neg))
        out = tirx.Select(v >= _i32(0), pos, neg) + _i32(zp_out)
        return tirx.Min(tirx.Max(out, _i32(-128)), _i32(127)).astype("int8")

    return te.compute(out_shape, f, name="prelu")


def _integer_sum(x, axes, keepdims: bool):
    """The int32 sum of x over `axes` (a stage of its own)."""
    from tvm import te

    shape = [int(v) for v in x.shape]
    rax = {a: te.reduce_axis((0, shape[a]), f"r{a}") for a in axes}
    out_shape = [1 if a in rax else d for a, d in enumerate(shape)] if keepdims else \
        [d for a, d in enumerate(shape) if a not in rax]

    def total(*o):
        it = iter(o)
        idx = []
        for a in range(len(shape)):
            if a in rax:
                idx.append(rax[a])
                if keepdims:
                    next(it)
            else:
                idx.append(next(it))
        return te.sum(x[tuple(idx)].astype("int32"), axis=list(rax.values()))

    return te.compute(out_shape, total, name="sum")


def mean_s8(x, *, axes, keepdims, n, zp_in, zp_out, mult, shift, lo, hi, out_dtype):
    """TFLite integer MEAN over `axes`: the int32 sum of (x - zp_in), rescaled once (1/n folded into mult, shift)."""
    from tvm import te, tirx

    sums = _integer_sum(x, axes, keepdims)
    out_shape = sums.shape

    def f(*o):
        scaled = multiply_by_quantized_multiplier(sums(*o) - _i32(zp_in * n), _i32(mult), _i32(shift))
        return tirx.Min(tirx.Max(scaled + _i32(zp_out), _i32(lo)), _i32(hi)).astype(out_dtype)

    return te.compute(out_shape, f, name="mean")


def sigmoid_s16(x, table, *, opcode, mult, shift):
    """TFLite's int16 LOGISTIC / TANH: the input scaled to units of 1/(3 * 4096), a 256-step table interpolated
    over 9 (LOGISTIC) or 8 (TANH) fraction bits, odd symmetry around 0 (see ops/int16.py)."""
    from tvm import te, tirx

    bits = 9 if opcode == "LOGISTIC" else 8

    def f(*i):
        rounding = (1 << (shift - 1)) if shift > 0 else 0
        d = (x(*i).astype("int32") * _i32(mult) + _i32(rounding)) >> _i32(shift)

        def body(d):
            a = tirx.Select(d >= _i32(0), d, -d)
            step = a >> _i32(bits)
            k = tirx.Min(step, _i32(254))
            lo, hi = table[k], table[k + 1]
            frac = a & _i32((1 << bits) - 1)
            if opcode == "LOGISTIC":
                r = tirx.Select(step >= _i32(255), _i32(0x7FFF << 10), (lo << _i32(9)) + frac * (hi - lo))
                r = tirx.Select(d >= _i32(0), r + _i32(1 << 9), _i32((1 << 25) + (1 << 9) - 1) - r) >> _i32(10)
            else:
                r = tirx.Select(step >= _i32(255), _i32(0xFFFF << 8), (lo << _i32(8)) + frac * (hi - lo))
                r = tirx.Select(d >= _i32(0), r - _i32((1 << 23) - (1 << 7)), _i32((1 << 23) + (1 << 7) - 1) - r) >> _i32(8)
            return tirx.Min(tirx.Max(r, _i32(-32768)), _i32(32767)).astype("int16")

        return _let(d, body, "d")

    return te.compute(x.shape, f, name="sigmoid")


def rescale_q(x, *, zp_in, zp_out, mult_pos, shift_pos, mult_neg, shift_neg, lo, hi, absolute, out_dtype):
    """zp_out + (x - zp_in) rescaled by one multiplier for x >= zp_in and another below (|x - zp_in| if absolute),
    clamped: TFLite's quantized ReLU family, LEAKY_RELU, ABS and integer requantization."""
    from tvm import te, tirx

    def f(*i):
        def body(v):
            if absolute:
                v = tirx.Select(v >= _i32(0), v, -v)
            pos = multiply_by_quantized_multiplier(v, _i32(mult_pos), _i32(shift_pos))
            if (mult_neg, shift_neg) == (mult_pos, shift_pos) or absolute:
                out = pos
            else:
                out = tirx.Select(v >= _i32(0), pos, multiply_by_quantized_multiplier(v, _i32(mult_neg), _i32(shift_neg)))
            return _clamp(out + _i32(zp_out), lo, hi, out_dtype)

        return _let(x(*i).astype("int32") - _i32(zp_in), body, "v")

    return te.compute(x.shape, f, name="rescale")


def batch_matmul_q(a, b, *, out_shape, adj_x, adj_y, zp_a, zp_b, zp_out, mult, shift, lo, hi, rounding, acc_dtype):
    """TFLite's quantized BATCH_MATMUL: sum over k of (a - zp_a)(b - zp_b), batch dimensions broadcast, one rescale
    (int8: int32 sums, double rounding; int16: int64 sums, the 64-bit rescale)."""
    from tvm import te

    depth = int(a.shape[-2] if adj_x else a.shape[-1])
    k = te.reduce_axis((0, depth), "k")
    batch = len(out_shape) - 2

    def operand(x, index, rows, adjoint):
        lead = [0 if int(x.shape[d]) == 1 else index[batch - (len(x.shape) - 2) + d] for d in range(len(x.shape) - 2)]
        return x[tuple(lead + ([k, rows] if adjoint else [rows, k]))]

    def total(*i):
        va = operand(a, i, i[-2], adj_x).astype("int32") - _i32(zp_a)
        vb = operand(b, i, i[-1], not adj_y).astype("int32") - _i32(zp_b)
        return te.sum(_product(va, vb, acc_dtype), axis=k)

    acc = te.compute(out_shape, total, name="acc")
    return te.compute(out_shape, lambda *i: _requantize(acc(*i), _i32(mult), _i32(shift), zp_out, lo, hi, rounding,
                                                        str(a.dtype)), name="requantize")


def squared_difference_s8(a, b, *, out_shape, left_shift, zp_a, zp_b, zp_out, mult_a, shift_a, mult_b, shift_b,
                          mult_out, shift_out, lo, hi):
    """TFLite int8 SQUARED_DIFFERENCE: both inputs rescaled to a common scale with `left_shift` bits of headroom,
    the difference squared in int32, one rescale to the output."""
    from tvm import te

    def scaled(x, zp, mult, shift):
        v = (x.astype("int32") - _i32(zp)) * _i32(1 << left_shift)
        return multiply_by_quantized_multiplier(v, _i32(mult), _i32(shift))

    diff = te.compute(out_shape, lambda *i: scaled(broadcast(a, out_shape, i), zp_a, mult_a, shift_a)
                      - scaled(broadcast(b, out_shape, i), zp_b, mult_b, shift_b), name="keep_diff")  # not inlined

    def f(*i):
        return _clamp(multiply_by_quantized_multiplier(diff(*i) * diff(*i), _i32(mult_out), _i32(shift_out))
                      + _i32(zp_out), lo, hi, str(a.dtype))

    return te.compute(out_shape, f, name="squared_difference")


def resize_bilinear_q(x, *, out_hw, align_corners, half_pixel):
    """TFLite's integer RESIZE_BILINEAR: source coordinates in 1/1024 steps, the four neighbours weighted in 2^-20,
    rounded half away from zero (int8 sums fit int32, int16 ones need int64)."""
    from tvm import te, tirx

    n, h, w, c = (int(v) for v in x.shape)
    oh, ow = out_hw
    acc = "int32" if str(x.dtype) == "int8" else "int64"

    def scale_10(size, out):
        if align_corners and out > 1:
            return ((1 << 10) * (size - 1) + (out - 1) // 2) // (out - 1)
        return ((1 << 10) * size + out // 2) // out

    sy, sx = scale_10(h, oh), scale_10(w, ow)

    def coordinate(v, scale, size):
        scaled = v * _i32(scale) + _i32(scale // 2 - (1 << 9)) if half_pixel else v * _i32(scale)
        low = tirx.Max(tirx.truncdiv(scaled, _i32(1 << 10)), _i32(0))
        high = tirx.Min(tirx.truncdiv(scaled + _i32((1 << 10) - 1), _i32(1 << 10)), _i32(size - 1))
        return scaled, low, high

    def f(b, y, xx, ch):
        iy, y0, y1 = coordinate(y.astype("int32"), sy, h)
        ix, x0, x1 = coordinate(xx.astype("int32"), sx, w)
        dy, dx = (iy - y0 * _i32(1 << 10)).astype(acc), (ix - x0 * _i32(1 << 10)).astype(acc)
        one = tirx.const(1 << 10, acc)

        def v(yy, xxx):
            return x[b, yy, xxx, ch].astype(acc)

        total = (v(y0, x0) * (one - dy) * (one - dx) + v(y1, x0) * dy * (one - dx) + v(y0, x1) * (one - dy) * dx
                 + v(y1, x1) * dy * dx)
        return _let(total, lambda t: tirx.truncdiv(t + tirx.Select(t > tirx.const(0, acc), tirx.const(1 << 19, acc),
                                                                   tirx.const(-(1 << 19), acc)),
                                                   tirx.const(1 << 20, acc)).astype(str(x.dtype)), "t")

    return te.compute((n, oh, ow, c), f, name="resize")


def lut_s16(x, table):
    """TFLite's int16 table lookup with interpolation over the low 7 bits (int16 wrap-around as the interpreter)."""
    from tvm import te

    def f(*i):
        v = x(*i).astype("int32")
        index = (v >> _i32(7)) + _i32(256)
        base = table[index]
        slope = (table[index + 1] - base).astype("int16").astype("int32")
        return (base + ((slope * (v & _i32(0x7F)) + _i32(64)) >> _i32(7))).astype("int16")

    return te.compute(x.shape, f, name="lut")


def sum_q(x, *, axes, keepdims, scale, bias, zp_out, lo, hi, out_dtype):
    """TFLite's quantized SUM, which computes in float: round(sum(x) * scale + bias) + zp_out, clamped, with
    scale = in/out scale and bias = -zp_in * scale * n in float32 (TVM's LLVM code generation does not contract a
    multiply and an add into one fused operation, which would round differently)."""
    from tvm import te, tirx

    sums = _integer_sum(x, axes, keepdims)
    out_shape = sums.shape

    def f(*o):
        value = sums(*o).astype("float32") * tirx.const(float(scale), "float32") + tirx.const(float(bias), "float32")
        rounded = tirx.Select(value >= tirx.const(0, "float32"), tirx.floor(value + tirx.const(0.5, "float32")),
                              tirx.ceil(value - tirx.const(0.5, "float32")))
        return _clamp(rounded.astype("int32") + _i32(zp_out), lo, hi, out_dtype)

    return te.compute(out_shape, f, name="requantize")
