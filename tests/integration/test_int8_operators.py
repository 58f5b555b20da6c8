"""Every integer kernel, bit-exact with the TFLite interpreter's reference kernels, on small random layers."""

import re
from pathlib import Path

import numpy as np
import pytest

from tests.helpers import quantized_layers as q
from tinymlaas.build.pipeline import compile_model
from tinymlaas.build.request import BuildRequest

SAME, VALID = 0, 1
NONE, RELU, RELU_N1_TO_1, RELU6 = 0, 1, 2, 3

CASES = {
    "conv_same_s2_relu6_per_channel": lambda: q.conv2d(1, [1, 9, 7, 3], 5, 3, 2, SAME, RELU6),
    "conv_valid_s1_per_tensor": lambda: q.conv2d(2, [1, 6, 8, 4], 3, 3, 1, VALID, NONE, per_channel=False),
    "conv_same_dilated_relu": lambda: q.conv2d(3, [1, 10, 9, 2], 4, 3, 1, SAME, RELU, dilation=2),
    "conv_1x1_odd": lambda: q.conv2d(4, [1, 5, 3, 7], 9, 1, 1, VALID, RELU_N1_TO_1),
    "conv_1x1_odd_pixels_c12": lambda: q.conv2d(22, [1, 3, 5, 12], 7, 1, 1, VALID, RELU),
    "conv_dead_channels": lambda: q.conv2d(20, [1, 5, 5, 8], 6, 3, 1, SAME, RELU, dead_channels=True),
    "conv_multiplier_above_one": lambda: q.conv2d(21, [1, 4, 4, 4], 4, 1, 1, VALID, NONE, out_scale_factor=0.1),
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
    "add_broadcast_channels_relu6": lambda: q.add(35, [1, 3, 5, 6], RELU6, b_shape=[1, 1, 1, 6]),
    "sub_broadcast_rows": lambda: q.add(36, [2, 5, 4], NONE, b_shape=[1, 5, 1], opcode="SUB"),
    "softmax_row": lambda: q.softmax(15, [1, 10], 0.1),
    "softmax_rows_wide_scale": lambda: q.softmax(16, [3, 7], 0.4, beta=0.7),
    "reshape": lambda: q.reshape(17, [1, 4, 4, 2], [1, 32]),
}


@pytest.mark.parametrize(
    "target, kernels",
    # DSP micro-kernels with int8 and int16 weights, integer TIR
    [("cortex-m4", "dsp"), ("cortex-m4", "dsp16"), ("cortex-m4", "tir"), ("rv32imac", "tir")],
)
@pytest.mark.parametrize("case", sorted(CASES))
def test_operator_is_bit_exact(case, target, kernels, tmp_path):
    path = tmp_path / f"{case}.tflite"
    path.write_bytes(CASES[case]())
    r = compile_model(path, target, tmp_path / "out", BuildRequest(inputs=20, seed=3, kernels=kernels))
    assert r.lowering == "integer"
    assert r.fidelity["max_lsb_diff"] == 0, r.fidelity
    out = np.frombuffer(Path(r.artifacts["outputs"]).read_bytes(), dtype=np.int8)
    assert len(np.unique(out)) > 3  # a layer whose outputs all saturate would prove nothing


@pytest.mark.parametrize("out_type", [q.I32, q.F32])
@pytest.mark.parametrize("in_type", [q.I8, q.s.TensorType.INT16])
def test_cast_from_quantized_tensors(in_type, out_type, tmp_path):
    path = tmp_path / "cast.tflite"
    path.write_bytes(q.cast(23, [2, 3, 5], in_type, out_type))
    r = compile_model(path, "cortex-m3", tmp_path / "out", BuildRequest(inputs=5))
    assert r.verified and r.fidelity["exact_fraction"] == 1.0, r.fidelity
    dtype = np.int32 if out_type == q.I32 else np.float32
    out = np.frombuffer(Path(r.artifacts["outputs"]).read_bytes(), dtype=dtype)
    assert out.min() < -20 and out.max() > 20  # raw values, not dequantized ones


