"""Weights below eight bits: int4 layers bit-exact with the interpreter on the re-quantized model, half the weight
flash, refused where they cannot apply."""

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from tests.helpers import quantized_layers as q
from tests.helpers.paths import model_path
from tinymlaas.build.pipeline import compile_model
from tinymlaas.build.request import BuildRequest, InvalidRequest
from tinymlaas.frontend.lowbit import INT4_MAX, eligible_layers, palette_of, rewritten, snapped, with_int4_weights
from tinymlaas.frontend.tflite import load_model_bytes, read_graph
from tinymlaas.ir.lower import ARENA_ALIGN
from tinymlaas.ir.weight_decode import pack_palette, pack_words, unpack_palette, unpack_words
from tinymlaas.ir.weight_storage import pack_int4, unpack_int4
from tinymlaas.ops.dsp_layouts import gemm_w4_weights, sums_fit_at_16x

SAME, VALID = 0, 1
NONE, RELU, RELU6 = 0, 1, 3

CASES = {
    "conv_same_s2_relu6": lambda: q.conv2d(1, [1, 9, 7, 3], 5, 3, 2, SAME, RELU6),
    "conv_per_tensor": lambda: q.conv2d(2, [1, 6, 8, 4], 3, 3, 1, VALID, NONE, per_channel=False),
    "conv_1x1_odd_channels": lambda: q.conv2d(4, [1, 5, 3, 7], 13, 1, 1, VALID, RELU),
    "depthwise_m2": lambda: q.depthwise(5, [1, 8, 7, 9], 2, 3, 2, SAME, RELU),
    "fc_per_tensor_batch": lambda: q.fully_connected(8, [2, 3, 37], 5, NONE),
    # one row whose requantization is proven after the re-quantization (the 4-bit gemv reads it in its loop)
    "fc_row_wide_output_scale": lambda: q.fully_connected(10, [1, 37], 11, RELU, out_scale_factor=30.0),
}


