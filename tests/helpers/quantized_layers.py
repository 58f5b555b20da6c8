"""Small random int8 TFLite layers, written with the TFLite schema's object API (the interpreter loads them)."""

import flatbuffers
import numpy as np
from ai_edge_litert import schema_py_generated as s

I8, I32, F32 = s.TensorType.INT8, s.TensorType.INT32, s.TensorType.FLOAT32


class Layer:
    def __init__(self, seed: int):
        self.rng = np.random.default_rng(seed)
        self.tensors, self.buffers = [], [s.BufferT()]

    def tensor(self, name, shape, ttype=I8, scale=None, zero_point=None, data=None, axis=0):
        t = s.TensorT()
        t.name, t.shape, t.type = name.encode(), np.array(shape, dtype=np.int32), ttype
        t.buffer = 0
        if data is not None:
            b = s.BufferT()
            b.data = np.frombuffer(np.ascontiguousarray(data).tobytes(), dtype=np.uint8)
            self.buffers.append(b)
            t.buffer = len(self.buffers) - 1
        if scale is not None:
            q = s.QuantizationParametersT()
            q.scale = list(np.atleast_1d(scale).astype(np.float32))
            zps = np.atleast_1d(zero_point if zero_point is not None else 0)
            q.zeroPoint = [int(z) for z in (zps if zps.size > 1 else np.repeat(zps, len(q.scale)))]
            q.quantizedDimension = axis
            t.quantization = q
        self.tensors.append(t)
        return len(self.tensors) - 1

    def activation(self, name, shape, scale, zero_point):
        return self.tensor(name, shape, I8, scale, zero_point)

    def weights(self, name, shape, per_channel_axis=None):
        w = self.rng.integers(-127, 128, size=shape).astype(np.int8)
        if per_channel_axis is None:
            return self.tensor(name, shape, I8, 0.01, 0, w), np.array([0.01])
        scales = self.rng.uniform(0.002, 0.02, size=shape[per_channel_axis])
        return self.tensor(name, shape, I8, scales, np.zeros_like(scales, dtype=int), w, per_channel_axis), scales

    def bias(self, name, n, scales):
        b = self.rng.integers(-2000, 2000, size=n).astype(np.int32)
        return self.tensor(name, [n], I32, scales, np.zeros(len(np.atleast_1d(scales)), dtype=int), b)

    def model(self, op_name, inputs, outputs, graph_inputs, options=None) -> bytes:
        model = s.ModelT()
        model.version = 3
        code = s.OperatorCodeT()
        code.builtinCode = getattr(s.BuiltinOperator, op_name)
        code.deprecatedBuiltinCode = min(code.builtinCode, 127)
        code.version = 1
        model.operatorCodes = [code]
        model.buffers = self.buffers
        op = s.OperatorT()
        op.opcodeIndex = 0
        op.inputs = np.array(inputs, dtype=np.int32)
        op.outputs = np.array(outputs, dtype=np.int32)
        if options is not None:
            op.builtinOptionsType, op.builtinOptions = options
        sg = s.SubGraphT()
        sg.tensors, sg.operators = self.tensors, [op]
        sg.inputs = np.array(graph_inputs, dtype=np.int32)
        sg.outputs = np.array(outputs, dtype=np.int32)
        model.subgraphs = [sg]
        b = flatbuffers.Builder(4096)
        b.Finish(model.Pack(b), file_identifier=b"TFL3")
        return bytes(b.Output())


def opts(kind, **fields):
    """A builtin-options pair (union type, options object) for Layer.model: `kind` names the schema's options
    table (Conv2DOptions, ...), `fields` its fields."""
    cls = getattr(s, kind + "T")
    o = cls()
    for k, v in fields.items():
        setattr(o, k, v)
    return getattr(s.BuiltinOptions, kind), o


