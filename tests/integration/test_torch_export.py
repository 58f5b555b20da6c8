"""PyTorch exported programs (.pt2) on the host targets: imported by TVM's exported-program frontend, checked
against the program itself run by PyTorch."""

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="torch is a dependency (requirements.lock)")

from tests.helpers.cli import cli
from tests.helpers.paths import CORPUS_MODELS
from tinymlaas.build.pipeline import compile_model
from tinymlaas.build.request import BuildRequest
from tinymlaas.errors import InvalidModel


class SmallCnn(torch.nn.Module):
    """Conv 3x3 + batch norm + ReLU, a residual 3x3 conv, global average pool, linear: resnet's pieces."""

    def __init__(self):
        super().__init__()
        self.stem = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1, bias=False), torch.nn.BatchNorm2d(8),
                                        torch.nn.ReLU())
        self.block = torch.nn.Sequential(torch.nn.Conv2d(8, 8, 3, padding=1), torch.nn.BatchNorm2d(8))
        self.fc = torch.nn.Linear(8, 5)

    def forward(self, x):
        y = self.stem(x)
        y = torch.relu(self.block(y) + y)
        return self.fc(y.mean(dim=(2, 3)))


class TinyEncoder(torch.nn.Module):
    """A transformer encoder layer over a sequence of feature vectors, then a classifier on the mean: a model of
    another family than the convolutional ones the corpus holds."""

    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Linear(6, 16)
        self.encoder = torch.nn.TransformerEncoderLayer(16, nhead=2, dim_feedforward=32, dropout=0.0,
                                                        batch_first=True, activation="gelu")
        self.head = torch.nn.Linear(16, 3)

    def forward(self, x):
        return torch.softmax(self.head(self.encoder(self.embed(x)).mean(dim=1)), dim=-1)


class MobileBlock(torch.nn.Module):
    """mobilenet's pieces: conv + batch norm + ReLU6, depthwise conv + batch norm + ReLU6, pointwise conv, pool."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, stride=2, padding=1, bias=False),
                                        torch.nn.BatchNorm2d(8), torch.nn.ReLU6())
        self.depthwise = torch.nn.Sequential(torch.nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False),
                                             torch.nn.BatchNorm2d(8), torch.nn.ReLU6())
        self.pointwise = torch.nn.Conv2d(8, 16, 1)
        self.fc = torch.nn.Linear(16, 4)

    def forward(self, x):
        y = self.pointwise(self.depthwise(self.conv(x)))
        return self.fc(torch.nn.functional.adaptive_avg_pool2d(y, 1).flatten(1))


def save_program(module, example, path, seed=0, **export_args):
    torch.manual_seed(seed)
    module = module().eval()
    for m in module.modules():  # batch norm statistics that are not the identity
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    with torch.no_grad():
        program = torch.export.export(module, (example,), **export_args)
    torch.export.save(program, str(path))
    return path


def test_an_exported_program_builds_for_the_host_cpu_and_matches_pytorch(tmp_path):
    path = save_program(SmallCnn, torch.randn(2, 3, 12, 12), tmp_path / "cnn.pt2")
    r = compile_model(path, "cpu-host", tmp_path / "out", BuildRequest(inputs=3))
    assert r.verified and r.fidelity["reference"] == "PyTorch (CPU, float32)" and r.fidelity["max_rel_error"] <= 1e-5
    assert r.fidelity["inputs"] == 3 and r.lowering == "float"
    params = 8 * 27 + 8 * 4 + 8 * 8 * 9 + 8 + 8 * 4 + 8 * 5 + 5  # conv, bn (4 vectors), conv + bias, bn, linear
    assert r.sizes["weights"] == params * 4 + 2 * 8  # + the two batch norms' int64 batch counters
    meta = json.loads((tmp_path / "out" / "metadata.json").read_text())
    assert [(i["shape"], i["dtype"]) for i in meta["inputs"]] == [([2, 3, 12, 12], "float32")]
    assert [(o["shape"], o["dtype"]) for o in meta["outputs"]] == [([2, 5], "float32")]
    assert (tmp_path / "out" / "model.pt2").read_bytes() == path.read_bytes()


def test_a_transformer_layer_builds_and_matches_pytorch(tmp_path):
    path = save_program(TinyEncoder, torch.randn(1, 10, 6), tmp_path / "enc.pt2")
    r = compile_model(path, "cpu-host", tmp_path / "out", BuildRequest(inputs=3))
    assert r.verified, r.fidelity
    outputs = np.frombuffer((tmp_path / "out" / "outputs.bin").read_bytes(), dtype=np.float32).reshape(3, 3)
    assert np.allclose(outputs.sum(axis=1), 1.0, atol=1e-5)  # softmax rows, as the model ends


def test_a_wrong_build_would_be_caught(tmp_path):
    """The check is real: the build of one program compared against another's outputs fails."""
    from tinymlaas.backends.host.build import build_host_external
    from tinymlaas.backends.host.options import HostOptions
    from tinymlaas.frontend.torch_export import load_exported_program
    from tinymlaas.targets import get_target

    example = torch.randn(1, 3, 12, 12)
    model = load_exported_program(save_program(SmallCnn, example, tmp_path / "a.pt2"))
    other = load_exported_program(save_program(SmallCnn, example, tmp_path / "b.pt2", seed=1))
    model.reference_outputs = other.reference_outputs
    (tmp_path / "w").mkdir()
    r = build_host_external(model, get_target("cpu-host"), tmp_path / "w", HostOptions(inputs=2), lambda s: None)
    assert not r.verified and r.fidelity["max_rel_error"] > 1e-3


