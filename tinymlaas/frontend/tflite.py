"""Import stage: a TFLite flatbuffer -> a checked model description and a TVM Relax module."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from tinymlaas.errors import InvalidModel, UnsupportedOperator

_TFLITE_DTYPES = {0: "float32", 1: "float16", 2: "int32", 3: "uint8", 4: "int64", 7: "int16", 9: "int8", 6: "bool"}


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
    quantized: bool  # full-integer model (int8 activations)
    original_data: bytes = field(repr=False, default=b"")
    notes: list[str] = field(default_factory=list)

    @property
    def hybrid(self) -> bool:
        return self.data != self.original_data


def _op_names() -> dict[int, str]:
    import tflite

    return {v: k for k, v in tflite.BuiltinOperator.__dict__.items() if not k.startswith("_")}


def _parse(data: bytes, label: str):
    import tflite

    if len(data) < 8 or data[4:8] != b"TFL3":
        raise InvalidModel(f"{label}: not a TFLite flatbuffer (no 'TFL3' identifier)")
    try:
        model = tflite.Model.GetRootAsModel(data, 0)
        if model.SubgraphsLength() < 1:
            raise InvalidModel(f"{label}: TFLite model has no subgraph")
        model.Subgraphs(0).OperatorsLength()
    except InvalidModel:
        raise
    except Exception as e:  # a corrupt flatbuffer raises anything from IndexError to struct.error
        raise InvalidModel(f"{label}: corrupt TFLite flatbuffer ({type(e).__name__})") from e
    return model


def _tensor_spec(subgraph, index: int) -> TensorSpec:
    t = subgraph.Tensors(index)
    q = t.Quantization()
    scale = float(q.Scale(0)) if q is not None and q.ScaleLength() == 1 else 0.0
    zp = int(q.ZeroPoint(0)) if q is not None and q.ZeroPointLength() == 1 else 0
    dtype = _TFLITE_DTYPES.get(t.Type())
    if dtype is None:
        raise InvalidModel(f"tensor '{t.Name().decode()}' has an unsupported TFLite type {t.Type()}")
    return TensorSpec(t.Name().decode(), tuple(int(s) for s in t.ShapeAsNumpy()), dtype, scale, zp)


def _dequantize_hybrid_weights(data: bytes) -> tuple[bytes, int]:
    """Rewrite constant int8 weights that float ops consume (dynamic-range quantization) as float32.

    TVM imports only float or full-integer graphs. The rewritten model computes what the float
    network with those (already rounded) weights computes; the verification reference runs the same file.
    """
    import flatbuffers
    from ai_edge_litert import schema_py_generated as schema

    m = schema.ModelT.InitFromObj(schema.Model.GetRootAsModel(data, 0))
    rewritten = 0
    for sg in m.subgraphs:
        float_consumers = set()
        for op in sg.operators:
            ins = [i for i in (op.inputs if op.inputs is not None else []) if i >= 0]
            if any(sg.tensors[i].type == schema.TensorType.FLOAT32 for i in ins):
                float_consumers.update(ins)
        for i in sorted(float_consumers):
            t = sg.tensors[i]
            buf = m.buffers[t.buffer]
            if t.type != schema.TensorType.INT8 or buf.data is None or len(buf.data) == 0:
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
    builder = flatbuffers.Builder(len(data) * 4)
    builder.Finish(m.Pack(builder), file_identifier=b"TFL3")
    return bytes(builder.Output()), rewritten


def load_tflite(path: str | Path) -> TFLiteModel:
    path = Path(path)
    label = path.name
    if not path.is_file():
        raise InvalidModel(f"{path}: no such model file")
    original = path.read_bytes()
    model = _parse(original, label)
    names = _op_names()
    sg = model.Subgraphs(0)
    ops = []
    for i in range(sg.OperatorsLength()):
        code = model.OperatorCodes(sg.Operators(i).OpcodeIndex())
        builtin = max(code.BuiltinCode(), code.DeprecatedBuiltinCode())
        ops.append(code.CustomCode().decode() if builtin == 32 and code.CustomCode() else names.get(builtin, str(builtin)))
    inputs = [_tensor_spec(sg, sg.Inputs(i)) for i in range(sg.InputsLength())]
    outputs = [_tensor_spec(sg, sg.Outputs(i)) for i in range(sg.OutputsLength())]
    data, rewritten = original, 0
    notes = []
    if all(t.dtype == "float32" for t in inputs):
        data, rewritten = _dequantize_hybrid_weights(original)
        if rewritten:
            notes.append(
                f"dynamic-range (hybrid) quantized model: {rewritten} int8 weight tensors dequantized to float32; "
                "verified against the interpreter on the dequantized model"
            )
    quantized = any(t.dtype in ("int8", "uint8", "int16") for t in inputs + outputs)
    return TFLiteModel(path.stem, path, data, inputs, outputs, ops, quantized, original, notes)


def unsupported_operators(model: TFLiteModel) -> list[str]:
    """Operators of the model that TVM's TFLite frontend has no converter for."""
    import tflite
    from tvm.relax.frontend.tflite import tflite_frontend

    fb = tflite.Model.GetRootAsModel(model.data, 0)
    sg = fb.Subgraphs(0)
    converter = tflite_frontend.OperatorConverter(fb, sg, tflite_frontend.ExprTable(), None)
    names = (converter.get_op_code_str(sg.Operators(i)) for i in range(sg.OperatorsLength()))
    return sorted({n for n in names if n not in converter.convert_map})


def import_relax(model: TFLiteModel):
    """TFLite -> Relax IRModule via TVM's frontend. Unsupported operators are named."""
    import tflite
    import tvm
    from tvm.relax.frontend.tflite import from_tflite

    missing = unsupported_operators(model)
    if missing:
        raise UnsupportedOperator(missing, model.path.name)
    try:
        return from_tflite(tflite.Model.GetRootAsModel(model.data, 0))
    except tvm.error.OpNotImplemented as e:
        msg = str(e).splitlines()[0]
        found = re.findall(r"'([A-Za-z0-9_]+)'", msg)
        raise UnsupportedOperator(found or [msg], model.path.name) from e
    except Exception as e:
        raise InvalidModel(f"{model.path.name}: TVM could not import the model: {str(e).splitlines()[-1][:200]}") from e
