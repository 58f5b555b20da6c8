"""More ONNX operators as TFLite float operators: transposed convolution, layer and instance normalization (and
PyTorch's GroupNorm, which exports through the latter), PRelu, HardSigmoid, Softplus, Mish, comparisons and Where, DepthToSpace. Each is TFLite's own operator
where TFLite has one, else the few operators TFLite's converter writes for it."""

from __future__ import annotations

import numpy as np

from tinymlaas.frontend.onnx_ops import TO_LAST, Steps, broadcast_const, converts, ints, physical, physical_axis


@converts("ConvTranspose")
def conv_transpose(cv, node) -> None:
    """TFLite's TRANSPOSE_CONV over the whole (VALID) output, then the rows and columns ONNX's pads take off."""
    x_name, w_name = node.input[0], node.input[1]
    b_name = node.input[2] if len(node.input) > 2 and node.input[2] else None
    if not cv.is_const(w_name):
        raise cv.unsupported("weights computed at run time")
    if len(cv.shape(x_name)) != 4:
        raise cv.unsupported("other than 2-D")
    if int(cv.attr(node, "group", 1)) != 1 or any(int(d) != 1 for d in cv.attr(node, "dilations", [1, 1])):
        raise cv.unsupported("grouped or dilated")
    w = np.asarray(cv.const(w_name), np.float32)  # [C_in, C_out, kH, kW]
    n, _, h, wd = cv.shape(x_name)
    c_out, kh, kw = w.shape[1], w.shape[2], w.shape[3]
    sh, sw = (int(s) for s in cv.attr(node, "strides", [1, 1]))
    full = (n, (h - 1) * sh + kh, (wd - 1) * sw + kw, c_out)
    out_shape = physical(cv.shape(node.output[0]), True)  # N H W C
    auto = cv.attr(node, "auto_pad", b"NOTSET")
    auto = auto.decode() if isinstance(auto, bytes) else str(auto)
    if auto not in ("NOTSET", "VALID") or cv.attr(node, "output_shape", None) is not None:
        # where the excess goes then is told differently by ONNX's text and ONNX Runtime
        raise cv.unsupported("with auto_pad SAME or an output_shape: give explicit pads")
    pads = [int(p) for p in cv.attr(node, "pads", [0, 0, 0, 0])]
    first = [pads[0], pads[1]]
    if any(f < 0 or f + o > fl for f, o, fl in zip(first, out_shape[1:3], full[1:3])):
        raise cv.unsupported("with an output padding past what its pads take off")
    s = Steps(cv, node)
    bias = np.asarray(cv.const(b_name), np.float32) if b_name else np.zeros(c_out, np.float32)
    whole = s.op("TRANSPOSE_CONV", [cv.constant(ints(full), f"{node.output[0]}/shape"),
                                    cv.constant(np.ascontiguousarray(w.transpose(1, 2, 3, 0)), f"{w_name}/tflite"),
                                    cv.value(x_name, True), s.const(bias)], full,
                 cv.options("TransposeConvOptions", padding=1, strideH=sh, strideW=sw))
    out = cv.output(node, 0, out_shape, True)
    begin = [0, first[0], first[1], 0]
    end = [n, first[0] + out_shape[1], first[1] + out_shape[2], c_out]
    cv.op("STRIDED_SLICE", [whole, cv.constant(ints(begin), f"{node.output[0]}/begin"),
                            cv.constant(ints(end), f"{node.output[0]}/end"),
                            cv.constant(ints([1, 1, 1, 1]), f"{node.output[0]}/strides")], [out],
          cv.options("StridedSliceOptions"))


def _normalized(cv, s: Steps, x: int, shape, axes: list[int], eps: float) -> int:
    """(x - mean) * RSQRT(mean square + eps) over the (physical) `axes`: what TFLite's converter writes for a
    layer norm."""
    reduced = tuple(1 if a in axes else d for a, d in enumerate(shape))
    over = cv.constant(ints(axes), f"{s.name}/axes")
    keep = cv.options("ReducerOptions", keepDims=True)
    centred = s.op("SUB", [x, s.op("MEAN", [x, over], reduced, keep)], shape)
    var = s.op("MEAN", [s.op("MUL", [centred, centred], shape), over], reduced, keep)
    return s.op("MUL", [centred, s.op("RSQRT", [s.op("ADD", [var, s.const(eps)], reduced)], reduced)], shape)


