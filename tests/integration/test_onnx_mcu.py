"""ONNX and PyTorch models on the microcontroller targets: fresh PyTorch exports (float, and QDQ int8 from
onnxruntime's quantize_static) converted to TFLite operators, built, run in the emulator, bit-exact to the
interpreter on the conversion and checked against ONNX Runtime / PyTorch on the same inputs."""

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="torch is a dependency (requirements.lock)")

from onnx import TensorProto, helper

from tests.helpers.cli import cli
from tests.helpers.torch_onnx import export_onnx, export_onnx_torchscript, export_pt2, export_pt2e, quantize_qdq
from tinymlaas.build.pipeline import compile_model
from tinymlaas.build.request import BuildRequest
from tinymlaas.errors import UnsupportedOperator
from tinymlaas.frontend.onnx import load_onnx, onnx_as_tflite
from tinymlaas.oracle import make_inputs, reference_outputs
from tinymlaas.verify import SOURCE_MAX_LSB, source_fidelity, source_lsb_tolerance


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """name -> path: each architecture as float ONNX, QDQ with uint8 activations (quantize_static's default) and
    QDQ int8 per-channel, and as a .pt2."""
    d = tmp_path_factory.mktemp("onnx-mcu")
    paths = {}
    for arch in ("cnn", "separable", "mlp", "conv1d"):
        f = paths[arch] = export_onnx(arch, d / f"{arch}.onnx")
        paths[f"{arch}-u8"] = quantize_qdq(f, d / f"{arch}-u8.onnx")
        paths[f"{arch}-s8"] = quantize_qdq(f, d / f"{arch}-s8.onnx", signed=True)
        paths[f"{arch}-pt2"] = export_pt2(arch, d / f"{arch}.pt2")
        paths[f"{arch}-pt2e"] = export_pt2e(arch, d / f"{arch}-pt2e.pt2")
    return paths


@pytest.mark.parametrize("target", ["cortex-m4", "rv32imac"])
@pytest.mark.parametrize("model", ["cnn", "separable", "mlp", "cnn-u8", "separable-s8", "mlp-s8"])
def test_onnx_models_build_for_microcontrollers(exports, model, target, tmp_path):
    report = compile_model(exports[model], target, tmp_path / "out")
    f = report.fidelity
    assert report.verified, f
    source = f["source"]
    assert source["reference"] == "ONNX Runtime" and source["passed"] and source["inputs"] == f["inputs"]
    if "-" in model:  # QDQ: integer kernels only, bit-exact to the interpreter on the conversion
        assert report.lowering == "integer" and f["max_lsb_diff"] == 0
        assert source["max_lsb_diff"] <= SOURCE_MAX_LSB
        # the weights stay int8: fewer bytes than their float32 values, with each kernel's requantization tables
        proto = load_onnx(exports[model]).proto()
        int8_values = sum(int(np.prod(t.dims)) for t in proto.graph.initializer if t.data_type in (2, 3))
        assert report.sizes["weights"] < 4 * int8_values
    else:
        assert report.lowering == "float" and f["max_rel_error"] <= 1e-5 and source["max_rel_error"] <= 1e-5
    saved = json.loads((tmp_path / "out" / "report.json").read_text())
    assert saved["fidelity"]["source"] == source and (tmp_path / "out" / "model.onnx").is_file()


@pytest.mark.parametrize("target", ["cortex-m4", "rv32imac"])
def test_a_pytorch_exported_program_builds_for_microcontrollers(exports, target, tmp_path):
    r = cli("compile", exports["cnn-pt2"], "-t", target, "-o", tmp_path / "out", "--json")
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)  # only JSON on stdout, though PyTorch's exporter reports its steps
    assert report["verified"] and report["lowering"] == "float"
    assert report["fidelity"]["source"]["reference"] == "PyTorch (CPU, float32)"
    assert report["fidelity"]["source"]["max_rel_error"] <= 1e-5
    assert (tmp_path / "out" / "model.pt2").is_file()


