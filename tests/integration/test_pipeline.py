"""The whole pipeline on the MLPerf Tiny models: real TVM, cross compilers, QEMU and TFLite interpreter."""

import json
from pathlib import Path

import numpy as np
import pytest

from tests.helpers.paths import CORPUS_MODELS, model_path
from tinymlaas.build.pipeline import compile_model
from tinymlaas.build.request import BuildRequest
from tinymlaas.frontend.tflite import load_tflite
from tinymlaas.targets import mcu_targets
from tinymlaas.verify import split_outputs

_cache = {}


@pytest.fixture(scope="session")
def compiled(tmp_path_factory, models_dir):
    def get(model, target, inputs=4):
        key = (model, target, inputs)
        if key not in _cache:
            out = tmp_path_factory.mktemp("build") / f"{model}-{target}"
            _cache[key] = compile_model(model_path(model), target, out, BuildRequest(inputs=inputs, seed=7))
        return _cache[key]

    return get


@pytest.mark.parametrize("target", ["cortex-m4", "rv32imafc"])
@pytest.mark.parametrize("model", ["kws_ref_model_float32", "vww_96_float", "pretrainedResnet", "ad01_fp32"])
def test_float_models_match_tflite(compiled, model, target):
    r = compiled(model, target)
    assert r.fidelity["kind"] == "float"
    assert r.fidelity["max_rel_error"] <= 1e-5
    assert r.verified
    assert r.instructions_repeat_exact
    assert r.instructions > 100_000


@pytest.mark.parametrize("target", ["cortex-m4", "rv32imafc"])
@pytest.mark.parametrize("model", ["kws_ref_model", "vww_96_int8", "pretrainedResnet_quant", "ad01_int8"])
def test_int8_models_are_bit_exact(compiled, model, target):
    r = compiled(model, target)
    assert r.lowering == "integer"
    assert r.fidelity["kind"] == "quantized" and r.fidelity["exact_fraction"] == 1.0 and r.fidelity["max_lsb_diff"] == 0
    assert r.verified and r.instructions_repeat_exact
    # Recompute from the bytes the firmware wrote and the interpreter's.
    m = load_tflite(model_path(model))
    got = Path(r.artifacts["outputs"]).read_bytes()
    assert got == Path(r.artifacts["expected_outputs"]).read_bytes()
    assert len(got) == sum(t.nbytes for t in m.outputs) * r.fidelity["inputs"]


# Ibex targets run ~0.5 M cycles/s (KWS: a minute per inference): a small model in tests/integration/test_ibex.py,
# KWS and the other MLPerf Tiny models on Ibex in benchmarks/cycles.py
@pytest.mark.parametrize("target", sorted(n for n, t in mcu_targets().items() if t.rtl is None))
def test_kws_int8_on_every_target(compiled, target):
    # integer kernels need no FPU: Cortex-M3 and RV32IMAC too
    r = compiled("kws_ref_model", target, inputs=3)
    assert r.lowering == "integer" and r.fidelity["max_lsb_diff"] == 0
    assert r.instructions_repeat_exact
    assert 0 < r.sizes["stack_peak"] < 4096
    # weights stay int8 in flash: no larger than the TFLite file's constants
    assert r.sizes["weights"] < 40_000


def test_int8_through_float_lowering_is_reported_honestly(tmp_path, models_dir):
    r = compile_model(model_path("kws_ref_model"), "cortex-m4", tmp_path / "k", BuildRequest(inputs=4, seed=7,
                                                                                           int8_lowering="float"))
    assert r.lowering == "float-emulated" and any("not bit-exact" in n for n in r.notes)
    f = r.fidelity
    m = load_tflite(model_path("kws_ref_model"))
    got = split_outputs(m, Path(r.artifacts["outputs"]).read_bytes(), f["inputs"])
    want = split_outputs(m, Path(r.artifacts["expected_outputs"]).read_bytes(), f["inputs"])
    diff = np.concatenate([np.abs(g[0].astype(int) - w[0].astype(int)).ravel() for g, w in zip(got, want)])
    assert f["exact_fraction"] == pytest.approx(np.mean(diff == 0))
    assert f["max_lsb_diff"] == diff.max()


def test_instruction_counts_repeat_across_builds(tmp_path, models_dir):
    a = compile_model(model_path("ad01_int8"), "cortex-m4", tmp_path / "a", BuildRequest(inputs=2))
    b = compile_model(model_path("ad01_int8"), "cortex-m4", tmp_path / "b", BuildRequest(inputs=2))
    assert (a.instructions, a.memory_accesses) == (b.instructions, b.memory_accesses)