# Which DSP kernel each case must reach: the fast kernels where requantization was proved overflow-free
# (dead channels folded to constants), the general ones (conv_s8.c) where it was not.
DSP_KERNEL = {
    ("conv_same_s2_relu6_per_channel", "dsp"): "tinymlaas_gemm_w8",
    ("conv_1x1_odd_pixels_c12", "dsp"): "tinymlaas_gemm_w8",
    ("conv_dead_channels", "dsp"): "tinymlaas_gemm_w8",
    ("conv_multiplier_above_one", "dsp"): "tinymlaas_conv1x1_s8",
    ("conv_1x1_odd", "dsp"): "tinymlaas_conv1x1_s8",  # a multiplier >= 0.5: left shift, general form
    ("depthwise_3x3_c8_same_relu6", "dsp"): "tinymlaas_depthwise3x3_w8",
    ("depthwise_valid_s1", "dsp"): "tinymlaas_depthwise_s8",
    ("fc_relu", "dsp"): "tinymlaas_gemv_w8_pt",  # quantized per tensor: the biases, one {mult, round, shift}
    ("fc_flatten_batch", "dsp"): "tinymlaas_gemm_w8",
    ("conv_same_s2_relu6_per_channel", "dsp16"): "tinymlaas_gemm4_w16",  # four pixels per pass
    ("conv_1x1_odd_pixels_c12", "dsp16"): "tinymlaas_gemm4_w16",  # 15 pixels: a last group of three
    ("fc_flatten_batch", "dsp16"): "tinymlaas_gemm_w16",  # fully connected: the 2x2 loop
    ("depthwise_3x3_c8_same_relu6", "dsp16"): "tinymlaas_depthwise3x3_rows",
    ("fc_relu", "dsp16"): "tinymlaas_gemv_w16_pt",
}


# The 3x3 depthwise kernel over a window of widened rows (dsp16): walked along rows or, when the output is taller
# than wide, transposed; channel groups of four with a tail; strides 1 and 2; VALID with unused input columns;
# batches. Also on the Cortex-M33 (ARMv8-M), whose assembler takes the same Thumb-2 code.
ROWS_CASES = {
    "depthwise_3x3_tall_c6_same_relu": lambda: q.depthwise(24, [1, 11, 4, 6], 1, 3, 1, SAME, RELU),
    "depthwise_3x3_valid_s2_even_width": lambda: q.depthwise(25, [1, 9, 8, 4], 1, 3, 2, VALID, NONE),
    "depthwise_3x3_batch2_c5_relu6": lambda: q.depthwise(26, [2, 5, 7, 5], 1, 3, 1, SAME, RELU6),
    "depthwise_3x3_tall_s2_c9": lambda: q.depthwise(27, [1, 13, 6, 9], 1, 3, 2, SAME, NONE),
}


@pytest.mark.parametrize("target", ["cortex-m4", pytest.param("cortex-m33", marks=pytest.mark.slow)])
@pytest.mark.parametrize("case", sorted(ROWS_CASES))
def test_depthwise_rows_kernel_is_bit_exact(case, target, tmp_path):
    path = tmp_path / f"{case}.tflite"
    path.write_bytes(ROWS_CASES[case]())
    r = compile_model(path, target, tmp_path / "out", BuildRequest(inputs=20, seed=3, kernels="dsp16"))
    driver = "".join(f.read_text() for f in (tmp_path / "out").rglob("tinymlaas_model.c"))
    assert "tinymlaas_depthwise3x3_rows" in driver
    assert r.fidelity["max_lsb_diff"] == 0, r.fidelity
    out = np.frombuffer(Path(r.artifacts["outputs"]).read_bytes(), dtype=np.int8)
    assert len(np.unique(out)) > 3