@pytest.mark.parametrize("target", ["cortex-m4", "rv32imac"])
@pytest.mark.parametrize("model", ["cnn", "separable"])
def test_pt2e_quantized_programs_run_on_integer_kernels(exports, model, target, tmp_path):
    """PyTorch's PT2E int8 (as ExecuTorch's Cortex-M backend takes it): quantize/dequantize around float aten
    operators, ReLU between convolution and quantize (fused as TFLite's clamp), float biases: integer kernels only,
    bit-exact to the conversion, within SOURCE_MAX_LSB of PyTorch."""
    report = compile_model(exports[f"{model}-pt2e"], target, tmp_path / "out")
    f = report.fidelity
    assert report.verified, f
    if model == "cnn":
        assert report.lowering == "integer" and f["max_lsb_diff"] == 0
    else:  # PT2E leaves the final softmax in float: that one float kernel within the float tolerance
        assert report.lowering == "mixed" and f["kind"] == "float" and f["max_rel_error"] <= 1e-5
    # the softmax output measured in the steps of the dequantized logits it is computed from
    assert f["source"]["reference"].startswith("PyTorch") and f["source"]["max_lsb_diff"] <= SOURCE_MAX_LSB


def test_a_pt2e_quantized_transformer_builds_for_microcontrollers(tmp_path):
    """PT2E int8 of the small ViT: its Linear layers over tokens come as MatMul by a transposed, dequantized weight
    (moved at build time, still int8: integer kernels); layer norm, attention's products and softmax in float."""
    from tinymlaas.frontend.torch_export import exported_program_as_tflite, load_exported_program

    path = export_pt2e("transformer", tmp_path / "t.pt2")
    report = compile_model(path, "cortex-m4", tmp_path / "out")
    f = report.fidelity
    assert report.verified and report.lowering == "mixed" and f["max_abs_error"] == 0, f
    # its float results quantized again (9) widen the source check's bound by two steps (measured: 0-3 steps)
    assert f["source"]["reference"].startswith("PyTorch") and f["source"]["max_lsb_diff"] <= SOURCE_MAX_LSB + 2
    assert "within 4 LSB" in f["source"]["tolerance"]
    graph = exported_program_as_tflite(load_exported_program(path)).graph
    int8_linear = [op for op in graph.operators if op.opcode == "FULLY_CONNECTED"
                   and graph.tensor(op.inputs[1]).dtype == "int8"]
    assert len(int8_linear) >= 2  # the MLP's two Linear layers over the tokens


@pytest.mark.parametrize("model", ["cnn", "separable", "mlp", "conv1d", "cnn-u8", "cnn-s8", "separable-u8",
                                   "separable-s8", "mlp-u8", "mlp-s8", "conv1d-u8", "conv1d-s8"])
def test_conversions_match_onnx_runtime(exports, model):
    """Every architecture and quantization: the converted model in the interpreter against ONNX Runtime on 30
    random inputs (the firmware is bit-exact to the former, the tests above show)."""
    tflite = onnx_as_tflite(load_onnx(exports[model]))
    batches = make_inputs(tflite, 30, seed=3)
    check = source_fidelity(tflite, batches, reference_outputs(tflite, batches))
    assert check["passed"], check
    if "-" in model:
        assert tflite.quantized and 0 <= check["max_lsb_diff"] <= SOURCE_MAX_LSB
        # integer operators, not float ones between a dequantize and a quantize
        assert not {"CONV_2D", "FULLY_CONNECTED"} - set(tflite.operators) or model.startswith("mlp")
        assert tflite.graph.lowering() == "integer"
    else:
        assert check["max_rel_error"] <= 1e-5