def conv2d(seed, in_shape, out_c, k, stride, padding, act, per_channel=True, dilation=1, out_scale_factor=1.0,
           dead_channels=False):
    """dead_channels: channel 0 with a zero multiplier and channel 1 saturated by a huge bias, as trained
    models have them; out_scale_factor < 1 gives multipliers above 1 (positive shifts)."""
    L = Layer(seed)
    n, h, w, c = in_shape
    in_scale, out_scale = 0.05, 0.05 * 0.01 * k * k * c * 0.5 * out_scale_factor
    x = L.activation("x", in_shape, in_scale, 7)
    wt, ws = L.weights("w", [out_c, k, k, c], 0 if per_channel else None)
    b = L.bias("b", out_c, in_scale * ws)
    if dead_channels:
        L.tensors[wt].quantization.scale[0] = np.float32(1e-14)
        bias = np.frombuffer(L.buffers[L.tensors[b].buffer].data.tobytes(), dtype=np.int32).copy()
        bias[:2] = 2**30
        L.buffers[L.tensors[b].buffer].data = np.frombuffer(bias.tobytes(), dtype=np.uint8)
    eff = (k - 1) * dilation + 1
    oh = -(-h // stride) if padding == 0 else (h - eff) // stride + 1
    ow = -(-w // stride) if padding == 0 else (w - eff) // stride + 1
    y = L.activation("y", [n, oh, ow, out_c], out_scale, -3)
    opt = opts("Conv2DOptions", padding=padding, strideW=stride, strideH=stride, fusedActivationFunction=act,
                dilationWFactor=dilation, dilationHFactor=dilation)
    return L.model("CONV_2D", [x, wt, b], [y], [x], opt)


def depthwise(seed, in_shape, multiplier, k, stride, padding, act):
    L = Layer(seed)
    n, h, w, c = in_shape
    oc = c * multiplier
    in_scale, out_scale = 0.05, 0.05 * 0.01 * k * k * 0.7
    x = L.activation("x", in_shape, in_scale, -11)
    wt, ws = L.weights("w", [1, k, k, oc], 3)
    b = L.bias("b", oc, in_scale * ws)
    oh = -(-h // stride) if padding == 0 else (h - k) // stride + 1
    ow = -(-w // stride) if padding == 0 else (w - k) // stride + 1
    y = L.activation("y", [n, oh, ow, oc], out_scale, 4)
    opt = opts("DepthwiseConv2DOptions", padding=padding, strideW=stride, strideH=stride, depthMultiplier=multiplier,
                fusedActivationFunction=act, dilationWFactor=1, dilationHFactor=1)
    return L.model("DEPTHWISE_CONV_2D", [x, wt, b], [y], [x], opt)


def fully_connected(seed, in_shape, out_features, act, out_scale_factor=1.0):
    L = Layer(seed)
    depth = in_shape[-1]
    in_scale, out_scale = 0.04, 0.04 * 0.01 * depth * 0.6 * out_scale_factor
    x = L.activation("x", in_shape, in_scale, 12)
    wt, ws = L.weights("w", [out_features, depth])
    b = L.bias("b", out_features, in_scale * ws)
    batch = int(np.prod(in_shape[:-1]))
    y = L.activation("y", [batch, out_features], out_scale, -20)
    return L.model("FULLY_CONNECTED", [x, wt, b], [y], [x], opts("FullyConnectedOptions", fusedActivationFunction=act))


def pool(seed, op, in_shape, k, stride, padding, act=0):
    L = Layer(seed)
    n, h, w, c = in_shape
    x = L.activation("x", in_shape, 0.1, -5)
    oh = -(-h // stride) if padding == 0 else (h - k) // stride + 1
    ow = -(-w // stride) if padding == 0 else (w - k) // stride + 1
    y = L.activation("y", [n, oh, ow, c], 0.1, -5)
    opt = opts("Pool2DOptions", padding=padding, strideW=stride, strideH=stride, filterWidth=k, filterHeight=k,
                fusedActivationFunction=act)
    return L.model(op, [x], [y], [x], opt)


def add(seed, shape, act, b_shape=None, opcode="ADD"):
    """ADD (or SUB) of two int8 tensors; b_shape: the second one broadcast."""
    L = Layer(seed)
    a = L.activation("a", shape, 0.07, 3)
    b = L.activation("b", b_shape or shape, 0.031, -9)
    y = L.activation("y", shape, 0.09, -2)
    options = "AddOptions" if opcode == "ADD" else "SubOptions"
    return L.model(opcode, [a, b], [y], [a, b], opts(options, fusedActivationFunction=act))


def softmax(seed, shape, in_scale, beta=1.0):
    L = Layer(seed)
    x = L.activation("x", shape, in_scale, 10)
    y = L.activation("y", shape, 1.0 / 256, -128)
    return L.model("SOFTMAX", [x], [y], [x], opts("SoftmaxOptions", beta=beta))


def reshape(seed, in_shape, out_shape):
    L = Layer(seed)
    x = L.activation("x", in_shape, 0.1, 1)
    y = L.activation("y", out_shape, 0.1, 1)
    return L.model("RESHAPE", [x], [y], [x], opts("ReshapeOptions", newShape=list(out_shape)))


def cast(seed, shape, in_type, out_type):
    """CAST from a quantized tensor: raw values converted, the quantization ignored."""
    L = Layer(seed)
    x = L.tensor("x", shape, in_type, 0.1, 3)
    y = L.tensor("y", shape, out_type)
    return L.model("CAST", [x], [y], [x])


def unsupported_operator_model() -> bytes:
    """A valid float model whose one operator (DYNAMIC_UPDATE_SLICE) TVM's TFLite frontend cannot import."""
    L = Layer(0)
    operand, update = L.tensor("operand", [4], F32), L.tensor("update", [2], F32)
    start = L.tensor("start", [1], I32, data=np.array([1], dtype=np.int32))
    out = L.tensor("out", [4], F32)
    return L.model("DYNAMIC_UPDATE_SLICE", [operand, update, start], [out], [operand, update])
