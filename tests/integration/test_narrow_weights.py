"""float16 and dynamic-range (int8 weight) exports keep the flash they were shrunk for: weights at their stored
width, widened in the kernels to the very float32 values a float32-weight build computes with (corpus models made by
tests/corpus/generate.py with TensorFlow's converter, as users export them)."""

import json

import pytest

from tests.helpers.paths import CORPUS_MODELS
from tinymlaas.build.pipeline import compile_model
from tinymlaas.build.request import BuildRequest
from tinymlaas.frontend.tflite import load_tflite, read_graph

WEIGHT_FLASH_GOAL = 1.1  # flash for weights at most 1.1x the .tflite's constants


def stored_constant_bytes(path) -> int:
    graph = read_graph(load_tflite(path).original_data)
    return sum(t.data.nbytes for t in graph.tensors if t.is_const and t.data is not None)


def build(path, target, out, weights):
    return compile_model(path, target, out, BuildRequest(inputs=3, weights=weights))


def check(path, target, tmp_path):
    stored = build(path, target, tmp_path / "stored", "stored")
    wide = build(path, target, tmp_path / "wide", "float32")
    assert stored.verified and wide.verified, (stored.fidelity, wide.fidelity)
    assert any("stored width" in n for n in stored.notes)
    assert stored.sizes["weights"] <= WEIGHT_FLASH_GOAL * stored_constant_bytes(path)
    assert wide.sizes["weights"] > 1.8 * stored.sizes["weights"]
    # the same float32 numbers in every kernel: the firmware's outputs are the same bits
    assert (tmp_path / "stored" / "outputs.bin").read_bytes() == (tmp_path / "wide" / "outputs.bin").read_bytes()
    return stored, wide


# cortex-m4: the FPU's half conversion; rv32imafc: exponent arithmetic and a float multiply; rv32imac and
# cortex-m3 (no FPU): integer operations
@pytest.mark.parametrize("target", ["cortex-m4", "rv32imafc", "rv32imac", "cortex-m3"])
def test_float16_weights_stay_float16(tmp_path, target):
    check(CORPUS_MODELS / "conv1d_sensor_float16.tflite", target, tmp_path)


@pytest.mark.parametrize("target", ["cortex-m4", "rv32imac"])
def test_dynamic_range_weights_stay_int8(tmp_path, target):
    check(CORPUS_MODELS / "ds_cnn_kws_dynamic.tflite", target, tmp_path)
    report = json.loads((tmp_path / "stored" / "report.json").read_text())
    assert any("stored width (int8)" in n for n in report["notes"])


@pytest.mark.slow
@pytest.mark.parametrize("name", ["resnet8", "ds_cnn_kws", "conv1d_sensor", "flatten_mlp"])
@pytest.mark.parametrize("precision", ["float16", "dynamic"])
@pytest.mark.parametrize("target", ["cortex-m4", "rv32imafc"])
def test_every_narrow_corpus_model(tmp_path, name, precision, target):
    check(CORPUS_MODELS / f"{name}_{precision}.tflite", target, tmp_path)