def test_the_source_check_can_fail(exports):
    """A conversion that computed something else is caught: one output value one step off passes, three fail."""
    tflite = onnx_as_tflite(load_onnx(exports["cnn-s8"]))
    batches = make_inputs(tflite, 4, seed=0)
    want = reference_outputs(tflite, batches)
    scale = tflite.source_output_scales[0]
    assert scale and source_fidelity(tflite, batches, want)["passed"]
    off = [[w.copy() for w in batch] for batch in want]
    off[2][0].flat[1] += 3 * scale + source_fidelity(tflite, batches, want)["max_lsb_diff"] * scale
    assert not source_fidelity(tflite, batches, off)["passed"]
    assert source_lsb_tolerance(tflite) == SOURCE_MAX_LSB  # integer throughout: no float result quantized again
    float_model = onnx_as_tflite(load_onnx(exports["cnn"]))
    want = reference_outputs(float_model, batches)
    want[0][0] = want[0][0] * (1 + 1e-4)
    check = source_fidelity(float_model, batches, want)
    assert not check["passed"] and check["max_rel_error"] > 1e-5


def _onnx_file(path, nodes, inputs, outputs, initializers=(), opset=18):
    import onnx

    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in inputs],
                              [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in outputs],
                              list(initializers))
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)]), path)
    return path


def test_operators_of_other_exporters(tmp_path):
    """A graph written with onnx.helper as other exporters write them: batch norm left unfolded, grouped and
    asymmetrically padded convolutions, transposes, concatenation over channels, resize, slicing, padding, sums
    over axes without keeping them, a Gemm with alpha and beta, a 3-D MatMul."""
    from onnx import numpy_helper

    rng = np.random.default_rng(0)

    def const(name, *shape, scale=0.3):
        return numpy_helper.from_array((rng.standard_normal(shape) * scale).astype(np.float32), name)

    inits = [const("w", 8, 2, 3, 3), const("b", 8), const("g", 8, scale=1.0), const("beta", 8),
             const("mean", 8), numpy_helper.from_array(rng.uniform(0.5, 2, 8).astype(np.float32), "var"),
             const("fc", 6, 16), const("fcb", 6), const("mm", 16, 4),
             numpy_helper.from_array(np.asarray([0, 0, 1, 1, 0, 0, 0, 0], np.int64), "pads"),
             numpy_helper.from_array(np.asarray([1, 1, 2, 2], np.float32), "scales"),
             numpy_helper.from_array(np.asarray([1, 2], np.int64), "starts"),
             numpy_helper.from_array(np.asarray([7, 30], np.int64), "ends"),
             numpy_helper.from_array(np.asarray([2, 3], np.int64), "axes"),
             numpy_helper.from_array(np.asarray([2, 3], np.int64), "mean_axes")]
    nodes = [
        helper.make_node("Conv", ["x", "w", "b"], ["c"], group=2, pads=[0, 1, 1, 0], strides=[2, 1]),
        helper.make_node("BatchNormalization", ["c", "g", "beta", "mean", "var"], ["bn"]),
        helper.make_node("Sigmoid", ["bn"], ["s"]),
        helper.make_node("Concat", ["s", "bn"], ["cat"], axis=1),
        helper.make_node("Resize", ["cat", "", "scales"], ["up"], mode="nearest",
                         coordinate_transformation_mode="asymmetric", nearest_mode="floor"),
        helper.make_node("Slice", ["up", "starts", "ends", "axes"], ["sl"]),
        helper.make_node("Pad", ["sl", "pads"], ["pd"]),
        helper.make_node("ReduceMean", ["pd", "mean_axes"], ["m"], keepdims=0),
        helper.make_node("Gemm", ["m", "fc", "fcb"], ["y"], transB=1, alpha=0.5, beta=2.0),
        helper.make_node("Transpose", ["pd"], ["t"], perm=[0, 2, 3, 1]),
        helper.make_node("MatMul", ["t", "mm"], ["z"]),
    ]
    path = _onnx_file(tmp_path / "others.onnx", nodes, [("x", [1, 4, 9, 7])],
                      [("y", [1, 6]), ("z", [1, 7, 11, 4])], inits)
    tflite = onnx_as_tflite(load_onnx(path))
    batches = make_inputs(tflite, 10, seed=1)
    check = source_fidelity(tflite, batches, reference_outputs(tflite, batches))
    assert check["passed"] and check["max_rel_error"] <= 1e-5, check
    assert {"CONV_2D", "PAD", "CONCATENATION", "RESIZE_NEAREST_NEIGHBOR", "STRIDED_SLICE", "MEAN",
            "FULLY_CONNECTED"} <= set(tflite.operators)


