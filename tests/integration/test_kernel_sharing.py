"""Unrolled recurrent networks: the kernels of every time step, equal up to their quantization constants, share one
code body (ir/kernel_sharing.py) - same outputs, a fraction of the code (corpus models made with TensorFlow)."""

import pytest

from tests.helpers.paths import CORPUS_MODELS
from tinymlaas.build.pipeline import compile_model
from tinymlaas.build.request import BuildRequest
from tinymlaas.frontend.tflite import load_tflite, read_graph
from tinymlaas.ir import kernel_sharing

LSTM = CORPUS_MODELS / "lstm_unrolled_int8.tflite"  # 20 time steps
BILSTM = CORPUS_MODELS / "bilstm_unrolled_int8.tflite"  # Keras Bidirectional, 16 steps each way


def test_time_steps_share_their_kernels_with_the_same_outputs(tmp_path, monkeypatch):
    shared = compile_model(LSTM, "cortex-m4", tmp_path / "shared", BuildRequest(inputs=3))
    monkeypatch.setattr(kernel_sharing, "SHARE_MIN_KERNELS", 10**6)
    apart = compile_model(LSTM, "cortex-m4", tmp_path / "apart", BuildRequest(inputs=3))
    for r in (shared, apart):
        assert r.verified and r.lowering == "integer" and r.fidelity["max_lsb_diff"] == 0
    assert any("share one code body" in n for n in shared.notes)
    assert not any("share" in n for n in apart.notes)
    assert (tmp_path / "shared" / "outputs.bin").read_bytes() == (tmp_path / "apart" / "outputs.bin").read_bytes()
    assert shared.sizes["model_code"] < 0.6 * apart.sizes["model_code"]
    # the constants that differ are loaded once per call, outside the loops: (almost) the same instructions
    assert shared.instructions <= 1.03 * apart.instructions


@pytest.mark.parametrize("target", ["cortex-m4", "rv32imac"])
def test_a_bidirectional_lstm_is_bit_exact_and_small(tmp_path, target):
    graph = read_graph(load_tflite(BILSTM).original_data)
    assert "REVERSE_V2" in {op.opcode for op in graph.operators}  # its input and output scales differ
    r = compile_model(BILSTM, target, tmp_path / "o", BuildRequest(inputs=3))
    assert r.verified and r.fidelity["max_lsb_diff"] == 0
    constants = sum(t.data.nbytes for t in graph.tensors if t.is_const and t.data is not None)
    # issue 34's goal: 2 x (weights + 64 KB) (benchmarks/results/corpus_architectures.json)
    assert r.sizes["flash_model"] <= 2 * (constants + 64 * 1024)
