"""Host targets (cpu-host here; cuda-host on a machine with an NVIDIA GPU): TVM Relax builds, run by TVM's runtime,
checked against the TFLite interpreter."""

import json
from pathlib import Path

import numpy as np
import pytest

from tests.helpers.cli import cli
from tests.helpers.paths import CORPUS_MODELS, model_path
from tinymlaas.backends.host.tuning import ROUNDS
from tinymlaas.build.pipeline import compile_model
from tinymlaas.build.request import BuildRequest, InvalidRequest
from tinymlaas.errors import UnsupportedOperator

# the two MobileNets take 12-17 s each to build here: `slow`
FLOAT_MODELS = [pytest.param(name, marks=pytest.mark.slow) if name.startswith("mobilenet") else name
                for name in sorted(p.name for p in CORPUS_MODELS.glob("*_float32.tflite"))]
INT8_MODELS = sorted(p.name for p in CORPUS_MODELS.glob("*_int8.tflite"))


def _cuda_device() -> bool:
    import tvm

    return tvm.cuda(0).exist


needs_cuda = pytest.mark.skipif("not _cuda_device()", reason="no NVIDIA GPU on this machine (CI has none; the "
                                "lent GPU runs these: see the issue note)")


def _run_library(report) -> list[np.ndarray]:
    """The exported library loaded on its own, as a host would (metadata.json says how), on input 0."""
    import tvm
    from tvm import relax

    out = Path(report.artifacts["dir"])
    meta = json.loads((out / "metadata.json").read_text())
    dev = tvm.cuda(0) if meta["device"] == "cuda" else tvm.cpu(0)
    raw, inputs = (out / "inputs.bin").read_bytes(), []
    for spec in meta["inputs"]:
        n = int(np.prod(spec["shape"])) * np.dtype(spec["dtype"]).itemsize
        inputs.append(np.frombuffer(raw[:n], dtype=spec["dtype"]).reshape(spec["shape"]))
        raw = raw[n:]
    inputs += [np.full(v["shape"], v["initial"], dtype=v["dtype"]) for v in meta["state"]]
    vm = relax.VirtualMachine(tvm.runtime.load_module(str(out / meta["library"])), dev)
    result = vm[meta["entry"]](*[tvm.runtime.tensor(x, dev) for x in inputs])
    return [r.numpy() for r in ([result] if hasattr(result, "numpy") else result)]


@pytest.mark.parametrize("name", FLOAT_MODELS)
def test_float_models_on_the_host_cpu_match_the_interpreter(name, tmp_path):
    r = compile_model(CORPUS_MODELS / name, "cpu-host", tmp_path / "out", BuildRequest(inputs=3))
    assert r.kind == "host" and r.lowering == "float"
    assert r.verified and r.fidelity["max_rel_error"] <= 1e-5, r.fidelity
    assert r.latency_ms > 0 and r.sizes["library"] > r.sizes["weights"] > 0
    # the library alone reproduces what the build reported for input 0
    got = _run_library(r)
    first = np.frombuffer(Path(r.artifacts["outputs"]).read_bytes()[:got[0].nbytes], dtype=got[0].dtype)
    assert np.array_equal(got[0].ravel(), first)


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if "lstm" in n or "gru" in n else n
                                  for n in INT8_MODELS])  # the unrolled recurrent ones: 20-30 s each, `slow`
def test_int8_models_on_the_host_cpu_are_bit_exact_or_name_the_missing_kernel(name, tmp_path):
    try:
        r = compile_model(CORPUS_MODELS / name, "cpu-host", tmp_path / "out", BuildRequest(inputs=3))
    except UnsupportedOperator as e:  # a layer that only has a C micro-kernel (softmax, LSTM, ...)
        assert "C micro-kernel tinymlaas_" in str(e) and "not linked on host targets" in str(e)
        assert not (tmp_path / "out").exists()  # nothing half-written
        return
    assert r.lowering == "integer" and r.fidelity["max_lsb_diff"] == 0, r.fidelity


def test_mlperf_ad01_int8_on_the_host_is_bit_exact(tmp_path):
    r = compile_model(model_path("ad01_int8"), "cpu-host", tmp_path / "out", BuildRequest(inputs=5, seed=1))
    assert r.fidelity["max_lsb_diff"] == 0 and r.fidelity["inputs"] == 5