def test_exported_program_errors_are_one_line(tmp_path):
    batch = torch.export.Dim("batch", min=2, max=64)
    dynamic = save_program(SmallCnn, torch.randn(4, 3, 12, 12), tmp_path / "dyn.pt2",
                           dynamic_shapes={"x": {0: batch}})
    with pytest.raises(InvalidModel, match="input 'x' has a dynamic dimension 0 \\('s"):
        compile_model(dynamic, "cpu-host", tmp_path / "a")
    (tmp_path / "junk.pt2").write_bytes(b"PK\x03\x04 not really a zip")
    r = cli("compile", tmp_path / "junk.pt2", "-t", "cpu-host", "-o", tmp_path / "b")
    assert r.returncode == 2 and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert "junk.pt2 is not a PyTorch exported program" in r.stderr
    assert not any((tmp_path / d).exists() for d in "ab")


class BagOfTokens(torch.nn.Module):
    """Token ids -> embedding -> mean -> linear: an input random values do not suit (ids index a 100-row table)."""

    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(100, 8)
        self.fc = torch.nn.Linear(8, 2)

    def forward(self, ids):
        return self.fc(self.embed(ids).mean(dim=1))


def test_token_ids_are_checked_with_the_inputs_the_user_gives(tmp_path):
    path = save_program(BagOfTokens, torch.randint(0, 100, (1, 12)), tmp_path / "bag.pt2")
    with pytest.raises(InvalidModel, match="cannot run bag on random inputs \\(IndexError.*--sample-inputs"):
        compile_model(path, "cpu-host", tmp_path / "a")
    ids = np.random.default_rng(0).integers(0, 100, size=(4, 1, 12))
    np.savez(tmp_path / "ids.npz", ids=ids)
    r = compile_model(path, "cpu-host", tmp_path / "b", BuildRequest(sample_inputs=str(tmp_path / "ids.npz")))
    assert r.verified and r.fidelity["inputs"] == 4 and r.fidelity["max_rel_error"] <= 1e-5
    assert (tmp_path / "b" / "inputs.bin").read_bytes() == ids.astype(np.int64).tobytes()
    import tvm
    from tvm import relax

    vm = relax.VirtualMachine(tvm.runtime.load_module(str(tmp_path / "b" / "model.so")), tvm.cpu())

    def run(x):
        out = vm["main"](tvm.runtime.tensor(x))
        return (out if hasattr(out, "numpy") else out[0]).numpy()

    last, past = np.full((1, 12), 99), np.full((1, 12), 99)
    past[0, 3] = 10**6  # past the table: clamped to its last row, never read outside it
    assert np.array_equal(run(last), run(past))
    np.savez(tmp_path / "wrong.npz", tokens=ids)
    r = cli("compile", path, "-t", "cpu-host", "-o", tmp_path / "c", "--sample-inputs", tmp_path / "wrong.npz")
    assert r.returncode == 2 and "Traceback" not in r.stderr and r.stderr.strip().splitlines()[-1] == (
        "tinymlaas: error: sample inputs wrong.npz: no array 'ids' (it holds tokens)")
    np.savez(tmp_path / "shape.npz", ids=ids[:, :, :5])
    with pytest.raises(InvalidModel, match="'ids' has shape \\(4, 1, 5\\); the model takes \\(1, 12\\)"):
        compile_model(path, "cpu-host", tmp_path / "d", BuildRequest(sample_inputs=str(tmp_path / "shape.npz")))
    assert not any((tmp_path / d).exists() for d in "acd")
    (tmp_path / "zip.npz").write_bytes(b"PK\x03\x04 a broken archive")
    np.save(tmp_path / "one.npy", ids)
    for broken in ("zip.npz", "one.npy"):
        with pytest.raises(InvalidModel, match=f"sample inputs {broken}: not a readable .npz of named arrays"):
            compile_model(path, "cpu-host", tmp_path / "f", BuildRequest(sample_inputs=str(tmp_path / broken)))
    assert not (tmp_path / "f").exists()
    # microcontroller builds take sample inputs too, matched to the model's inputs by name in the same way
    with pytest.raises(InvalidModel, match=r"sample inputs ids.npz: no array 'keras_tensor_\d+' \(it holds ids\)"):
        compile_model(CORPUS_MODELS / "flatten_mlp_float32.tflite", "cortex-m4", tmp_path / "e",
                      BuildRequest(sample_inputs=str(tmp_path / "ids.npz")))


