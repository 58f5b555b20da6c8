"""The corpus made by tests/corpus/generate.py with TensorFlow: every operator graph compiles and verifies.

Integer graphs must be bit-exact (dequantized float outputs compared as bit patterns); float graphs within the
float tolerance. What no converter takes yet is listed below and must fail with a clear UnsupportedOperator (strict:
when one starts working, the list has to shrink).
"""

import json
from pathlib import Path

import pytest

from tinymlaas.errors import InvalidModel, UnsupportedOperator
from tinymlaas.pipeline import CompileOptions, compile_model

CORPUS = Path(__file__).parent / "corpus"
MANIFEST = json.loads((CORPUS / "manifest.json").read_text())
BUILT = {k: v for k, v in MANIFEST.items() if "file" in v}

NOT_YET = {  # operators without a kernel in this precision yet (named in the error)
    "int8": "batch_matmul div l2_normalization log_softmax mean mean_last_axis reduce_prod resize_bilinear_align "
            "resize_bilinear squared_difference sum",
    "int16x8": "abs add_broadcast_relu add average_pool_2d batch_matmul broadcast_to concatenation conv_2d "
               "conv_2d_valid_dilated depthwise_conv_2d exp expand_dims fully_connected gelu leaky_relu log logistic "
               "max_pool_2d maximum_minimum mean mean_last_axis mul_broadcast mul pack reduce_prod relu6 relu "
               "reshape resize_bilinear_align resize_bilinear rsqrt softmax squared_difference squeeze sub sum tanh "
               "transpose_conv transpose_conv_valid zeros_like_fill",
}
INVALID = {"padv2_int16x8"}  # the interpreter itself refuses the converter's output (int16 input, float pad value)


def _expected_unsupported(key: str, entry: dict) -> bool:
    name = key[: -len(entry["precision"]) - 1]
    return name in NOT_YET.get(entry["precision"], "").split()


def _cases(precision: str):
    return sorted(k for k, v in BUILT.items() if v["precision"] == precision)


def _compile(key, target, tmp_path):
    return compile_model(CORPUS / BUILT[key]["file"], target, tmp_path / key, CompileOptions(inputs=3))


def _check(key, target, tmp_path):
    entry = BUILT[key]
    if key in INVALID:
        with pytest.raises(InvalidModel, match="interpreter refuses"):
            _compile(key, target, tmp_path)
        return
    if _expected_unsupported(key, entry):
        with pytest.raises(UnsupportedOperator):
            _compile(key, target, tmp_path)
        return
    r = _compile(key, target, tmp_path)
    assert r.verified, r.fidelity
    if r.lowering == "integer":
        assert r.fidelity["max_lsb_diff"] == 0
    assert r.instructions_repeat_exact


def test_corpus_covers_the_operators():
    ops = {op for v in BUILT.values() for op in v["operators"]}
    assert len(BUILT) >= 240 and len(ops) >= 80


@pytest.mark.parametrize("key", _cases("float32"))
def test_float32_operator_on_cortex_m4(key, tmp_path):
    _check(key, "cortex-m4", tmp_path)


@pytest.mark.parametrize("key", _cases("int8"))
def test_int8_operator_on_cortex_m4(key, tmp_path):
    _check(key, "cortex-m4", tmp_path)


@pytest.mark.parametrize("key", _cases("int16x8"))
def test_int16x8_operator_on_cortex_m4(key, tmp_path):
    _check(key, "cortex-m4", tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("key", _cases("float32"))
def test_float32_operator_on_rv32imafc(key, tmp_path):
    _check(key, "rv32imafc", tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("target", ["cortex-m3", "rv32imac"])
@pytest.mark.parametrize("key", _cases("int8") + _cases("int16x8"))
def test_integer_operator_without_fpu_or_dsp(key, target, tmp_path):
    _check(key, target, tmp_path)
