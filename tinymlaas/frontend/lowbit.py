"""Weights below eight bits: an integer model's layer weights re-quantized to int4 (a TFLite model rewrite).

A layer chosen for int4 gets weights of 4-bit values, per output channel symmetric (values -7..7 times a new scale
per channel: the channel's largest magnitude / 7), from the values the int8 weights stand for (q * scale). The
rewritten model is still a TFLite model: int8 weight tensors that hold 4-bit values, their new scales, and biases
re-quantized to input scale x new weight scale. So the TFLite interpreter runs exactly the arithmetic the firmware
runs (the verification's reference is that model, bit-exact), and the firmware keeps those weights two to a byte in
flash (ir/weight_storage.py, form "int4"). What re-quantizing costs in accuracy is the user's data's to say.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# operators whose weights (input 1) may go below eight bits, and the weights' output-channel axis
WEIGHT_AXIS = {"CONV_2D": 0, "DEPTHWISE_CONV_2D": 3, "FULLY_CONNECTED": 0}
INT4_MAX = 7  # symmetric: -7..7 (TFLite's int4 and CMSIS-NN's s4 kernels take the same range)
MIN_WEIGHTS = 64  # a smaller tensor saves less flash than its decoding costs in code


@dataclass(frozen=True)
class LayerWeights:
    """One layer's weights as the rewrite left them: the operator, its precision and the flash its weights need."""

    op: int
    opcode: str
    precision: str  # int8 | int4
    elements: int

    @property
    def nbytes(self) -> int:
        return self.elements if self.precision == "int8" else (self.elements + 1) // 2

    def to_dict(self) -> dict:
        return {"op": self.op, "opcode": self.opcode, "precision": self.precision, "bytes": self.nbytes}


def eligible_layers(graph) -> list[int]:
    """Operators whose constant int8 weights can go to int4: convolutions, depthwise convolutions and fully
    connected layers of int8 activations, symmetric weights of at least MIN_WEIGHTS values, used by that layer only."""
    readers: dict[int, int] = {}
    for op in graph.operators:
        for i in op.inputs:
            if i >= 0:
                readers[i] = readers.get(i, 0) + 1
    out = []
    for op in graph.operators:
        if op.opcode not in WEIGHT_AXIS or len(op.inputs) < 2:
            continue
        x, w = graph.tensor(op.inputs[0]), graph.tensor(op.inputs[1])
        if (x.dtype == "int8" and w.dtype == "int8" and w.is_const and w.quant is not None
                and not any(w.quant.zero_point) and w.size >= MIN_WEIGHTS and readers[w.index] == 1
                and (len(op.inputs) < 3 or op.inputs[2] < 0 or readers[op.inputs[2]] == 1)):
            out.append(op.index)
    return out


def requantize_int4(q: np.ndarray, scale: np.ndarray, axis: int, per_channel: bool = True
                    ) -> tuple[np.ndarray, np.ndarray]:
    """int8 weights `q` with `scale` per index of `axis` (or one) -> (4-bit values as int8, their scale: one per
    channel, or one for the tensor). A channel of zeros keeps its scale (its values stay 0)."""
    channels = q.shape[axis]
    shape = [1] * q.ndim
    shape[axis] = channels
    s8 = np.broadcast_to(np.asarray(scale, np.float64).reshape(-1), (channels,))
    real = q.astype(np.float64) * s8.reshape(shape)
    peak = np.abs(np.moveaxis(real, axis, 0).reshape(channels, -1)).max(axis=1)
    if not per_channel:
        peak, s8 = np.array([peak.max()]), s8[:1]
    s4 = np.where(peak > 0, peak / INT4_MAX, s8).astype(np.float32)  # stored as float32: divide by what is stored
    q4 = np.rint(real / np.broadcast_to(s4.astype(np.float64), (channels,)).reshape(shape))
    return np.clip(q4, -INT4_MAX, INT4_MAX).astype(np.int8), s4


