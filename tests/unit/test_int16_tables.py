"""The int16 tables read back from the interpreter reproduce its LOGISTIC, TANH and EXP on every input, at
quantizations the corpus does not have (power-of-two scales take a different path in the interpreter)."""

import flatbuffers
import numpy as np
import pytest
from ai_edge_litert import schema_py_generated as s

from tinymlaas.frontend.tflite import read_graph
from tinymlaas.ops.int16 import input_rescale, interpolate, lut_interpolate, read_lut, scale_inputs, sigmoid_table
from tinymlaas.ops.interpreter_tables import lookup_table


def one_operator(opcode: str, in_scale: float, out_scale: float, in_zero: int = 0):
    tensors = []
    for name, scale, zero in ((b"x", in_scale, in_zero), (b"y", out_scale, 0)):
        t = s.TensorT()
        t.name, t.shape, t.buffer, t.type = name, np.array([4], np.int32), 0, s.TensorType.INT16
        t.quantization = s.QuantizationParametersT()
        t.quantization.scale, t.quantization.zeroPoint = [scale], [zero]
        tensors.append(t)
    code = s.OperatorCodeT()
    code.builtinCode = code.deprecatedBuiltinCode = getattr(s.BuiltinOperator, opcode)
    code.version = 3 if opcode in ("LOGISTIC", "TANH") else 2
    op = s.OperatorT()
    op.opcodeIndex, op.inputs, op.outputs = 0, np.array([0], np.int32), np.array([1], np.int32)
    sg = s.SubGraphT()
    sg.tensors, sg.operators, sg.inputs, sg.outputs = tensors, [op], np.array([0], np.int32), np.array([1], np.int32)
    m = s.ModelT()
    m.version, m.operatorCodes, m.subgraphs, m.buffers = 3, [code], [sg], [s.BufferT()]
    b = flatbuffers.Builder(1024)
    b.Finish(m.Pack(b), file_identifier=b"TFL3")
    graph = read_graph(bytes(b.Output()), "one.tflite")
    return graph, graph.operators[0]


ALL = np.arange(-32768, 32768, dtype=np.int16)


@pytest.mark.parametrize("opcode", ["LOGISTIC", "TANH"])
@pytest.mark.parametrize("scale", [2**-12, 2**-11, 3.1e-4, 9e-5, 1.7e-3])
def test_sigmoid_table_reproduces_the_interpreter(opcode, scale):
    graph, op = one_operator(opcode, scale, 2**-15)
    expected = lookup_table(graph, op, ALL).astype(np.int64)
    scaled = scale_inputs(ALL, *input_rescale(scale))
    table = sigmoid_table(opcode, scaled, expected)
    assert table is not None
    assert np.array_equal(interpolate(opcode, scaled, table), expected)


@pytest.mark.parametrize("scale, out_scale", [(2.5e-4, 3e-3), (1e-3, 1e-3)])
def test_exp_table_read_back(scale, out_scale):
    graph, op = one_operator("EXP", scale, out_scale)
    expected = lookup_table(graph, op, ALL).astype(np.int64)
    table = read_lut(ALL, expected)
    assert table is not None and np.array_equal(lut_interpolate(ALL, table), expected)


def test_a_table_that_is_not_an_interpolation_is_refused():
    rng = np.random.default_rng(0)
    assert read_lut(ALL, rng.integers(-32768, 32767, ALL.size)) is None
