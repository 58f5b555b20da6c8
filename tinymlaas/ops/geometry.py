"""Shapes and index arithmetic shared by the converters of every precision: TFLite's SAME/VALID padding,
transposed convolutions as dilated-and-padded plain ones, reduction axes, constant integer operands."""

from __future__ import annotations

import numpy as np

from tinymlaas.errors import UnsupportedOperator
from tinymlaas.ops.semantics import norm_axis

# TFLite Padding (schema.fbs)
SAME, VALID = 0, 1


def same_padding(in_size: int, k: int, stride: int, dilation: int) -> tuple[int, int]:
    """TFLite SAME padding of one dimension: (before, after)."""
    eff = (k - 1) * dilation + 1
    out = (in_size + stride - 1) // stride
    total = max((out - 1) * stride + eff - in_size, 0)
    return total // 2, total - total // 2


def padding(kind: int, in_size: int, k: int, stride: int, dilation: int) -> tuple[int, int]:
    """TFLite ComputePaddingHeightWidth for one dimension: (before, after)."""
    if kind == VALID:
        return 0, 0
    return same_padding(in_size, k, stride, dilation)


def window_padding(op, h, w, kh, kw) -> tuple[int, int, int, int]:
    """(top, bottom, left, right) of a convolution: its explicit padding (a PAD folded into it:
    frontend/pad_fold.py), or TFLite's SAME/VALID."""
    explicit = op.opt("explicitPadding")
    if explicit:
        return tuple(int(p) for p in explicit)
    return (*padding(int(op.opt("padding", 0)), h, kh, op.opt("strideH", 1), op.opt("dilationHFactor", 1) or 1),
            *padding(int(op.opt("padding", 0)), w, kw, op.opt("strideW", 1), op.opt("dilationWFactor", 1) or 1))


def pixels_in_rows(op, h, w, kh, kw) -> bool:
    """A convolution whose output pixels are its input pixels, one to one and in the same raster order (1x1, stride 1,
    no padding): its TIR kernel runs over the rows flattened into one pixel axis, so register
    tiles of pixels span rows (a 25x5 map takes tiles of 4 or 8 pixels, not only divisors of 5)."""
    return (kh == kw == 1 and op.opt("strideH", 1) == op.opt("strideW", 1) == 1 and op.opcode == "CONV_2D"
            and not any(window_padding(op, h, w, kh, kw)))


def conv_padding(op, h, w, kh, kw) -> list[int]:
    """[top, left, bottom, right] of a convolution operator."""
    pt, pb, pl, pr = window_padding(op, h, w, kh, kw)
    return [pt, pl, pb, pr]


def transpose_conv_geometry(op, in_shape, w_shape, out_shape):
    """(stride, [(before, after)] per spatial axis) of the dilated input that a plain convolution then reads."""
    _, h, w, _ = in_shape
    _, kh, kw, _ = w_shape
    stride = (op.opt("strideH", 1), op.opt("strideW", 1))
    pads = []
    for size, k, s, out in ((h, kh, stride[0], out_shape[1]), (w, kw, stride[1], out_shape[2])):
        top = same_padding(out, k, s, 1)[0] if int(op.opt("padding", 0)) == SAME else 0
        before = k - 1 - top
        pads.append((before, out + k - 1 - ((size - 1) * s + 1) - before))
    return stride, pads


def transpose_conv_taps(data_shape, weight_shape, stride, before):
    """A transposed convolution as a gather (the input dilated by `stride`, padded by `before`, correlated with the
    kernel flipped), NHWC data, OHWI weights: the reduce axes (kernel rows, columns, channels) and taps(y, x): the
    input row and column, the weight's row and column (flipped), and whether they exist, of output pixel (y, x) at
    the axes' values.
    Only the taps on the stride's grid: ceil(k / stride) per row, no zeros multiplied, no dilated copy in RAM."""
    from tvm import te, tirx

    _, h, w, _ = (int(v) for v in data_shape)
    _, kh, kw, ic = (int(v) for v in weight_shape)
    (sh, sw), (bh, bw) = stride, before
    ry = te.reduce_axis((0, -(-kh // sh)), "ry")
    rx = te.reduce_axis((0, -(-kw // sw)), "rx")
    rc = te.reduce_axis((0, ic), "rc")

    def along(y, j, s, b, k, size):  # the j-th kernel row landing on the grid for output row y, its input row
        ky = tirx.floormod(tirx.const(b, "int32") - y, s) + j * s
        iy = tirx.floordiv(y + ky - b, s)
        return ky, iy, tirx.all(ky < k, iy >= 0, iy < size)

    def taps(y, x):
        ky, iy, y_ok = along(y, ry, sh, bh, kh, h)
        kx, ix, x_ok = along(x, rx, sw, bw, kw, w)
        return iy, ix, kh - 1 - ky, kw - 1 - kx, tirx.all(y_ok, x_ok)

    return (ry, rx, rc), taps


def const_ints(ctx, op, k) -> list[int]:
    """Operand k as a list of Python ints; it must be a constant (shapes, axes, paddings are compile-time here)."""
    t = ctx.tensor(op.inputs[k])
    if not t.is_const:
        raise UnsupportedOperator([f"{op.opcode} #{op.index} with a computed '{t.name}' (only constants)"], ctx.graph.name)
    return np.asarray(t.data).astype(np.int64).ravel().tolist()


def reduce_axes(ctx, op) -> list[int]:
    """The sorted, non-negative axes of a reduction (operand 1)."""
    rank = len(ctx.tensor(op.inputs[0]).shape)
    return sorted({norm_axis(a, rank) for a in const_ints(ctx, op, 1)})
