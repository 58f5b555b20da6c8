"""One converter per ONNX operator: ONNX node -> TFLite operators, written through `cv`, the onnx_tflite.Converter
converting the graph (this module is the lower layer: it knows the converter by what it calls).

CONVERTERS convert an operator in float; INTEGER the ones TFLite has integer kernels for, used when the operator
sits between DequantizeLinear and QuantizeLinear (a QDQ model). Most converters serve both: the converter's `mode`
decides the tensors' type, `cv.value` hands over the right one. An integer converter raises `Decline` before it
writes anything when this instance cannot be integer (the operator is then converted in float).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# rank -> permutation from the logical (channels-first) order to the stored channels-last one, and back
TO_LAST = {3: (0, 2, 1), 4: (0, 2, 3, 1)}
TO_FIRST = {3: (0, 2, 1), 4: (0, 3, 1, 2)}


@dataclass(frozen=True)
class QParams:
    """An activation's quantization as TFLite keeps it (uint8 already moved to int8)."""
    scale: float
    zero_point: int
    dtype: str = "int8"

    def same(self, other: QParams | None) -> bool:
        return other is not None and (self.scale, self.zero_point, self.dtype) == (other.scale, other.zero_point,
                                                                                 other.dtype)


class Decline(Exception):
    """This operator cannot run on integers here: convert it in float."""


CONVERTERS: dict = {}
INTEGER: dict = {}


def converts(*op_types: str, integer: bool = False):
    """Register `fn` for `op_types`; integer=True: as their integer converter, and as the float one only where they
    have none (an integer converter may Decline, and its float fallback must not be itself: a float Add of a
    constant went to binary_integer, which declined again)."""
    def register(fn):
        for t in op_types:
            if integer:
                INTEGER[t] = fn
                CONVERTERS.setdefault(t, fn)
            else:
                CONVERTERS[t] = fn
        return fn
    return register


# --- layout helpers ----------------------------------------------------------------------------------------------

def physical(shape, channels_last: bool) -> tuple[int, ...]:
    shape = tuple(shape)
    return tuple(shape[p] for p in TO_LAST[len(shape)]) if channels_last and len(shape) in TO_LAST else shape


def physical_axis(axis: int, rank: int, channels_last: bool) -> int:
    axis %= rank
    return TO_LAST[rank].index(axis) if channels_last and rank in TO_LAST else axis


def same_memory(shape, channels_last: bool) -> bool:
    """Whether a channels-last tensor of logical `shape` holds its elements in the logical order (only axes of
    extent 1 move): then a reshape may read it as it is."""
    if not channels_last or len(shape) not in TO_LAST:
        return True
    moved = [a for a in TO_LAST[len(shape)] if shape[a] != 1]
    return moved == sorted(moved)


def ints(values) -> np.ndarray:
    return np.asarray(values, dtype=np.int32)


def _quantized(cv) -> bool:
    return cv.mode == "int8"


def _in_quant(cv, node, k: int = 0) -> QParams | None:
    return cv.quant_of(node.input[k]) if _quantized(cv) else None


def simple(cv, node, opcode: str, options=None, quant: QParams | None = None, channels_last=None,
           extra_inputs=()) -> int:
    """`opcode` on input 0 in the layout it is in (or the one asked for), output in the same layout."""
    cl = cv.channels_last(node.input[0]) if channels_last is None else channels_last
    x = cv.value(node.input[0], cl)
    out = cv.output(node, 0, physical(cv.shape(node.output[0]), cl), cl, quant)
    cv.op(opcode, [x, *extra_inputs], [out], options)
    cv.finish_output(node, 0, out, cl)
    return out


class Steps:
    """Intermediate float tensors and operators of one node's conversion, named after its first output (the
    converters that write a node as several TFLite operators: normalizations, recurrent cells, softplus)."""

    def __init__(self, cv, node):
        self.cv, self.name, self.count = cv, node.output[0] or node.name or node.op_type, 0

    def tensor(self, shape, label: str) -> int:
        self.count += 1
        return self.cv.add_tensor(f"{self.name}/{label}{self.count}", shape, "float32")

    def op(self, opcode: str, inputs, shape, options=None, label: str | None = None) -> int:
        """`opcode` into a new tensor of `shape`; ADD, SUB and MUL get their options when none are given."""
        out = self.tensor(shape, label or opcode.lower())
        kind = {"ADD": "AddOptions", "SUB": "SubOptions", "MUL": "MulOptions"}.get(opcode)
        self.cv.op(opcode, inputs, [out], options if options is not None or kind is None else self.cv.options(kind))
        return out

    def const(self, value, label: str = "c") -> int:
        self.count += 1
        return self.cv.constant(np.ascontiguousarray(value, np.float32), f"{self.name}/{label}{self.count}")


# --- elementwise -------------------------------------------------------------------------------------------------

