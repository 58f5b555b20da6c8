"""Every integer kernel, bit-exact with the TFLite interpreter's reference kernels, on small random layers."""

from pathlib import Path

import numpy as np
import pytest
import quantized_layers as q

from tinymlaas.pipeline import CompileOptions, compile_model

SAME, VALID = 0, 1
NONE, RELU, RELU_N1_TO_1, RELU6 = 0, 1, 2, 3

CASES = {
    "conv_same_s2_relu6_per_channel": lambda: q.conv2d(1, [1, 9, 7, 3], 5, 3, 2, SAME, RELU6),
    "conv_valid_s1_per_tensor": lambda: q.conv2d(2, [1, 6, 8, 4], 3, 3, 1, VALID, NONE, per_channel=False),
    "conv_same_dilated_relu": lambda: q.conv2d(3, [1, 10, 9, 2], 4, 3, 1, SAME, RELU, dilation=2),
    "conv_1x1_odd": lambda: q.conv2d(4, [1, 5, 3, 7], 9, 1, 1, VALID, RELU_N1_TO_1),
    "depthwise_same_s2_m2_relu": lambda: q.depthwise(5, [1, 8, 7, 3], 2, 3, 2, SAME, RELU),
    "depthwise_valid_s1": lambda: q.depthwise(6, [1, 6, 6, 5], 1, 3, 1, VALID, NONE),
    "depthwise_3x3_c8_same_relu6": lambda: q.depthwise(18, [1, 7, 9, 8], 1, 3, 1, SAME, RELU6),
    "depthwise_3x3_c4_s2_same": lambda: q.depthwise(19, [1, 8, 8, 4], 1, 3, 2, SAME, NONE),
    "fc_relu": lambda: q.fully_connected(7, [1, 37], 11, RELU),
    "fc_flatten_batch": lambda: q.fully_connected(8, [2, 3, 8], 5, NONE),
    "avgpool_same_partial_windows": lambda: q.pool(9, "AVERAGE_POOL_2D", [1, 9, 9, 3], 3, 2, SAME),
    "avgpool_valid_relu6": lambda: q.pool(10, "AVERAGE_POOL_2D", [1, 8, 6, 2], 2, 2, VALID, RELU6),
    "maxpool_same": lambda: q.pool(11, "MAX_POOL_2D", [1, 7, 7, 2], 2, 2, SAME),
    "maxpool_valid_relu": lambda: q.pool(12, "MAX_POOL_2D", [1, 6, 5, 3], 3, 1, VALID, RELU),
    "add_relu": lambda: q.add(13, [1, 5, 5, 3], RELU),
    "add_plain": lambda: q.add(14, [1, 4, 9], NONE),
    "softmax_row": lambda: q.softmax(15, [1, 10], 0.1),
    "softmax_rows_wide_scale": lambda: q.softmax(16, [3, 7], 0.4, beta=0.7),
    "reshape": lambda: q.reshape(17, [1, 4, 4, 2], [1, 32]),
}


@pytest.mark.parametrize(
    "target, kernels",
    [("cortex-m4", "dsp"), ("cortex-m4", "tir"), ("rv32imac", "tir")],  # DSP micro-kernels and integer TIR
)
@pytest.mark.parametrize("case", sorted(CASES))
def test_operator_is_bit_exact(case, target, kernels, tmp_path):
    path = tmp_path / f"{case}.tflite"
    path.write_bytes(CASES[case]())
    r = compile_model(path, target, tmp_path / "out", CompileOptions(inputs=20, seed=3, kernels=kernels))
    assert r.lowering == "integer"
    assert r.fidelity["max_lsb_diff"] == 0, r.fidelity
    out = np.frombuffer(Path(r.artifacts["outputs"]).read_bytes(), dtype=np.int8)
    assert len(np.unique(out)) > 3  # a layer whose outputs all saturate would prove nothing
