"""Data-movement operators: the same converter for float32, int8 and int16 (values are moved, never changed).

Quantized inputs and outputs must share their quantization (TFLite's converter guarantees it for these
operators; a model that breaks it is refused with the tensor named).
"""

from __future__ import annotations

import numpy as np

from tinymlaas.errors import UnsupportedOperator
from tinymlaas.ops.emit import activation
from tinymlaas.ops.geometry import const_ints
from tinymlaas.ops.quantization import same_quantization
from tinymlaas.ops.registry import register
from tinymlaas.ops.semantics import norm_axis, pad_widths, slice_index, strided_slice_index

ALL = ("float32", "int8", "int16")


@register(("RESHAPE", "SQUEEZE", "EXPAND_DIMS"), ALL)
def reshape(ctx, op, impl):
    from tvm import relax

    same_quantization(ctx, op)
    ctx.set_output(op, 0, relax.op.reshape(ctx.input(op, 0), ctx.tensor(op.outputs[0]).shape))


@register("TRANSPOSE", ALL)
def transpose(ctx, op, impl):
    from tvm import relax

    same_quantization(ctx, op)
    rank = len(ctx.tensor(op.inputs[0]).shape)
    perm = [norm_axis(a, rank) for a in const_ints(ctx, op, 1)]
    ctx.set_output(op, 0, relax.op.permute_dims(ctx.input(op, 0), perm))


def _apply_index(ctx, x, shape, index):
    """x[index] for a NumPy basic index (ints, slices, Ellipsis, newaxis) as Relax strided_slice + reshape."""
    from tvm import relax

    explicit = [i for i in index if i is not None and i is not Ellipsis]
    if Ellipsis in index:
        e = index.index(Ellipsis)
        index = index[:e] + (slice(None),) * (len(shape) - len(explicit)) + index[e + 1:]
    real = [i for i in index if i is not None]
    real += [slice(None)] * (len(shape) - len(real))
    axes, begin, end, strides, flips = [], [], [], [], []
    for axis, (ix, dim) in enumerate(zip(real, shape)):
        if isinstance(ix, int):
            b = ix + dim if ix < 0 else ix
            axes.append(axis), begin.append(b), end.append(b + 1), strides.append(1)
            continue
        start, stop, step = ix.indices(dim)
        if step < 0:  # reversed: flip, then a forward slice
            flips.append(axis)
            start, stop, step = dim - 1 - start, dim - 1 - stop, -step
        if (start, stop, step) != (0, dim, 1):
            axes.append(axis), begin.append(start), end.append(max(stop, start)), strides.append(step)
    for axis in flips:
        x = relax.op.flip(x, axis)
    if axes:
        x = relax.op.strided_slice(x, axes, begin, end, strides, assume_inbound=True)
    return x


@register("STRIDED_SLICE", ALL)
def strided_slice(ctx, op, impl):
    same_quantization(ctx, op)
    shape = ctx.tensor(op.inputs[0]).shape
    index = strided_slice_index(len(shape), const_ints(ctx, op, 1), const_ints(ctx, op, 2), const_ints(ctx, op, 3),
                                op.options)
    ctx.set_output(op, 0, _apply_index(ctx, ctx.input(op, 0), shape, index))


@register("SLICE", ALL)
def slice_(ctx, op, impl):
    same_quantization(ctx, op)
    shape = ctx.tensor(op.inputs[0]).shape
    index = slice_index(const_ints(ctx, op, 1), const_ints(ctx, op, 2), shape)
    ctx.set_output(op, 0, _apply_index(ctx, ctx.input(op, 0), shape, index))


@register("CONCATENATION", ALL)
def concatenation(ctx, op, impl):
    from tvm import relax

    same_quantization(ctx, op, range(len(op.inputs)))
    rank = len(ctx.tensor(op.outputs[0]).shape)
    y = relax.op.concat([ctx.input(op, k) for k in range(len(op.inputs))], axis=norm_axis(op.opt("axis", 0), rank))
    ctx.set_output(op, 0, activation(ctx, op, y))


@register("PACK", ALL)
def pack(ctx, op, impl):
    from tvm import relax

    same_quantization(ctx, op, range(len(op.inputs)))
    axis = norm_axis(op.opt("axis", 0), len(ctx.tensor(op.outputs[0]).shape))
    parts = [relax.op.expand_dims(ctx.input(op, k), axis) for k in range(len(op.inputs))]
    ctx.set_output(op, 0, relax.op.concat(parts, axis=axis))


