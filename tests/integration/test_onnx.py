"""ONNX models on the host targets: imported by TVM's ONNX frontend, checked against ONNX Runtime."""

import json

import numpy as np
import pytest

onnx = pytest.importorskip("onnx", reason="onnx is a dependency (requirements.lock)")
from onnx import TensorProto, helper, numpy_helper

from tests.helpers.cli import cli
from tests.helpers.onnx_models import small_cnn
from tinymlaas.build.pipeline import compile_model
from tinymlaas.build.request import BuildRequest
from tinymlaas.errors import InvalidModel


def test_an_onnx_model_builds_for_the_host_cpu_and_matches_onnx_runtime(tmp_path):
    r = compile_model(small_cnn(tmp_path / "cnn.onnx"), "cpu-host", tmp_path / "out", BuildRequest(inputs=3))
    assert r.verified and r.fidelity["reference"] == "ONNX Runtime" and r.fidelity["max_rel_error"] <= 1e-5
    assert r.sizes["weights"] == (8 * 27 + 8 + 10 * 392 + 10) * 4 and r.lowering == "float"
    meta = json.loads((tmp_path / "out" / "metadata.json").read_text())
    assert meta["inputs"] == [{"name": "x", "shape": [1, 3, 14, 14], "dtype": "float32"}]
    assert (tmp_path / "out" / "model.onnx").read_bytes() == (tmp_path / "cnn.onnx").read_bytes()


def test_a_wrong_onnx_build_would_be_caught(tmp_path):
    """The check is real: the same build compared against another model's reference fails."""
    import tinymlaas.frontend.onnx as frontend
    from tinymlaas.backends.host.build import build_host_external
    from tinymlaas.backends.host.options import HostOptions
    from tinymlaas.targets import get_target

    model = frontend.load_onnx(small_cnn(tmp_path / "a.onnx"))
    other = frontend.load_onnx(small_cnn(tmp_path / "b.onnx", seed=1))
    model.reference_outputs = other.reference_outputs  # the build of `model` checked against `other`
    (tmp_path / "w").mkdir()
    r = build_host_external(model, get_target("cpu-host"), tmp_path / "w", HostOptions(inputs=2), lambda s: None)
    assert not r.verified and r.fidelity["max_rel_error"] > 1e-3


def test_onnx_input_errors_are_one_line(tmp_path):
    with pytest.raises(InvalidModel, match="input 'x' has a dynamic dimension 0 \\('N'\\)"):
        compile_model(small_cnn(tmp_path / "dyn.onnx", batch="N"), "cpu-host", tmp_path / "a")
    (tmp_path / "junk.onnx").write_bytes(b"not a protobuf at all")
    r = cli("compile", tmp_path / "junk.onnx", "-t", "cpu-host", "-o", tmp_path / "b")
    assert r.returncode == 2 and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert "junk.onnx is not a valid ONNX model" in r.stderr
    assert not (tmp_path / "b").exists()
    op = helper.make_node("DeformConv", ["x", "w", "o"], ["y"])  # in ONNX, not in TVM's ONNX frontend
    graph = helper.make_graph([op], "g", [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in
                                          [("x", [1, 1, 4, 4]), ("w", [1, 1, 2, 2]), ("o", [1, 8, 3, 3])]],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1, 3, 3])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)]), tmp_path / "deform.onnx")
    r = cli("compile", tmp_path / "deform.onnx", "-t", "cpu-host", "-o", tmp_path / "d")
    assert r.returncode == 2 and r.stderr.strip() == (
        "tinymlaas: error: deform: TVM's ONNX frontend cannot import it: The following operators are not supported "
        "for frontend ONNX: DeformConv")


@pytest.mark.parametrize("tuned", [False, pytest.param(True, marks=pytest.mark.slow)])  # tuning: ~50 s
def test_batch_norm_after_a_depthwise_convolution_matches_onnx_runtime(tuned, tmp_path):
    """Conv (depthwise) -> BatchNormalization -> Clip, as a PyTorch export of a MobileNet block gives it: built with
    the batch norm kept whole (untuned) and decomposed into scale and shift (tuned), both within 1e-5."""
    rng = np.random.default_rng(3)
    inits = [numpy_helper.from_array(a.astype(np.float32), n) for n, a in (
        ("w", rng.standard_normal((6, 1, 3, 3)) * 0.4), ("gamma", rng.uniform(0.5, 1.5, 6)),
        ("beta", rng.standard_normal(6)), ("mean", rng.standard_normal(6) * 0.2), ("var", rng.uniform(0.5, 2, 6)),
        ("lo", np.array(0.0)), ("hi", np.array(6.0)))]
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], group=6, pads=[1, 1, 1, 1]),
             helper.make_node("BatchNormalization", ["c", "gamma", "beta", "mean", "var"], ["n"], epsilon=1e-5),
             helper.make_node("Clip", ["n", "lo", "hi"], ["y"])]
    graph = helper.make_graph(nodes, "dw_bn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 6, 9, 9])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 6, 9, 9])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(model, tmp_path / "dw_bn.onnx")
    opts = BuildRequest(inputs=3, tune_trials=4 if tuned else 0, tune_trials_per_task=2,
                          tuning_dir=str(tmp_path / "db"))
    r = compile_model(tmp_path / "dw_bn.onnx", "cpu-host", tmp_path / "out", opts)
    assert r.verified and r.fidelity["max_rel_error"] <= 1e-5, r.fidelity
    assert bool(r.tuning["trials"]) == tuned
