import os
from pathlib import Path

import numpy as np
import pytest

from tinymlaas import PROJECT_ROOT

MODELS_DIR = Path(os.environ.get("TINYMLAAS_MODELS", PROJECT_ROOT.parent / "shared" / "models" / "mlperf-tiny"))

ALL_MODELS = [
    "kws_ref_model",
    "kws_ref_model_float32",
    "vww_96_int8",
    "vww_96_float",
    "pretrainedResnet_quant",
    "pretrainedResnet",
    "ad01_int8",
    "ad01_fp32",
]


@pytest.fixture(scope="session")
def models_dir() -> Path:
    if not (MODELS_DIR / "kws_ref_model.tflite").exists():
        pytest.fail(f"MLPerf Tiny models not found in {MODELS_DIR} (set TINYMLAAS_MODELS)")
    return MODELS_DIR


def model_path(name: str) -> Path:
    return MODELS_DIR / f"{name}.tflite"


def build_tflite(op_name: str, inputs, outputs, tensors, buffers=None, builtin_options=None) -> bytes:
    """A real TFLite flatbuffer with one operator, written with the schema's object API.

    tensors: list of (name, shape, type) ; inputs/outputs: tensor indices of the graph.
    buffers: optional {tensor index: bytes} for constant tensors.
    """
    import flatbuffers
    from ai_edge_litert import schema_py_generated as s

    model = s.ModelT()
    model.version = 3
    code = s.OperatorCodeT()
    code.builtinCode = getattr(s.BuiltinOperator, op_name)
    code.deprecatedBuiltinCode = min(code.builtinCode, 127)
    code.version = 1
    model.operatorCodes = [code]
    empty = s.BufferT()
    model.buffers = [empty]
    sg = s.SubGraphT()
    sg.tensors = []
    for i, (name, shape, ttype) in enumerate(tensors):
        t = s.TensorT()
        t.name, t.shape, t.type = name.encode(), np.array(shape, dtype=np.int32), ttype
        t.buffer = 0
        if buffers and i in buffers:
            b = s.BufferT()
            b.data = np.frombuffer(buffers[i], dtype=np.uint8)
            model.buffers.append(b)
            t.buffer = len(model.buffers) - 1
        sg.tensors.append(t)
    op = s.OperatorT()
    op.opcodeIndex = 0
    op.inputs = np.array([i for i in range(len(tensors)) if i not in outputs], dtype=np.int32)
    op.outputs = np.array(outputs, dtype=np.int32)
    if builtin_options is not None:
        op.builtinOptionsType, op.builtinOptions = builtin_options
    sg.operators = [op]
    sg.inputs = np.array(inputs, dtype=np.int32)
    sg.outputs = np.array(outputs, dtype=np.int32)
    model.subgraphs = [sg]
    b = flatbuffers.Builder(1024)
    b.Finish(model.Pack(b), file_identifier=b"TFL3")
    return bytes(b.Output())
