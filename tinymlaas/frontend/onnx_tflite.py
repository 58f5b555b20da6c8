"""ONNX -> a TFLite flatbuffer, so that ONNX (and PyTorch, through ONNX) models take the microcontroller path.

Why a flatbuffer and not a graph of our own: the microcontroller path compiles TFLite's operator semantics and
verifies every build bit for bit against the TFLite interpreter. Writing the ONNX model as TFLite operators keeps that
one path and that one oracle; the conversion itself is then checked against the model's own reference (ONNX Runtime,
or PyTorch) on the same inputs (`source_fidelity`).

Two things change on the way:
- Layout. ONNX is channels-first (NCHW, NCL), TFLite's convolutions channels-last. Each value is kept in whichever
  layout its producer writes; a consumer that needs the other gets a TRANSPOSE (the model's own inputs and outputs
  keep the user's layout, so the firmware takes the arrays ONNX Runtime takes).
- Quantization. A QDQ model (onnxruntime.quantization, PyTorch's PT2E) spells an int8 layer as
  DequantizeLinear -> float op -> QuantizeLinear. Where every input of an operator comes through DequantizeLinear
  and every consumer of its output is one QuantizeLinear, the operator becomes TFLite's integer operator with those
  scales and zero points (uint8 activations become int8 ones, zero point - 128: the same arithmetic). Anything
  else runs in float between an explicit DEQUANTIZE and QUANTIZE, as ONNX Runtime runs it.

The operators themselves are in `onnx_ops.py`, one converter each.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from tinymlaas.errors import InvalidModel, UnsupportedOperator
from tinymlaas.frontend import onnx_more, onnx_recurrent  # noqa: F401 - register their converters
from tinymlaas.frontend.onnx_ops import CONVERTERS, INTEGER, TO_FIRST, TO_LAST, Decline, QParams

TFLITE_TYPES = {"float32": 0, "int32": 2, "uint8": 3, "int64": 4, "bool": 6, "int16": 7, "int8": 9}


@dataclass(frozen=True)
class QConst:
    """A constant behind a DequantizeLinear: its integers, scales, zero points and axis (ONNX's)."""
    q: np.ndarray
    scale: np.ndarray
    zero_point: np.ndarray
    axis: int

    @property
    def per_channel(self) -> bool:
        return self.scale.size > 1

    def along_axis(self, values: np.ndarray) -> np.ndarray:
        """Per-axis values (scales, zero points) shaped to broadcast against `q`; one value as it is."""
        if values.size == 1 or self.q.ndim == 0:
            return values.reshape(())
        shape = [1] * self.q.ndim
        shape[self.axis] = values.size
        return values.reshape(shape)

    def centered(self) -> np.ndarray:
        """q minus its zero point (int64)."""
        return self.q.astype(np.int64) - self.along_axis(self.zero_point)

    def dequantized(self) -> np.ndarray:
        return (self.centered() * self.along_axis(self.scale)).astype(np.float32)


@dataclass(frozen=True)
class Converted:
    data: bytes  # the TFLite flatbuffer
    notes: tuple[str, ...]
    output_scales: tuple[float | None, ...]  # per output: the scale of the quantization it was dequantized from


class Converter:
    """One ONNX graph -> TFLite tensors and operators. Operator converters (onnx_ops.CONVERTERS) call its methods."""

    def __init__(self, proto, label: str):
        from ai_edge_litert import schema_py_generated as schema

        self.schema, self.label = schema, label
        self.shapes, self.dtypes, self.consts = _probe(proto, label)
        self.graph = fuse_gelu(proto.graph, self.consts)
        self.tensors: list = []
        self.buffers: list = [schema.BufferT()]
        self.operators: list = []
        self.codes: dict[int, int] = {}
        self.values: dict[tuple[str, bool], int] = {}  # (ONNX value, channels-last) -> tensor index
        self.qalias: dict[str, str] = {}  # DequantizeLinear output -> the quantized value it reads
        self.qconsts: dict[str, QConst] = {}  # DequantizeLinear output of a constant -> that constant
        self.qparams: dict[str, QParams] = {}  # quantized activation value -> its quantization
        self.fused: dict[str, object] = {}  # an integer operator's output -> the Relu/Clip node fused into it
        self.consumers: dict[str, list] = {}
        for node in self.graph.node:
            for name in node.input:
                self.consumers.setdefault(name, []).append(node)
        self.graph_outputs = [v.name for v in self.graph.output]
        self.notes: list[str] = []
        self.float_biases: list[str] = []  # integer layers whose bias came in float (PT2E leaves them so)
        self.mode = "float"  # of the operator being converted: "float" or "int8"
        self.node = None

    # --- shapes and constants ------------------------------------------------------------------------------------

    def shape(self, name: str) -> tuple[int, ...]:
        return self.shapes[name]

    def is_const(self, name: str) -> bool:
        return name in self.consts or name in self.qconsts

    def const(self, name: str) -> np.ndarray:
        """A constant input's value in float (a DequantizeLinear'd constant dequantized)."""
        if name in self.qconsts:
            return self.qconsts[name].dequantized()
        return self.consts[name]

    def attr(self, node, name: str, default=None):
        import onnx

        for a in node.attribute:
            if a.name == name:
                return onnx.helper.get_attribute_value(a)
        return default

    # --- tensors and operators -----------------------------------------------------------------------------------

    def add_tensor(self, name: str, shape, dtype: str, quant: QParams | None = None, data: np.ndarray | None = None,
                   scales=None, zero_points=None, axis: int = 0) -> int:
        t = self.schema.TensorT()
        t.name = name.encode()
        t.shape = [int(s) for s in shape]
        t.type = TFLITE_TYPES[dtype]
        if quant is not None:
            scales, zero_points = [quant.scale], [quant.zero_point]
        if scales is not None:
            q = self.schema.QuantizationParametersT()
            q.scale = [float(s) for s in scales]
            q.zeroPoint = [int(z) for z in zero_points]
            q.quantizedDimension = axis
            t.quantization = q
        t.buffer = 0
        if data is not None:
            b = self.schema.BufferT()
            b.data = np.frombuffer(np.ascontiguousarray(data, dtype=dtype).tobytes(), dtype=np.uint8)
            self.buffers.append(b)
            t.buffer = len(self.buffers) - 1
        self.tensors.append(t)
        return len(self.tensors) - 1

    def constant(self, value: np.ndarray, name: str, quant: QParams | None = None, **q) -> int:
        value = np.asarray(value)
        return self.add_tensor(name, value.shape, str(value.dtype), quant, value, **q)

    def op(self, opcode: str, inputs, outputs, options=None, options_name: str | None = None) -> None:
        code = getattr(self.schema.BuiltinOperator, opcode)
        if code not in self.codes:
            self.codes[code] = len(self.codes)
        o = self.schema.OperatorT()
        o.opcodeIndex = self.codes[code]
        o.inputs, o.outputs = [int(i) for i in inputs], [int(i) for i in outputs]
        if options is not None:
            o.builtinOptionsType = getattr(self.schema.BuiltinOptions, options_name or type(options).__name__[:-1])
            o.builtinOptions = options
        self.operators.append(o)

    def options(self, kind: str, **fields):
        obj = getattr(self.schema, kind + "T")()
        for key, value in fields.items():
            setattr(obj, key, value)
        return obj

    def tensor_quant(self, index: int) -> QParams | None:
        t = self.tensors[index]
        if t.quantization is None or not t.quantization.scale:
            return None
        dtype = {v: k for k, v in TFLITE_TYPES.items()}[t.type]
        return QParams(float(t.quantization.scale[0]), int(t.quantization.zeroPoint[0]), dtype)

    def tensor_shape(self, index: int) -> tuple[int, ...]:
        return tuple(self.tensors[index].shape)

    # --- values in a layout --------------------------------------------------------------------------------------

    def layouts(self, name: str) -> list[bool]:
        """The layouts `name` is available in now (True: channels-last)."""
        name = self.qalias.get(name, name) if self.mode == "int8" else name
        return [cl for cl in (True, False) if (name, cl) in self.values]

    def value(self, name: str, channels_last: bool | None = None) -> int:
        """The tensor holding ONNX value `name` in this operator's arithmetic (int8: the quantized value behind a
        DequantizeLinear; float: a float tensor, dequantized once where needed), in the layout asked for (None:
        whichever exists)."""
        if self.mode == "int8":
            name = self.qalias.get(name, name)
        elif name in self.qalias:
            name = self._dequantized(name)
        have = [cl for cl in (True, False) if (name, cl) in self.values]
        if not have:
            raise InvalidModel(f"{self.label}: value '{name}' is read before anything writes it")
        if channels_last is None or channels_last in have:
            return self.values[(name, have[0] if channels_last is None else channels_last)]
        rank = len(self.shape(name))
        if rank not in TO_LAST:
            return self.values[(name, have[0])]
        src = self.values[(name, have[0])]
        perm = TO_LAST[rank] if channels_last else TO_FIRST[rank]
        shape = [self.tensor_shape(src)[p] for p in perm]
        out = self.add_tensor(f"{name}/{'nhwc' if channels_last else 'nchw'}", shape, self.dtype_of(src),
                              self.tensor_quant(src))
        self.op("TRANSPOSE", [src, self.constant(np.asarray(perm, np.int32), f"{name}/perm")], [out])
        self.values[(name, channels_last)] = out
        return out

    def channels_last(self, name: str) -> bool:
        return self.layouts(name)[0] if self.layouts(name) else False

    def dtype_of(self, index: int) -> str:
        return {v: k for k, v in TFLITE_TYPES.items()}[self.tensors[index].type]

    def _dequantized(self, name: str) -> str:
        source = self.qalias[name]
        if (name, False) not in self.values and (name, True) not in self.values:
            for cl in (True, False):
                if (source, cl) in self.values:
                    src = self.values[(source, cl)]
                    out = self.add_tensor(name, self.tensor_shape(src), "float32")
                    self.op("DEQUANTIZE", [src], [out])
                    self.values[(name, cl)] = out
                    break
        return name

    def output(self, node, k: int, shape_physical, channels_last: bool, quant: QParams | None = None) -> int:
        """The tensor operator `node` writes its output `k` to: float32, or in int8 mode the quantized value of the
        QuantizeLinear reading it (with `quant` given: a tensor of that quantization, requantized into it after)."""
        name = node.output[k]
        if self.mode == "int8":
            target = self.quantized_output(node, k)
            want = self.qparams[target]
            if quant is not None and not quant.same(want):
                return self.add_tensor(f"{name}/requant", shape_physical, quant.dtype, quant)
            index = self.add_tensor(target, shape_physical, want.dtype, want)
            self.values[(target, channels_last)] = index
            return index
        index = self.add_tensor(name, shape_physical, "float32")
        self.values[(name, channels_last)] = index
        return index

    def finish_output(self, node, k: int, written: int, channels_last: bool) -> None:
        """After `output` gave a tensor of another quantization: requantize it into the output's."""
        if self.mode != "int8":
            return
        target = self.quantized_output(node, k)
        if (target, channels_last) in self.values and self.values[(target, channels_last)] == written:
            return
        want = self.qparams[target]
        index = self.add_tensor(target, self.tensor_shape(written), want.dtype, want)
        self.op("QUANTIZE", [written], [index])
        self.values[(target, channels_last)] = index

    def quantized_output(self, node, k: int) -> str:
        return self.consumers[self._through_activation(node.output[k])][0].output[0]

    def _through_activation(self, name: str) -> str:
        return self.fused[name].output[0] if name in self.fused else name

    def fused_activation(self, node) -> int:
        """TFLite's fusedActivationFunction for the Relu/Clip fused into integer `node` (0: none)."""
        act = self.fused.get(node.output[0])
        return 0 if act is None else _activation_code(self, act)

    def quant_of(self, name: str) -> QParams | None:
        """In int8 mode, the quantization of the activation `name` (behind its DequantizeLinear)."""
        return self.qparams.get(self.qalias.get(name, name))

    def unsupported(self, what: str) -> UnsupportedOperator:
        return UnsupportedOperator([f"{self.node.op_type} ({what})"], self.label)

    # --- the whole graph -----------------------------------------------------------------------------------------

    def convert(self) -> Converted:
        missing = sorted({n.op_type for n in self.graph.node if n.op_type not in CONVERTERS
                          and n.op_type not in ("QuantizeLinear", "DequantizeLinear", "Constant")
                          and not all(o in self.consts for o in n.output)})
        if missing:
            raise UnsupportedOperator(missing, self.label)
        inputs = []
        for v in self.graph.input:
            if v.name in self.consts:
                continue
            dtype = self.dtypes[v.name]
            if dtype not in TFLITE_TYPES:
                raise InvalidModel(f"{self.label}: input '{v.name}' is {dtype}, which the microcontroller targets do "
                                   "not take")
            index = self.add_tensor(v.name, self.shape(v.name), dtype)
            self.values[(v.name, False)] = index
            inputs.append(index)
        quantize_done: set[str] = set()
        fused_done: set[str] = set()  # outputs of Relu/Clip nodes an integer operator took in
        for node in self.graph.node:
            self.node = node
            if all(o in self.consts for o in node.output if o) and node.op_type != "DequantizeLinear":
                continue
            if self._moves_a_quantized_constant(node):
                continue
            if node.op_type == "DequantizeLinear":
                self._dequantize_linear(node)
            elif node.op_type == "QuantizeLinear":
                if node.output[0] not in quantize_done:
                    self._quantize_linear(node)
            else:
                if node.output[0] in fused_done:
                    continue
                integer = node.op_type in INTEGER and self._integer(node)
                try:
                    self.mode = "int8" if integer else "float"
                    (INTEGER if integer else CONVERTERS)[node.op_type](self, node)
                except Decline:  # raised before anything was written
                    integer, self.mode = False, "float"
                    for name in node.output:
                        self.fused.pop(name, None)
                    CONVERTERS[node.op_type](self, node)
                finally:
                    self.mode = "float"
                if integer:
                    fused_done.update(self.fused[o].output[0] for o in node.output if o in self.fused)
                    quantize_done.update(c.output[0] for o in node.output
                                         for c in self.consumers.get(self._through_activation(o), []))
        outputs, scales = [], []
        for name in self.graph_outputs:
            if name in self.consts:
                raise InvalidModel(f"{self.label}: output '{name}' is a constant: nothing to compute")
            index = self.value(name, channels_last=False)
            if index in inputs or index in outputs:  # one tensor cannot be two of the model's ends
                copy = self.add_tensor(name, self.tensor_shape(index), self.dtype_of(index), self.tensor_quant(index))
                self.op("RESHAPE", [index, self.constant(np.asarray(self.tensor_shape(index), np.int32),
                                                         f"{name}/shape")], [copy])
                index = copy
            self.tensors[index].name = name.encode()  # the ONNX output's name, whichever layout step wrote it
            outputs.append(index)
            scales.append(self._output_scale(name))
        if self.float_biases:
            self.notes.append(f"float biases of {len(self.float_biases)} integer layers quantized to int32 at input "
                              "scale x weight scale (what TFLite's integer kernels add)")
        return Converted(self._pack(inputs, outputs), tuple(self.notes), tuple(scales))

    def _output_scale(self, name: str) -> float | None:
        """The scale an output is measured in against the model's own framework: that of the dequantized value it
        is, or is computed from in float by functions of one value that move an output at most `gain` times as far
        as their input moved (softmax, sigmoid, tanh, ReLU, moves of elements: 1; a product with a constant: its
        size), times those gains; None for a float output."""
        producer = {o: n for n in self.graph.node for o in n.output}
        gain = 1.0
        while name not in self.qalias:
            node = producer.get(name)
            step = None if node is None else self._lipschitz(node)
            if step is None:
                return None
            name, factor = step
            gain *= factor
        return self.qparams[self.qalias[name]].scale * gain

    def _lipschitz(self, node) -> tuple[str, float] | None:
        """(the one varying input of `node`, the most its output moves per unit its input moves), or None."""
        if node.op_type in NONEXPANDING:
            return node.input[0], 1.0
        alpha = self.attr(node, "alpha", None)
        if node.op_type in ("Elu", "LeakyRelu"):  # slope 1 on one side, at most alpha on the other
            return node.input[0], max(1.0, abs(float({"Elu": 1.0, "LeakyRelu": 0.01}[node.op_type]
                                                     if alpha is None else alpha)))
        if node.op_type == "HardSigmoid":
            return node.input[0], abs(float(0.2 if alpha is None else alpha))
        if node.op_type == "PRelu" and node.input[1] in self.consts:
            return node.input[0], max(1.0, float(np.max(np.abs(self.consts[node.input[1]]))))
        if node.op_type in ("Mul", "Div") and len(node.input) == 2:
            varying = [i for i in node.input if i not in self.consts]
            const = [i for i in node.input if i in self.consts]
            if len(varying) == 1 and const and np.size(self.consts[const[0]]) >= 1:
                c = float(np.max(np.abs(self.consts[const[0]])))
                if node.op_type == "Div":
                    if const[0] != node.input[1] or not np.all(self.consts[const[0]]):
                        return None
                    c = 1.0 / float(np.min(np.abs(self.consts[const[0]])))
                return varying[0], c
        return None

    def _dequantize_linear(self, node) -> None:
        x = node.input[0]
        if x in self.consts:
            scale = np.asarray(self.consts[node.input[1]], np.float64).ravel()
            zp = (np.asarray(self.consts[node.input[2]]).ravel() if len(node.input) > 2 and node.input[2]
                  else np.zeros(scale.size, np.int64))
            axis = int(self.attr(node, "axis", 1))
            q = self.consts[x]
            self.qconsts[node.output[0]] = QConst(q, scale, zp.astype(np.int64), axis % max(q.ndim, 1))
            return
        if x not in self.qparams:
            raise self.unsupported(f"of '{x}', which no QuantizeLinear wrote")
        self.qalias[node.output[0]] = x

    def _moves_a_quantized_constant(self, node) -> bool:
        """A Transpose or reshape of a DequantizeLinear'd constant (PT2E writes a Linear over tokens as a MatMul by
        its weight transposed): moved here, at build time, and still quantized, so that the operator reading it sees
        quantized weights."""
        if node.op_type not in ("Transpose", "Reshape", "Squeeze", "Unsqueeze", "Flatten", "Identity") \
                or not node.input or node.input[0] not in self.qconsts:
            return False
        qc = self.qconsts[node.input[0]]
        if node.op_type == "Transpose":
            perm = [int(p) for p in self.attr(node, "perm", list(range(qc.q.ndim))[::-1])]
            q, axis = qc.q.transpose(perm), perm.index(qc.axis) if qc.q.ndim else 0
        elif qc.per_channel and node.op_type != "Identity":  # where the channel axis lands is not said
            return False
        else:
            q, axis = qc.q.reshape(self.shape(node.output[0])), qc.axis if node.op_type == "Identity" else 0
        self.qconsts[node.output[0]] = QConst(q, qc.scale, qc.zero_point, axis)
        return True

    def _quantize_linear(self, node) -> None:
        """A float value quantized (its QuantizeLinear not taken by an integer operator): QUANTIZE."""
        scale = np.asarray(self.consts.get(node.input[1]), np.float64).ravel()
        zp = (np.asarray(self.consts[node.input[2]]).ravel() if len(node.input) > 2 and node.input[2]
              else np.zeros(1, np.int64))
        dtype = self.dtypes[node.output[0]]
        if scale.size != 1 or dtype not in ("int8", "uint8"):
            raise self.unsupported("per-axis or non-8-bit quantization of an activation")
        params = to_int8(float(scale[0]), int(zp[0]), dtype)
        self.qparams[node.output[0]] = params
        cl = self.channels_last(node.input[0])
        src = self.value(node.input[0], cl)
        index = self.add_tensor(node.output[0], self.tensor_shape(src), "int8", params)
        self.op("QUANTIZE", [src], [index])
        self.values[(node.output[0], cl)] = index

    def _integer(self, node) -> bool:
        """Whether `node` runs on integers: every input through DequantizeLinear (or a constant), every output read
        by QuantizeLinear nodes of one quantization."""
        for name in node.input:
            if name and name not in self.qalias and name not in self.qconsts and name not in self.consts:
                return False
        if not any(name in self.qalias for name in node.input):
            return False
        for name in node.output:
            readers = self.consumers.get(name, [])
            if (node.op_type in FUSES_ACTIVATION and len(readers) == 1 and name not in self.graph_outputs
                    and readers[0].op_type in ("Relu", "Clip") and _activation_code(self, readers[0])):
                # PyTorch's PT2E writes conv -> relu -> quantize: in integers, relu is the clamp of the output
                self.fused[name] = readers[0]
                name = readers[0].output[0]
                readers = self.consumers.get(name, [])
            if not readers or name in self.graph_outputs or any(r.op_type != "QuantizeLinear" for r in readers):
                self.fused.pop(node.output[0], None)
                return False
            params = set()
            for r in readers:
                scale = np.asarray(self.consts.get(r.input[1], np.nan), np.float64).ravel()
                zp = np.asarray(self.consts[r.input[2]]).ravel() if len(r.input) > 2 and r.input[2] else [0]
                dtype = self.dtypes[r.output[0]]
                if scale.size != 1 or dtype not in ("int8", "uint8"):
                    return False
                params.add(to_int8(float(scale[0]), int(zp[0]), dtype))
            if len(params) != 1:
                return False
            for r in readers:
                self.qparams[r.output[0]] = next(iter(params))
                # every reader's output is the same tensor: later DequantizeLinears of any of them read it
                if r.output[0] != readers[0].output[0]:
                    self.qalias[r.output[0]] = readers[0].output[0]
        return True

    def _pack(self, inputs: list[int], outputs: list[int]) -> bytes:
        import flatbuffers

        s = self.schema
        sg = s.SubGraphT()
        sg.tensors, sg.operators, sg.inputs, sg.outputs = self.tensors, self.operators, inputs, outputs
        sg.name = b"main"
        model = s.ModelT()
        model.version = 3
        model.description = b"converted from ONNX by tinymlaas"
        model.subgraphs, model.buffers = [sg], self.buffers
        codes = []
        for code in sorted(self.codes, key=self.codes.get):
            c = s.OperatorCodeT()
            c.builtinCode, c.deprecatedBuiltinCode, c.version = code, min(code, 127), 1
            codes.append(c)
        model.operatorCodes = codes
        builder = flatbuffers.Builder(1024)
        builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
        return bytes(builder.Output())


FUSES_ACTIVATION = ("Conv", "Gemm", "MatMul", "Add")
# one-input functions whose output moves at most as far as their input (max norm; softmax's Jacobian rows sum to
# 2p(1-p) <= 0.5)
NONEXPANDING = ("Softmax", "Sigmoid", "Tanh", "Relu", "Clip", "Reshape", "Flatten", "Transpose", "Identity",
                "DepthToSpace", "SpaceToDepth", "Softplus", "AveragePool", "GlobalAveragePool", "GlobalMaxPool",
                "Squeeze", "Unsqueeze", "MaxPool", "Dropout")


def _activation_code(cv, node) -> int:
    """TFLite's ActivationFunctionType for a Relu or Clip node: RELU 1, RELU_N1_TO_1 2, RELU6 3; 0 if it is none of
    them."""
    if node.op_type == "Relu":
        return 1
    lo = float(cv.consts[node.input[1]]) if len(node.input) > 1 and node.input[1] in cv.consts else -np.inf
    hi = float(cv.consts[node.input[2]]) if len(node.input) > 2 and node.input[2] in cv.consts else np.inf
    return {(0.0, np.inf): 1, (-1.0, 1.0): 2, (0.0, 6.0): 3}.get((lo, hi), 0)


def to_int8(scale: float, zero_point: int, dtype: str) -> QParams:
    """uint8 quantization as int8: q - 128 with the zero point - 128 is the same real value."""
    return QParams(scale, zero_point - 128 if dtype == "uint8" else zero_point)


def _probe(proto, label: str):
    """Every value's shape and type, and the value of every constant one (initializers, Constant nodes and what
    only constants feed): ONNX Runtime runs the graph once on zeros with every value as an output."""
    import onnx
    import onnxruntime as ort
    from onnx import numpy_helper

    consts = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    for node in proto.graph.node:
        if node.op_type == "Constant":
            consts[node.output[0]] = numpy_helper.to_array(node.attribute[0].t) if node.attribute[0].HasField("t") \
                else np.asarray(onnx.helper.get_attribute_value(node.attribute[0]))
    constant_only = set(consts)
    for node in proto.graph.node:  # a shape is static here: what only shapes and constants feed is a constant too
        if node.op_type in ("Shape", "Size") or node.op_type not in ("Constant", "DequantizeLinear", "QuantizeLinear") \
                and all(not i or i in constant_only for i in node.input):
            constant_only.update(node.output)
    probe = onnx.ModelProto()
    probe.CopyFrom(proto)
    known = {v.name for v in probe.graph.output}
    for node in probe.graph.node:
        for name in node.output:
            if name and name not in known:
                probe.graph.output.append(onnx.ValueInfoProto(name=name))
                known.add(name)
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    opts.log_severity_level = 3
    try:
        session = ort.InferenceSession(probe.SerializeToString(), opts, providers=["CPUExecutionProvider"])
        feeds = {}
        for v in session.get_inputs():
            dtype = _ORT_TYPES.get(v.type)
            if dtype is None or any(not isinstance(d, int) for d in v.shape):
                raise InvalidModel(f"{label}: input '{v.name}' ({v.type}, shape {v.shape}) needs a static shape and a "
                                   "numeric type for a microcontroller build")
            feeds[v.name] = np.zeros(v.shape, dtype)
        names = [o.name for o in session.get_outputs()]
        results = session.run(names, feeds)
    except InvalidModel:
        raise
    except Exception as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise InvalidModel(f"{label}: ONNX Runtime cannot run the model to find its shapes: {first[:200]}") from e
    shapes, dtypes = {}, {}
    for name, value in zip(names, results):
        if isinstance(value, np.ndarray):
            shapes[name], dtypes[name] = tuple(int(s) for s in value.shape), str(value.dtype)
            if name in constant_only and name not in consts:
                consts[name] = value
    for name, value in consts.items():
        shapes.setdefault(name, tuple(value.shape))
        dtypes.setdefault(name, str(value.dtype))
    for v in session.get_inputs():
        shapes[v.name], dtypes[v.name] = tuple(v.shape), str(np.dtype(_ORT_TYPES[v.type]))
    return shapes, dtypes, consts


_ORT_TYPES = {"tensor(float)": np.float32, "tensor(int8)": np.int8, "tensor(uint8)": np.uint8,
              "tensor(int16)": np.int16, "tensor(int32)": np.int32, "tensor(int64)": np.int64,
              "tensor(bool)": np.bool_}


def fuse_gelu(graph, consts: dict):
    """The exact GELU as exporters before ONNX's Gelu (opset 20) spell it, x * 0.5 * (1 + Erf(x / sqrt(2))) in
    either order of its two products, as one Gelu node (TFLite's GELU): TFLite has no Erf. Other nodes as they are."""
    import onnx

    producer = {o: n for n in graph.node for o in n.output}
    readers: dict = {}
    for n in graph.node:
        for i in n.input:
            readers.setdefault(i, []).append(n)

    def const_of(node, value, op_type):
        if node is None or node.op_type != op_type:
            return None
        for k, other in ((0, 1), (1, 0)):
            c = consts.get(node.input[k])
            if c is not None and np.size(c) == 1 and np.isclose(float(np.ravel(c)[0]), value, rtol=1e-4):
                return node.input[other]
        return None

    def only_reader(name):
        r = readers.get(name, [])
        return r[0] if len(r) == 1 else None

    replaced, fused = set(), {}
    for erf in graph.node:
        if erf.op_type != "Erf":
            continue
        scaled = producer.get(erf.input[0])
        x = const_of(scaled, np.sqrt(2), "Div") or const_of(scaled, 1 / np.sqrt(2), "Mul")
        plus = only_reader(erf.output[0])
        if x is None or const_of(plus, 1.0, "Add") != erf.output[0]:
            continue
        first = only_reader(plus.output[0])  # (1 + erf) * x then * 0.5, or * 0.5 then * x
        if first is None or first.op_type != "Mul":
            continue
        other = first.input[1] if first.input[0] == plus.output[0] else first.input[0]
        last = only_reader(first.output[0])
        x_then_half = other == x and const_of(last, 0.5, "Mul") == first.output[0]
        half_then_x = const_of(first, 0.5, "Mul") == plus.output[0] and last is not None \
            and last.op_type == "Mul" and x in last.input
        if not (x_then_half or half_then_x):
            continue
        chain = [scaled, erf, plus, first, last]
        if any(only_reader(n.output[0]) is None for n in chain[:-1]):
            continue
        replaced.update(id(n) for n in chain)
        fused[id(last)] = onnx.helper.make_node("Gelu", [x], [last.output[0]], name=f"{last.output[0]}/gelu")
    if not fused:
        return graph
    out = onnx.GraphProto()
    out.CopyFrom(graph)
    del out.node[:]
    out.node.extend(fused.get(id(n), n) for n in graph.node if id(n) not in replaced or id(n) in fused)
    return out


def onnx_to_tflite(proto, label: str) -> Converted:
    return Converter(proto, label).convert()
