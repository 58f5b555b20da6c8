"""Concatenations in place (ir/concat_in_place.py) and RAM against TFLite Micro's arena on the
concatenation-heavy networks of the corpus (Inception-, SqueezeNet-style, a bilinear autoencoder) and a transposed-
convolution autoencoder: each build bit-exact, its RAM (arena + scratch + stack) at most the arena TFLite Micro
itself allocates for the same file (measure/tflm.py, its host build)."""

import re

import numpy as np
import pytest

from tests.helpers.paths import CORPUS
from tinymlaas.backends.mcu import load_firmware_model
from tinymlaas.backends.mcu.build import import_model, weight_storage
from tinymlaas.build.pipeline import compile_model
from tinymlaas.build.request import BuildRequest
from tinymlaas.ir import memory
from tinymlaas.ir.concat_in_place import CONCAT_KERNEL, OUT_STRIDE
from tinymlaas.ir.lower import Copy, KernelCall, lower
from tinymlaas.ir.schedule import schedule_for
from tinymlaas.measure.tflm import tflm_arena
from tinymlaas.targets import get_target

MODELS = CORPUS / "models"


def _program(name: str, target: str):
    model = load_firmware_model(MODELS / f"{name}.tflite")
    t = get_target(target)
    relax_mod, _, _ = import_model(model, t)
    return lower(relax_mod, schedule=schedule_for(None), **weight_storage(model, t))


def _counts(notes) -> tuple[int, int, int]:
    note = next(n for n in notes if n.startswith("concatenation in place"))
    return tuple(int(v) for v in re.findall(r"(\d+) (?:concatenation|input)", note) + re.findall(r"(\d+) copied", note))


def test_fire_modules_write_their_expands_into_the_concatenation():
    """SqueezeNet: both expand convolutions (gemm C kernels) of each fire module write every pixel's channels at the
    concatenation's stride, side by side; no concatenation kernel is left."""
    unplanned = _program("squeezenet_mini_int8", "cortex-m4")
    concats = [s for s in unplanned.steps if isinstance(s, KernelCall) and CONCAT_KERNEL.match(s.kernel)]
    assert len(concats) == 3
    planned = memory.plan(unplanned, "optimal")
    assert not any(isinstance(s, KernelCall) and CONCAT_KERNEL.match(s.kernel) for s in planned.steps)
    assert _counts(planned.notes) == (3, 6, 0)
    strided = [s for s in planned.steps if isinstance(s, KernelCall) and s.kernel.startswith("tinymlaas_gemm")
               and planned.constants[s.args[-2].index][OUT_STRIDE]]
    assert sorted(int(planned.constants[s.args[-2].index][OUT_STRIDE]) for s in strided) == [32, 32, 32, 32, 48, 48]
    # each pair: one at the slice's start, the other one expand's channels later, in the same tensor
    for a, b in zip(strided[::2], strided[1::2]):
        ya, yb = a.args[-1], b.args[-1]
        assert ya.tensor == yb.tensor and yb.within - ya.within == planned.constants[a.args[-2].index][6]  # oc
    # the plan gives no two live tensors the same bytes: checked by the planner's own rules, and by the build below
    assert planned.arena_bytes <= unplanned.arena_bytes


def test_an_input_other_layers_read_is_copied_into_its_slice(tmp_path):
    """The bilinear autoencoder's skips are read by the next layer too: copied (a strided Copy step); the upsampled
    tensors (TIR kernels) are written in place. Bit-exact either way."""
    r = compile_model(MODELS / "bilinear_autoencoder_int8.tflite", "cortex-m4", tmp_path / "b", BuildRequest(inputs=3))
    assert r.verified and r.fidelity["max_lsb_diff"] == 0
    assert _counts(r.notes) == (2, 2, 2)
    source = (tmp_path / "b" / "tinymlaas_model.c").read_text()
    assert "for (uint32_t r = 0; r < 256u; r++)" in source  # 16 x 16 pixels of 16 channels into a 32-channel row
    assert "_into_concatenate" in source


def test_along_the_outermost_axis_a_tensor_just_lives_in_its_slice(tmp_path):
    """Two fully connected heads joined (one run each): no copy, no stride; the second written 5 bytes in (a C
    kernel: any byte will do)."""
    tf = pytest.importorskip("tensorflow", reason="TensorFlow is the optional `tensorflow` extra")
    keras, layers = tf.keras, tf.keras.layers
    keras.utils.set_random_seed(5)
    inp = keras.Input((8,))
    joined = layers.Concatenate()([layers.Dense(5, activation="relu")(inp), layers.Dense(5)(inp)])
    keras.Model(inp, layers.Dense(3)(joined)).save(tmp_path / "heads.keras")
    np.savez(tmp_path / "calib.npz", x=np.random.default_rng(2).standard_normal((16, 8)).astype(np.float32))
    r = compile_model(tmp_path / "heads.keras", "cortex-m4", tmp_path / "b",
                      BuildRequest(inputs=3, quantize="int8", calibration=str(tmp_path / "calib.npz")))
    assert r.verified and r.fidelity["max_lsb_diff"] == 0
    assert _counts(r.notes) == (1, 2, 0)
    calls = re.findall(r"tinymlaas_gemv_w8\(.*\(tinymlaas_arena \+ (\d+)\)\);", (tmp_path / "b" / "tinymlaas_model.c").read_text())
    assert int(calls[1]) - int(calls[0]) == 5


def test_tvm_plan_keeps_the_concatenation_kernels():
    program = _program("inception_mini_int8", "cortex-m4")
    assert memory.plan(program, "tvm") is program
    assert sum(bool(isinstance(s, KernelCall) and CONCAT_KERNEL.match(s.kernel)) for s in program.steps) == 2
    assert not any(isinstance(s, Copy) and s.rows > 1 for s in program.steps)


# (model, target): fast on Cortex-M4, the other precisions and RV32 in the slow suite
RAM_CASES = [("inception_mini_int8", "cortex-m4"), ("squeezenet_mini_int8", "cortex-m4"),
             ("bilinear_autoencoder_int8", "cortex-m4"), ("conv_autoencoder_float32", "rv32imafc")] + [
    pytest.param(m, t, marks=pytest.mark.slow) for m, t in (
        ("inception_mini_int8", "rv32imac"), ("squeezenet_mini_int8", "rv32imac"),
        ("bilinear_autoencoder_int8", "rv32imac"), ("inception_mini_int16x8", "cortex-m4"),
        ("squeezenet_mini_int16x8", "cortex-m4"), ("bilinear_autoencoder_int16x8", "cortex-m4"),
        ("inception_mini_float32", "rv32imafc"), ("squeezenet_mini_float32", "rv32imafc"),
        ("conv_autoencoder_int8", "cortex-m4"), ("conv_autoencoder_int16x8", "cortex-m4"),
        ("unet_tiny_int8", "cortex-m4"))]


@pytest.mark.parametrize("name, target", RAM_CASES)
def test_ram_at_most_tflite_micros_arena(name, target, tmp_path):
    path = MODELS / f"{name}.tflite"
    tflm = tflm_arena(path)
    if tflm.refused:  # TFLite Micro cannot run it (U-Net's TILE): nothing to compare with
        pytest.skip(f"TFLite Micro: {tflm.refused}")
    r = compile_model(path, target, tmp_path / "b", BuildRequest(inputs=3))
    assert r.verified, r.fidelity
    if r.lowering == "integer":
        assert r.fidelity["max_lsb_diff"] == 0
    assert r.sizes["ram_model"] <= tflm.total, (r.sizes, tflm)
