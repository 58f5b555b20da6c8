"""float32 operators as Relax operations (TVM legalizes them to TIR; FuseOps fuses elementwise tails)."""

from __future__ import annotations

import numpy as np

from tinymlaas.ops.emit import activation, emit_kernel
from tinymlaas.ops.geometry import (
    SAME,
    const_ints,
    conv_padding,
    reduce_axes,
    same_padding,
    transpose_conv_geometry,
    transpose_conv_taps,
)
from tinymlaas.ops.quantization import same_quantization
from tinymlaas.ops.registry import register
from tinymlaas.ops.semantics import norm_axis

F32 = "float32"


def _bias(ctx, op, y, k=2):
    from tvm import relax

    if len(op.inputs) > k and op.inputs[k] >= 0:
        y = relax.op.add(y, ctx.input(op, k))
    return y


@register("CONV_2D", F32)
def conv2d(ctx, op, impl):
    from tvm import relax

    _, h, w, c = ctx.tensor(op.inputs[0]).shape
    _, kh, kw, ic = ctx.tensor(op.inputs[1]).shape
    weight = relax.op.permute_dims(ctx.input(op, 1), [1, 2, 3, 0])  # OHWI -> HWIO
    y = relax.op.nn.conv2d(ctx.input(op, 0), weight, strides=(op.opt("strideH", 1), op.opt("strideW", 1)),
                           padding=conv_padding(op, h, w, kh, kw),
                           dilation=(op.opt("dilationHFactor", 1) or 1, op.opt("dilationWFactor", 1) or 1),
                           groups=c // ic, data_layout="NHWC", kernel_layout="HWIO")
    ctx.set_output(op, 0, activation(ctx, op, _bias(ctx, op, y)))


@register("DEPTHWISE_CONV_2D", F32)
def depthwise_conv2d(ctx, op, impl):
    from tvm import relax

    _, h, w, c = ctx.tensor(op.inputs[0]).shape
    _, kh, kw, oc = ctx.tensor(op.inputs[1]).shape
    weight = relax.op.reshape(ctx.input(op, 1), (kh, kw, oc, 1))
    y = relax.op.nn.conv2d(ctx.input(op, 0), weight, strides=(op.opt("strideH", 1), op.opt("strideW", 1)),
                           padding=conv_padding(op, h, w, kh, kw),
                           dilation=(op.opt("dilationHFactor", 1) or 1, op.opt("dilationWFactor", 1) or 1),
                           groups=c, data_layout="NHWC", kernel_layout="HWOI")
    ctx.set_output(op, 0, activation(ctx, op, _bias(ctx, op, y)))


def transpose_conv2d_f32(data, weight, *bias, stride, before, out_hw, relu_bounds=None):
    """NHWC transposed convolution as a gather over the taps on the stride's grid (geometry.transpose_conv_taps),
    weights OHWI. relu_bounds: TFLite's fused RELU / RELU_N1_TO_1 / RELU6 as (lo, hi), either may be None."""
    from tvm import te, tirx

    (ry, rx, rc), taps = transpose_conv_taps(data.shape, weight.shape, stride, before)

    def product(b, y, x, o):
        iy, ix, wy, wx, inside = taps(y, x)
        return tirx.if_then_else(inside, data[b, iy, ix, rc] * weight[o, wy, wx, rc], tirx.const(0.0, "float32"))

    shape = (int(data.shape[0]), *out_hw, int(weight.shape[0]))
    acc = te.compute(shape, lambda b, y, x, o: te.sum(product(b, y, x, o), axis=[ry, rx, rc]), name="acc")
    lo, hi = relu_bounds or (None, None)

    def out(b, y, x, o):
        v = acc[b, y, x, o] + (bias[0][o] if bias else tirx.const(0.0, "float32"))
        v = tirx.max(v, tirx.const(lo, "float32")) if lo is not None else v
        return tirx.min(v, tirx.const(hi, "float32")) if hi is not None else v

    return te.compute(shape, out, name="transpose_conv")


RELU_BOUNDS = {0: None, 1: (0.0, None), 2: (-1.0, 1.0), 3: (0.0, 6.0)}  # TFLite fused activation -> clamp


@register("TRANSPOSE_CONV", F32)
def transpose_conv(ctx, op, impl):
    """TFLite scatters input pixel y to output rows y*stride - pad + k; here a gather over only the taps that land
    on the stride's grid (transpose_conv2d_f32), bias and a clamping activation in the same kernel."""
    x_t, w_t, out_t = ctx.tensor(op.inputs[2]), ctx.tensor(op.inputs[1]), ctx.tensor(op.outputs[0])
    stride, pads = transpose_conv_geometry(op, x_t.shape, w_t.shape, out_t.shape)
    act = int(op.opt("fusedActivationFunction", 0) or 0)
    args = [ctx.input(op, 2), ctx.input(op, 1)]
    if len(op.inputs) > 3 and op.inputs[3] >= 0:
        args.append(ctx.input(op, 3))
    y = emit_kernel(ctx, transpose_conv2d_f32, args, stride=stride, before=(pads[0][0], pads[1][0]),
                    out_hw=tuple(out_t.shape[1:3]), relu_bounds=RELU_BOUNDS.get(act))
    ctx.set_output(op, 0, y if act in RELU_BOUNDS else activation(ctx, op, y))


@register("FULLY_CONNECTED", F32)
def fully_connected(ctx, op, impl):
    from tvm import relax

    _, depth = ctx.tensor(op.inputs[1]).shape
    x, x_t = ctx.input(op, 0), ctx.tensor(op.inputs[0])
    if x_t.shape != (x_t.size // depth, depth):
        x = relax.op.reshape(x, (x_t.size // depth, depth))
    y = relax.op.matmul(x, relax.op.permute_dims(ctx.input(op, 1), [1, 0]))
    ctx.set_output(op, 0, activation(ctx, op, _bias(ctx, op, y)))


@register("BATCH_MATMUL", F32)
def batch_matmul(ctx, op, impl):
    from tvm import relax

    a, b = ctx.input(op, 0), ctx.input(op, 1)
    for flag, k in (("adjX", 0), ("adjY", 1)):
        if op.opt(flag, False):
            rank = len(ctx.tensor(op.inputs[k]).shape)
            perm = list(range(rank - 2)) + [rank - 1, rank - 2]
            if k == 0:
                a = relax.op.permute_dims(a, perm)
            else:
                b = relax.op.permute_dims(b, perm)
    ctx.set_output(op, 0, relax.op.matmul(a, b))


def _pool_args(ctx, op):
    _, h, w, _ = ctx.tensor(op.inputs[0]).shape
    kh, kw = op.opt("filterHeight", 1), op.opt("filterWidth", 1)
    padding = [0, 0, 0, 0]
    if int(op.opt("padding", 0)) == SAME:
        pt, pb = same_padding(h, kh, op.opt("strideH", 1), 1)
        pl, pr = same_padding(w, kw, op.opt("strideW", 1), 1)
        padding = [pt, pl, pb, pr]
    return {"pool_size": (kh, kw), "strides": (op.opt("strideH", 1), op.opt("strideW", 1)), "padding": padding,
            "layout": "NHWC"}


@register("AVERAGE_POOL_2D", F32)
def avg_pool(ctx, op, impl):
    from tvm import relax

    y = relax.op.nn.avg_pool2d(ctx.input(op, 0), count_include_pad=False, **_pool_args(ctx, op))
    ctx.set_output(op, 0, activation(ctx, op, y))


@register("MAX_POOL_2D", F32)
def max_pool(ctx, op, impl):
    from tvm import relax

    ctx.set_output(op, 0, activation(ctx, op, relax.op.nn.max_pool2d(ctx.input(op, 0), **_pool_args(ctx, op))))


@register("L2_POOL_2D", F32)
def l2_pool(ctx, op, impl):
    from tvm import relax

    x = ctx.input(op, 0)
    y = relax.op.nn.avg_pool2d(relax.op.multiply(x, x), count_include_pad=False, **_pool_args(ctx, op))
    ctx.set_output(op, 0, activation(ctx, op, relax.op.sqrt(y)))


_BINARY = {
    "ADD": "add", "SUB": "subtract", "MUL": "multiply", "DIV": "divide", "MAXIMUM": "maximum", "MINIMUM": "minimum",
    "POW": "power", "FLOOR_DIV": "floor_divide", "FLOOR_MOD": "floor_mod", "EQUAL": "equal", "NOT_EQUAL": "not_equal",
    "LESS": "less", "LESS_EQUAL": "less_equal", "GREATER": "greater", "GREATER_EQUAL": "greater_equal",
    "LOGICAL_AND": "logical_and", "LOGICAL_OR": "logical_or", "ATAN2": "atan2",
}


@register(tuple(_BINARY), F32)
def binary(ctx, op, impl):
    from tvm import relax

    fn = getattr(relax.op, _BINARY[op.opcode])
    a, b = ctx.input(op, 0), ctx.input(op, 1)
    if op.opcode == "FLOOR_MOD" and ctx.tensor(op.inputs[0]).dtype == F32:
        # TFLite: r = fmod(a, b), moved to b's sign when they differ
        q = relax.op.floor(relax.op.divide(a, b))
        ctx.set_output(op, 0, relax.op.subtract(a, relax.op.multiply(q, b)))
        return
    ctx.set_output(op, 0, activation(ctx, op, fn(a, b)))


@register("SQUARED_DIFFERENCE", F32)
def squared_difference(ctx, op, impl):
    from tvm import relax

    d = relax.op.subtract(ctx.input(op, 0), ctx.input(op, 1))
    ctx.set_output(op, 0, relax.op.multiply(d, d))


@register("ADD_N", F32)
def add_n(ctx, op, impl):
    from tvm import relax

    y = ctx.input(op, 0)
    for k in range(1, len(op.inputs)):
        y = relax.op.add(y, ctx.input(op, k))
    ctx.set_output(op, 0, y)


_UNARY = {
    "ABS": "abs", "NEG": "negative", "EXP": "exp", "LOG": "log", "SQRT": "sqrt", "RSQRT": "rsqrt", "SIN": "sin",
    "COS": "cos", "FLOOR": "floor", "CEIL": "ceil", "LOGISTIC": "sigmoid", "TANH": "tanh", "SIGN": "sign",
    "LOGICAL_NOT": "logical_not",
}


@register(tuple(_UNARY), F32)
def unary(ctx, op, impl):
    from tvm import relax

    ctx.set_output(op, 0, getattr(relax.op, _UNARY[op.opcode])(ctx.input(op, 0)))


@register("SQUARE", F32)
def square(ctx, op, impl):
    from tvm import relax

    x = ctx.input(op, 0)
    ctx.set_output(op, 0, relax.op.multiply(x, x))


@register("ROUND", F32)
def round_(ctx, op, impl):
    """TFLite rounds half to even: floor, then up where the rest is above one half or exactly one half of an odd."""
    from tvm import relax

    x = ctx.input(op, 0)
    fl = relax.op.floor(x)
    diff = relax.op.subtract(x, fl)
    half = ctx.const(0.5, F32)
    odd = relax.op.not_equal(relax.op.floor_mod(fl, ctx.const(2.0, F32)), ctx.const(0.0, F32))
    up = relax.op.logical_or(relax.op.greater(diff, half), relax.op.logical_and(relax.op.equal(diff, half), odd))
    ctx.set_output(op, 0, relax.op.where(up, relax.op.add(fl, ctx.const(1.0, F32)), fl))


@register(("RELU", "RELU6", "RELU_N1_TO_1", "RELU_0_TO_1"), F32)
def relu(ctx, op, impl):
    from tvm import relax

    lo, hi = {"RELU": (0.0, None), "RELU6": (0.0, 6.0), "RELU_N1_TO_1": (-1.0, 1.0), "RELU_0_TO_1": (0.0, 1.0)}[op.opcode]
    x = ctx.input(op, 0)
    ctx.set_output(op, 0, relax.op.nn.relu(x) if hi is None else relax.op.clip(x, lo, hi))


@register("LEAKY_RELU", F32)
def leaky_relu(ctx, op, impl):
    from tvm import relax

    ctx.set_output(op, 0, relax.op.nn.leakyrelu(ctx.input(op, 0), float(np.float32(op.opt("alpha", 0.2)))))


@register("PRELU", F32)
def prelu(ctx, op, impl):
    from tvm import relax

    x, alpha = ctx.input(op, 0), ctx.input(op, 1)
    zero = ctx.const(0.0, F32)
    ctx.set_output(op, 0, relax.op.where(relax.op.greater_equal(x, zero), x, relax.op.multiply(x, alpha)))


@register("ELU", F32)
def elu(ctx, op, impl):
    from tvm import relax

    x = ctx.input(op, 0)
    neg = relax.op.subtract(relax.op.exp(x), ctx.const(1.0, F32))
    ctx.set_output(op, 0, relax.op.where(relax.op.less(x, ctx.const(0.0, F32)), neg, x))


@register("HARD_SWISH", F32)
def hard_swish(ctx, op, impl):
    from tvm import relax

    x = ctx.input(op, 0)
    r6 = relax.op.clip(relax.op.add(x, ctx.const(3.0, F32)), 0.0, 6.0)
    ctx.set_output(op, 0, relax.op.multiply(x, relax.op.divide(r6, ctx.const(6.0, F32))))


@register("GELU", F32)
def gelu(ctx, op, impl):
    from tvm import relax

    x = ctx.input(op, 0)
    ctx.set_output(op, 0, relax.op.nn.gelu_tanh(x) if op.opt("approximate", False) else relax.op.nn.gelu(x))


@register("SOFTMAX", F32)
def softmax(ctx, op, impl):
    from tvm import relax

    x = ctx.input(op, 0)
    beta = float(op.opt("beta", 1.0))
    if beta != 1.0:
        x = relax.op.multiply(x, ctx.const(beta, F32))
    ctx.set_output(op, 0, relax.op.nn.softmax(x, axis=-1))


@register("LOG_SOFTMAX", F32)
def log_softmax(ctx, op, impl):
    from tvm import relax

    ctx.set_output(op, 0, relax.op.nn.log_softmax(ctx.input(op, 0), axis=-1))


@register("L2_NORMALIZATION", F32)
def l2_normalization(ctx, op, impl):
    from tvm import relax

    x = ctx.input(op, 0)
    norm = relax.op.sqrt(relax.op.sum(relax.op.multiply(x, x), axis=[-1], keepdims=True))
    y = relax.op.divide(x, relax.op.maximum(norm, ctx.const(1e-6, F32)))
    ctx.set_output(op, 0, activation(ctx, op, y))


_REDUCE = {"MEAN": "mean", "SUM": "sum", "REDUCE_MAX": "max", "REDUCE_MIN": "min", "REDUCE_PROD": "prod"}


@register(tuple(_REDUCE), F32)
@register(("REDUCE_MAX", "REDUCE_MIN"), ("int8", "int16"))
def reduce(ctx, op, impl):
    from tvm import relax

    same_quantization(ctx, op)

    fn = getattr(relax.op, _REDUCE[op.opcode])
    ctx.set_output(op, 0, fn(ctx.input(op, 0), axis=reduce_axes(ctx, op), keepdims=bool(op.opt("keepDims", False))))


@register(("REDUCE_ANY", "REDUCE_ALL"), F32)
def reduce_bool(ctx, op, impl):
    from tvm import relax

    x = relax.op.astype(ctx.input(op, 0), "int8")
    fn = relax.op.max if op.opcode == "REDUCE_ANY" else relax.op.min
    y = fn(x, axis=reduce_axes(ctx, op), keepdims=bool(op.opt("keepDims", False)))
    ctx.set_output(op, 0, relax.op.astype(y, "bool"))


@register(("ARG_MAX", "ARG_MIN"), ("float32", "int8", "int16"))
def arg_max(ctx, op, impl):
    from tvm import relax

    rank = len(ctx.tensor(op.inputs[0]).shape)
    axis = norm_axis(const_ints(ctx, op, 1)[0], rank)
    fn = relax.op.argmax if op.opcode == "ARG_MAX" else relax.op.argmin
    y = fn(ctx.input(op, 0), axis=axis)
    ctx.set_output(op, 0, relax.op.astype(y, ctx.tensor(op.outputs[0]).dtype))


def _cumsum_te(x, axis: int, exclusive: bool, reverse: bool):
    from tvm import te, tirx

    n = int(x.shape[axis])
    j = te.reduce_axis((0, n), "j")

    def f(*i):
        idx = list(i)
        idx[axis] = j
        take = (j >= i[axis]) if reverse else (j <= i[axis])
        if exclusive:
            take = tirx.all(take, j != i[axis])
        return te.sum(tirx.if_then_else(take, x[tuple(idx)], tirx.const(0, x.dtype)), axis=j)

    return te.compute(x.shape, f, name="cumsum")


@register("CUMSUM", F32)
def cumsum(ctx, op, impl):
    rank = len(ctx.tensor(op.inputs[0]).shape)
    axis = norm_axis(const_ints(ctx, op, 1)[0], rank)
    y = ctx.bb.emit_te(_cumsum_te, ctx.input(op, 0), axis, bool(op.opt("exclusive", False)),
                       bool(op.opt("reverse", False)), primfunc_name_hint=f"op{op.index}_cumsum")
    ctx.set_output(op, 0, y)


@register(("SELECT", "SELECT_V2"), ("float32", "int8", "int16"))
def select(ctx, op, impl):
    from tvm import relax

    ctx.set_output(op, 0, relax.op.where(ctx.input(op, 0), ctx.input(op, 1), ctx.input(op, 2)))


@register("CAST", ("float32", "int8", "int16"))  # raw values converted, quantization ignored (as TFLite)
def cast(ctx, op, impl):
    from tvm import relax

    ctx.set_output(op, 0, relax.op.astype(ctx.input(op, 0), ctx.tensor(op.outputs[0]).dtype))


@register("ZEROS_LIKE", ("float32", "int8", "int16"))
def zeros_like(ctx, op, impl):
    from tvm import relax

    ctx.set_output(op, 0, relax.op.zeros_like(ctx.input(op, 0)))


@register("FILL", ("float32", "int8", "int16"))  # quantized: the value is copied as stored
def fill(ctx, op, impl):
    from tvm import relax

    t = ctx.tensor(op.outputs[0])
    ctx.set_output(op, 0, relax.op.broadcast_to(relax.op.reshape(ctx.input(op, 1), [1] * len(t.shape)), t.shape))


@register("DEQUANTIZE", F32)
def dequantize_half(ctx, op, impl):
    from tvm import relax

    ctx.set_output(op, 0, relax.op.astype(ctx.input(op, 0), F32))


@register(("RESIZE_BILINEAR", "RESIZE_NEAREST_NEIGHBOR"), F32)
@register("RESIZE_NEAREST_NEIGHBOR", ("int8", "int16"))
def resize(ctx, op, impl):
    from tvm import relax

    same_quantization(ctx, op)

    _, oh, ow, _ = ctx.tensor(op.outputs[0]).shape
    align, half = bool(op.opt("alignCorners", False)), bool(op.opt("halfPixelCenters", False))
    if op.opcode == "RESIZE_BILINEAR":
        method, rounding = "linear", ""
        mode = "align_corners" if align else "half_pixel" if half else "asymmetric"
    else:
        method = "nearest_neighbor"
        mode, rounding = ("align_corners", "round") if align else \
            ("tf_half_pixel_for_nn", "") if half else ("asymmetric", "floor")
    y = relax.op.image.resize2d(ctx.input(op, 0), (oh, ow), layout="NHWC", method=method,
                                coordinate_transformation_mode=mode, rounding_method=rounding)
    ctx.set_output(op, 0, y)