def test_unsupported_precision_and_missing_kernels_are_clear(tmp_path):
    with pytest.raises(InvalidRequest, match="--precision cpu-host builds float32, not float16"):
        compile_model(model_path("ad01_fp32"), "cpu-host", tmp_path / "a", BuildRequest(precision="float16"))
    r = cli("compile", model_path("kws_ref_model"), "-t", "cpu-host", "-o", tmp_path / "b")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines() == [(
        "tinymlaas: error: kws_ref_model: unsupported operator(s): SOFTMAX #12 (int8): C micro-kernel "
        "tinymlaas_softmax_s8, not linked on host targets yet")]


def test_the_variant_search_refuses_host_targets(tmp_path):
    r = cli("search", model_path("ad01_fp32"), "-t", "cpu-host", "--budget", "2", "-o", tmp_path / "s")
    assert r.returncode == 2 and r.stderr.strip() == (
        "tinymlaas: error: the variant search is for microcontroller targets; build for cpu-host with "
        "`tinymlaas compile` (--precision, --tune-trials)")


def test_host_compile_from_the_command_line(tmp_path):
    r = cli("compile", model_path("ad01_fp32"), "-t", "cpu-host", "-o", tmp_path / "out", "--json")
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["target"] == "cpu-host" and report["verified"] and report["tvm_target"].startswith("llvm")
    assert (tmp_path / "out" / "model.so").is_file() and (tmp_path / "out" / "report.json").is_file()
    # the build records its mode, in the report and beside the library
    mode = report["mode"]
    assert mode["precision"] == "float32" and not mode["tuned"] and mode["kernels"] >= 1 and "cuda_graph" not in mode
    assert json.loads((tmp_path / "out" / "metadata.json").read_text())["mode"] == mode
    bad = cli("compile", model_path("ad01_fp32"), "-t", "cpu-host", "--tune-trials", "-1", "-o", tmp_path / "bad")
    assert bad.returncode == 2 and "--tune-trials: must be at least 0" in bad.stderr
    assert "Traceback" not in bad.stderr and not (tmp_path / "bad").exists()


def test_cuda_host_without_a_gpu_says_so(tmp_path):
    if _cuda_device():
        pytest.skip("this machine has a GPU")
    r = cli("compile", model_path("ad01_fp32"), "-t", "cuda-host", "-o", tmp_path / "out")
    assert r.returncode == 2
    assert r.stderr.strip() == "tinymlaas: error: target cuda-host needs a CUDA device; this machine has none"


@needs_cuda
@pytest.mark.parametrize("precision", ["float32", "float16"])
@pytest.mark.parametrize("name", ["ds_cnn_kws_float32.tflite", "conv_autoencoder_float32.tflite"])
def test_cuda_host_float_models(name, precision, tmp_path):
    r = compile_model(CORPUS_MODELS / name, "cuda-host", tmp_path / "out", BuildRequest(inputs=3, precision=precision))
    assert r.verified, r.fidelity
    assert r.tvm_target.startswith("cuda sm_")
    graph = r.mode["cuda_graph"]  # launches replayed as CUDA graphs (all but those touching the call's own tensors)
    assert graph["asked"] and (graph["captured"] or r.mode["kernels"] <= 2), r.mode
    assert np.array_equal(_run_library(r)[0].ravel(), np.frombuffer(
        Path(r.artifacts["outputs"]).read_bytes()[:_run_library(r)[0].nbytes], dtype=np.float32))


@needs_cuda
def test_cuda_host_int8_layers_are_bit_exact(tmp_path):
    r = compile_model(model_path("ad01_int8"), "cuda-host", tmp_path / "out", BuildRequest(inputs=3))
    assert r.fidelity["max_lsb_diff"] == 0


@needs_cuda
def test_cuda_tuning_database_is_reused(tmp_path):
    opts = BuildRequest(inputs=2, tune_trials=8, tune_trials_per_task=2, tuning_dir=str(tmp_path / "db"))
    first = compile_model(CORPUS_MODELS / "flatten_mlp_float32.tflite", "cuda-host", tmp_path / "a", opts)
    second = compile_model(CORPUS_MODELS / "flatten_mlp_float32.tflite", "cuda-host", tmp_path / "b", opts)
    assert first.verified and second.verified
    assert not first.tuning["reused"] and second.tuning["reused"]