_UNARY_FLOAT = {"Exp": "EXP", "Log": "LOG", "Sqrt": "SQRT", "Abs": "ABS", "Neg": "NEG", "Floor": "FLOOR",
                "Ceil": "CEIL", "Sin": "SIN", "Cos": "COS", "Reciprocal": None, "Gelu": "GELU", "Elu": "ELU"}


@converts(*_UNARY_FLOAT)
def unary(cv, node) -> None:
    opcode = _UNARY_FLOAT[node.op_type]
    if opcode is None:  # 1 / x
        cl = cv.channels_last(node.input[0])
        x = cv.value(node.input[0], cl)
        out = cv.output(node, 0, physical(cv.shape(node.output[0]), cl), cl)
        cv.op("DIV", [cv.constant(np.ones((), np.float32), f"{node.output[0]}/one"), x], [out],
              cv.options("DivOptions"))
        return
    simple(cv, node, opcode)


@converts("HardSwish", integer=True)
def hard_swish(cv, node) -> None:
    simple(cv, node, "HARD_SWISH")


@converts("Relu", integer=True)
def relu(cv, node) -> None:
    simple(cv, node, "RELU")


@converts("LeakyRelu", integer=True)
def leaky_relu(cv, node) -> None:
    simple(cv, node, "LEAKY_RELU", cv.options("LeakyReluOptions", alpha=float(cv.attr(node, "alpha", 0.01))))


# fixed output quantization of TFLite's integer kernels (scale, zero point): requantized after where ONNX differs
_FIXED = {"Sigmoid": ("LOGISTIC", QParams(1 / 256, -128)), "Tanh": ("TANH", QParams(1 / 128, 0))}


@converts("Sigmoid", "Tanh", integer=True)
def fixed_range(cv, node) -> None:
    opcode, quant = _FIXED[node.op_type]
    simple(cv, node, opcode, quant=quant if _quantized(cv) else None)


@converts("Softmax", integer=True)
def softmax(cv, node) -> None:
    shape = cv.shape(node.input[0])
    axis = int(cv.attr(node, "axis", -1)) % len(shape)
    for cl in (cv.channels_last(node.input[0]), not cv.channels_last(node.input[0])):
        if physical_axis(axis, len(shape), cl) == len(shape) - 1:
            break
    else:
        raise cv.unsupported(f"over axis {axis} of a rank-{len(shape)} tensor: only the last axis (or the channels)")
    simple(cv, node, "SOFTMAX", cv.options("SoftmaxOptions", beta=1.0),
           quant=QParams(1 / 256, -128) if _quantized(cv) else None, channels_last=cl)


@converts("Clip", integer=True)
def clip(cv, node) -> None:
    lo = float(cv.const(node.input[1])) if len(node.input) > 1 and node.input[1] else -np.inf
    hi = float(cv.const(node.input[2])) if len(node.input) > 2 and node.input[2] else np.inf
    named = {(0.0, 6.0): "RELU6", (0.0, np.inf): "RELU", (-1.0, 1.0): "RELU_N1_TO_1"}.get((lo, hi))
    if named:
        simple(cv, node, named)
        return
    if _quantized(cv):
        raise Decline
    cl = cv.channels_last(node.input[0])
    x = cv.value(node.input[0], cl)
    shape = physical(cv.shape(node.output[0]), cl)
    for bound, opcode, last in ((lo, "MAXIMUM", np.isinf(hi)), (hi, "MINIMUM", True)):
        if np.isinf(bound):
            continue
        out = cv.output(node, 0, shape, cl) if last else cv.add_tensor(f"{node.output[0]}/lo", shape, "float32")
        cv.op(opcode, [x, cv.constant(np.full((), bound, np.float32), f"{node.output[0]}/{opcode}")], [out])
        x = out


_BINARY = {"Add": "ADD", "Sub": "SUB", "Mul": "MUL", "Div": "DIV", "Max": "MAXIMUM", "Min": "MINIMUM",
           "Pow": "POW"}
_OPTIONS = {"ADD": "AddOptions", "SUB": "SubOptions", "MUL": "MulOptions", "DIV": "DivOptions"}


@converts(*_BINARY)
def binary(cv, node) -> None:
    opcode = _BINARY[node.op_type]
    out_shape = cv.shape(node.output[0])
    rank = len(out_shape)
    if node.op_type in ("Max", "Min") and len(node.input) != 2:
        raise cv.unsupported(f"of {len(node.input)} inputs")
    cl = rank in TO_LAST and any(not cv.is_const(n) and len(cv.shape(n)) == rank and cv.channels_last(n)
                                 for n in node.input)
    operands = []
    for n in node.input:
        if cv.is_const(n):
            operands.append(broadcast_const(cv, node, n, rank, cl))
        elif len(cv.shape(n)) == rank:
            operands.append(cv.value(n, cl))
        else:  # a lower-rank activation: given its leading 1s, then the layout
            x = cv.value(n, False)
            full = (1,) * (rank - len(cv.shape(n))) + tuple(cv.shape(n))
            r = cv.add_tensor(f"{n}/rank{rank}", full, cv.dtype_of(x), cv.tensor_quant(x))
            cv.op("RESHAPE", [x, cv.constant(ints(full), f"{n}/rank{rank}/shape")], [r])
            if cl:
                t = cv.add_tensor(f"{n}/rank{rank}/nhwc", physical(full, True), cv.dtype_of(x), cv.tensor_quant(x))
                cv.op("TRANSPOSE", [r, cv.constant(ints(TO_LAST[rank]), f"{n}/perm")], [t])
                r = t
            operands.append(r)
    out = cv.output(node, 0, physical(out_shape, cl), cl)
    options = cv.options(_OPTIONS[opcode]) if opcode in _OPTIONS else None
    if opcode == "ADD":
        options.fusedActivationFunction = cv.fused_activation(node)
    cv.op(opcode, operands, [out], options)
    cv.finish_output(node, 0, out, cl)