# The matrix-product kernel's patch gathering: a depth of 4n - 1 padded per tap to whole words (the extra byte
# meets a zero weight), including the patch that ends on the tensor's last byte (no read past it) and a batch
# whose taps read into the next image; pointwise layers gathered as runs (batch 2, odd pixel count).
GATHER_CASES = {
    "conv_rgb_valid_batch2": lambda: q.conv2d(28, [2, 6, 5, 3], 4, 3, 1, VALID, RELU),
    "conv_c7_same_s2": lambda: q.conv2d(29, [1, 7, 6, 7], 6, 3, 2, SAME, NONE),
    "conv_rgb_5x5_same_relu6": lambda: q.conv2d(30, [1, 8, 7, 3], 5, 5, 1, SAME, RELU6),
    "conv_1x1_batch2_odd_pixels": lambda: q.conv2d(31, [2, 3, 3, 8], 6, 1, 1, VALID, RELU),
    # four pixels per pass (gemm4, int16 weights on DSP cores): a last group of 3 pixels (7 of them, across the
    # batch), a last group of one (25 pixels), an RGB input, more channels than one run of 32 and an odd count
    "conv_1x1_batch_7_pixels_c36_oc37": lambda: q.conv2d(32, [7, 1, 1, 36], 37, 1, 1, VALID, RELU6),
    "conv_3x3_25_pixels_oc70_relu6": lambda: q.conv2d(33, [1, 5, 5, 12], 70, 3, 1, SAME, RELU6),
    "conv_rgb_3x3_s2_16_pixels": lambda: q.conv2d(34, [1, 8, 8, 3], 8, 3, 2, SAME, NONE),
    # tap rows of whole words (one channel, four taps across; two channels, two taps; dilated across: per tap),
    # widened straight from the input inside, from a padded copy of the row where the window is clipped, zeros for
    # rows above and below
    "conv_c1_4x4_same_s2": lambda: q.conv2d(35, [1, 13, 10, 1], 12, 4, 2, SAME, RELU),
    "conv_c2_2x2_same_dilated": lambda: q.conv2d(36, [1, 7, 6, 2], 6, 2, 1, SAME, NONE, dilation=2),
    "conv_c2_2x2_same": lambda: q.conv2d(37, [2, 5, 6, 2], 9, 2, 1, SAME, RELU6),
    # tap rows of one to three channels that are not whole words, split (DSP cores): each row's whole words
    # straight from the input, the rows' leftover bytes in one last quad (3x3 RGB: 7 quads); clipped windows
    # from a padded copy; rows of three bytes (all leftovers), of six (one word and two), a batch
    "conv_c1_3x3_same": lambda: q.conv2d(38, [1, 7, 9, 1], 5, 3, 1, SAME, RELU),
    "conv_c2_3x3_valid_s2": lambda: q.conv2d(39, [1, 9, 8, 2], 7, 3, 2, VALID, NONE),
    "conv_rgb_3x3_same_batch2": lambda: q.conv2d(40, [2, 6, 7, 3], 10, 3, 1, SAME, RELU6),
    # three channels not split: rows of whole words (4x4 taps: twelve bytes), dilated across (taps apart)
    "conv_rgb_4x4_same": lambda: q.conv2d(46, [1, 9, 8, 3], 6, 4, 1, SAME, RELU),
    "conv_rgb_3x3_dilated": lambda: q.conv2d(47, [1, 9, 9, 3], 5, 3, 1, SAME, NONE, dilation=2),
}

# gemm4 where four pixels per pass win (int16 weights on DSP cores: pixels 0 or 3 mod 4, or 24 and more)
GEMM4 = {"conv_rgb_4x4_same", "conv_rgb_3x3_dilated", "conv_c1_3x3_same", "conv_c2_3x3_valid_s2", "conv_rgb_3x3_same_batch2", "conv_c1_4x4_same_s2", "conv_c2_2x2_same", "conv_c2_2x2_same_dilated", "conv_rgb_valid_batch2", "conv_c7_same_s2", "conv_rgb_5x5_same_relu6", "conv_1x1_batch_7_pixels_c36_oc37",
         "conv_3x3_25_pixels_oc70_relu6", "conv_rgb_3x3_s2_16_pixels"}