def _scale_and_shift(cv, node, s: Steps, y: int, shape, scale, bias, channels_last: bool) -> None:
    """y * scale + bias into the node's output (constants broadcast to y's rank; bias may be None)."""
    y = s.op("MUL", [y, s.const(scale)], shape)
    out = cv.output(node, 0, shape, channels_last)
    cv.op("ADD", [y, s.const(bias)], [out], cv.options("AddOptions"))


@converts("LayerNormalization")
def layer_norm(cv, node) -> None:
    """Normalized over the axes from `axis` on, then scale and bias."""
    if any(node.output[1:]):
        raise cv.unsupported("with its mean or inverse deviation as outputs")
    if not all(cv.is_const(n) for n in node.input[1:] if n):
        raise cv.unsupported("with a scale or bias computed at run time")
    shape = cv.shape(node.input[0])
    rank = len(shape)
    axis = int(cv.attr(node, "axis", -1)) % rank
    s = Steps(cv, node)
    y = _normalized(cv, s, cv.value(node.input[0], False), shape, list(range(axis, rank)),
                    float(cv.attr(node, "epsilon", 1e-5)))
    scale = np.asarray(cv.const(node.input[1]), np.float32)
    bias = (np.asarray(cv.const(node.input[2]), np.float32) if len(node.input) > 2 and node.input[2]
            else np.zeros_like(scale))
    full = (1,) * (rank - scale.ndim)
    _scale_and_shift(cv, node, s, y, shape, scale.reshape(full + scale.shape), bias.reshape(full + bias.shape), False)


@converts("InstanceNormalization")
def instance_norm(cv, node) -> None:
    """Per sample and channel over the spatial axes, then the channel's scale and bias (in whichever layout the
    input is)."""
    shape = cv.shape(node.input[0])
    rank = len(shape)
    cl = cv.channels_last(node.input[0]) and rank in TO_LAST
    phys = physical(shape, cl)
    s = Steps(cv, node)
    y = _normalized(cv, s, cv.value(node.input[0], cl), phys, [physical_axis(a, rank, cl) for a in range(2, rank)],
                    float(cv.attr(node, "epsilon", 1e-5)))
    channel = [1] * rank
    channel[1] = shape[1]
    scale, bias = (np.asarray(cv.const(n), np.float32).reshape(channel) for n in node.input[1:3])
    if cl:
        scale, bias = scale.transpose(TO_LAST[rank]), bias.transpose(TO_LAST[rank])
    _scale_and_shift(cv, node, s, y, phys, scale, bias, cl)


@converts("PRelu")
def prelu(cv, node) -> None:
    if not cv.is_const(node.input[1]):
        raise cv.unsupported("with a slope computed at run time")
    shape = cv.shape(node.output[0])
    rank = len(shape)
    cl = cv.channels_last(node.input[0]) and rank in TO_LAST
    slope = broadcast_const(cv, node, node.input[1], rank, cl)
    if cv.tensor_shape(slope) == ():  # one slope: TFLite's PRELU takes it at the input's rank
        slope = cv.constant(np.full((1,) * rank, cv.const(node.input[1]), np.float32), f"{node.output[0]}/slope")
    out = cv.output(node, 0, physical(shape, cl), cl)
    cv.op("PRELU", [cv.value(node.input[0], cl), slope], [out])


@converts("HardSigmoid")
def hard_sigmoid(cv, node) -> None:
    """max(0, min(1, alpha * x + beta)): MUL, ADD, then TFLite's RELU_0_TO_1."""
    cl = cv.channels_last(node.input[0])
    shape = physical(cv.shape(node.output[0]), cl)
    s = Steps(cv, node)
    scaled = s.op("MUL", [cv.value(node.input[0], cl), s.const(float(cv.attr(node, "alpha", 0.2)))], shape)
    shifted = s.op("ADD", [scaled, s.const(float(cv.attr(node, "beta", 0.5)))], shape)
    out = cv.output(node, 0, shape, cl)
    cv.op("RELU_0_TO_1", [shifted], [out])