@pytest.mark.parametrize("target, kernels", [
    # the C kernels: 4-bit weights read in the loop (gemm_w4, gemv_w4) or unpacked into RAM (int16 weights, the
    # general requantization); TIR decoding each read
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
    assert any("two to a byte" in n or "kept packed" in n for n in r.notes) or "_w4" in driver(r), r.notes


def driver(report) -> str:
    return (Path(report.artifacts["dir"]) / report.artifacts["driver"]).read_text()


@pytest.mark.parametrize("case", ["conv_same_s2_relu6", "fc_per_tensor_batch"])
def test_int4_weights_stay_4_bit_under_the_int16_weight_kernels(case, tmp_path):
    """--kernels dsp16 widens int8 weights to int16 in flash; 4-bit weights keep their four bits (gemm_w4): the
    weights take less flash than the int8 build's (the same requantization tables beside), not four times theirs."""
    path = tmp_path / f"{case}.tflite"
    path.write_bytes(CASES[case]())
    int8 = compile_model(path, "cortex-m4", tmp_path / "int8", BuildRequest(inputs=5, seed=3, kernels="dsp16"))
    int4 = compile_model(path, "cortex-m4", tmp_path / "int4",
                         BuildRequest(inputs=5, seed=3, weights="int4", kernels="dsp16"))
    assert int4.fidelity["max_lsb_diff"] == 0 and int8.fidelity["max_lsb_diff"] == 0
    assert "_w4" in driver(int4) and "_w16" in driver(int8)
    assert int4.sizes["weights"] < int8.sizes["weights"], (int4.sizes, int8.sizes)  # with the same tables


@pytest.mark.parametrize("depth, out_scale_factor", [
    (200, 40.0),  # a multiplier below 1/2: TFLite's rounding shift after SMMUL
    (200, 0.2),  # about 3/4 once the weights are 4-bit (18x their int8 scale): one SMMULR
    (1, 20.0),  # about 1.5 (one input, 64 outputs): shifted left first
])
def test_a_row_of_4_bit_weights_is_read_by_the_4_bit_gemv_without_a_copy_in_ram(depth, out_scale_factor, tmp_path):
    path = tmp_path / "fc.tflite"
    path.write_bytes(q.fully_connected(11, [1, depth], 24 if depth > 1 else 64, NONE, out_scale_factor=out_scale_factor))
    for target in ("cortex-m4", "rv32imac"):  # SMLAD on 16 x the nibbles; the scalar loop
        r = compile_model(path, target, tmp_path / target, BuildRequest(inputs=20, weights="int4"))
        out = np.frombuffer(Path(r.artifacts["outputs"]).read_bytes(), dtype=np.int8)
        assert len(np.unique(out)) > 10  # not saturated: the requantization is what is checked
        assert r.fidelity["max_lsb_diff"] == 0, r.fidelity
        assert "tinymlaas_gemv_w4" in driver(r) and "unpack" not in driver(r)
        assert r.sizes["arena"] <= 256  # the input and output rows only


# convolutions whose 4-bit weights the 2x2 product reads in its loop (gemm_dsp.c gemm_w4): the pointwise path, padded
# windows, odd channel counts and an odd output count, the few-channel split rows of an RGB image, a batch, fully
# connected batches (single rounding); multipliers below 1/2 only (clamped, and the unclamped run of products) and
# with rows of 1/2 or more (4-bit scales are ~18x the int8 ones), alone or mixed with the others
GEMM_W4_CASES = {
    "pointwise_c16": lambda: q.conv2d(21, [1, 6, 5, 16], 10, 1, 1, VALID, NONE),
    "pointwise_odd_channels_relu": lambda: q.conv2d(22, [1, 5, 3, 7], 13, 1, 1, VALID, RELU, out_scale_factor=3.0),
    "conv3x3_same_relu6": lambda: q.conv2d(23, [1, 7, 6, 8], 6, 3, 1, SAME, RELU6),
    "conv3x3_same_s2_c5": lambda: q.conv2d(24, [1, 9, 8, 5], 9, 3, 2, SAME, NONE),
    "conv3x3_rgb_s2": lambda: q.conv2d(25, [1, 11, 9, 3], 8, 3, 2, SAME, NONE),
    "conv3x3_batch2": lambda: q.conv2d(26, [2, 6, 5, 12], 7, 3, 1, VALID, NONE, out_scale_factor=4.0),
    "fc_batch": lambda: q.fully_connected(27, [3, 40], 9, NONE),
    # multipliers below 1/2 after the re-quantization (the others reach 1/2 and more: rows of a left shift)
    "pointwise_c12_relu_small_multipliers": lambda: q.conv2d(28, [1, 4, 6, 12], 10, 1, 1, VALID, RELU,
                                                             out_scale_factor=16.0),
    "fc_batch_relu_small_multipliers": lambda: q.fully_connected(29, [2, 40], 9, RELU, out_scale_factor=8.0),
}
BELOW_ONE_HALF = {"conv3x3_batch2", "pointwise_c12_relu_small_multipliers", "fc_batch_relu_small_multipliers"}


@pytest.mark.parametrize("target", ["cortex-m4", "rv32imac"])  # SMLAD on 16 x the nibbles; the scalar loop
@pytest.mark.parametrize("case", sorted(GEMM_W4_CASES))
def test_4_bit_convolution_weights_are_read_by_gemm_w4_without_a_copy_in_ram(case, target, tmp_path):
    _check_gemm_w4(case, target, tmp_path)


@pytest.mark.parametrize("target", ["cortex-m7", "cortex-m33", "cortex-m3"])  # the other DSP cores; Thumb-2 without
@pytest.mark.parametrize("case", ["conv3x3_same_relu6", "conv3x3_batch2"])  # DSP (the scalar loop)
def test_gemm_w4_on_the_other_arm_cores(case, target, tmp_path):
    _check_gemm_w4(case, target, tmp_path)


def _check_gemm_w4(case, target, tmp_path):
    path = tmp_path / f"{case}.tflite"
    path.write_bytes(GEMM_W4_CASES[case]())
    request = BuildRequest(inputs=20, seed=5, kernels="dsp")  # the C kernels (on RV32 their scalar loops)
    r8 = compile_model(path, target, tmp_path / "int8", request)
    r4 = compile_model(path, target, tmp_path / "int4", replace(request, weights="int4"))
    assert r4.fidelity["max_lsb_diff"] == 0, r4.fidelity
    out = np.frombuffer(Path(r4.artifacts["outputs"]).read_bytes(), dtype=np.int8)
    assert len(np.unique(out)) > 10  # not saturated: the sums and their requantization are what is checked
    # gemm_w4l where the 4-bit scales bring rows of a multiplier of 1/2 or more
    symbol = "tinymlaas_gemm_w4(" if case in BELOW_ONE_HALF else "tinymlaas_gemm_w4l("
    assert symbol in driver(r4) and "tinymlaas_gemm_w8" in driver(r8)
    assert "unpack" not in driver(r4)
    # the same arena (the weights stay in flash, nothing is unpacked) and the same patch on the stack; the kernel's
    # frame may save a few more registers than gemm_w8's: 32 B
    assert r4.sizes["arena"] == r8.sizes["arena"], (r4.sizes, r8.sizes)
    assert r4.sizes["ram_model"] <= r8.sizes["ram_model"] + 32, (r4.sizes, r8.sizes)


def test_the_gemm_w4_layout_pairs_channels_in_the_nibbles_of_each_byte():
    w = np.random.default_rng(4).integers(-8, 8, size=(5, 7)).astype(np.int8)  # odd channels, depth not a quad
    packed = gemm_w4_weights(w).view(np.uint8)
    assert packed.shape == (3, 2, 4)  # [OC/2][K/4][k0 k1 k2 k3]
    low = ((packed & 0xF).astype(np.int8) ^ 8) - 8  # channel 2p
    high = ((packed >> 4).astype(np.int8) ^ 8) - 8  # channel 2p + 1
    back = np.stack([low, high], axis=1).transpose(0, 1, 2, 3).reshape(6, 8)  # [channel][k]
    assert np.array_equal(back[:5, :7], w)
    assert not back[5].any() and not back[:, 7:].any()  # the padding is 0
    assert sums_fit_at_16x(np.full((1, 75200), 7, np.int8), 0)  # inputs within 128 of the zero point
    assert not sums_fit_at_16x(np.full((1, 75200), 7, np.int8), 127)  # 16 x 255 x 526,400 >= 2^31


def test_int4_halves_the_weight_flash(tmp_path):
    path = tmp_path / "conv.tflite"
    path.write_bytes(q.conv2d(3, [1, 8, 8, 16], 32, 3, 1, SAME, RELU))  # 4,608 weights
    for kernels in ("tir", "auto"):  # decoded per read; read in the loop by the C kernel (gemm_w4)
        sizes, ram = {}, {}
        for weights in ("stored", "int4"):
            r = compile_model(path, "rv32imac", tmp_path / kernels / weights,
                              BuildRequest(inputs=3, weights=weights, kernels=kernels))
            assert r.fidelity["max_lsb_diff"] == 0
            sizes[weights], ram[weights] = r.sizes["weights"], r.sizes["arena"]
        # the same biases and tables, the weights halved (give or take the constants' alignment in the blob)
        assert abs(sizes["stored"] - sizes["int4"] - 4608 // 2) <= (0 if kernels == "tir" else ARENA_ALIGN), sizes
        if kernels == "auto":  # no unpacked copy: no arena slot of its own
            assert ram["int4"] == ram["stored"], ram


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


TRAINED = Path(__file__).resolve().parent.parent / "corpus" / "trained"


def _trained(name: str) -> tuple[Path, Path]:
    return TRAINED / f"{name}_int8.tflite", TRAINED / f"{name}_validation.npz"


def test_auto_keeps_the_accuracy_within_the_limit_and_every_chosen_set_was_measured(tmp_path):
    """A 1-D CNN trained on scikit-learn's digits: int4 everywhere loses 0.83 points of top-1 on its held-out
    samples; with a 0.5-point limit, auto keeps some layers at int8 and the build's measured drop is within it."""
    model, validation = _trained("digits_signal")
    r = compile_model(model, "cortex-m4", tmp_path / "auto", BuildRequest(
        inputs=3, weights="auto", validation=str(validation), max_accuracy_drop=0.5))
    assert r.fidelity["max_lsb_diff"] == 0
    a = r.accuracy
    assert a["metric"] == "top1" and a["samples"] == 360 and a["drop"] <= 0.5, a
    plan = {w["op"]: w["precision"] for w in r.weights if w["precision"] != "int8"}
    assert plan and len(plan) < len(r.weights), r.weights  # some layers below eight bits, not all
    # the report's figure is the interpreter's on the model the firmware computes: measured again here
    from tinymlaas.accuracy import load_validation, measure
    from tinymlaas.frontend.tflite import load_tflite

    as_given = load_tflite(model)
    v = load_validation(validation, as_given)
    assert a["reference"] == measure(as_given.data, v, "top1")
    assert a["value"] == measure(rewritten(as_given.data, plan), v, "top1")
    with pytest.raises(InvalidRequest, match=r"--max-accuracy-drop 0.5: int4 weights in 5 of 5 eligible layers lose 0.83 points"):
        compile_model(model, "cortex-m4", tmp_path / "int4", BuildRequest(
            weights="int4", validation=str(validation), max_accuracy_drop=0.5))


def test_auto_mixes_precisions_per_layer_for_less_flash_than_int4_everywhere(tmp_path):
    """The 2-D digits CNN keeps its accuracy with int4 everywhere; auto finds smaller: palettes on the convolutions,
    int4 on the one-row fully connected layers (read in the gemv's loop), within the limit."""
    model, validation = _trained("digits_cnn")
    request = BuildRequest(inputs=3, validation=str(validation), max_accuracy_drop=1.0)
    auto = compile_model(model, "rv32imac", tmp_path / "auto", replace(request, weights="auto"))
    int4 = compile_model(model, "rv32imac", tmp_path / "int4", replace(request, weights="int4"))
    assert auto.accuracy["drop"] <= 1.0 and auto.fidelity["max_lsb_diff"] == 0, auto.accuracy
    kinds = {w["opcode"]: set() for w in auto.weights}
    for w in auto.weights:
        kinds[w["opcode"]].add(w["precision"])
    assert kinds["FULLY_CONNECTED"] == {"int4"} and all(p.startswith("palette") for p in kinds["CONV_2D"]), kinds
    assert auto.sizes["weights"] < int4.sizes["weights"]


def test_metrics_against_hand_computed_values():
    from tinymlaas.accuracy import InvalidValidation, drop, score

    scores = np.array([[0.1, 0.7, 0.2], [0.5, 0.3, 0.2], [0.2, 0.3, 0.5], [0.4, 0.35, 0.25]])
    labels = np.array([1, 1, 2, 1])
    assert score(scores, labels, "top1") == 0.5  # samples 0 and 2
    assert score(np.tile(scores, (1, 2)), labels, "top5") == 1.0
    assert score(scores, scores + 0.5, "mse") == 0.25
    # AUC: positives score 0.9, 0.4; negatives 0.5, 0.1 -> pairs above: (0.9>0.5, 0.9>0.1, 0.4>0.1) = 3 of 4
    assert score(np.array([[0.9], [0.5], [0.4], [0.1]]), np.array([1, 0, 1, 0]), "auc") == 0.75
    assert score(scores, np.eye(3)[labels], "top1") == 0.5  # one-hot labels: their index
    for metric, bad in (("top1", np.zeros((4, 2))), ("mse", np.zeros((4, 2)))):  # named, not a numpy traceback
        with pytest.raises(InvalidValidation, match=f"y holds 8 values .*{metric} needs"):
            score(scores, bad, metric)
    assert drop(0.9861, 0.9778, "top1") == pytest.approx(0.83)
    assert drop(2.0, 2.5, "mse") == pytest.approx(25.0)


@pytest.mark.parametrize("arrays, words", [
    ({"x": np.zeros((4, 64, 1), np.float32)}, "no array y"),
    ({"x": np.zeros((4, 63), np.float32), "y": np.zeros(4)}, "not samples of the model's input"),
    ({"x": np.zeros((4, 64), np.float32), "y": np.zeros(3)}, "4 samples in x but 3 labels"),
    ({"x": np.full((2, 64), np.nan, np.float32), "y": np.zeros(2)}, "finite numbers"),
])
def test_a_validation_file_that_does_not_fit_is_refused_in_one_line(arrays, words, tmp_path, capsys):
    from tinymlaas.cli import main

    path = tmp_path / "v.npz"
    np.savez(path, **arrays)
    model, _ = _trained("digits_signal")
    code = main(["compile", str(model), "-t", "cortex-m4", "--weights", "auto", "--validation", str(path),
                 "-o", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and words in err and "\n" not in err, err
    assert not (tmp_path / "out").exists()


def test_auto_needs_validation_data(tmp_path, capsys):
    from tinymlaas.cli import main

    model, _ = _trained("digits_cnn")
    assert main(["compile", str(model), "-t", "cortex-m4", "--weights", "auto"]) == 2
    assert "--weights auto chooses per layer by accuracy: give --validation" in capsys.readouterr().err


@pytest.mark.parametrize("bits", [2, 3, 5])
@pytest.mark.parametrize("target, kernels", [("cortex-m4", "dsp16"), ("cortex-m4", "tir"), ("rv32imac", "auto")])
@pytest.mark.parametrize("case", ["conv_same_s2_relu6", "depthwise_m2", "fc_per_tensor_batch"])
def test_palettized_layers_are_bit_exact_with_at_most_2_to_the_bits_values(case, target, kernels, bits, tmp_path):
    """Weights snapped to a k-means palette, kept as indices: decoded a block of channels at a time (the C matrix
    kernels) or unpacked before the layer (the others, TIR)."""
    path = tmp_path / f"{case}.tflite"
    path.write_bytes(CASES[case]())
    r = compile_model(path, target, tmp_path / "out", BuildRequest(inputs=20, seed=4, weights="palette",
                                                                   palette_bits=bits, kernels=kernels))
    assert r.fidelity["max_lsb_diff"] == 0, r.fidelity
    assert [w["precision"] for w in r.weights] == [f"palette{bits}"]
    assert any("kept packed in flash" in n or "a block of output channels at a time" in n for n in r.notes), r.notes
    out = np.frombuffer(Path(r.artifacts["outputs"]).read_bytes(), dtype=np.int8)
    assert len(np.unique(out)) > 3


@pytest.mark.parametrize("shape, outputs, kernels", [
    ([1, 37], 11, "dsp"),  # depth and channels not multiples of 4: the padding takes index 0
    ([1, 64], 16, "dsp16"),  # the int16-weight request: a palette row is read as indices all the same
    ([1, 1, 40], 6, "dsp"),  # a 3-D input, flattened to one row
])
def test_a_palettized_row_is_read_by_the_palette_gemv_without_a_copy_in_ram(shape, outputs, kernels, tmp_path):
    """One-row fully connected layers of at most 16 values read their 4-bit indices through a pair table in the
    loop (gemm_dsp.c's gemv_p4): bit-exact, and no unpacking kernel or RAM buffer for the weights."""
    path = tmp_path / "fc.tflite"
    path.write_bytes(q.fully_connected(12, shape, outputs, RELU))
    r = compile_model(path, "cortex-m4", tmp_path / "out", BuildRequest(inputs=20, seed=5, weights="palette",
                                                                       palette_bits=4, kernels=kernels))
    out = np.frombuffer(Path(r.artifacts["outputs"]).read_bytes(), dtype=np.int8)
    assert len(np.unique(out)) > 5 and r.fidelity["max_lsb_diff"] == 0, r.fidelity
    assert [w["precision"] for w in r.weights] == ["palette4"]
    assert "tinymlaas_gemv_p4" in driver(r) and "unpack" not in driver(r)
    assert r.sizes["arena"] <= 256 and any("read 4-bit palette indices in the loop" in n for n in r.notes)


# palettized layers of the C matrix kernels, decoded a block of output channels at a time into a scratch in the arena
# (unpack_weights.c gemm_p8/gemm_p16/gemm4_p16/gemv_p8): the pointwise path, padded windows with an odd channel
# count, the few-channel split rows of an RGB image, a batch, fully connected batches and rows (per tensor: its table
# spread per channel); and layers of several blocks, the last one short (weight_decode.PALETTE_SCRATCH)
PALETTE_BLOCK_CASES = {
    "pointwise_c16": (lambda: q.conv2d(41, [1, 6, 5, 16], 10, 1, 1, VALID, NONE), 4),
    "conv3x3_same_s2_c5": (lambda: q.conv2d(42, [1, 9, 8, 5], 9, 3, 2, SAME, RELU), 3),
    "conv3x3_rgb_s2": (lambda: q.conv2d(43, [1, 11, 9, 3], 8, 3, 2, SAME, RELU6), 2),
    "conv3x3_batch2": (lambda: q.conv2d(44, [2, 6, 5, 12], 7, 3, 1, VALID, NONE), 3),
    "fc_batch": (lambda: q.fully_connected(45, [3, 40], 9, NONE), 4),
    "fc_row_per_tensor": (lambda: q.fully_connected(46, [1, 300], 70, RELU), 3),
    # 20 channel pairs of 128 values: two blocks of int8 (16 pairs and 4), three of int16
    "pointwise_c64_two_blocks": (lambda: q.conv2d(47, [1, 5, 4, 64], 40, 1, 1, VALID, RELU), 4),
    # 10 pairs of 576 values: blocks of the least four pairs (4, 4, 2), an odd last channel
    "conv3x3_c32_three_blocks": (lambda: q.conv2d(48, [1, 6, 5, 32], 19, 3, 1, SAME, NONE), 2),
    # a channel of a zero multiplier and one saturated by its bias (constant outputs: compact rows keep their round)
    "pointwise_dead_channels": (lambda: q.conv2d(49, [1, 5, 4, 16], 12, 1, 1, VALID, RELU, dead_channels=True), 3),
}


@pytest.mark.parametrize("target, kernels", [
    ("cortex-m4", "dsp"), ("cortex-m4", "dsp16"),  # SMLAD on int8 / int16 (four pixels a pass where it applies)
    ("rv32imac", "dsp"), ("cortex-m3", "dsp"),  # the scalar loops: no DSP
])
@pytest.mark.parametrize("case", sorted(PALETTE_BLOCK_CASES))
def test_palettized_matrix_layers_decode_blocks_of_channels_without_a_copy_in_the_arena(case, target, kernels,
                                                                                        tmp_path):
    from tinymlaas.ir.weight_decode import PALETTE_MIN_PAIRS, PALETTE_SCRATCH

    make, bits = PALETTE_BLOCK_CASES[case]
    path = tmp_path / f"{case}.tflite"
    path.write_bytes(make())
    request = BuildRequest(inputs=20, seed=6, kernels=kernels)
    r8 = compile_model(path, target, tmp_path / "int8", request)
    rp = compile_model(path, target, tmp_path / "palette", replace(request, weights="palette", palette_bits=bits))
    assert rp.fidelity["max_lsb_diff"] == 0, rp.fidelity
    assert [w["precision"] for w in rp.weights] == [f"palette{bits}"]
    out = np.frombuffer(Path(rp.artifacts["outputs"]).read_bytes(), dtype=np.int8)
    assert len(np.unique(out)) > 10  # not saturated
    code = driver(rp)
    assert "unpack" not in code and "tinymlaas_gemv_p4" not in code
    row = case.startswith("fc_row")
    four = kernels == "dsp16" and "tinymlaas_gemm4_w16" in driver(r8)
    symbol = ("tinymlaas_gemv_p" if row else "tinymlaas_gemm4_p" if four else "tinymlaas_gemm_p") + (
        "16" if kernels == "dsp16" else "8")
    assert symbol + ("_pt(" if row else "(") in code, code  # fc_row_per_tensor: its table of one triple
    assert "tinymlaas_palette_first_s" in code  # the scratch's first block, right before the layer
    # RAM: one block of the weights in the arena (at most the scratch's bytes, or PALETTE_MIN_PAIRS pairs, or the
    # layer's whole when the arena had room for it), beside the int8 build's; the stack the int8 kernel's and the
    # block loop's frame (its copy of the parameter block, saved registers: under 256 B)
    blocks = [n for n in rp.notes if "a block of output channels at a time" in n]
    assert len(blocks) == 1, rp.notes
    if not row:  # the rows of requant_table's forms (a per-tensor row keeps its table of one triple)
        assert "1 of them keep their requantization rows in 9 B a channel" in blocks[0], blocks[0]
    largest = int(blocks[0].split("the largest block ")[1].split(" B")[0].replace(",", ""))
    weights = r8.sizes["weights"]
    assert 0 < largest <= max(PALETTE_SCRATCH, PALETTE_MIN_PAIRS * 2 * 576 * (2 if kernels == "dsp16" else 1),
                              weights), (largest, rp.notes)
    assert rp.sizes["arena"] <= r8.sizes["arena"] + -(-largest // ARENA_ALIGN) * ARENA_ALIGN, (rp.sizes, r8.sizes)
    assert rp.sizes["stack_peak"] <= r8.sizes["stack_peak"] + 256, (rp.sizes, r8.sizes)


def test_compact_requantization_rows_expand_to_the_table_and_refuse_other_rows():
    """compact_rows keeps requant_table's rows (round from the shift and the output zero point; constant rows of
    multiplier 0) in 9 B; expanded_rows (expand_rows' arithmetic, 32-bit) gives the table back; a row of another
    form (a 4-bit layer's left shift) is refused."""
    from tinymlaas.ir.weight_decode import compact_rows, expanded_rows
    from tinymlaas.ops.dsp_layouts import requant_table

    rng = np.random.default_rng(12)
    w = rng.integers(-127, 128, size=(13, 40)).astype(np.int8)
    bias = rng.integers(-5000, 5000, size=13)
    mult = rng.integers(2**30, 2**31 - 1, size=13)
    shift = rng.integers(-12, -3, size=13)
    mult[3], bias[5] = 0, 2**30  # a zero multiplier, a bias that saturates every output: constant rows
    for zp_out in (-128, -3, 0, 77):
        table = requant_table(w, bias, mult, shift, 5, zp_out, (-128, 127), single=False)
        assert table is not None and (table[:, 1] == 0).sum() >= 2
        compact = compact_rows(table, zp_out)
        assert compact.nbytes == 4 + 9 * 13 + 3  # {R}, 8 B a row, a byte of shift a row in whole words
        assert np.array_equal(expanded_rows(compact, zp_out), table)
    assert compact_rows(np.array([[10, 2**30, 77, -3]], np.int32), 77) is None  # a left shift's row
    assert compact_rows(np.array([[10, 2**30, 78, 4]], np.int32), 0) is None  # a round of no known form


def test_the_palette_blob_decodes_to_the_kernel_layout_in_blocks():
    """palette_blob's header, table and indices give back every value of the layout, from any block's start (the
    C decoder reads runs starting inside a word)."""
    from tinymlaas.ir.weight_decode import palette_blob

    rng = np.random.default_rng(9)
    for bits, dtype in ((2, np.int8), (3, np.int16), (5, np.int8), (6, np.int16)):
        values = rng.choice(np.arange(-100, 100), size=2 ** bits - 1, replace=False)
        c = np.concatenate([[0], values])[rng.integers(0, 2 ** bits, size=(13, 7, 2, 4))].astype(dtype)
        blob = palette_blob(c, bits, scratch=3 * 56 * c.itemsize, least=1)
        assert list(blob[:3]) == [bits, 3, 56]
        table = blob[4:4 + blob[3]].view(np.uint8).view(dtype)
        words = blob[4 + blob[3]:].view(np.uint32).astype(np.uint64)
        per_word = 32 // bits
        index = (words.reshape(-1, 1) >> (np.arange(per_word, dtype=np.uint64) * bits)) & ((1 << bits) - 1)
        assert np.array_equal(table[index.ravel()[:c.size].astype(np.int64)].reshape(c.shape), c)
    assert palette_blob(np.arange(40, dtype=np.int8).reshape(5, 8), 4) is None  # 40 values: not 16


def test_the_palette_gemv_layout_holds_every_real_weight_and_its_table_every_pair():
    from tinymlaas.ir.weight_decode import gemv_palette
    from tinymlaas.ops.dsp_layouts import blocked_weights

    rng = np.random.default_rng(0)
    values = np.array([-120, -64, -9, -1, 0, 3, 17, 90, 127], np.int8)
    w = rng.choice(values[values != 0], size=(7, 13)).astype(np.int8)  # 7 x 13: padded to 8 x 16
    blocked = blocked_weights(w, 4, wide=False)
    packed, pairs = gemv_palette(blocked, 7, 13)
    index = packed.view(np.uint8).reshape(*blocked.shape[:3], 2)
    lo, hi = (pairs.astype(np.int64) << 16 >> 16).astype(np.int16), (pairs >> 16).astype(np.int16)
    for byte, (ka, kb) in ((0, (0, 2)), (1, (1, 3))):  # each byte: two lanes of the quad
        got_a, got_b = lo[index[..., byte]], hi[index[..., byte]]
        real = np.zeros((8, 16), bool)
        real[:7, :13] = True
        real = real.reshape(2, 4, 4, 4).transpose(0, 2, 1, 3)
        assert np.array_equal(got_a[real[..., ka]], blocked[..., ka][real[..., ka]])
        assert np.array_equal(got_b[real[..., kb]], blocked[..., kb][real[..., kb]])
    assert gemv_palette(blocked_weights(rng.integers(-128, 127, (8, 16), dtype=np.int8), 4, False), 8, 16) is None


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6])
def test_palette_packing_round_trips_and_the_rewrite_uses_at_most_2_to_the_bits_values(bits):
    rng = np.random.default_rng(bits)
    weights = rng.integers(-127, 128, size=(7, 3, 3, 5)).astype(np.int8)
    table = palette_of(weights, bits)
    assert table.size <= 2 ** bits and 0 in table
    snapped_weights = snapped(weights, table)
    assert set(np.unique(snapped_weights)) <= set(table.tolist())
    # every weight went to its nearest palette value
    distance = np.abs(snapped_weights.astype(int) - weights)
    assert np.all(distance <= np.abs(weights.astype(int)[..., None] - table.astype(int)).min(axis=-1))
    for c in (snapped_weights, snapped_weights.astype(np.int16) * 2):  # int8, and a widened, doubled layout
        packed = pack_palette(c, bits)
        assert packed is not None
        assert np.array_equal(unpack_palette(*packed, bits, c.size).reshape(c.shape), c)
        assert packed[0].size == -(-c.size // (32 // bits)) * 4
    assert pack_palette(weights, 2) is None  # more values than four


def test_auto_never_keeps_a_plan_beyond_the_limit_even_when_each_layer_alone_is_within_it():
    """The selection rule on its own, with a judge whose drops are set: any layer alone costs 0.3 points, any two
    together 1.0. With a 0.5 limit, exactly one layer may go below eight bits (the largest saving)."""
    from tinymlaas.frontend.lowbit import choose_plan
    from tinymlaas.frontend.tflite import load_tflite, read_graph

    class SetDrops:
        def drop(self, data: bytes) -> float:
            graph = read_graph(data)
            low = sum(1 for op in graph.operators if op.opcode in ("CONV_2D", "FULLY_CONNECTED")
                      and np.unique(graph.tensor(op.inputs[1]).data).size <= 16)
            return {0: 0.0, 1: 0.3}.get(low, 1.0)

    model = load_tflite(_trained("digits_signal")[0])
    eligible = eligible_layers(model.graph)
    plan = choose_plan(model.data, model.graph, eligible, SetDrops(), 0.5)
    assert len(plan) == 1, plan
    biggest = max(eligible, key=lambda op: model.graph.tensor(model.graph.operators[op].inputs[1]).size)
    assert list(plan) == [biggest]


def test_a_search_spans_flash_against_accuracy_and_its_variants_rebuild_exactly(tmp_path):
    """The strategy's points all get auto's plan; the best of them is built again with int8 weights and the plans
    auto kept on its way: the front is flash x cost x accuracy, every point's accuracy is its weights' (measured
    once per plan, the builds being bit-exact to them), none beyond --max-accuracy-drop, and the chosen build has
    the weights asked for."""
    from tinymlaas.accuracy import load_validation
    from tinymlaas.frontend.lowbit import Judge, low_bit_weights
    from tinymlaas.search.search import search

    model, validation = _trained("digits_signal")
    request = BuildRequest(budget=6, weights="auto", validation=str(validation), max_accuracy_drop=0.5, workers=1)
    result = search(model, "rv32imac", tmp_path / "search", request)
    asked = {str(w.op): w.precision for w in low_bit_weights(load_model_bytes(model.read_bytes(), "m"), request)[1]
             if w.precision != "int8"}
    assert asked
    points = [p for p in result.points if p.verified]
    by_plan = {}
    for p in points:
        by_plan.setdefault(json_key(p.variant.get("weights") or {}), []).append(p)
    assert json_key(asked) in by_plan and json_key({}) in by_plan and len(by_plan[json_key({})]) == 1, list(by_plan)
    int8 = by_plan[json_key({})][0]
    original = load_model_bytes(model.read_bytes(), "m")
    judge = Judge(original.data, load_validation(str(validation), original), "top1")
    for p in points:  # each point's accuracy is its own weights' on the validation set
        plan = {int(k): v for k, v in (p.variant.get("weights") or {}).items()}
        assert p.accuracy == judge.value(rewritten(original.data, plan)) and p.accuracy_drop <= 0.5
    assert int8.accuracy_drop == 0 and int8.accuracy == judge.reference
    chosen = result.points[result.chosen]
    assert chosen.variant["weights"] == asked and chosen.flash < int8.flash
    assert result.points.index(int8) in result.front  # the most accurate point stays on the front
    (tmp_path / "front.json").write_text(json.dumps(result.to_dict()))
    again = compile_model(model, "rv32imac", tmp_path / "again", BuildRequest(
        inputs=3, variant_file=str(tmp_path / "front.json")))
    assert again.instructions == chosen.instructions and again.variant == chosen.variant
    assert {w["op"]: w["precision"] for w in again.weights if w["precision"] != "int8"} == {
        int(k): v for k, v in chosen.variant["weights"].items()}


def test_a_search_over_a_set_of_precisions_never_chooses_one_beyond_the_limit(tmp_path, capsys):
    """--weights int4,palette --palette-bits 2 on the 1-D digits CNN: int4 everywhere loses 0.83 points of top-1,
    palettes of 4 values 8.9 with fewer weight bytes. With a 1-point limit the candidates get int4 (the smallest plan
    within it); the palette plan is built on the best variant and measured, but never on the front nor chosen. The
    chosen point rebuilds exactly from front.json, a set given to `compile` is refused naming --weights."""
    from tinymlaas.accuracy import load_validation
    from tinymlaas.cli import main
    from tinymlaas.frontend.lowbit import Judge
    from tinymlaas.search.result import write_result
    from tinymlaas.search.search import search

    model, validation = _trained("digits_signal")
    request = BuildRequest(budget=6, weights="int4,palette", palette_bits=2, validation=str(validation),
                           max_accuracy_drop=1.0, workers=1)
    result = search(model, "cortex-m4", tmp_path / "search", request)
    original = load_model_bytes(model.read_bytes(), "m")
    eligible = eligible_layers(original.graph)
    judge = Judge(original.data, load_validation(str(validation), original), "top1")
    by_precision = {}
    for i, p in enumerate(result.points):
        assert p.verified, p.error
        plan = {int(k): v for k, v in (p.variant.get("weights") or {}).items()}
        assert p.accuracy == judge.value(rewritten(original.data, plan))  # measured, each point its own weights'
        by_precision.setdefault("/".join(sorted(set(plan.values()))) or "int8", []).append(i)
        assert not plan or sorted(plan) == eligible  # uniform plans: every eligible layer
    assert set(by_precision) == {"int8", "int4", "palette2"}, by_precision
    over = [result.points[i] for i in by_precision["palette2"]]
    assert len(over) == 1 and over[0].accuracy_drop > 1.0 and over[0].flash < result.points[result.chosen].flash
    assert over[0].weights_bytes < result.points[result.chosen].weights_bytes
    assert not set(by_precision["palette2"]) & set(result.front) and result.chosen not in by_precision["palette2"]
    chosen = result.points[result.chosen]
    assert result.chosen in by_precision["int4"] and len(by_precision["int4"]) >= 3  # the strategy's candidates
    assert 0 < chosen.accuracy_drop <= 1.0 and chosen.accuracy == judge.value(rewritten(
        original.data, dict.fromkeys(eligible, "int4")))
    int8 = result.points[by_precision["int8"][0]]
    assert chosen.flash < int8.flash and by_precision["int8"][0] in result.front
    assert any("palette2: 5 layer(s)" in n and "beyond --max-accuracy-drop 1" in n for n in result.notes), result.notes
    # the chosen variant rebuilt from front.json, with the search's request (as the service's worker does)
    write_result(result, tmp_path / "front")
    again = compile_model(model, "cortex-m4", tmp_path / "again", replace(
        request, budget=None, workers=None, inputs=3, variant_file=str(tmp_path / "front" / "front.json")))
    assert again.variant == chosen.variant and again.instructions == chosen.instructions
    assert again.sizes["flash_model"] == chosen.flash and again.accuracy["value"] == chosen.accuracy
    assert {w["op"]: w["precision"] for w in again.weights} == dict.fromkeys(eligible, "int4")
    assert again.sizes["weights"] == chosen.weights_bytes and again.accuracy == chosen.accuracy_of_weights
    assert set(chosen.accuracy_of_weights) >= {"metric", "value", "reference"}
    best = json.loads((tmp_path / "front" / "best" / "report.json").read_text())  # the chosen build, its accuracy
    assert best["accuracy"] == again.accuracy and best["sizes"]["weights"] == chosen.weights_bytes
    capsys.readouterr()
    assert main(["compile", str(model), "-t", "cortex-m4", "--weights", "int4,palette", "-o",
                 str(tmp_path / "set")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("tinymlaas: error: --weights int4,palette is a set of precisions for `search`") and (
        "\n" not in err), err


def json_key(value) -> str:
    return json.dumps(value, sort_keys=True)


def test_a_variant_with_weights_the_model_cannot_have_is_refused(tmp_path):
    model, _ = _trained("digits_signal")
    for weights, words in (({"0": "int4"}, "cannot have there"), ({"1": "int3"}, "`weights` must map")):
        path = tmp_path / "v.json"
        path.write_text(json.dumps({"kernels": {}, "weights": weights}))
        with pytest.raises(InvalidRequest, match=words):
            compile_model(model, "cortex-m4", tmp_path / "out", BuildRequest(variant_file=str(path)))


def test_the_per_layer_profile_is_of_the_low_bit_build(tmp_path):
    """--profile builds the model again: with the build's layers below eight bits, so its steps add up to the
    build's own count (they were the int8 model's)."""
    path = tmp_path / "fc.tflite"
    path.write_bytes(CASES["fc_row_wide_output_scale"]())
    r = compile_model(path, "cortex-m4", tmp_path / "out", BuildRequest(inputs=3, weights="int4", profile=True))
    assert r.profile["totals"]["instructions"] == r.instructions
    assert any("gemv_w4" in s["kernel"] for s in r.profile["steps"]), r.profile["steps"]


@pytest.mark.parametrize("target", ["cortex-m4", "rv32imac"])
def test_every_intermediate_tensor_of_a_mixed_low_bit_build_is_bit_exact(tmp_path, target):
    """The layer-by-layer trace of a build with int4 and palette layers, each tensor against the interpreter on the
    model those weights make (the trace built the int8 model before)."""
    from tinymlaas.backends.mcu.profile import verify_layers

    model, _ = _trained("digits_cnn")
    eligible = eligible_layers(load_model_bytes(model.read_bytes(), "m").graph)
    plan = {op: ("int4", "palette2", "palette3")[k % 3] for k, op in enumerate(eligible)}
    results = verify_layers(model, target, tmp_path, inputs=2, plan=plan)
    assert len(results) == 2
    for checks in results:
        computed = [c for c in checks if c.exact_fraction is not None]  # (the flatten's SHAPE is folded at build)
        assert {c.operator.split()[0] for c in checks if c.exact_fraction is None} <= {"SHAPE", "STRIDED_SLICE",
                                                                                       "PACK"}
        assert sum(c.operator.startswith(("CONV_2D", "FULLY_CONNECTED")) for c in computed) >= len(eligible)
        for c in computed:
            assert c.max_lsb_diff == 0, f"{c.operator} {c.tensor}: {c.exact_fraction:.2%} exact"