@converts("Add", "Sub", "Mul", integer=True)
def binary_integer(cv, node) -> None:
    for n in node.input:
        if n in cv.qconsts and cv.qconsts[n].per_channel:
            raise Decline  # TFLite's integer ADD/MUL take one scale per operand
    if any(n in cv.consts for n in node.input):
        raise Decline
    binary(cv, node)


def broadcast_const(cv, node, name: str, rank: int, cl: bool) -> int:
    """A constant operand at the output's rank, in its layout (float, or int8 with its quantization)."""
    if _quantized(cv):
        qc = cv.qconsts[name]
        value = qc.centered()
        quant = QParams(float(qc.scale[0]), 0)
        if value.min() < -128 or value.max() > 127:
            raise Decline
        dtype = np.int8
    else:
        value, quant, dtype = cv.const(name), None, np.float32
    value = np.asarray(value).reshape((1,) * (rank - np.ndim(value)) + np.shape(value))
    if cl and rank in TO_LAST:
        value = value.transpose(TO_LAST[rank])
    if value.size == 1:
        value = value.reshape(())
    return cv.constant(value.astype(dtype), f"{node.output[0]}/{name}", quant)


@converts("BatchNormalization")
def batch_norm(cv, node) -> None:
    gamma, beta, mean, var = (cv.const(n).astype(np.float64) for n in node.input[1:5])
    eps = float(cv.attr(node, "epsilon", 1e-5))
    scale = gamma / np.sqrt(var + eps)
    shift = beta - mean * scale
    rank = len(cv.shape(node.input[0]))
    cl = cv.channels_last(node.input[0]) and rank in TO_LAST
    bshape = (scale.size,) if cl or rank <= 2 else (scale.size,) + (1,) * (rank - 2)
    x = cv.value(node.input[0], cl)
    shape = physical(cv.shape(node.output[0]), cl)
    mid = cv.add_tensor(f"{node.output[0]}/scaled", shape, "float32")
    cv.op("MUL", [x, cv.constant(scale.reshape(bshape).astype(np.float32), f"{node.output[0]}/scale")], [mid],
          cv.options("MulOptions"))
    out = cv.output(node, 0, shape, cl)
    cv.op("ADD", [mid, cv.constant(shift.reshape(bshape).astype(np.float32), f"{node.output[0]}/shift")], [out],
          cv.options("AddOptions"))


# --- convolution and matrix products -----------------------------------------------------------------------------