@pytest.mark.parametrize("target, kernels", [("cortex-m4", "dsp"), ("cortex-m4", "dsp16"), ("rv32imac", "dsp16")])
@pytest.mark.parametrize("case", sorted(GATHER_CASES))
def test_gemm_patch_gathering_is_bit_exact(case, target, kernels, tmp_path):
    path = tmp_path / f"{case}.tflite"
    path.write_bytes(GATHER_CASES[case]())
    r = compile_model(path, target, tmp_path / "out", BuildRequest(inputs=20, seed=3, kernels=kernels))
    driver = "".join(f.read_text() for f in (tmp_path / "out").rglob("tinymlaas_model.c"))
    four = target == "cortex-m4" and kernels == "dsp16" and case in GEMM4
    assert ("tinymlaas_gemm4_w16" if four else "tinymlaas_gemm_w") in driver
    assert r.fidelity["max_lsb_diff"] == 0, r.fidelity
    out = np.frombuffer(Path(r.artifacts["outputs"]).read_bytes(), dtype=np.int8)
    assert len(np.unique(out)) > 3


@pytest.mark.parametrize("case, kernels", sorted(DSP_KERNEL))
def test_dsp_kernel_choice(case, kernels, tmp_path):
    from tinymlaas.frontend.cleanup import clean
    from tinymlaas.frontend.tflite import load_tflite
    from tinymlaas.frontend.to_relax import to_relax
    from tinymlaas.targets import get_target

    path = tmp_path / f"{case}.tflite"
    path.write_bytes(CASES[case]())
    text = to_relax(clean(load_tflite(path).graph), get_target("cortex-m4"), kernels).script()
    assert set(re.findall(r'"(tinymlaas_[a-z0-9_]+)"', text)) == {DSP_KERNEL[case, kernels]}


# The default build ("auto") takes TIR with its family's default schedule where one is listed (ir/layer_schedule.py
# DEFAULT_SCHEDULES: depthwise layers; convolutions over one to three channels whose tap rows are not whole words),
# on every core; the C kernels elsewhere. Case -> (model, the C kernel it replaces, the default's tile check).
DEFAULTS = {
    "dw_3x3_c8_same": (CASES["depthwise_3x3_c8_same_relu6"], "tinymlaas_depthwise",
                       lambda s, shape: s.oc_block == 1 and s.px_block == min(5, shape.pixels)),
    "dw_5x5_c12_same": (lambda: q.depthwise(41, [1, 14, 13, 12], 1, 5, 1, SAME, NONE), "tinymlaas_depthwise",
                        lambda s, shape: s.oc_block == 1 and s.px_block == min(5, shape.pixels)),
    "dw_3x3_c6_s2": (lambda: q.depthwise(42, [1, 15, 16, 6], 1, 3, 2, SAME, RELU), "tinymlaas_depthwise",
                     lambda s, shape: s.oc_block == 1 and s.px_block == min(5, shape.pixels)),
    "conv_rgb_3x3_s2": (lambda: q.conv2d(43, [1, 17, 15, 3], 8, 3, 2, SAME, RELU6), "tinymlaas_gemm",
                        lambda s, shape: s.oc_block == 2 and s.unroll_tile),
    "conv_c2_3x3_same": (lambda: q.conv2d(44, [1, 9, 10, 2], 6, 3, 1, SAME, NONE), "tinymlaas_gemm",
                         lambda s, shape: s.oc_block == 2 and s.unroll_tile),
}


@pytest.mark.parametrize("target", ["cortex-m4", "rv32imac"])
@pytest.mark.parametrize("case", sorted(DEFAULTS))
def test_the_default_build_takes_tir_with_the_family_default(case, target, tmp_path):
    from tinymlaas.frontend.cleanup import clean
    from tinymlaas.frontend.tflite import load_tflite
    from tinymlaas.ir.layer_schedule import default_schedule, kernel_shape
    from tinymlaas.targets import get_target

    model, c_kernel, tile_ok = DEFAULTS[case]
    path = tmp_path / f"{case}.tflite"
    path.write_bytes(model())
    auto = compile_model(path, target, tmp_path / "auto", BuildRequest(inputs=5, seed=2))
    c = compile_model(path, target, tmp_path / "c", BuildRequest(inputs=5, seed=2, kernels="dsp"))
    assert auto.fidelity["max_lsb_diff"] == 0 and c.fidelity["max_lsb_diff"] == 0
    driver = (tmp_path / "auto" / "tinymlaas_model.c").read_text()
    graph = clean(load_tflite(path).graph)
    shape = kernel_shape(graph, graph.operators[0], get_target(target))
    schedule = default_schedule(shape)  # the table's, in the layer's space
    assert schedule is not None and tile_ok(schedule, shape)
    assert c_kernel not in driver and "tinymlaas_k_op0" in driver  # TIR, not the C kernel
    assert c_kernel in (tmp_path / "c" / "tinymlaas_model.c").read_text()
    assert auto.instructions < c.instructions