@pytest.mark.parametrize("tensor_cores", [False, True])
def test_before_tuning_batch_norm_folds_and_tensor_core_layout_stays_whole(tensor_cores, tmp_path):
    """The rewrites ahead of tuning: batch norm folded into the convolutions; for tensor cores the convolutions in
    NHWC and ReLU6 (a clip, which TVM's layout conversion wraps in a transpose each way) kept in that layout, so the
    only transposes are the model's input and the pooled output. The module still computes what PyTorch does."""
    import tvm
    from tvm import relax
    from tvm.relax.frontend.torch import from_exported_program

    from tinymlaas.backends.host.passes import tuning_preparation

    x = torch.randn(2, 3, 16, 16)
    program = torch.export.load(str(save_program(MobileBlock, x, tmp_path / "m.pt2")))
    expected = program.module()(x).detach().numpy()
    mod = tuning_preparation(tensor_cores)(from_exported_program(program, keep_params_as_input=False))
    calls = [b.value for block in mod["main"].body.blocks for b in block.bindings
             if isinstance(b.value, relax.Call) and isinstance(b.value.op, tvm.ir.Op)]
    ops = [c.op.name for c in calls]
    assert "relax.nn.batch_norm" not in ops and ops.count("relax.nn.conv2d") == 3
    # ReLU6: a clip, or for tensor cores maximum then minimum (clip_as_bounds: float16 conversion fails on a clip)
    relu6 = (["relax.maximum", "relax.minimum"] if tensor_cores else ["relax.clip"])
    assert all(ops.count(name) == 2 for name in relu6) and ("relax.clip" in ops) != tensor_cores, ops
    assert ops.count("relax.permute_dims") == (2 if tensor_cores else 0)
    layouts = {c.attrs.data_layout for c in calls if c.op.name == "relax.nn.conv2d"}
    assert layouts == ({"NHWC"} if tensor_cores else {"NCHW"})
    with tvm.target.Target("llvm"):
        built = relax.build(relax.get_pipeline("zero")(mod), target="llvm")
    got = relax.VirtualMachine(built, tvm.cpu())["main"](tvm.runtime.tensor(x.numpy()))
    got = (got if hasattr(got, "numpy") else got[0]).numpy()
    assert np.linalg.norm(got - expected) / np.linalg.norm(expected) <= 1e-5


@pytest.mark.slow
def test_a_tuned_host_build_of_a_batch_norm_model_matches_pytorch(tmp_path):
    path = save_program(MobileBlock, torch.randn(1, 3, 16, 16), tmp_path / "m.pt2")
    opts = BuildRequest(inputs=2, tune_trials=2, tune_trials_per_task=1, tuning_dir=str(tmp_path / "db"))
    r = compile_model(path, "cpu-host", tmp_path / "out", opts)
    assert r.verified and r.fidelity["max_rel_error"] <= 1e-5 and r.tuning["ran"]["trials"] > 0
