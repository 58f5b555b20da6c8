"""UNIDIRECTIONAL_SEQUENCE_LSTM in the forms converters emit and the ones they can (peephole, CIFG, projection,
layer normalisation, clipping), against the interpreter over a sequence of inferences: the state tensors carry
over from one inference to the next on the device as in the interpreter."""

from pathlib import Path

import numpy as np
import pytest

from tests.helpers.paths import CORPUS_MODELS
from tinymlaas.build.pipeline import compile_model
from tinymlaas.build.request import BuildRequest

STACKED = CORPUS_MODELS / "lstm_stacked_keras2_float32.tflite"
# UNIDIRECTIONAL_SEQUENCE_LSTM input slots
INPUT_GATE = (1, 5, 12)  # input-to-input and recurrent-to-input weights, input gate bias
PEEPHOLE = (9, 10, 11)
PROJECTION_WEIGHTS, PROJECTION_BIAS = 16, 17
LAYER_NORM = (20, 21, 22, 23)


def _written(model, path: Path) -> Path:
    """A model edited through the schema's object API, written back as a .tflite."""
    import flatbuffers

    b = flatbuffers.Builder(1 << 16)
    b.Finish(model.Pack(b), file_identifier=b"TFL3")
    path.write_bytes(bytes(b.Output()))
    return path


def _variant(tmp_path: Path, name: str, peephole=False, cifg=False, projection=False, layer_norm=False,
             cell_clip=0.0, proj_clip=0.0) -> Path:
    """The first LSTM of the stacked Keras 2 model, rewritten: new constant tensors appended for the extra slots."""
    from ai_edge_litert import schema_py_generated as s

    rng = np.random.default_rng(5)
    m = s.ModelT.InitFromObj(s.Model.GetRootAs(STACKED.read_bytes(), 0))
    g = m.subgraphs[0]
    op = g.operators[0]
    n_cell = int(g.tensors[op.inputs[1]].shape[0])
    inputs = list(op.inputs)

    def add_const(shape, scale=0.4):
        buf = s.BufferT()
        buf.data = (rng.standard_normal(shape).astype(np.float32) * scale).tobytes()
        m.buffers.append(buf)
        t = s.TensorT()
        t.shape, t.type, t.buffer, t.name = np.array(shape, dtype=np.int32), s.TensorType.FLOAT32, len(m.buffers) - 1, b"extra"
        g.tensors.append(t)
        return len(g.tensors) - 1

    if peephole:
        for k in PEEPHOLE:
            inputs[k] = add_const([n_cell])
    if projection:  # square, so the shapes downstream stay
        inputs[PROJECTION_WEIGHTS], inputs[PROJECTION_BIAS] = add_const([n_cell, n_cell]), add_const([n_cell], 0.1)
    if layer_norm:
        inputs += [-1] * (24 - len(inputs))
        for k in LAYER_NORM:
            inputs[k] = add_const([n_cell], 0.5)
    if cifg:
        for k in INPUT_GATE + ((LAYER_NORM[0],) if layer_norm else ()) + ((PEEPHOLE[0],) if peephole else ()):
            inputs[k] = -1
    op.inputs = np.array(inputs, dtype=np.int32)
    op.builtinOptions.cellClip, op.builtinOptions.projClip = cell_clip, proj_clip
    return _written(m, tmp_path / f"{name}.tflite")


@pytest.mark.parametrize("name, variant", [
    ("peephole_projection_layer_norm_clip",
     {"peephole": True, "projection": True, "layer_norm": True, "cell_clip": 0.6, "proj_clip": 0.3}),
    ("cifg_peephole", {"cifg": True, "peephole": True}),
])
def test_lstm_variants_match_the_interpreter_over_a_sequence(tmp_path, name, variant):
    model = _variant(tmp_path, name, **variant)
    r = compile_model(model, "cortex-m4", tmp_path / "out", BuildRequest(inputs=4))
    assert r.verified, r.fidelity
    assert r.fidelity["inputs"] == 5 and r.instructions_repeat_exact is None  # state carried: no repeat claim
    assert r.sizes["state"] == 2 * (48 + 48 + 32 + 32)  # h and c of both LSTMs (12 and 7 floats, 16-aligned), twice