@pytest.mark.parametrize("export", ["dynamo", "torchscript", "pt2"])
def test_a_transformer_builds_for_microcontrollers(export, tmp_path):
    """Layer norm, multi-head attention (its packed query, key and value unbound by Gather; the TorchScript exporter
    computes shapes at run time), the exact GELU (Erf before ONNX's Gelu), a learned position embedding added as a
    constant: float on Cortex-M4, against the interpreter on the conversion and against ONNX Runtime / PyTorch."""
    write = {"dynamo": export_onnx, "torchscript": export_onnx_torchscript, "pt2": export_pt2}[export]
    path = write("transformer", tmp_path / ("t.pt2" if export == "pt2" else "t.onnx"))
    report = compile_model(path, "cortex-m4", tmp_path / "out", BuildRequest(inputs=2))
    f = report.fidelity
    assert report.verified and f["max_rel_error"] <= 1e-5, f
    assert f["source"]["passed"] and f["source"]["max_rel_error"] <= 1e-5, f["source"]
    if export != "pt2":
        ops = set(onnx_as_tflite(load_onnx(path)).operators)
        assert {"RSQRT", "BATCH_MATMUL", "SOFTMAX"} <= ops and "GELU" in ops, ops


@pytest.mark.parametrize("export", ["dynamo", "torchscript", "pt2"])
def test_pytorch_lstm_and_gru_build_for_microcontrollers(export, tmp_path):
    """nn.LSTM and nn.GRU (PyTorch exports GRU with linear_before_reset) unrolled over their steps into float
    operators: against the interpreter on the conversion and against ONNX Runtime / PyTorch."""
    write = {"dynamo": export_onnx, "torchscript": export_onnx_torchscript, "pt2": export_pt2}[export]
    path = write("recurrent", tmp_path / ("r.pt2" if export == "pt2" else "r.onnx"))
    report = compile_model(path, "cortex-m4", tmp_path / "out", BuildRequest(inputs=2))
    f = report.fidelity
    assert report.verified and f["max_rel_error"] <= 1e-5 and f["source"]["max_rel_error"] <= 1e-5, f


def test_an_unrolled_sequence_stores_its_weights_once(tmp_path):
    """An LSTM of 32 over 30 steps: each step's product reads the same weights, stored once in flash, and checked
    against the flash limit once (counted per step, 30 copies of its recurrent weights went over a limit the build
    fits in)."""
    from onnx import numpy_helper

    rng = np.random.default_rng(3)
    hidden, features, steps = 32, 4, 30
    inits = [numpy_helper.from_array((rng.standard_normal((1, 4 * hidden, n)) * 0.3).astype(np.float32), name)
             for name, n in (("W", features), ("R", hidden))]
    node = helper.make_node("LSTM", ["x", "W", "R"], ["", "y_h"], hidden_size=hidden)
    path = _onnx_file(tmp_path / "lstm.onnx", [node], [("x", [steps, 1, features])], [("y_h", [1, 1, hidden])],
                      inits)
    weights = 4 * 4 * hidden * (features + hidden)  # float32 W and R
    report = compile_model(path, "rv32imac", tmp_path / "out", BuildRequest(inputs=2, max_flash=weights * 4))
    assert report.verified and report.fidelity["source"]["max_rel_error"] <= 1e-5
    assert weights <= report.sizes["weights"] <= weights + 4096  # once, with the zero biases and a few constants