def test_sizes_are_consistent(compiled):
    r = compiled("kws_ref_model_float32", "cortex-m4")
    s = r.sizes
    # the "float" KWS is a dynamic-range export: its int8 weights stay int8 in flash (with a scale per channel),
    # not the ~88 KB they take widened to float32
    assert 20_000 < s["weights"] < 40_000 and any("stored width (int8)" in n for n in r.notes)
    assert s["flash_model"] == s["model_code"] + s["weights"]
    assert s["ram_model"] == s["arena"] + s["kernel_scratch"] + s["stack_peak"]
    assert 0 < s["stack_peak"] < 64 * 1024
    assert s["firmware_flash"] > s["flash_model"]
    # the arena reuses memory: less than all intermediate tensors (25*5*64 floats each, 10 layers) together
    assert s["arena"] < 10 * 25 * 5 * 64 * 4


def test_report_and_artifacts_written(compiled):
    r = compiled("ad01_fp32", "cortex-m4")
    report = json.loads(Path(r.artifacts["dir"] + "/report.json").read_text())
    assert report["instructions"] == r.instructions and report["verified"]
    for name in ("firmware", "driver", "header", "kernels", "weights"):
        assert Path(r.artifacts[name]).stat().st_size > 0


@pytest.mark.parametrize("target", ["cortex-m3", "rv32imac"])
def test_soft_float_targets(compiled, target):
    # No FPU: LLVM calls the soft-float routines; results still match the float reference.
    r = compiled("kws_ref_model_float32", target, inputs=1)
    assert r.verified and r.fidelity["max_rel_error"] <= 1e-5


def test_per_layer_profile_adds_up(compiled, tmp_path):
    from tinymlaas.backends.mcu.profile import profile_model

    prof = profile_model(model_path("kws_ref_model"), "cortex-m4", tmp_path)
    whole = compiled("kws_ref_model", "cortex-m4")
    steps = prof.steps
    assert len(steps) >= 10 and all(s.instructions > 0 and s.cycles_estimate > 0 for s in steps)
    # same input 0 (seed differs from the compiled fixture's, and requantization branches are data dependent)
    assert abs(prof.totals()["instructions"] - whole.instructions) / whole.instructions < 0.01
    # keyed by TFLite operator and kernel variant: DSP kernels on Cortex-M4
    convs = [s for s in steps if s.opcode == "CONV_2D"]
    assert len(convs) == 5 and {s.implementation for s in convs} == {"dsp"}
    assert [s.op_index for s in convs] == [0, 2, 4, 6, 8]
    assert prof.cycles_source is None and "cortex-m4" in prof.estimate_method


@pytest.mark.parametrize("name, first", [("ds_cnn_kws_float32", "CONV_2D"), ("ds_cnn_kws_int8", "QUANTIZE")])
def test_profile_names_the_operator_of_every_fused_kernel(name, first, tmp_path):
    """FuseOps binds each fused group to a fresh variable; the steps still name their TFLite operator: a float
    model's convolutions (with bias and activation fused), an int8 model's quantization of its float input."""
    from tinymlaas.backends.mcu.profile import profile_model

    model = CORPUS_MODELS / f"{name}.tflite"
    prof = profile_model(model, "cortex-m4", tmp_path)
    graph = load_tflite(model).graph
    layers = [op.index for op in graph.operators if op.opcode in ("CONV_2D", "DEPTHWISE_CONV_2D")]
    assert sorted(s.op_index for s in prof.steps if s.opcode in ("CONV_2D", "DEPTHWISE_CONV_2D")) == layers
    assert prof.steps[0].opcode == first and prof.steps[0].features is not None
    assert all(s.op_index is not None for s in prof.steps if s.kernel != "copy" and s.instructions > 1000)


def _assert_layers_exact(results):
    for checks in results:
        for c in checks:
            assert c.exact_fraction is not None, f"{c.operator} {c.tensor}: not produced by any step"
            assert c.max_lsb_diff == 0, f"{c.operator} {c.tensor}: {c.exact_fraction:.2%} exact"


@pytest.mark.parametrize("target", ["cortex-m4", "rv32imac"])
@pytest.mark.parametrize("model", ["kws_ref_model", "vww_96_int8", "pretrainedResnet_quant", "ad01_int8"])
def test_every_intermediate_tensor_is_bit_exact(model, target, tmp_path, models_dir):
    from tinymlaas.backends.mcu.profile import verify_layers

    results = verify_layers(model_path(model), target, tmp_path, inputs=3, seed=11)
    assert len(results) == 3 and len(results[0]) >= 3
    _assert_layers_exact(results)


@pytest.mark.parametrize("target", ["cortex-m3", "cortex-m4", "cortex-m7", "rv32imac"])
@pytest.mark.parametrize("model", ["kws_ref_model", "vww_96_int8", "pretrainedResnet_quant"])
def test_intermediate_tensors_bit_exact_on_100_inputs(model, target, tmp_path, models_dir):
    from tinymlaas.backends.mcu.profile import verify_layers

    _assert_layers_exact(verify_layers(model_path(model), target, tmp_path, inputs=100, seed=100))