def test_state_starts_at_zero_and_carries_over(tmp_path):
    """The same input twice gives different outputs (as in the interpreter): the firmware keeps the state."""
    from tinymlaas.frontend.tflite import load_tflite
    from tinymlaas.oracle import make_inputs, reference_outputs

    model = load_tflite(STACKED)
    x = make_inputs(model, 1, 3)[0]
    first, second = reference_outputs(model, [x, x])
    assert not np.array_equal(first[0], second[0])
    # verified against one interpreter run over the inputs in order: a firmware that reset its state would fail
    r = compile_model(STACKED, "rv32imafc", tmp_path / "out", BuildRequest(inputs=2))
    assert r.verified and r.fidelity["max_rel_error"] <= 1e-5, r.fidelity


STACKED_INT8 = CORPUS_MODELS / "lstm_stacked_keras2_int8.tflite"


def _int8_variant(tmp_path: Path, name: str, peephole=False, cifg=False, projection=False, cell_clip=0.0,
                  proj_clip=0.0) -> Path:
    """The first LSTM of the stacked int8 model with the slots no converter fills here: int16 peephole weights, a
    square int8 projection (with a bias; the hidden zero point is 2), CIFG, clips."""
    from ai_edge_litert import schema_py_generated as s

    rng = np.random.default_rng(7)
    m = s.ModelT.InitFromObj(s.Model.GetRootAs(STACKED_INT8.read_bytes(), 0))
    g = m.subgraphs[0]
    op = next(o for o in g.operators if len(o.inputs) >= 20)
    n_cell = int(g.tensors[op.inputs[2]].shape[0])
    inputs = list(op.inputs)

    def add_const(values: np.ndarray, ttype: int, scale: float):
        buf = s.BufferT()
        buf.data = values.tobytes()
        m.buffers.append(buf)
        q = s.QuantizationParametersT()
        q.scale, q.zeroPoint = np.array([scale], np.float32), np.array([0], np.int64)
        t = s.TensorT()
        t.shape, t.type, t.buffer, t.name, t.quantization = (np.array(values.shape, np.int32), ttype,
                                                            len(m.buffers) - 1, b"extra", q)
        g.tensors.append(t)
        return len(g.tensors) - 1

    if peephole:
        for k in PEEPHOLE:
            inputs[k] = add_const(rng.integers(-20000, 20000, n_cell, dtype=np.int16), s.TensorType.INT16, 2e-5)
    if projection:
        inputs[PROJECTION_WEIGHTS] = add_const(rng.integers(-127, 128, (n_cell, n_cell), dtype=np.int8),
                                               s.TensorType.INT8, 0.004)
        inputs[PROJECTION_BIAS] = add_const(rng.integers(-3000, 3000, n_cell, dtype=np.int32), s.TensorType.INT32, 1e-5)
    if cifg:
        for k in INPUT_GATE + ((PEEPHOLE[0],) if peephole else ()):
            inputs[k] = -1
    op.inputs = np.array(inputs, dtype=np.int32)
    op.builtinOptions.cellClip, op.builtinOptions.projClip = cell_clip, proj_clip
    g.outputs = np.append(g.outputs, op.outputs[0]).astype(np.int32)  # its whole sequence checked, not only the head
    return _written(m, tmp_path / f"{name}.tflite")


@pytest.mark.parametrize("name, variant, target", [
    ("int8_peephole_projection_clips", {"peephole": True, "projection": True, "cell_clip": 0.05, "proj_clip": 0.2},
     "cortex-m4"),
    ("int8_cifg_peephole", {"cifg": True, "peephole": True}, "rv32imac"),
])
def test_int8_lstm_variants_are_bit_exact_over_a_sequence(tmp_path, name, variant, target):
    model = _int8_variant(tmp_path, name, **variant)
    r = compile_model(model, target, tmp_path / "out", BuildRequest(inputs=4))
    assert r.verified and r.fidelity["exact_fraction"] == 1.0, r.fidelity
    assert r.instructions_repeat_exact is None


