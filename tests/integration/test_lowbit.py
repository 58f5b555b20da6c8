"""Weights below eight bits: int4 layers bit-exact with the interpreter on the re-quantized model, half the weight
flash, refused where they cannot apply."""

from pathlib import Path

import numpy as np
import pytest

from tests.helpers import quantized_layers as q
from tests.helpers.paths import model_path
from tinymlaas.build.pipeline import compile_model
from tinymlaas.build.request import BuildRequest, InvalidRequest
from tinymlaas.frontend.lowbit import INT4_MAX, eligible_layers, with_int4_weights
from tinymlaas.frontend.tflite import load_model_bytes, read_graph
from tinymlaas.ir.lower import ARENA_ALIGN
from tinymlaas.ir.weight_decode import pack_words, unpack_words
from tinymlaas.ir.weight_storage import pack_int4, unpack_int4

SAME, VALID = 0, 1
NONE, RELU, RELU6 = 0, 1, 3

CASES = {
    "conv_same_s2_relu6": lambda: q.conv2d(1, [1, 9, 7, 3], 5, 3, 2, SAME, RELU6),
    "conv_per_tensor": lambda: q.conv2d(2, [1, 6, 8, 4], 3, 3, 1, VALID, NONE, per_channel=False),
    "conv_1x1_odd_channels": lambda: q.conv2d(4, [1, 5, 3, 7], 13, 1, 1, VALID, RELU),
    "depthwise_m2": lambda: q.depthwise(5, [1, 8, 7, 9], 2, 3, 2, SAME, RELU),
    "fc_per_tensor_batch": lambda: q.fully_connected(8, [2, 3, 37], 5, NONE),
}


@pytest.mark.parametrize("target, kernels", [
    # the C kernels (int8 and int16 weights) reading weights unpacked into RAM; TIR decoding each read
    ("cortex-m4", "dsp"), ("cortex-m4", "dsp16"), ("cortex-m4", "tir"), ("rv32imac", "auto"), ("rv32imac", "tir"),
])
@pytest.mark.parametrize("case", sorted(CASES))
def test_int4_layers_are_bit_exact_with_the_interpreter_on_the_int4_model(case, target, kernels, tmp_path):
    path = tmp_path / f"{case}.tflite"
    path.write_bytes(CASES[case]())
    r = compile_model(path, target, tmp_path / "out", BuildRequest(inputs=20, seed=3, weights="int4", kernels=kernels))
    assert r.fidelity["max_lsb_diff"] == 0, r.fidelity
    assert [w["precision"] for w in r.weights] == ["int4"]
    out = np.frombuffer(Path(r.artifacts["outputs"]).read_bytes(), dtype=np.int8)
    assert len(np.unique(out)) > 3  # outputs that all saturate would prove nothing
    assert any("two to a byte" in n for n in r.notes), r.notes  # the kernel read them packed


def test_int4_halves_the_weight_flash(tmp_path):
    path = tmp_path / "conv.tflite"
    path.write_bytes(q.conv2d(3, [1, 8, 8, 16], 32, 3, 1, SAME, RELU))  # 4,608 weights
    for kernels in ("tir", "auto"):  # decoded per read; unpacked into RAM for the C kernel
        sizes, ram = {}, {}
        for weights in ("stored", "int4"):
            r = compile_model(path, "rv32imac", tmp_path / kernels / weights,
                              BuildRequest(inputs=3, weights=weights, kernels=kernels))
            assert r.fidelity["max_lsb_diff"] == 0
            sizes[weights], ram[weights] = r.sizes["weights"], r.sizes["arena"]
        # the same biases and tables, the weights halved (give or take the constants' alignment in the blob)
        assert abs(sizes["stored"] - sizes["int4"] - 4608 // 2) <= (0 if kernels == "tir" else ARENA_ALIGN), sizes
        if kernels == "auto":  # the unpacked weights need an arena slot of their own
            assert ram["int4"] >= ram["stored"] + 4608, ram


def test_the_int4_model_stands_for_the_int8_weights_within_half_a_step():
    """The rewrite's arithmetic, checked on the file it writes: 4-bit values, per-channel scales from each channel's
    largest weight, the dequantized weights within half a new step of the int8 ones, biases on input x weight scale."""
    data = q.conv2d(7, [1, 6, 6, 5], 8, 3, 1, SAME, RELU)
    graph = read_graph(data)
    layers = eligible_layers(graph)
    assert layers == [0]
    new = read_graph(with_int4_weights(data, layers))
    x, w8, b8 = (graph.tensor(i) for i in graph.operators[0].inputs)
    w4, b4 = (new.tensor(i) for i in new.operators[0].inputs[1:])
    real8 = w8.data.astype(np.float64) * np.asarray(w8.quant.scale).reshape(-1, 1, 1, 1)
    s4 = np.asarray(w4.quant.scale, np.float64)
    assert np.abs(w4.data).max() == INT4_MAX and w4.data.dtype == np.int8
    assert np.allclose(np.abs(real8).reshape(8, -1).max(axis=1) / INT4_MAX, s4, rtol=1e-6)
    assert np.all(np.abs(w4.data * s4.reshape(-1, 1, 1, 1) - real8) <= s4.reshape(-1, 1, 1, 1) / 2 + 1e-9)
    np.testing.assert_allclose(b4.quant.scale, x.quant.scale[0] * s4, rtol=1e-6)
    want = np.rint(b8.data * np.asarray(w8.quant.scale) / s4)
    assert np.array_equal(b4.data, want.astype(np.int32))


@pytest.mark.parametrize("n", [1, 2, 7, 63, 64, 4097])
def test_packing_round_trips(n):
    values = np.random.default_rng(n).integers(-8, 8, size=n).astype(np.int8)
    packed = pack_int4(values)  # TIR kernels: pairs, two's complement nibbles
    assert packed.size == (n + 1) // 2
    assert np.array_equal(unpack_int4(packed, values.shape), values)
    if n >= 2:  # element 0 in the low nibble
        assert int(packed.view(np.uint8)[0]) == (int(values[0]) & 0xF) | ((int(values[1]) & 0xF) << 4)
    words = pack_words(values)  # the C unpacking: groups of eight, value + 8
    assert words.size == -(-n // 8) * 4
    assert np.array_equal(unpack_words(words, n), values)
    if n >= 8:  # byte 1: value 1 low, value 5 high
        assert int(words.view(np.uint8)[1]) == (int(values[1]) + 8) | ((int(values[5]) + 8) << 4)


def test_int4_is_refused_where_it_cannot_apply(tmp_path):
    with pytest.raises(InvalidRequest, match="--weights int4 re-quantizes an integer model"):
        compile_model(model_path("ad01_fp32"), "cortex-m4", tmp_path / "out", BuildRequest(weights="int4"))
    tiny = tmp_path / "tiny.tflite"
    tiny.write_bytes(q.fully_connected(9, [1, 7], 3, NONE))  # 21 weights: below the smallest layer worth it
    assert eligible_layers(load_model_bytes(tiny.read_bytes(), "tiny.tflite").graph) == []
    with pytest.raises(InvalidRequest, match="no convolution or fully connected layer"):
        compile_model(tiny, "cortex-m4", tmp_path / "out2", BuildRequest(weights="int4"))