def _split_outputs(ctx, op, x, axis: int, sizes: list[int]):
    from tvm import relax

    if len(sizes) == 1:
        ctx.set_output(op, 0, x)
        return
    parts = ctx.emit(relax.op.split(x, np.cumsum(sizes)[:-1].tolist(), axis=axis))
    for k in range(len(sizes)):
        ctx.set_output(op, k, relax.TupleGetItem(parts, k))


@register("UNPACK", ALL)
def unpack(ctx, op, impl):
    shape = ctx.tensor(op.inputs[0]).shape
    axis = norm_axis(op.opt("axis", 0), len(shape))
    _split_outputs(ctx, op, ctx.input(op, 0), axis, [1] * shape[axis])


@register("SPLIT", ALL)
def split(ctx, op, impl):
    shape = ctx.tensor(op.inputs[1]).shape
    axis = norm_axis(const_ints(ctx, op, 0)[0], len(shape))
    n = len(op.outputs)
    _split_outputs(ctx, op, ctx.input(op, 1), axis, [shape[axis] // n] * n)


@register("SPLIT_V", ALL)
def split_v(ctx, op, impl):
    shape = ctx.tensor(op.inputs[0]).shape
    axis = norm_axis(const_ints(ctx, op, 2)[0], len(shape))
    sizes = const_ints(ctx, op, 1)
    if -1 in sizes:
        sizes[sizes.index(-1)] = shape[axis] - (sum(sizes) + 1)
    _split_outputs(ctx, op, ctx.input(op, 0), axis, sizes)


@register(("PAD", "PADV2"), ALL)
def pad(ctx, op, impl):
    from tvm import relax

    same_quantization(ctx, op)
    x = ctx.tensor(op.inputs[0])
    if len(op.inputs) > 2 and op.inputs[2] >= 0:
        v = ctx.tensor(op.inputs[2])
        if not v.is_const:
            raise UnsupportedOperator([f"PADV2 #{op.index} with a computed padding value"], ctx.graph.name)
        value = np.asarray(v.data).reshape(()).item()
    else:
        value = x.zero_point if x.quant else 0  # quantized zero
    widths = pad_widths(np.asarray(const_ints(ctx, op, 1)))
    flat = [w for pair in widths for w in pair]
    ctx.set_output(op, 0, relax.op.nn.pad(ctx.input(op, 0), flat, "constant", float(value)))


@register("MIRROR_PAD", ALL)
def mirror_pad(ctx, op, impl):
    """REFLECT (edge not repeated) or SYMMETRIC (edge repeated): concatenations of reversed slices."""
    from tvm import relax

    same_quantization(ctx, op)
    shape = list(ctx.tensor(op.inputs[0]).shape)
    widths = pad_widths(np.asarray(const_ints(ctx, op, 1)))
    skip = 1 if int(op.opt("mode", 0)) == 0 else 0  # 0: REFLECT
    y = ctx.input(op, 0)
    for axis, (before, after) in enumerate(widths):
        if not before and not after:
            continue
        dim = shape[axis]
        parts = []
        if before:
            parts.append(relax.op.flip(relax.op.strided_slice(y, [axis], [skip], [skip + before]), axis))
        parts.append(y)
        if after:
            parts.append(relax.op.flip(relax.op.strided_slice(y, [axis], [dim - skip - after], [dim - skip]), axis))
        y = relax.op.concat(parts, axis=axis)
        shape[axis] += before + after
    ctx.set_output(op, 0, y)


@register("GATHER", ALL)
def gather(ctx, op, impl):
    from tvm import relax

    same_quantization(ctx, op)
    shape = ctx.tensor(op.inputs[0]).shape
    if op.opt("batchDims", 0):
        raise UnsupportedOperator([f"GATHER #{op.index} with batch_dims"], ctx.graph.name)
    axis = norm_axis(op.opt("axis", 0), len(shape))
    ctx.set_output(op, 0, relax.op.take(ctx.input(op, 0), ctx.input(op, 1), axis=axis, mode="clip"))


@register("GATHER_ND", ALL)
def gather_nd(ctx, op, impl):
    from tvm import relax

    same_quantization(ctx, op)
    ctx.set_output(op, 0, relax.op.gather_nd(ctx.input(op, 0), relax.op.astype(ctx.input(op, 1), "int64")))


@register("EMBEDDING_LOOKUP", ALL)
def embedding_lookup(ctx, op, impl):
    from tvm import relax

    ctx.set_output(op, 0, relax.op.take(ctx.input(op, 1), ctx.input(op, 0), axis=0, mode="clip"))


@register("TILE", ALL)
def tile(ctx, op, impl):
    from tvm import relax

    same_quantization(ctx, op)
    ctx.set_output(op, 0, relax.op.tile(ctx.input(op, 0), const_ints(ctx, op, 1)))


@register("BROADCAST_TO", ALL)
def broadcast_to(ctx, op, impl):
    from tvm import relax

    same_quantization(ctx, op)
    ctx.set_output(op, 0, relax.op.broadcast_to(ctx.input(op, 0), ctx.tensor(op.outputs[0]).shape))


@register("REVERSE_V2", ALL)
def reverse(ctx, op, impl):
    """TFLite's kernel moves the stored values, whatever the quantization says: a Keras Bidirectional layer's int8
    export gives the reversed sequence its own (nearly equal) scale, and the interpreter copies the bytes."""
    from tvm import relax

    y = ctx.input(op, 0)
    for axis in const_ints(ctx, op, 1):
        y = relax.op.flip(y, norm_axis(axis, len(ctx.tensor(op.inputs[0]).shape)))
    ctx.set_output(op, 0, y)


@register("SPACE_TO_DEPTH", ALL)
def space_to_depth(ctx, op, impl):
    from tvm import relax

    same_quantization(ctx, op)
    n, h, w, c = ctx.tensor(op.inputs[0]).shape
    b = int(op.opt("blockSize", 1))
    y = relax.op.reshape(ctx.input(op, 0), (n, h // b, b, w // b, b, c))
    y = relax.op.permute_dims(y, [0, 1, 3, 2, 4, 5])
    ctx.set_output(op, 0, relax.op.reshape(y, (n, h // b, w // b, b * b * c)))


@register("DEPTH_TO_SPACE", ALL)
def depth_to_space(ctx, op, impl):
    from tvm import relax

    same_quantization(ctx, op)
    n, h, w, c = ctx.tensor(op.inputs[0]).shape
    b = int(op.opt("blockSize", 1))
    y = relax.op.reshape(ctx.input(op, 0), (n, h, w, b, b, c // (b * b)))
    y = relax.op.permute_dims(y, [0, 1, 3, 2, 4, 5])
    ctx.set_output(op, 0, relax.op.reshape(y, (n, h * b, w * b, c // (b * b))))


@register("SPACE_TO_BATCH_ND", ALL)
def space_to_batch(ctx, op, impl):
    from tvm import relax

    same_quantization(ctx, op)
    shape = ctx.tensor(op.inputs[0]).shape
    block = const_ints(ctx, op, 1)
    pads = pad_widths(np.asarray(const_ints(ctx, op, 2)))
    m = len(block)
    x = ctx.tensor(op.inputs[0])
    flat = [0, 0] + [w for p in pads for w in p] + [0, 0] * (len(shape) - 1 - m)
    y = relax.op.nn.pad(ctx.input(op, 0), flat, "constant", float(x.zero_point if x.quant else 0))
    padded = [shape[0]] + [shape[1 + i] + sum(pads[i]) for i in range(m)] + list(shape[1 + m:])
    split = [padded[0]]
    for i in range(m):
        split += [padded[1 + i] // block[i], block[i]]
    split += padded[1 + m:]
    y = relax.op.reshape(y, split)
    perm = [2 + 2 * i for i in range(m)] + [0] + [1 + 2 * i for i in range(m)] + list(range(1 + 2 * m, len(split)))
    y = relax.op.permute_dims(y, perm)
    ctx.set_output(op, 0, relax.op.reshape(y, ctx.tensor(op.outputs[0]).shape))


@register("BATCH_TO_SPACE_ND", ALL)
def batch_to_space(ctx, op, impl):
    from tvm import relax

    same_quantization(ctx, op)
    shape = ctx.tensor(op.inputs[0]).shape
    block = const_ints(ctx, op, 1)
    crops = pad_widths(np.asarray(const_ints(ctx, op, 2)))
    m, prod = len(block), int(np.prod(block))
    batch = shape[0] // prod
    y = relax.op.reshape(ctx.input(op, 0), list(block) + [batch] + list(shape[1:]))
    perm = [m]
    for i in range(m):
        perm += [m + 1 + i, i]
    perm += list(range(2 * m + 1, m + len(shape)))
    y = relax.op.permute_dims(y, perm)
    full = [batch] + [shape[1 + i] * block[i] for i in range(m)] + list(shape[1 + m:])
    y = relax.op.reshape(y, full)
    index = (slice(None),) + tuple(slice(c0, full[1 + i] - c1) for i, (c0, c1) in enumerate(crops))
    ctx.set_output(op, 0, _apply_index(ctx, y, full, index))
