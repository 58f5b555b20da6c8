"""Models users bring that earlier builds refused or checked with a test that could not fail: uint8 input and
output, grouped int8 convolutions, token ids, float operators inside an int8 graph (corpus models made by
tests/corpus/generate.py with TensorFlow, the way users export them)."""

import numpy as np
import pytest

from tests.helpers.cli import cli
from tests.helpers.paths import CORPUS
from tinymlaas.build.pipeline import compile_model
from tinymlaas.build.request import BuildRequest
from tinymlaas.frontend.cleanup import clean
from tinymlaas.frontend.tflite import load_tflite, short_input_name
from tinymlaas.frontend.to_relax import implementations
from tinymlaas.ir.layer_schedule import kernel_shape, space_of
from tinymlaas.oracle import input_ranges, make_inputs
from tinymlaas.search.space import Variant
from tinymlaas.targets import get_target
from tinymlaas.verify import MIXED_MAX_LSB, compare

UINT8 = CORPUS / "models" / "uint8_io_cnn_int8.tflite"
GROUPED = CORPUS / "models" / "grouped_cnn_int8.tflite"
TOKENS = CORPUS / "models" / "token_text_classifier_int8.tflite"


@pytest.mark.parametrize("target", ["cortex-m4", "rv32imac"])
def test_a_model_with_uint8_input_and_output_is_bit_exact(tmp_path, target):
    model = load_tflite(UINT8)
    assert [s.dtype for s in model.inputs + model.outputs] == ["uint8", "uint8"]
    r = compile_model(UINT8, target, tmp_path / "o", BuildRequest(inputs=3))
    assert r.verified and r.lowering == "integer" and r.fidelity["max_lsb_diff"] == 0


@pytest.mark.parametrize("target", ["cortex-m4", "rv32imac"])
def test_grouped_int8_convolutions_are_bit_exact(tmp_path, target):
    graph = clean(load_tflite(GROUPED).graph, shapes_from_interpreter=True)
    grouped = [op for op in graph.operators if op.opcode == "CONV_2D"
               and graph.tensor(op.inputs[1]).shape[3] != graph.tensor(op.inputs[0]).shape[3]]
    assert len(grouped) == 2  # groups of 4 and of 2
    chosen = implementations(graph, get_target(target))
    assert all(chosen[op.index] == "tir" for op in grouped)  # the C kernels take no groups
    for op in grouped:  # layer schedules do, without the tensorized inner product (reads depend on the channel)
        space = space_of(kernel_shape(graph, op, get_target(target)))
        assert len(space) > 1000 and not any(s.dsp_dot for s in space)
    schedules = {op.index: space_of(kernel_shape(graph, op, get_target(target)))[-1] for op in grouped}
    r = compile_model(GROUPED, target, tmp_path / "tuned", BuildRequest(inputs=3, variant=Variant(
        kernels=tuple((i, "tir") for i in schedules), layers=tuple(sorted(schedules.items())))))
    assert r.verified and r.fidelity["max_lsb_diff"] == 0
    r = compile_model(GROUPED, target, tmp_path / "o", BuildRequest(inputs=3))
    assert r.verified and r.lowering == "integer" and r.fidelity["max_lsb_diff"] == 0


def test_token_ids_are_drawn_within_the_embedding_table():
    model = load_tflite(TOKENS)
    assert input_ranges(model.graph) == {0: (0, 49)}  # a 50-row table
    ids = np.concatenate([b[0].ravel() for b in make_inputs(model, 20, 0)])
    assert ids.min() >= 0 and ids.max() == 49 and model.inputs[0].dtype == "int32"


def test_a_token_id_model_builds_on_random_and_on_the_users_inputs(tmp_path):
    r = compile_model(TOKENS, "rv32imac", tmp_path / "random", BuildRequest(inputs=3))
    assert r.verified and r.lowering == "integer" and r.fidelity["max_lsb_diff"] == 0
    name = short_input_name(load_tflite(TOKENS).inputs[0].name)  # the Keras input's name (or the TFLite one)
    np.savez(tmp_path / "ids.npz", **{name: np.array([[[3] * 20], [list(range(20))]], dtype=np.int32)})
    r = cli("compile", TOKENS, "-t", "cortex-m4", "--sample-inputs", tmp_path / "ids.npz", "-o", tmp_path / "given")
    assert r.returncode == 0 and "over 3 inputs" in r.stdout, r.stdout + r.stderr  # the two, and the first again
    np.savez(tmp_path / "bad.npz", **{name: np.full((1, 1, 20), 50, dtype=np.int32)})  # beyond the table
    r = cli("compile", TOKENS, "-t", "cortex-m4", "--sample-inputs", tmp_path / "bad.npz", "-o", tmp_path / "bad")
    assert r.returncode == 2 and "cannot run" in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_quantized_outputs_of_a_mixed_build_have_a_tolerance_that_can_fail():
    model = load_tflite(UINT8)
    want = [[np.array([10, 20, 30, 40], dtype=np.uint8).reshape(model.outputs[0].shape)]]
    near = [[want[0][0] + np.uint8(MIXED_MAX_LSB)]]
    far = [[want[0][0] + np.uint8(MIXED_MAX_LSB + 1)]]
    assert compare(model, near, want).passed and not compare(model, far, want).passed
    assert not compare(model, near, want, integer_kernels=True).passed  # integer kernels: bit-exact


@pytest.mark.parametrize("target", ["cortex-m4", "rv32imac"])
def test_dilated_convolutions_exported_through_space_to_batch_become_one_operator(tmp_path, target):
    path = CORPUS / "models" / "dilated_tcn_int8.tflite"
    raw = load_tflite(path).graph
    graph = clean(raw, shapes_from_interpreter=True)
    opcodes = [op.opcode for op in graph.operators]
    assert [op.opcode for op in raw.operators].count("SPACE_TO_BATCH_ND") == 3
    assert "SPACE_TO_BATCH_ND" not in opcodes and "BATCH_TO_SPACE_ND" not in opcodes
    dilations = sorted(max(op.opt("dilationHFactor"), op.opt("dilationWFactor")) for op in graph.operators
                       if op.opcode == "CONV_2D")
    assert dilations == [1, 2, 2, 4]  # the causal 1-D ones (1, 2, 4) and the 2-D one (2, SAME)
    r = compile_model(path, target, tmp_path / "o", BuildRequest(inputs=3))
    assert r.verified and r.fidelity["max_lsb_diff"] == 0  # the interpreter runs the model as exported
    assert any("6 operators removed" in n for n in r.notes)