@needs_cuda
def test_cuda_float16_tuning_measures_tensor_core_schedules(tmp_path):
    """float16 on the GPU tunes with tensor-core tiling: wmma schedules are built and measured (none fails for TVM's
    storage rewrite, turned off for these builds), and the tuned build still matches the interpreter."""
    opts = BuildRequest(inputs=2, precision="float16", tune_trials=48, tune_trials_per_task=16,
                          tuning_dir=str(tmp_path / "db"))
    r = compile_model(CORPUS_MODELS / "resnet8_float32.tflite", "cuda-host", tmp_path / "a", opts)
    assert r.verified, r.fidelity
    records = [json.loads(line) for line in
               (Path(r.tuning["database"]) / "database_tuning_record.json").read_text().splitlines()]
    wmma = [rec for _, rec in records if "wmma_sync_16x16x16_f16f16" in json.dumps(rec[0])]
    assert wmma and any(rec[1] and max(float(t) for t in rec[1]) < 1e9 for rec in wmma)
    # split-K is on by default: resnet8's last stage (8x8 outputs, 64 channels, K = 576) splits its reduction in two
    assert r.mode["split_k"] and r.mode["split_k_convolutions"] >= 1, r.mode
    # a rebuild in a new process loads the database of wmma schedules (their intrinsics registered first)
    again = cli("compile", CORPUS_MODELS / "resnet8_float32.tflite", "-t", "cuda-host", "--precision", "float16",
                "--tune-trials", "48", "--tuning-dir", tmp_path / "db", "-o", tmp_path / "b", "--json")
    assert again.returncode == 0, again.stderr
    report = json.loads(again.stdout)
    assert report["tuning"]["reused"] and report["verified"]


def test_a_tuning_cut_short_is_resumed_not_reused(tmp_path):
    """A database without its end-of-tuning mark (the process was stopped mid-round) is not taken as tuned: the next
    build tunes on from the records already measured, and reaches first the functions the first tuning never did
    (here one trial each time: the dense autoencoder's second function, not its first again)."""
    from tinymlaas.backends.host.tuning import TUNED

    def measured_functions(db: Path) -> list[int]:  # the workload index of each record, in the order measured
        return [json.loads(line)[0] for line in (db / "database_tuning_record.json").read_text().splitlines()]

    opts = BuildRequest(inputs=1, tune_trials=1, tune_trials_per_task=1, tuning_dir=str(tmp_path / "db"))
    model = CORPUS_MODELS / "dense_autoencoder_float32.tflite"
    first = compile_model(model, "cpu-host", tmp_path / "a", opts)
    db = Path(first.tuning["database"])
    assert first.verified and (db / TUNED).is_file() and first.tuning["ran"]["tasks"] > 1
    assert db.name.endswith("-float32")  # split-K (on by default) is for tensor cores: no split-K database here
    assert len(measured_functions(db)) == 1
    (db / TUNED).unlink()
    second = compile_model(model, "cpu-host", tmp_path / "b", opts)
    assert not second.tuning["reused"] and second.verified
    functions = measured_functions(db)
    assert len(functions) == 2 and functions[0] != functions[1]  # the old record kept, a new function measured


def test_a_time_budget_stops_tuning_between_calls_and_keeps_what_they_measured(tmp_path, monkeypatch):
    """meta_schedule keeps a call's measurements only when the call ends: the tuner calls it for a few functions at
    a time and checks its minutes budget between calls. One function per call and a budget spent by the first: the
    first function is measured and kept, the others are not started."""
    import tvm
    from tvm import relax

    from tinymlaas.backends.host import tuning
    from tinymlaas.backends.host.passes import public_functions
    from tinymlaas.frontend.cleanup import clean
    from tinymlaas.frontend.tflite import load_tflite
    from tinymlaas.frontend.to_relax import to_relax
    from tinymlaas.targets import get_target

    graph = clean(load_tflite(CORPUS_MODELS / "dense_autoencoder_float32.tflite").graph, shapes_from_interpreter=True)
    target = tvm.target.Target({"kind": "llvm", "num-cores": 1})  # meta_schedule asks how many cores
    with target:
        mod = relax.get_pipeline("zero")(public_functions(to_relax(graph, get_target("cpu-host"), "tir")))
    monkeypatch.setattr(tuning, "TASKS_PER_CALL", 1)
    ran = tuning.tune(mod, target, tmp_path, trials=8, per_task=1, minutes=1e-4)
    assert ran["tasks"] > 1 and ran["stopped_by"] == "minutes" and ran["rounds"] == 1
    records = (tmp_path / "database_tuning_record.json").read_text().splitlines()
    assert len(records) == ran["trials"] == 1