def _recurrent_graph(tmp_path, op, hidden, features, steps, batch, inits=(), **attrs):
    """One ONNX LSTM/GRU with random weights; inputs x (and initial states as graph inputs), every output."""
    from onnx import numpy_helper

    rng = np.random.default_rng(7)
    gates = {"LSTM": 4, "GRU": 3}[op]
    dirs = 2 if attrs.get("direction") == "bidirectional" else 1
    layout = attrs.get("layout", 0)
    w = numpy_helper.from_array((rng.standard_normal((dirs, gates * hidden, features)) * 0.4).astype(np.float32), "W")
    r = numpy_helper.from_array((rng.standard_normal((dirs, gates * hidden, hidden)) * 0.4).astype(np.float32), "R")
    b = numpy_helper.from_array((rng.standard_normal((dirs, 2 * gates * hidden)) * 0.3).astype(np.float32), "B")
    x_shape = [batch, steps, features] if layout else [steps, batch, features]
    state = [batch, dirs, hidden] if layout else [dirs, batch, hidden]
    names = ["x", "W", "R", "B", "", *inits]
    outputs = [("y", [batch, steps, dirs, hidden] if layout else [steps, dirs, batch, hidden]), ("y_h", state)]
    if op == "LSTM":
        outputs.append(("y_c", state))
    node = helper.make_node(op, names, [n for n, _ in outputs], hidden_size=hidden, **attrs)
    inputs = [("x", x_shape)] + [(n, state) for n in inits]
    return _onnx_file(tmp_path / f"{op.lower()}.onnx", [node], inputs, outputs, [w, r, b])


@pytest.mark.parametrize("op, attrs, inits", [
    ("LSTM", {"direction": "bidirectional"}, ("h0", "c0")),
    ("GRU", {"direction": "reverse", "linear_before_reset": 0}, ("h0",)),
    ("GRU", {"linear_before_reset": 1}, ()),
    ("LSTM", {"direction": "reverse"}, ()),
])
def test_onnx_recurrent_forms_match_onnx_runtime(tmp_path, op, attrs, inits):
    """Directions, both GRU forms, initial states given at run time, every output (the sequence, the last h and c)."""
    path = _recurrent_graph(tmp_path, op, hidden=5, features=3, steps=4, batch=2, inits=inits, **attrs)
    report = compile_model(path, "rv32imac", tmp_path / "out", BuildRequest(inputs=3))
    f = report.fidelity
    assert report.verified and f["source"]["passed"] and f["source"]["max_rel_error"] <= 1e-5, f


def test_recurrent_forms_onnx_runtime_would_compute_otherwise_are_named(tmp_path):
    path = _recurrent_graph(tmp_path, "LSTM", hidden=4, features=3, steps=3, batch=1, clip=1.0)
    with pytest.raises(UnsupportedOperator, match="LSTM .*with a cell clip"):
        compile_model(path, "cortex-m4", tmp_path / "a")


@pytest.mark.parametrize("export", ["torchscript", "pt2"])
@pytest.mark.parametrize("model", ["upsampler", "norms", "activations"])
def test_more_pytorch_layers_build_for_microcontrollers(model, export, tmp_path):
    """ConvTranspose2d, PixelShuffle (DepthToSpace, CRD), GroupNorm and InstanceNorm, SiLU, PReLU, Softplus,
    Hardsigmoid, Mish and ELU (the dynamo exporter spells some with Greater and Where) against ONNX Runtime /
    PyTorch."""
    write = {"torchscript": export_onnx_torchscript, "pt2": export_pt2}[export]
    path = write(model, tmp_path / ("m.pt2" if export == "pt2" else "m.onnx"))
    report = compile_model(path, "rv32imac", tmp_path / "out", BuildRequest(inputs=2))
    f = report.fidelity
    assert report.verified and f["max_rel_error"] <= 1e-5 and f["source"]["max_rel_error"] <= 1e-5, f


@pytest.mark.parametrize("model", ["upsampler", "activations"])
def test_float_outputs_of_quantized_layers_are_measured_in_their_steps(model, tmp_path):
    """A QDQ model whose output is computed in float from a dequantized value (PixelShuffle; a product with 3, then
    ELU) is measured against ONNX Runtime in that value's steps times what the float functions can stretch them
    (1 for moves and ELU, 3 for the product), not by a float model's 1e-5: 1.2e-2 relative made them fail."""
    path = quantize_qdq(export_onnx(model, tmp_path / "m.onnx"), tmp_path / "m-s8.onnx", signed=True)
    tflite = onnx_as_tflite(load_onnx(path))
    batches = make_inputs(tflite, 20, seed=2)
    check = source_fidelity(tflite, batches, reference_outputs(tflite, batches))
    assert check["passed"] and check["max_lsb_diff"] <= SOURCE_MAX_LSB, check
    assert tflite.source_output_scales[0] is not None