def test_families_without_a_default_keep_their_kernels(tmp_path):
    from tinymlaas.ir.layer_schedule import KernelShape, default_schedule

    assert default_schedule(KernelShape("dense", 1, 12, (64,), zero_point=False)) is None
    assert default_schedule(KernelShape("conv", 5, 16, (3, 3, 8), zero_point=True)) is None
    assert default_schedule(KernelShape("conv", 5, 16, (10, 4, 1), zero_point=True)) is None  # whole-word rows
    wide = tmp_path / "wide.tflite"  # eight channels: the C kernels stay the default
    wide.write_bytes(q.conv2d(45, [1, 9, 10, 8], 6, 3, 1, SAME, NONE))
    built = compile_model(wide, "cortex-m4", tmp_path / "wide", BuildRequest(inputs=3, seed=2))
    assert built.fidelity["max_lsb_diff"] == 0
    assert "tinymlaas_gemm" in (tmp_path / "wide" / "tinymlaas_model.c").read_text()


@pytest.mark.parametrize("single", [False, True])
def test_requant_table_equals_tflite_requantization(single):
    """gemm_dsp.c's arithmetic (emulated with int32 overflow checks) against TFLite's formula, at the proved
    accumulator bounds and at random accumulators, for the channels requant_table accepts."""
    from tinymlaas.ops.dsp_layouts import requant_table, requantize_exact
    from tinymlaas.ops.quantization import quantize_multiplier

    rng = np.random.default_rng(5)
    accepted = 0

    def i32(v):
        assert -(2**31) <= v < 2**31, "int32 overflow in the kernel's arithmetic"
        return v

    for trial in range(60):
        oc, k = 16, int(rng.integers(1, 600))
        w = rng.integers(-127, 128, size=(oc, k)).astype(np.int8)
        bias = rng.integers(-(2**(trial % 31)), 2**(trial % 31) + 1, size=oc).astype(np.int32)
        pairs = [quantize_multiplier(float(r)) for r in np.exp(rng.uniform(np.log(1e-9), np.log(3.0 if trial % 5 == 0 else 0.45), size=oc))]
        mult, shift = np.array([m for m, _ in pairs]), np.array([s for _, s in pairs])
        zp_in, zp_out = int(rng.integers(-128, 128)), int(rng.integers(-128, 128))
        act = (max(-128, zp_out), 127) if trial % 3 else (-128, 127)
        table = requant_table(w, bias, mult, shift, zp_in, zp_out, act, single)
        if table is None:
            continue
        spread = max(abs(-128 - zp_in), abs(127 - zp_in)) * np.abs(w.astype(np.int64)).sum(axis=1)
        for ch in range(oc):
            tb, tm, tr, te = (int(v) for v in table[ch])
            accs = [-int(spread[ch]), int(spread[ch]), *rng.integers(-spread[ch], spread[ch] + 1, size=50).tolist()]
            for acc in accs:
                if single:
                    v = (i32(i32(acc + tb) * tm >> 32) + tr) >> te
                else:
                    x = i32(i32(2 * acc + tb) * tm + (1 << 31) >> 32)
                    v = i32(x + tr - int(x < 0)) >> te
                got = min(max(v, -128, act[0]), 127, act[1])
                want = min(max(requantize_exact(acc + int(bias[ch]), int(mult[ch]), int(shift[ch]), single) + zp_out,
                               act[0]), act[1])
                assert got == want, (trial, ch, acc)
        accepted += 1
    assert accepted >= 30
