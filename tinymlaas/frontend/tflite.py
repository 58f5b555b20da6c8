"""Parse stage: a TFLite flatbuffer -> a checked `Graph` (and the model file's description for verification).

The flatbuffer is read once with the TFLite schema's object API; every index, shape and constant buffer is
checked here, so later stages can trust the graph. A corrupt file raises InvalidModel, never anything else.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType

import numpy as np

from tinymlaas.errors import InvalidModel
from tinymlaas.frontend.graph import Graph, Operator, Quantization, Tensor

# TFLite TensorType -> numpy dtype name
DTYPES = {0: "float32", 1: "float16", 2: "int32", 3: "uint8", 4: "int64", 6: "bool", 7: "int16", 9: "int8",
          10: "float64", 13: "uint32", 16: "uint16"}
MAX_ELEMENTS = 1 << 28  # one tensor: far beyond any microcontroller, small enough to refuse absurd shapes early


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    dtype: str
    scale: float = 0.0
    zero_point: int = 0

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape)) * np.dtype(self.dtype).itemsize


@dataclass
class TFLiteModel:
    name: str
    path: Path
    data: bytes  # what is compiled and verified against (hybrid weights already dequantized)
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    operators: list[str]  # one entry per operator, in graph order
    quantized: bool  # integer activations (int8, or int16 with int8 weights) anywhere in the graph
    original_data: bytes = field(repr=False, default=b"")
    notes: list[str] = field(default_factory=list)
    graph: Graph | None = field(repr=False, default=None)
    # a model converted from another format (an ONNX or PyTorch model): that model, whose own reference checks the
    # conversion, and per output the quantization scale its value was dequantized from (None: a float output)
    converted_from: object | None = field(repr=False, default=None)
    source_output_scales: tuple = ()

    @property
    def hybrid(self) -> bool:
        return self.data != self.original_data


def short_input_name(name: str) -> str:
    """A model input's name as the user named it: a converted Keras model's TFLite input serving_default_<name>:0
    is <name>."""
    return name.split(":")[0].removeprefix("serving_default_")


def array_for_input(keys, name: str) -> str | None:
    """Which of a user's named arrays (sample inputs, calibration data) feeds the input `name`: the one named
    exactly so, or after the input as the user named it (short_input_name); None if neither."""
    return name if name in keys else short_input_name(name) if short_input_name(name) in keys else None


def _schema():
    from ai_edge_litert import schema_py_generated as schema

    return schema


def _enum_names(enum) -> dict[int, str]:
    return {v: k for k, v in enum.__dict__.items() if not k.startswith("_")}


def _options(obj) -> MappingProxyType:
    if obj is None:
        return MappingProxyType({})
    values = {}
    for key, value in vars(obj).items():
        if isinstance(value, np.ndarray):
            value = tuple(value.tolist())
        elif isinstance(value, list):
            value = tuple(value)
        values[key] = value
    return MappingProxyType(values)


def _custom_options(raw) -> dict:
    """A custom operator's flexbuffer map (TFLite_Detection_PostProcess keeps its parameters there); {} if none or
    unreadable (its converter then names what is missing)."""
    from flatbuffers import flexbuffers

    if raw is None or not len(raw):
        return {}
    try:
        value = flexbuffers.Loads(np.asarray(raw, dtype=np.uint8).tobytes())
    except Exception:  # noqa: BLE001 -- fuzzed bytes: the flexbuffer reader may raise anything
        return {}
    return {str(k): v for k, v in value.items()} if isinstance(value, dict) else {}


def _unpack(data: bytes, label: str):
    schema = _schema()
    if len(data) < 8 or data[4:8] != b"TFL3":
        raise InvalidModel(f"{label}: not a TFLite flatbuffer (no 'TFL3' identifier)")
    try:
        model = schema.ModelT.InitFromObj(schema.Model.GetRootAsModel(data, 0))
    except Exception as e:  # a corrupt flatbuffer raises anything from IndexError to struct.error
        raise InvalidModel(f"{label}: corrupt TFLite flatbuffer ({type(e).__name__} while reading it)") from e
    if not model.subgraphs:
        raise InvalidModel(f"{label}: TFLite model has no subgraph")
    return model


def _quantization(q, label: str, tname: str) -> Quantization | None:
    if q is None or q.scale is None or len(q.scale) == 0:
        return None
    scale = tuple(float(s) for s in q.scale)
    zps = tuple(int(z) for z in q.zeroPoint) if q.zeroPoint is not None and len(q.zeroPoint) else (0,) * len(scale)
    if len(zps) != len(scale) or not all(np.isfinite(scale)) or any(v < 0 for v in scale):
        raise InvalidModel(f"{label}: tensor '{tname}' has inconsistent quantization parameters")
    return Quantization(scale, zps, int(q.quantizedDimension or 0))


_ZERO_POINT_RANGE = {"int8": (-128, 127), "uint8": (0, 255), "int16": (-32768, 32767)}


def _check_quantization(t: Tensor, label: str) -> None:
    if t.quant is None:
        return
    lo, hi = _ZERO_POINT_RANGE.get(t.dtype, (-(2**31), 2**31 - 1))
    if any(not lo <= z <= hi for z in t.quant.zero_point):
        raise InvalidModel(f"{label}: tensor '{t.name}' has a zero point outside the range of {t.dtype}")
    if t.quant.per_channel and (not 0 <= t.quant.axis < max(len(t.shape), 1)
                                or t.shape and len(t.quant.scale) != t.shape[t.quant.axis]):
        raise InvalidModel(f"{label}: tensor '{t.name}' has {len(t.quant.scale)} scales for axis {t.quant.axis} "
                           f"of shape {shape_text(t.shape)}")


def printable(text: str, limit: int = 80) -> str:
    """A name from the file as it may appear in a one-line message: control characters escaped, length bounded."""
    text = "".join(c if c.isprintable() else f"\\x{ord(c):02x}" for c in text)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def shape_text(shape) -> str:
    dims = [str(d) for d in shape]
    return "[" + ", ".join(dims if len(dims) <= 8 else dims[:8] + [f"... {len(dims)} dims"]) + "]"


def _tensor(model, t, index: int, label: str) -> Tensor:
    raw = t.name.decode("utf-8", "replace") if isinstance(t.name, bytes) else str(t.name or "")
    name = printable(raw) or f"tensor{index}"
    dtype = DTYPES.get(t.type)
    if dtype is None:
        raise InvalidModel(f"{label}: tensor '{name}' has an unsupported TFLite type {t.type}")
    shape = tuple(int(s) for s in (t.shape if t.shape is not None else ()))
    if any(s < 0 for s in shape):
        raise InvalidModel(f"{label}: tensor '{name}' has a negative dimension in shape {shape_text(shape)}")
    if np.prod(shape, dtype=np.float64) > MAX_ELEMENTS:
        raise InvalidModel(f"{label}: tensor '{name}' of shape {shape_text(shape)} is too large")
    data = None
    if not 0 <= t.buffer < len(model.buffers):
        raise InvalidModel(f"{label}: tensor '{name}' refers to buffer {t.buffer} of {len(model.buffers)}")
    buf = model.buffers[t.buffer]
    raw = buf.data
    if raw is not None and len(raw):
        raw = np.asarray(raw, dtype=np.uint8).tobytes()
        want = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        if len(raw) != want:
            raise InvalidModel(f"{label}: constant tensor '{name}' holds {len(raw)} bytes, its shape "
                               f"{shape_text(shape)} of {dtype} needs {want}")
        data = np.frombuffer(raw, dtype=dtype).reshape(shape)
    elif getattr(buf, "offset", 0) and buf.offset > 1:
        raise InvalidModel(f"{label}: tensor '{name}' keeps its data outside the flatbuffer (models over 2 GB)")
    return Tensor(index, name, shape, dtype, _quantization(t.quantization, label, name), data,
                  variable=bool(getattr(t, "isVariable", False)))


def read_graph(data: bytes, label: str = "model") -> Graph:
    """The first subgraph of a TFLite flatbuffer as a checked Graph."""
    schema = _schema()
    model = _unpack(data, label)
    sg = model.subgraphs[0]
    builtin_names = _enum_names(schema.BuiltinOperator)
    codes = model.operatorCodes or []
    tensors_fb = sg.tensors or []
    try:
        tensors = tuple(_tensor(model, t, i, label) for i, t in enumerate(tensors_fb))
    except InvalidModel:
        raise
    except Exception as e:
        raise InvalidModel(f"{label}: corrupt tensor table ({type(e).__name__})") from e

    for t in tensors:
        _check_quantization(t, label)

    def check_index(i: int, what: str, optional: bool = False) -> int:
        i = int(i)
        if optional and i == -1:
            return -1
        if not 0 <= i < len(tensors):
            raise InvalidModel(f"{label}: {what} refers to tensor {i}, but the model has {len(tensors)}")
        return i

    operators = []
    for n, op in enumerate(sg.operators or []):
        if not 0 <= op.opcodeIndex < len(codes):
            raise InvalidModel(f"{label}: operator #{n} has opcode index {op.opcodeIndex} of {len(codes)}")
        code = codes[op.opcodeIndex]
        builtin = max(int(code.builtinCode), int(code.deprecatedBuiltinCode))
        if builtin == schema.BuiltinOperator.CUSTOM:
            custom = printable(code.customCode.decode("utf-8", "replace"), 40) if isinstance(code.customCode, bytes) else "?"
            opcode = f"CUSTOM:{custom}"
        else:
            opcode = builtin_names.get(builtin, f"BUILTIN_{builtin}")
        ins = tuple(check_index(i, f"operator #{n} ({opcode})", optional=True) for i in (op.inputs if op.inputs is not None else ()))
        outs = tuple(check_index(i, f"operator #{n} ({opcode})") for i in (op.outputs if op.outputs is not None else ()))
        if not outs:
            raise InvalidModel(f"{label}: operator #{n} ({opcode}) has no output")
        opts = dict(_options(op.builtinOptions))
        opts.update(_options(getattr(op, "builtinOptions2", None)))
        if builtin == schema.BuiltinOperator.CUSTOM:
            opts.update(_custom_options(op.customOptions))
        mids = tuple(check_index(i, f"operator #{n} ({opcode})") for i in (op.intermediates if op.intermediates is not None else ()))
        operators.append(Operator(n, opcode, ins, outs, MappingProxyType(opts), int(op.builtinOptionsType or 0),
                                  int(code.version or 1), mids))
    inputs = tuple(check_index(i, "the graph's input") for i in (sg.inputs if sg.inputs is not None else ()))
    outputs = tuple(check_index(i, "the graph's output") for i in (sg.outputs if sg.outputs is not None else ()))
    if not inputs or not outputs:
        raise InvalidModel(f"{label}: the graph has no {'inputs' if not inputs else 'outputs'}")
    produced = set(inputs) | {t.index for t in tensors if t.is_const or t.variable}
    for op in operators:
        for i in op.inputs:
            if i >= 0 and i not in produced:
                raise InvalidModel(f"{label}: operator #{op.index} ({op.opcode}) reads tensor "
                                   f"'{tensors[i].name}' before anything writes it")
        produced.update(op.outputs)
    for i in outputs:
        if i not in produced:
            raise InvalidModel(f"{label}: graph output '{tensors[i].name}' is never written")
    for i in inputs:
        if tensors[i].is_const:
            raise InvalidModel(f"{label}: graph input '{tensors[i].name}' is a constant")
    return Graph(label, tensors, tuple(operators), inputs, outputs, source=data)


def _spec(t: Tensor) -> TensorSpec:
    return TensorSpec(t.name, t.shape, t.dtype, t.scale, t.zero_point)


def model_tree(data: bytes):
    """The flatbuffer's object tree (the TFLite schema's ModelT), to edit; model_bytes writes it back."""
    schema = _schema()
    return schema.ModelT.InitFromObj(schema.Model.GetRootAsModel(data, 0))


def model_bytes(tree, size_hint: int) -> bytes:
    """A ModelT (model_tree's, edited) as a TFLite flatbuffer."""
    import flatbuffers

    builder = flatbuffers.Builder(size_hint)
    builder.Finish(tree.Pack(builder), file_identifier=b"TFL3")
    return bytes(builder.Output())


def _dequantize_hybrid_weights(data: bytes) -> tuple[bytes, int]:
    """Rewrite constant int8 weights that float ops consume (dynamic-range quantization) as float32.

    The rewritten model computes what the float network with those (already rounded) weights computes;
    the verification reference runs the same file.
    """
    schema = _schema()
    m = model_tree(data)
    rewritten = 0
    for sg in m.subgraphs:
        float_consumers = set()
        for op in sg.operators:
            if m.operatorCodes[op.opcodeIndex].builtinCode == schema.BuiltinOperator.DEQUANTIZE:
                continue  # an explicit DEQUANTIZE of a constant is an operator of its own
            ins = [i for i in (op.inputs if op.inputs is not None else []) if i >= 0]
            if any(sg.tensors[i].type == schema.TensorType.FLOAT32 for i in ins):
                float_consumers.update(ins)
        for i in sorted(float_consumers):
            t = sg.tensors[i]
            buf = m.buffers[t.buffer]
            if t.type != schema.TensorType.INT8 or buf.data is None or len(buf.data) == 0 or t.quantization is None:
                continue
            q = np.frombuffer(bytes(bytearray(buf.data)), dtype=np.int8).astype(np.float64)
            q = q.reshape(t.shape)
            scale = np.asarray(t.quantization.scale, dtype=np.float64)
            zp = np.asarray(t.quantization.zeroPoint if t.quantization.zeroPoint is not None else [0], dtype=np.float64)
            if scale.size > 1:
                bshape = [1] * q.ndim
                bshape[t.quantization.quantizedDimension] = scale.size
                scale, zp = scale.reshape(bshape), zp.reshape(bshape) if zp.size > 1 else zp
            w = ((q - zp) * scale).astype(np.float32)
            buf.data = np.frombuffer(w.tobytes(), dtype=np.uint8)
            t.type = schema.TensorType.FLOAT32
            t.quantization = None
            rewritten += 1
    if not rewritten:
        return data, 0
    return model_bytes(m, len(data) * 4), rewritten


def load_model_bytes(original: bytes, label: str, path: Path | None = None) -> TFLiteModel:
    graph = read_graph(original, label)
    data, notes = original, []
    ins = [graph.tensor(i) for i in graph.inputs]
    outs = [graph.tensor(i) for i in graph.outputs]
    if all(t.dtype == "float32" for t in ins) and any(
        t.dtype == "int8" and t.is_const and t.quant for t in graph.tensors
    ):
        try:
            data, rewritten = _dequantize_hybrid_weights(original)
        except Exception as e:
            raise InvalidModel(f"{label}: corrupt TFLite flatbuffer ({type(e).__name__} while rewriting it)") from e
        if rewritten:
            graph = read_graph(data, label)
            notes.append(
                f"dynamic-range (hybrid) quantized model: {rewritten} int8 weight tensors used at their exact "
                "dequantized values by float operators (not TFLite's hybrid kernels, which quantize activations on "
                "the fly); verified against the interpreter on that float model"
            )
    # integer activations anywhere (a full-integer model may keep a float interface: QUANTIZE/DEQUANTIZE at the edges)
    quantized = any(t.dtype in ("int8", "uint8", "int16") and t.quant is not None and not t.is_const
                    for t in graph.tensors)
    name = (path.stem if path else label.rsplit(".", 1)[0]) or "model"
    return TFLiteModel(name, path or Path(label), data, [_spec(t) for t in ins], [_spec(t) for t in outs],
                       [op.opcode for op in graph.operators], quantized, original, notes, graph)


def load_tflite(path: str | Path) -> TFLiteModel:
    path = Path(path)
    if not path.is_file():
        raise InvalidModel(f"{path}: no such model file")
    return load_model_bytes(path.read_bytes(), path.name, path)


def import_relax_tvm(model: TFLiteModel):
    """TVM's own TFLite frontend: only for `--int8-lowering float` (int8 through dequantize/float/quantize)."""
    import re

    import tflite
    import tvm
    from tvm.relax.frontend.tflite import from_tflite

    from tinymlaas.errors import UnsupportedOperator

    try:
        return from_tflite(tflite.Model.GetRootAsModel(model.data, 0))
    except tvm.error.OpNotImplemented as e:
        msg = str(e).splitlines()[0]
        found = re.findall(r"'([A-Za-z0-9_]+)'", msg)
        raise UnsupportedOperator(found or [msg], model.path.name) from e
    except Exception as e:
        raise InvalidModel(f"{model.path.name}: TVM could not import the model: {str(e).splitlines()[-1][:200]}") from e