def test_a_float_output_of_quantized_layers_is_checked_in_their_steps(tmp_path):
    """PT2E int8 of linear layers with Softplus, Hardsigmoid, Mish and ELU between them, the last one float: the
    firmware against the interpreter on the conversion in the steps of the quantization that output is computed
    from (their float exp and log a hair apart, a value on a rounding boundary requantizes one step away: 2.4e-2
    relative failed the float models' 1e-5)."""
    path = export_pt2e("activations", tmp_path / "a.pt2")
    report = compile_model(path, "cortex-m4", tmp_path / "out", BuildRequest(inputs=20))
    f = report.fidelity
    assert report.verified and f["kind"] == "float" and f["max_lsb_diff"] <= SOURCE_MAX_LSB + 1, f
    assert "LSB of the quantization each output is computed from" in f["tolerance"]


def test_a_float_add_of_a_constant_converts(tmp_path):
    """A float Add with a constant operand: the integer converter declines it, and the float one takes it (it
    declined again: an internal error)."""
    from onnx import numpy_helper

    bias = numpy_helper.from_array(np.linspace(-1, 1, 8, dtype=np.float32).reshape(1, 8), "bias")
    nodes = [helper.make_node("Add", ["x", "bias"], ["y"])]
    path = _onnx_file(tmp_path / "add.onnx", nodes, [("x", [2, 8])], [("y", [2, 8])], [bias])
    report = compile_model(path, "rv32imac", tmp_path / "out", BuildRequest(inputs=2))
    assert report.verified and report.fidelity["source"]["passed"]


def test_an_erf_outside_a_gelu_is_named(tmp_path):
    nodes = [helper.make_node("Erf", ["x"], ["y"])]
    path = _onnx_file(tmp_path / "erf.onnx", nodes, [("x", [2, 8])], [("y", [2, 8])])
    with pytest.raises(UnsupportedOperator, match="unsupported operator\\(s\\): Erf"):
        compile_model(path, "cortex-m4", tmp_path / "a")


def test_what_cannot_be_converted_is_named(tmp_path):
    nodes = [helper.make_node("Relu", ["x"], ["r"]), helper.make_node("Einsum", ["r", "r"], ["y"], equation="ij,ij->i")]
    path = _onnx_file(tmp_path / "einsum.onnx", nodes, [("x", [3, 4])], [("y", [3])])
    with pytest.raises(UnsupportedOperator, match="unsupported operator\\(s\\): Einsum"):
        compile_model(path, "cortex-m4", tmp_path / "a")
    r = cli("compile", path, "-t", "rv32imac", "-o", tmp_path / "b")
    assert r.returncode == 2 and r.stderr.strip() == "tinymlaas: error: einsum.onnx: unsupported operator(s): Einsum"
    nodes = [helper.make_node("Softmax", ["x"], ["y"], axis=0)]
    path = _onnx_file(tmp_path / "softmax0.onnx", nodes, [("x", [3, 4])], [("y", [3, 4])])
    r = cli("compile", path, "-t", "cortex-m4", "-o", tmp_path / "c")
    assert r.returncode == 2 and "Softmax (over axis 0 of a rank-2 tensor" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
    assert not any((tmp_path / d).exists() for d in "abc")