def _softplus(cv, s: Steps, x: int, shape, out: int | None = None) -> int:
    """log(1 + exp(x)) as max(x, 0) + log(1 + exp(-|x|)) (no overflow for large x), into `out` if given."""
    tail = s.op("EXP", [s.op("NEG", [s.op("ABS", [x], shape)], shape)], shape)
    soft = s.op("LOG", [s.op("ADD", [tail, s.const(1.0)], shape)], shape)
    inputs = [s.op("RELU", [x], shape), soft]
    if out is None:
        return s.op("ADD", inputs, shape)
    cv.op("ADD", inputs, [out], cv.options("AddOptions"))
    return out


@converts("Softplus", "Mish")
def softplus(cv, node) -> None:
    """Softplus; Mish is x * tanh(softplus(x))."""
    cl = cv.channels_last(node.input[0])
    shape = physical(cv.shape(node.output[0]), cl)
    s = Steps(cv, node)
    x = cv.value(node.input[0], cl)
    if node.op_type == "Softplus":
        _softplus(cv, s, x, shape, cv.output(node, 0, shape, cl))
        return
    y = s.op("TANH", [_softplus(cv, s, x, shape)], shape)
    cv.op("MUL", [x, y], [cv.output(node, 0, shape, cl)], cv.options("MulOptions"))


_COMPARE = {"Greater": "GREATER", "Less": "LESS", "Equal": "EQUAL", "GreaterOrEqual": "GREATER_EQUAL",
            "LessOrEqual": "LESS_EQUAL"}


def _operand(cv, node, name: str, rank: int):
    """An operand at the output's rank in the logical layout: constants broadcast, activations as they are."""
    if cv.is_const(name):
        return broadcast_const(cv, node, name, rank, False)
    if len(cv.shape(name)) != rank:
        raise cv.unsupported("with operands of other ranks")
    return cv.value(name, False)


@converts(*_COMPARE)
def compare(cv, node) -> None:
    shape = cv.shape(node.output[0])
    out = cv.add_tensor(node.output[0], shape, "bool")
    cv.values[(node.output[0], False)] = out
    cv.op(_COMPARE[node.op_type], [_operand(cv, node, n, len(shape)) for n in node.input], [out])


@converts("Where")
def where(cv, node) -> None:
    shape = cv.shape(node.output[0])
    out = cv.output(node, 0, shape, False)
    cv.op("SELECT_V2", [_operand(cv, node, n, len(shape)) for n in node.input], [out])


@converts("DepthToSpace")
def depth_to_space(cv, node) -> None:
    """TFLite's DEPTH_TO_SPACE (channels-last) is ONNX's DCR order; CRD (PyTorch's PixelShuffle) first gathers the
    channels into DCR order."""
    shape = cv.shape(node.input[0])
    if len(shape) != 4:
        raise cv.unsupported("of other than a 4-D tensor")
    block = int(cv.attr(node, "blocksize"))
    mode = cv.attr(node, "mode", b"DCR")
    mode = mode.decode() if isinstance(mode, bytes) else str(mode)
    x = cv.value(node.input[0], True)
    n, c, h, w = shape
    if mode == "CRD":  # DCR channel (i * block + j) * C' + c' is CRD channel c' * block^2 + i * block + j
        c_out = c // (block * block)
        order = [k % c_out * block * block + k // c_out for k in range(c)]
        s = Steps(cv, node)
        x = s.op("GATHER", [x, cv.constant(ints(order), f"{node.output[0]}/dcr")], (n, h, w, c),
                 cv.options("GatherOptions", axis=3))
    out = cv.output(node, 0, physical(cv.shape(node.output[0]), True), True)
    cv.op("DEPTH_TO_SPACE", [x], [out], cv.options("DepthToSpaceOptions", blockSize=block))
