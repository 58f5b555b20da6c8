import numpy as np
import pytest

from tests.helpers.paths import model_path
from tests.helpers.quantized_layers import unsupported_operator_model
from tinymlaas.errors import InvalidModel, UnsupportedOperator
from tinymlaas.frontend.cleanup import clean
from tinymlaas.frontend.tflite import load_tflite
from tinymlaas.frontend.to_relax import to_relax
from tinymlaas.oracle import make_inputs, reference_outputs
from tinymlaas.targets import get_target


def test_reads_inputs_outputs_and_operators(models_dir):
    m = load_tflite(model_path("kws_ref_model"))
    assert m.inputs[0].shape == (1, 49, 10, 1) and m.inputs[0].dtype == "int8"
    assert m.inputs[0].zero_point == 83
    assert m.outputs[0].shape == (1, 12)
    assert m.quantized and not m.hybrid
    assert {"CONV_2D", "DEPTHWISE_CONV_2D", "AVERAGE_POOL_2D", "FULLY_CONNECTED", "SOFTMAX"} <= set(m.operators)


def test_not_a_flatbuffer(tmp_path):
    bad = tmp_path / "notes.tflite"
    bad.write_text("this is not a model\n")
    with pytest.raises(InvalidModel, match="not a TFLite flatbuffer"):
        load_tflite(bad)


def test_truncated_flatbuffer(tmp_path, models_dir):
    bad = tmp_path / "cut.tflite"
    bad.write_bytes(model_path("kws_ref_model").read_bytes()[:200])
    with pytest.raises(InvalidModel):
        load_tflite(bad)


def test_missing_file(tmp_path):
    with pytest.raises(InvalidModel, match="no such model file"):
        load_tflite(tmp_path / "nope.tflite")


def test_unsupported_operator_is_named(tmp_path):
    data = unsupported_operator_model()
    path = tmp_path / "dus.tflite"
    path.write_bytes(data)
    model = load_tflite(path)  # a valid model ...
    with pytest.raises(UnsupportedOperator, match="DYNAMIC_UPDATE_SLICE") as e:  # ... no converter takes
        to_relax(clean(model.graph), get_target("cortex-m4"))
    assert e.value.ops == ["DYNAMIC_UPDATE_SLICE"]


def test_hybrid_model_weights_are_dequantized(models_dir):
    m = load_tflite(model_path("kws_ref_model_float32"))
    assert m.hybrid and m.notes
    # The rewritten model is plain float and close to the hybrid original (which quantizes activations).
    batches = make_inputs(m, 2, seed=1)
    ours = reference_outputs(m, batches)
    from dataclasses import replace

    original = reference_outputs(replace(m, data=m.original_data), batches)
    for a, b in zip(ours, original):
        assert np.max(np.abs(a[0] - b[0])) < 0.05