def test_int8_state_starts_at_its_zero_point(tmp_path):
    """The interpreter resets a quantized variable tensor to its zero point, not to raw 0: the hidden state of the
    time-major model has zero point 16, and a build starting from raw 0 differs from the first inference on."""
    from tinymlaas.frontend.tflite import load_tflite

    model = load_tflite(CORPUS_MODELS / "lstm_time_major_keras2_int8.tflite")
    assert [model.graph.tensor(i).zero_point for i in model.graph.state] == [16, 0]
    r = compile_model(model.path, "cortex-m3", tmp_path / "out", BuildRequest(inputs=2))
    assert r.verified and r.fidelity["exact_fraction"] == 1.0, r.fidelity


def _svdf_model(tmp_path: Path, precision: str, batch=2, n_input=5, n_filter=6, memory=4, rank=2, act=0) -> Path:
    """One SVDF operator written with the TFLite schema (converters do not emit it; speech models carry it)."""
    from ai_edge_litert import schema_py_generated as s

    from tests.helpers.quantized_layers import F32, I8, I32, Layer, opts

    layer, units = Layer(11), n_filter // rank
    rng = layer.rng
    if precision == "float32":
        x = layer.tensor("x", [batch, n_input], F32)
        wf = layer.tensor("w_feature", [n_filter, n_input], F32, data=rng.standard_normal((n_filter, n_input)).astype(np.float32))
        wt = layer.tensor("w_time", [n_filter, memory], F32, data=rng.standard_normal((n_filter, memory)).astype(np.float32))
        b = layer.tensor("bias", [units], F32, data=rng.standard_normal(units).astype(np.float32))
        state = layer.tensor("state", [batch, n_filter * memory], F32)
        y = layer.tensor("y", [batch, units], F32)
    else:
        I16 = s.TensorType.INT16
        x = layer.tensor("x", [batch, n_input], I8, 0.05, 3)
        wf = layer.tensor("w_feature", [n_filter, n_input], I8, 0.01, 0,
                          rng.integers(-127, 128, (n_filter, n_input)).astype(np.int8))
        wt = layer.tensor("w_time", [n_filter, memory], I16, 2e-4, 0,
                          rng.integers(-30000, 30000, (n_filter, memory)).astype(np.int16))
        b = layer.tensor("bias", [units], I32, 5e-4 * 2e-4, 0, rng.integers(-20000, 20000, units).astype(np.int32))
        state = layer.tensor("state", [batch, n_filter * memory], I16, 5e-4, 0)
        y = layer.tensor("y", [batch, units], I8, 1.5, -5)
    layer.tensors[state].isVariable = True
    path = tmp_path / f"svdf_{precision}.tflite"
    path.write_bytes(layer.model("SVDF", [x, wf, wt, b, state], [y], [x],
                                 opts("SVDFOptions", rank=rank, fusedActivationFunction=act)))
    return path


@pytest.mark.parametrize("precision, shape, target", [
    ("float32", {"rank": 2, "act": 1}, "rv32imafc"),
    ("float32", {"rank": 1, "memory": 1, "batch": 1}, "cortex-m4"),
    ("int8", {"rank": 2, "act": 1}, "cortex-m3"),  # the interpreter takes integer SVDF with RELU only
    ("int8", {"rank": 3, "n_filter": 9, "batch": 1, "memory": 7, "act": 1}, "rv32imac"),
])
def test_svdf_matches_the_interpreter_over_a_sequence(tmp_path, precision, shape, target):
    model = _svdf_model(tmp_path, precision, **shape)
    r = compile_model(model, target, tmp_path / "out", BuildRequest(inputs=5))
    assert r.verified, r.fidelity
    if precision == "int8":
        assert r.fidelity["exact_fraction"] == 1.0, r.fidelity
    else:
        assert r.fidelity["max_rel_error"] <= 1e-5, r.fidelity
    assert r.instructions_repeat_exact is None and r.sizes["state"] > 0