@pytest.mark.parametrize("value, folded", [(0.0, True), (0.5, False)])
def test_a_pad_before_a_convolution_folds_into_it(tmp_path, value, folded):
    """PyTorch-style padding TFLite's SAME cannot say arrives as PAD -> VALID convolution: folded into the
    convolution's own padding when the PAD's value is what that padding reads (0), kept otherwise; bit-exact to
    the interpreter either way, and the same as ONNX Runtime."""
    from onnx import numpy_helper

    from tinymlaas.frontend.cleanup import clean

    rng = np.random.default_rng(4)
    inits = [numpy_helper.from_array(rng.standard_normal((6, 3, 3, 3)).astype(np.float32), "w"),
             numpy_helper.from_array(np.asarray([0, 0, 1, 2, 0, 0, 2, 1], np.int64), "pads"),
             numpy_helper.from_array(np.asarray(value, np.float32), "value")]
    nodes = [helper.make_node("Pad", ["x", "pads", "value"], ["p"]),
             helper.make_node("Conv", ["p", "w"], ["y"], strides=[2, 2])]
    path = _onnx_file(tmp_path / "pad.onnx", nodes, [("x", [1, 3, 10, 9])], [("y", [1, 6, 6, 5])], inits)
    tflite = onnx_as_tflite(load_onnx(path))
    cleaned = clean(tflite.graph, shapes_from_interpreter=True)
    assert (not {"PAD", "PADV2"} & {op.opcode for op in cleaned.operators}) == folded
    if folded:
        conv = next(op for op in cleaned.operators if op.opcode == "CONV_2D")
        assert conv.opt("explicitPadding") == (1, 2, 2, 1)
    report = compile_model(path, "cortex-m4", tmp_path / "out")
    assert report.verified and report.fidelity["max_rel_error"] <= 1e-5
    assert any("PAD operator folded" in n for n in report.notes) == folded


def test_search_and_profile_take_onnx_models(exports, tmp_path):
    """The variant search and the per-layer profile load an ONNX model as the build does (converted), and the build
    keeps the converted TFLite model beside the original."""
    r = cli("search", exports["separable-s8"], "-t", "cortex-m4", "--budget", "2", "--no-record", "--json",
            "-o", tmp_path / "search")
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout)
    assert result["chosen"] is not None and all(p["verified"] for p in result["points"])
    report = compile_model(exports["cnn-u8"], "cortex-m4", tmp_path / "out",
                           BuildRequest(profile=True))
    assert [s["opcode"] for s in report.profile["steps"] if s["opcode"] == "CONV_2D"] == ["CONV_2D", "CONV_2D"]
    assert report.profile["totals"]["instructions"] > 0
    assert (tmp_path / "out" / "converted.tflite").read_bytes()[4:8] == b"TFL3"
    assert (tmp_path / "out" / "model.onnx").read_bytes() == exports["cnn-u8"].read_bytes()


def test_pytorchs_default_export_with_weights_beside_the_model(tmp_path):
    """torch.onnx.export keeps the weights in MODEL.onnx.data by default: read from beside the model; without that
    file, or naming a file elsewhere, refused in one line."""
    import contextlib
    import io
    import shutil

    import onnx

    from tests.helpers.torch_onnx import Cnn

    model = Cnn().eval()
    with contextlib.redirect_stdout(io.StringIO()):
        torch.onnx.export(model, (torch.randn(*model.shape),), str(tmp_path / "net.onnx"), dynamo=True)
    assert (tmp_path / "net.onnx.data").is_file()
    report = compile_model(tmp_path / "net.onnx", "cortex-m4", tmp_path / "out")
    assert report.verified and report.fidelity["source"]["max_rel_error"] <= 1e-5
    (tmp_path / "alone").mkdir()
    shutil.copy(tmp_path / "net.onnx", tmp_path / "alone" / "net.onnx")
    r = cli("compile", tmp_path / "alone" / "net.onnx", "-t", "cortex-m4", "-o", tmp_path / "a")
    assert r.returncode == 2 and r.stderr.strip() == (
        "tinymlaas: error: net.onnx keeps its weights in net.onnx.data, which is not beside it: keep the files "
        "together, or export with external_data=False (one file)")
    proto = onnx.load(str(tmp_path / "net.onnx"), load_external_data=False)
    for t in proto.graph.initializer:
        for entry in t.external_data:
            if entry.key == "location":
                entry.value = "/etc/passwd"
    onnx.save(proto, str(tmp_path / "alone" / "evil.onnx"))
    r = cli("compile", tmp_path / "alone" / "evil.onnx", "-t", "cortex-m4", "-o", tmp_path / "b")
    assert r.returncode == 2 and "outside its folder (/etc/passwd)" in r.stderr
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