def _same_pads(size: int, kernel: int, stride: int, dilation: int) -> tuple[int, int]:
    """TFLite's SAME padding of one spatial axis (before, after)."""
    out = -(-size // stride)
    total = max((out - 1) * stride + (kernel - 1) * dilation + 1 - size, 0)
    return total // 2, total - total // 2


def _padding(cv, node, spatial, kernel, strides, dilations):
    """(TFLite padding, explicit pads to apply first or None) for ONNX's pads/auto_pad."""
    n = len(spatial)
    auto = cv.attr(node, "auto_pad", b"NOTSET")
    auto = auto.decode() if isinstance(auto, bytes) else str(auto)
    same = [_same_pads(spatial[i], kernel[i], strides[i], dilations[i]) for i in range(n)]
    if auto in ("SAME_UPPER",):
        return "SAME", None
    if auto == "VALID":
        return "VALID", None
    if auto == "SAME_LOWER":
        pads = [(b, a) for a, b in same]
    else:
        given = len(cv.shape(node.input[0])) - 2  # a 1-D window runs as a 2-D one of height 1
        flat = list(cv.attr(node, "pads", [0] * (2 * given)))
        pads = [(0, 0)] * (n - given) + [(int(flat[i]), int(flat[i + given])) for i in range(given)]
    if all(p == (0, 0) for p in pads):
        return "VALID", None
    if pads == same:
        return "SAME", None
    return "VALID", pads


def _pad_first(cv, node, x: int, pads, value) -> int:
    """An explicit PAD (PADV2 with `value`) before a VALID window: asymmetric pads TFLite's SAME cannot say."""
    shape = cv.tensor_shape(x)
    widths = [(0, 0), *pads, (0, 0)]
    padded = [s + a + b for s, (a, b) in zip(shape, widths)]
    out = cv.add_tensor(f"{node.output[0]}/padded", padded, cv.dtype_of(x), cv.tensor_quant(x))
    inputs = [x, cv.constant(ints(widths), f"{node.output[0]}/pads")]
    if value is None:
        cv.op("PAD", inputs, [out])
    else:
        cv.op("PADV2", inputs + [cv.constant(np.asarray([value], dtype=cv.dtype_of(x)), f"{node.output[0]}/pad_value",
                                             cv.tensor_quant(x))], [out])
    return out


def _to_2d(cv, node, x: int, rank: int) -> int:
    """A channels-last (N, L, C) value as (N, 1, L, C): 1-D windows run as 2-D ones of height 1."""
    if rank == 4:
        return x
    n, length, c = cv.tensor_shape(x)
    out = cv.add_tensor(f"{node.output[0]}/as2d", (n, 1, length, c), cv.dtype_of(x), cv.tensor_quant(x))
    cv.op("RESHAPE", [x, cv.constant(ints((n, 1, length, c)), f"{node.output[0]}/as2d/shape")], [out])
    return out


def _window_output(cv, node, rank: int, quant: QParams | None = None) -> tuple[int, int]:
    """(tensor the window operator writes, tensor of the ONNX output): one and the same for 2-D windows; for 1-D
    ones a (N, 1, L, C) tensor reshaped into the output."""
    out_shape = physical(cv.shape(node.output[0]), True)
    if rank == 4:
        out = cv.output(node, 0, out_shape, True, quant)
        return out, out
    final = cv.output(node, 0, out_shape, True, quant)
    n, length, c = out_shape
    q = cv.tensor_quant(final)
    written = cv.add_tensor(f"{node.output[0]}/2d", (n, 1, length, c), cv.dtype_of(final), q)
    return written, final


def _finish_window(cv, node, written: int, final: int) -> None:
    if written != final:
        cv.op("RESHAPE", [written, cv.constant(ints(cv.tensor_shape(final)), f"{node.output[0]}/shape")], [final])
    cv.finish_output(node, 0, final, True)


def _weights_int8(cv, name: str):
    """A DequantizeLinear'd weight constant as (int8 values, per-output-channel scales) with zero point 0."""
    if name not in cv.qconsts:
        raise Decline
    qc = cv.qconsts[name]
    values = qc.centered()
    if values.min() < -127 or values.max() > 127:
        raise cv.unsupported(f"weights '{name}' with zero points that leave the symmetric int8 range: quantize "
                             "the weights symmetrically (QInt8 weights, WeightSymmetric)")
    return values.astype(np.int8), qc


def _bias_int32(cv, name: str | None, expect: np.ndarray, channels: int, label: str) -> np.ndarray:
    """The bias as int32 at scale input x weight (TFLite's); re-rounded, and said, where ONNX chose another."""
    if not name:
        return np.zeros(channels, np.int32)
    if name in cv.qconsts and cv.qconsts[name].q.dtype == np.int32:
        qc = cv.qconsts[name]
        scale = np.broadcast_to(qc.scale, (channels,))
        if np.allclose(scale, expect, rtol=1e-6) and not qc.zero_point.any():
            return qc.q.reshape(channels).astype(np.int32)
    value = cv.const(name).astype(np.float64).reshape(channels)
    cv.float_biases.append(label)
    return np.clip(np.round(value / expect), -2**31, 2**31 - 1).astype(np.int32)


@converts("Conv", integer=True)
def conv(cv, node) -> None:
    x_name, w_name = node.input[0], node.input[1]
    b_name = node.input[2] if len(node.input) > 2 and node.input[2] else None
    if not cv.is_const(w_name):
        raise cv.unsupported("weights computed at run time")
    rank = len(cv.shape(x_name))
    if rank not in (3, 4):
        raise cv.unsupported(f"of a rank-{rank} input: 1-D and 2-D convolutions only")
    group = int(cv.attr(node, "group", 1))
    c_in = cv.shape(x_name)[1]
    quantized = _quantized(cv)
    if quantized:
        w, qc = _weights_int8(cv, w_name)
    else:
        w = cv.const(w_name).astype(np.float32)
    if rank == 3:  # (O, I, k) as (O, I, 1, k)
        w = w[:, :, None, :]
    out_ch, kh, kw = w.shape[0], w.shape[2], w.shape[3]
    strides = list(cv.attr(node, "strides", [1] * (rank - 2)))
    dilations = list(cv.attr(node, "dilations", [1] * (rank - 2)))
    spatial = list(cv.shape(x_name)[2:])
    if rank == 3:
        strides, dilations, spatial = [1, *strides], [1, *dilations], [1, *spatial]
    padding, pads = _padding(cv, node, spatial, [kh, kw], strides, dilations)
    depthwise = group == c_in and group > 1 and w.shape[1] == 1
    x = _to_2d(cv, node, cv.value(x_name, True), rank)
    if pads:
        x = _pad_first(cv, node, x, pads, None)
    if depthwise:
        filt, opcode, axis = w.transpose(1, 2, 3, 0), "DEPTHWISE_CONV_2D", 3
        options = cv.options("DepthwiseConv2DOptions", padding=0 if padding == "SAME" else 1, strideH=strides[0],
                             strideW=strides[1], dilationHFactor=dilations[0], dilationWFactor=dilations[1],
                             depthMultiplier=out_ch // c_in, fusedActivationFunction=cv.fused_activation(node))
    else:
        filt, opcode, axis = w.transpose(0, 2, 3, 1), "CONV_2D", 0
        options = cv.options("Conv2DOptions", padding=0 if padding == "SAME" else 1, strideH=strides[0],
                             strideW=strides[1], dilationHFactor=dilations[0], dilationWFactor=dilations[1],
                             fusedActivationFunction=cv.fused_activation(node))
    if quantized:
        in_q = cv.quant_of(x_name)
        w_scales = np.broadcast_to(qc.scale, (out_ch,)).astype(np.float64)
        weights = cv.constant(np.ascontiguousarray(filt), f"{w_name}/tflite", scales=w_scales,
                              zero_points=[0] * out_ch, axis=axis)
        expect = in_q.scale * w_scales
        bias = cv.constant(_bias_int32(cv, b_name, expect, out_ch, node.name or node.output[0]),
                           f"{b_name or node.output[0]}/bias", scales=expect, zero_points=[0] * out_ch)
    else:
        weights = cv.constant(np.ascontiguousarray(filt), f"{w_name}/tflite")
        b = cv.const(b_name).astype(np.float32) if b_name else np.zeros(out_ch, np.float32)
        bias = cv.constant(b, f"{b_name or node.output[0]}/bias")
    written, final = _window_output(cv, node, rank)
    cv.op(opcode, [x, weights, bias], [written], options)
    _finish_window(cv, node, written, final)


def _fully_connected(cv, node, x_name: str, weights_of, bias_name: str | None, scale: float = 1.0,
                     bias_scale: float = 1.0) -> None:
    """y = x W^T + b over the last axis; `weights_of(quantized)` gives W as (out, in) (ints and scales when
    quantized)."""
    shape = cv.shape(x_name)
    x = cv.value(x_name, False)
    quantized = _quantized(cv)
    if quantized:
        w, w_scales = weights_of(True)
        out_features = w.shape[0]
        in_q = cv.quant_of(x_name)
        w_scales = np.broadcast_to(np.asarray(w_scales, np.float64), (out_features,))
        per_channel = not np.all(w_scales == w_scales[0])
        scales = w_scales if per_channel else w_scales[:1]
        weights = cv.constant(w, f"{node.output[0]}/weights", scales=scales, zero_points=[0] * scales.size, axis=0)
        expect = in_q.scale * w_scales
        b = _bias_int32(cv, bias_name, expect, out_features, node.name or node.output[0])
        bias = cv.constant(b, f"{node.output[0]}/bias", scales=expect if per_channel else expect[:1],
                           zero_points=[0] * (out_features if per_channel else 1))
    else:
        w = (weights_of(False) * scale).astype(np.float32)
        out_features = w.shape[0]
        weights = cv.constant(w, f"{node.output[0]}/weights")
        b = (cv.const(bias_name).astype(np.float64).reshape(-1) * bias_scale if bias_name
             else np.zeros(out_features))
        bias = cv.constant(np.broadcast_to(b, (out_features,)).astype(np.float32), f"{node.output[0]}/bias")
    out = cv.output(node, 0, cv.shape(node.output[0]), False)
    cv.op("FULLY_CONNECTED", [x, weights, bias], [out],
          cv.options("FullyConnectedOptions", keepNumDims=len(shape) > 2,
                     fusedActivationFunction=cv.fused_activation(node)))
    cv.finish_output(node, 0, out, False)


def _matrix(cv, name: str, transposed: bool):
    """A constant matrix as (out, in): float, or (int8 values, scales) when quantized."""
    def weights_of(quantized: bool):
        if not quantized:
            m = cv.const(name)
            return m if transposed else m.T
        w, qc = _weights_int8(cv, name)
        axis_out = 0 if transposed else 1
        if qc.per_channel and qc.axis != axis_out:
            raise Decline
        return (np.ascontiguousarray(w if transposed else w.T), qc.scale)
    return weights_of


@converts("Gemm", integer=True)
def gemm(cv, node) -> None:
    if int(cv.attr(node, "transA", 0)) or len(cv.shape(node.input[0])) != 2:
        raise cv.unsupported("with a transposed or non-matrix first input")
    if not cv.is_const(node.input[1]):
        raise cv.unsupported("with a second input computed at run time")
    c = node.input[2] if len(node.input) > 2 and node.input[2] else None
    if c is not None and (not cv.is_const(c) or np.size(cv.const(c)) not in (1, cv.shape(node.output[0])[1])):
        raise cv.unsupported("with a bias that is not one value per output")
    alpha, beta = float(cv.attr(node, "alpha", 1.0)), float(cv.attr(node, "beta", 1.0))
    if _quantized(cv) and (alpha, beta) != (1.0, 1.0):
        raise Decline
    _fully_connected(cv, node, node.input[0], _matrix(cv, node.input[1], bool(cv.attr(node, "transB", 0))), c,
                     alpha, beta)


@converts("MatMul", integer=True)
def matmul(cv, node) -> None:
    a, b = node.input[0], node.input[1]
    if cv.is_const(b) and len(cv.shape(b)) == 2 and len(cv.shape(a)) >= 2:
        _fully_connected(cv, node, a, _matrix(cv, b, False), None)
        return
    if _quantized(cv):
        raise Decline
    if cv.is_const(a) or cv.is_const(b) or len(cv.shape(a)) != len(cv.shape(b)):
        raise cv.unsupported("of a constant or broadcast left operand")
    out = cv.output(node, 0, cv.shape(node.output[0]), False)
    cv.op("BATCH_MATMUL", [cv.value(a, False), cv.value(b, False)], [out], cv.options("BatchMatMulOptions"))


# --- windows and reductions --------------------------------------------------------------------------------------

@converts("MaxPool", "AveragePool", integer=True)
def pool(cv, node) -> None:
    rank = len(cv.shape(node.input[0]))
    if rank not in (3, 4):
        raise cv.unsupported(f"of a rank-{rank} input")
    if any(d != 1 for d in cv.attr(node, "dilations", [])):
        raise cv.unsupported("with dilations")
    if int(cv.attr(node, "ceil_mode", 0)) and not _floor_size_matches(cv, node):  # TFLite's windows round down
        raise cv.unsupported("with ceil_mode where it makes the output larger")
    kernel = list(cv.attr(node, "kernel_shape"))
    strides = list(cv.attr(node, "strides", [1] * len(kernel)))
    spatial = list(cv.shape(node.input[0])[2:])
    if rank == 3:
        kernel, strides, spatial = [1, *kernel], [1, *strides], [1, *spatial]
    padding, pads = _padding(cv, node, spatial, kernel, strides, [1, 1])
    opcode = "MAX_POOL_2D" if node.op_type == "MaxPool" else "AVERAGE_POOL_2D"
    x = _to_2d(cv, node, cv.value(node.input[0], True), rank)
    if pads:
        if opcode == "AVERAGE_POOL_2D" and not int(cv.attr(node, "count_include_pad", 0)):
            raise cv.unsupported("with padding TFLite's SAME does not make and count_include_pad=0")
        lowest = -128 if cv.tensor_quant(x) else np.finfo(np.float32).min  # what a max window never picks
        x = _pad_first(cv, node, x, pads, lowest if opcode == "MAX_POOL_2D" else None)
    # TFLite's integer pooling keeps the input's quantization: requantized after where ONNX's output differs
    written, final = _window_output(cv, node, rank, cv.tensor_quant(x) if _quantized(cv) else None)
    cv.op(opcode, [x], [written], cv.options("Pool2DOptions", padding=0 if padding == "SAME" else 1,
                                             strideH=strides[0], strideW=strides[1], filterHeight=kernel[0],
                                             filterWidth=kernel[1]))
    _finish_window(cv, node, written, final)


def _floor_size_matches(cv, node) -> bool:
    kernel = list(cv.attr(node, "kernel_shape"))
    strides = list(cv.attr(node, "strides", [1] * len(kernel)))
    flat = list(cv.attr(node, "pads", [0] * (2 * len(kernel))))
    n = len(kernel)
    spatial = cv.shape(node.input[0])[2:]
    floor = [(spatial[i] + flat[i] + flat[i + n] - kernel[i]) // strides[i] + 1 for i in range(n)]
    return list(cv.shape(node.output[0])[2:]) == floor


_REDUCE = {"ReduceMean": "MEAN", "ReduceMax": "REDUCE_MAX", "ReduceSum": "SUM", "GlobalAveragePool": "MEAN",
           "GlobalMaxPool": "REDUCE_MAX", "ReduceMin": "REDUCE_MIN", "ReduceProd": "REDUCE_PROD"}


@converts(*_REDUCE)
def reduce(cv, node) -> None:
    shape = cv.shape(node.input[0])
    rank = len(shape)
    if node.op_type.startswith("Global"):
        axes, keep = list(range(2, rank)), True
    else:
        axes = cv.attr(node, "axes", None)
        if axes is None and len(node.input) > 1 and node.input[1]:
            axes = cv.const(node.input[1]).tolist()
        if axes is None or len(axes) == 0:
            if int(cv.attr(node, "noop_with_empty_axes", 0)):
                raise cv.unsupported("with no axes (noop_with_empty_axes)")
            axes = list(range(rank))
        keep = bool(int(cv.attr(node, "keepdims", 1)))
    axes = sorted(int(a) % rank for a in axes)
    cl = cv.channels_last(node.input[0]) and rank in TO_LAST
    if cl and not keep:  # the kept axes must stay in their logical order
        kept = [a for a in TO_LAST[rank] if a not in axes]
        cl = kept == sorted(kept)
    out_cl = cl and keep
    x = cv.value(node.input[0], cl)
    phys_axes = sorted(physical_axis(a, rank, cl) for a in axes)
    out = cv.output(node, 0, physical(cv.shape(node.output[0]), out_cl), out_cl)
    cv.op(_REDUCE[node.op_type], [x, cv.constant(ints(phys_axes), f"{node.output[0]}/axes")], [out],
          cv.options("ReducerOptions", keepDims=keep))
    cv.finish_output(node, 0, out, out_cl)


@converts("GlobalAveragePool", "ReduceMean", integer=True)
def mean_integer(cv, node) -> None:
    reduce(cv, node)


# --- data movement -----------------------------------------------------------------------------------------------

@converts("Reshape", "Flatten", "Squeeze", "Unsqueeze", integer=True)
def reshape(cv, node) -> None:
    shape = cv.shape(node.input[0])
    cl = cv.channels_last(node.input[0]) and same_memory(shape, True)
    x = cv.value(node.input[0], cl if cl else False)
    new = cv.shape(node.output[0])
    quant = cv.tensor_quant(x) if _quantized(cv) else None
    out = cv.output(node, 0, new, False, quant)
    cv.op("RESHAPE", [x, cv.constant(ints(new), f"{node.output[0]}/shape")], [out])
    cv.finish_output(node, 0, out, False)


@converts("Gather", integer=True)
def gather(cv, node) -> None:
    """Gather at constant indices (an exporter's unbinding of packed query/key/value, a row of a table): TFLite's
    GATHER on the logical layout."""
    if not cv.is_const(node.input[1]) or cv.is_const(node.input[0]):
        raise cv.unsupported("with indices computed at run time or of a constant table")
    shape = cv.shape(node.input[0])
    axis = int(cv.attr(node, "axis", 0)) % len(shape)
    indices = cv.const(node.input[1]).astype(np.int64)
    indices = np.where(indices < 0, indices + shape[axis], indices).astype(np.int32)
    x = cv.value(node.input[0], False)
    quant = cv.tensor_quant(x) if _quantized(cv) else None
    out = cv.output(node, 0, cv.shape(node.output[0]), False, quant)
    cv.op("GATHER", [x, cv.constant(indices, f"{node.output[0]}/indices")], [out],
          cv.options("GatherOptions", axis=axis))
    cv.finish_output(node, 0, out, False)


@converts("Identity", "Dropout")
def identity(cv, node) -> None:
    for cl in cv.layouts(node.input[0]):
        cv.values[(node.output[0], cl)] = cv.value(node.input[0], cl)


@converts("Transpose", integer=True)
def transpose(cv, node) -> None:
    shape = cv.shape(node.input[0])
    rank = len(shape)
    perm = [int(p) for p in cv.attr(node, "perm", list(range(rank))[::-1])]
    cl = cv.channels_last(node.input[0]) and rank in TO_LAST
    x = cv.value(node.input[0], cl)
    phys_perm = [physical_axis(p, rank, cl) for p in perm]
    quant = cv.tensor_quant(x) if _quantized(cv) else None
    out = cv.output(node, 0, cv.shape(node.output[0]), False, quant)
    cv.op("TRANSPOSE", [x, cv.constant(ints(phys_perm), f"{node.output[0]}/perm")], [out])
    cv.finish_output(node, 0, out, False)


@converts("Concat", integer=True)
def concat(cv, node) -> None:
    names = [n for n in node.input if n]
    if any(cv.is_const(n) for n in names) and _quantized(cv):
        raise Decline
    rank = len(cv.shape(node.output[0]))
    axis = int(cv.attr(node, "axis")) % rank
    cl = rank in TO_LAST and all(cv.is_const(n) or cv.channels_last(n) for n in names)
    out_q = cv.qparams[cv.quantized_output(node, 0)] if _quantized(cv) else None
    inputs = []
    for n in names:
        if cv.is_const(n):
            value = cv.const(n)
            inputs.append(cv.constant((value.transpose(TO_LAST[rank]) if cl else value).astype(np.float32),
                                      f"{node.output[0]}/{n}"))
            continue
        x = cv.value(n, cl)
        q = cv.tensor_quant(x)
        if out_q is not None and not out_q.same(q):  # TFLite's integer concatenation keeps one quantization
            r = cv.add_tensor(f"{n}/requant", cv.tensor_shape(x), "int8", out_q)
            cv.op("QUANTIZE", [x], [r])
            x = r
        inputs.append(x)
    out = cv.output(node, 0, physical(cv.shape(node.output[0]), cl), cl)
    cv.op("CONCATENATION", inputs, [out], cv.options("ConcatenationOptions", axis=physical_axis(axis, rank, cl)))


@converts("Pad", integer=True)
def pad(cv, node) -> None:
    mode = cv.attr(node, "mode", b"constant")
    if (mode.decode() if isinstance(mode, bytes) else mode) != "constant":
        raise cv.unsupported(f"mode {mode!r}: constant padding only")
    shape = cv.shape(node.input[0])
    rank = len(shape)
    pads = [int(p) for p in (cv.const(node.input[1]) if len(node.input) > 1 else cv.attr(node, "pads"))]
    if len(node.input) > 3 and node.input[3]:
        raise cv.unsupported("over some axes only")
    value = float(cv.const(node.input[2])) if len(node.input) > 2 and node.input[2] else 0.0
    cl = rank in TO_LAST  # channels-last: what a convolution after it reads, and then folds it into itself
    widths = [(pads[a], pads[a + rank]) for a in range(rank)]
    if cl:
        widths = [widths[a] for a in TO_LAST[rank]]
    x = cv.value(node.input[0], cl)
    quant = cv.tensor_quant(x) if _quantized(cv) else None
    out = cv.output(node, 0, physical(cv.shape(node.output[0]), cl), cl, quant)
    if quant is not None:
        fill = np.asarray([np.clip(np.round(value / quant.scale) + quant.zero_point, -128, 127)], np.int8)
        cv.op("PADV2", [x, cv.constant(ints(widths), f"{node.output[0]}/pads"),
                        cv.constant(fill, f"{node.output[0]}/value", quant)], [out])
    else:
        cv.op("PADV2", [x, cv.constant(ints(widths), f"{node.output[0]}/pads"),
                        cv.constant(np.asarray([value], np.float32), f"{node.output[0]}/value")], [out])
    cv.finish_output(node, 0, out, cl)


@converts("Slice")
def slice_(cv, node) -> None:
    shape = cv.shape(node.input[0])
    rank = len(shape)
    starts, ends = cv.const(node.input[1]).tolist(), cv.const(node.input[2]).tolist()
    axes = cv.const(node.input[3]).tolist() if len(node.input) > 3 and node.input[3] else list(range(len(starts)))
    steps = cv.const(node.input[4]).tolist() if len(node.input) > 4 and node.input[4] else [1] * len(starts)
    cl = cv.channels_last(node.input[0]) and rank in TO_LAST
    begin, end, stride = [0] * rank, list(physical(shape, cl)), [1] * rank
    end_mask = 0
    for s, e, a, st in zip(starts, ends, axes, steps):
        p = physical_axis(int(a), rank, cl)
        lo, hi, step = slice(int(s), int(e), int(st)).indices(shape[int(a) % rank])
        begin[p], end[p], stride[p] = lo, hi, step
        if hi < 0:  # a reversed slice down to element 0
            end_mask |= 1 << p
    x = cv.value(node.input[0], cl)
    out = cv.output(node, 0, physical(cv.shape(node.output[0]), cl), cl)
    cv.op("STRIDED_SLICE", [x, cv.constant(ints(begin), f"{node.output[0]}/begin"),
                            cv.constant(ints(end), f"{node.output[0]}/end"),
                            cv.constant(ints(stride), f"{node.output[0]}/strides")], [out],
          cv.options("StridedSliceOptions", endMask=end_mask))


@converts("Resize", "Upsample")
def resize(cv, node) -> None:
    shape, out_shape = cv.shape(node.input[0]), cv.shape(node.output[0])
    if len(shape) != 4 or out_shape[:2] != shape[:2]:
        raise cv.unsupported("other than of the spatial axes of a 4-D tensor")
    mode = cv.attr(node, "mode", b"nearest")
    mode = mode.decode() if isinstance(mode, bytes) else mode
    coord = cv.attr(node, "coordinate_transformation_mode", b"half_pixel")
    coord = coord.decode() if isinstance(coord, bytes) else coord
    nearest = cv.attr(node, "nearest_mode", b"round_prefer_floor")
    nearest = nearest.decode() if isinstance(nearest, bytes) else nearest
    if node.op_type == "Upsample":
        coord, nearest = "asymmetric", "floor"
    if mode == "nearest" and coord == "asymmetric" and nearest == "floor":
        opcode, options = "RESIZE_NEAREST_NEIGHBOR", cv.options("ResizeNearestNeighborOptions")
    elif mode == "linear" and coord in ("half_pixel", "pytorch_half_pixel", "align_corners", "asymmetric"):
        if coord == "pytorch_half_pixel" and min(out_shape[2:]) == 1:
            raise cv.unsupported("pytorch_half_pixel to a size of 1")
        opcode = "RESIZE_BILINEAR"
        options = cv.options("ResizeBilinearOptions", alignCorners=coord == "align_corners",
                             halfPixelCenters=coord in ("half_pixel", "pytorch_half_pixel"))
    else:
        raise cv.unsupported(f"mode {mode} with {coord} coordinates ({nearest}): nearest/asymmetric/floor or "
                             "linear")
    simple(cv, node, opcode, options, channels_last=True,
           extra_inputs=[cv.constant(ints(out_shape[2:]), f"{node.output[0]}/size")])