def with_int4_weights(data: bytes, layers: list[int]) -> bytes:
    """The TFLite flatbuffer `data` with the weights of operators `layers` (eligible_layers) re-quantized to int4."""
    import flatbuffers
    from ai_edge_litert import schema_py_generated as schema

    if not layers:
        return data
    m = schema.ModelT.InitFromObj(schema.Model.GetRootAsModel(data, 0))  # read (and checked) as a graph before
    sg = m.subgraphs[0]
    codes = {v: k for k, v in schema.BuiltinOperator.__dict__.items() if not k.startswith("_")}
    for index in layers:
        op = sg.operators[index]
        code = m.operatorCodes[op.opcodeIndex]
        opcode = codes[max(code.builtinCode, code.deprecatedBuiltinCode)]
        axis = WEIGHT_AXIS[opcode]
        x, w = sg.tensors[op.inputs[0]], sg.tensors[op.inputs[1]]
        buf = m.buffers[w.buffer]
        q = np.frombuffer(bytes(bytearray(buf.data)), np.int8).reshape(w.shape)
        s8 = np.asarray(w.quantization.scale, np.float64)
        per_tensor = s8.size == 1 and opcode == "FULLY_CONNECTED"  # a per-tensor FC stays so (as the model has it)
        q4, s4 = requantize_int4(q, s8, axis, per_channel=not per_tensor)
        buf.data = np.frombuffer(q4.tobytes(), np.uint8)
        w.quantization.scale = [float(v) for v in s4]
        w.quantization.zeroPoint = [0] * s4.size
        w.quantization.quantizedDimension = axis if not per_tensor else 0
        if len(op.inputs) > 2 and op.inputs[2] >= 0:  # the bias: input scale x weight scale
            b = sg.tensors[op.inputs[2]]
            bias = np.frombuffer(bytes(bytearray(m.buffers[b.buffer].data)), np.int32).astype(np.float64)
            x_scale = float(x.quantization.scale[0])
            new = (x_scale * s4.astype(np.float64)).astype(np.float32)  # one per weight scale, as TFLite checks
            ratio = np.broadcast_to(s8, bias.shape) / np.broadcast_to(s4.astype(np.float64), bias.shape)
            b32 = np.clip(np.rint(bias * ratio), -(2**31), 2**31 - 1).astype(np.int32)
            m.buffers[b.buffer].data = np.frombuffer(b32.tobytes(), np.uint8)
            b.quantization.scale = [float(v) for v in new]
            b.quantization.zeroPoint = [0] * new.size
    builder = flatbuffers.Builder(len(data) + 1024)
    builder.Finish(m.Pack(builder), file_identifier=b"TFL3")
    return bytes(builder.Output())


def weight_layers(graph) -> list[LayerWeights]:
    """Every layer with constant weights (WEIGHT_AXIS's operators) and its weights as the graph holds them: int8,
    or int4 where all are 4-bit values of a rewritten layer."""
    out = []
    for op in graph.operators:
        if op.opcode in WEIGHT_AXIS and len(op.inputs) > 1 and graph.tensor(op.inputs[1]).is_const:
            w = graph.tensor(op.inputs[1])
            if w.dtype == "int8":
                out.append(LayerWeights(op.index, op.opcode, "int8", int(w.size)))
    return out


def low_bit_weights(model, weights: str):
    """(model, its layers' weights) for a build's `weights` option (BuildRequest.weights): int4 rewrites every
    eligible layer of an integer model; other values leave the model as it is (and report nothing)."""
    from dataclasses import replace

    from tinymlaas.build.request import InvalidRequest
    from tinymlaas.frontend.tflite import read_graph

    if weights != "int4":
        return model, []
    if not model.quantized:
        raise InvalidRequest("weights", "int4 re-quantizes an integer model's int8 weights: this model is float "
                             "(quantize it first: an int8 .tflite, or --quantize int8 with --calibration)")
    layers = eligible_layers(model.graph)
    if not layers:
        raise InvalidRequest("weights", f"int4: {model.name} has no convolution or fully connected layer with "
                             f"int8 weights of {MIN_WEIGHTS} values or more")
    data = with_int4_weights(model.data, layers)
    graph = read_graph(data, model.name)
    kept = [replace(w, precision="int4") if w.op in set(layers) else w for w in weight_layers(graph)]
    before = sum(w.elements for w in kept)
    after = sum(w.nbytes for w in kept)
    note = (f"weights re-quantized to int4 (per channel, symmetric -7..7) in {len(layers)} of {len(kept)} layers: "
            f"{after:,} B of weights instead of {before:,} B; verified against the interpreter on that int4 model "
            "(what it costs in accuracy is measured on your data)")
    return replace(model, data=data, graph=graph, notes=[*model.notes, note]), kept