@pytest.mark.slow
def test_cpu_tuning_stops_at_its_time_budget_and_a_rebuild_reuses_the_database(tmp_path):
    opts = BuildRequest(inputs=2, tune_trials=400, tune_trials_per_task=64, tune_minutes=0.1,
                          tuning_dir=str(tmp_path / "db"))
    first = compile_model(CORPUS_MODELS / "flatten_mlp_float32.tflite", "cpu-host", tmp_path / "a", opts)
    ran = first.tuning["ran"]
    assert first.verified and ran["rounds"] == 1 and ran["stopped_by"] == "minutes"
    assert 0 < ran["trials"] <= ROUNDS[0] * ran["tasks"]  # the first round's share per function
    second = compile_model(CORPUS_MODELS / "flatten_mlp_float32.tflite", "cpu-host", tmp_path / "b", opts)
    assert second.tuning["reused"] and second.tuning["ran"] == {} and second.verified


def test_tuning_takes_the_heaviest_functions_only():
    """resnet8's fused functions on the CPU: the tuner takes the fewest, heaviest first, that hold 95% of the FLOPs,
    and leaves out no function heavier than one it takes."""
    import tvm
    from tvm import relax
    from tvm.s_tir.analysis import estimate_tir_flops
    from tvm.s_tir.meta_schedule.relax_integration import extract_tasks

    from tinymlaas.backends.host.passes import public_functions
    from tinymlaas.backends.host.tuning import FLOP_SHARE, heaviest_tasks
    from tinymlaas.frontend.cleanup import clean
    from tinymlaas.frontend.tflite import load_tflite
    from tinymlaas.frontend.to_relax import to_relax
    from tinymlaas.targets import get_target

    graph = clean(load_tflite(CORPUS_MODELS / "resnet8_float32.tflite").graph, shapes_from_interpreter=True)
    target = tvm.target.Target("llvm")
    with target:
        mod = relax.get_pipeline("zero")(relax.transform.DecomposeOpsForInference()(
            public_functions(to_relax(graph, get_target("cpu-host"), "tir"))))
    tasks = extract_tasks(mod, target)
    flops = {t.task_name: float(estimate_tir_flops(t.dispatched[0])) * int(t.weight) for t in tasks}
    chosen = [t.task_name for t in heaviest_tasks(tasks)]
    total = sum(flops.values())
    assert 0 < len(chosen) < len(tasks)
    assert sum(flops[n] for n in chosen) >= FLOP_SHARE * total
    assert sum(flops[n] for n in chosen[:-1]) < FLOP_SHARE * total  # the fewest
    assert min(flops[n] for n in chosen) >= max(f for n, f in flops.items() if n not in chosen)
    assert any("conv" in n for n in chosen) and not any(n.startswith("add") for n in chosen)


def test_fast_tvmscript_parsing_answers_as_inspect_does_and_is_undone():
    """The shortcut around inspect's module scan (TVM's parser calls it for every frame of every function it parses)
    gives the scan's own answers: no module for a frame of generated code, the module for a frame of a file; and
    inspect is as it was afterwards, also after nesting."""
    import inspect

    from tinymlaas.backends.host.tuning import fast_tvmscript_parsing

    scope = {}
    exec(compile("import sys\nframe = sys._getframe()", "<generated>", "exec"), scope)  # noqa: S102 - a frame of generated code
    here = inspect.currentframe()

    def answers():
        return [inspect.getmodule(scope["frame"], "<generated>"), inspect.getmodule(here, __file__),
                inspect.getsourcefile(scope["frame"]), inspect.getframeinfo(here).filename]

    original, expected = inspect.getmodule, answers()
    assert expected[0] is None and expected[1].__name__ == __name__
    with fast_tvmscript_parsing():
        shortcut = inspect.getmodule
        assert shortcut is not original and answers() == expected
        with fast_tvmscript_parsing():
            assert inspect.getmodule is shortcut
        assert inspect.getmodule is shortcut
    assert inspect.getmodule is original
