"""Host backend: a model built by TVM Relax for a CPU (LLVM) or an NVIDIA GPU (CUDA) and run by TVM's runtime.

The same front end as the microcontroller builds (every operator through our registry; integer layers as their
bit-exact TIR kernels), then TVM's own route for a host: the zero pipeline, dlight's default GPU schedules (CUDA),
optionally meta_schedule tuning (`static_shape_tuning`, its database kept per target and model so a rebuild costs
no tuning), `relax.build`, and the library exported (`model.so`) with the metadata a host needs to load and call it.
The build is then loaded back, run on the same inputs as the TFLite interpreter (fidelity) and timed on the device.

This module holds the device and target helpers and that build, check and timing; the Relax passes and
`optimize` are in passes.py, meta_schedule tuning in tuning.py, HostReport and its text form in report.py,
HostOptions in options.py.
"""

from __future__ import annotations

import hashlib
import json
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tinymlaas.backends.host.options import HostOptions
from tinymlaas.backends.host.passes import (
    build_mode,
    extern_layers,
    lowering_config,
    lowering_pipeline,
    optimize,
    public_functions,
    uses_tensor_cores,
)
from tinymlaas.backends.host.report import HostReport
from tinymlaas.backends.host.tuning import is_tuned, tuning_folder
from tinymlaas.errors import BuildFailure, InvalidModel, ToolMissing, UnsupportedOperator
from tinymlaas.oracle import load_sample_inputs, make_inputs, reference_outputs
from tinymlaas.targets import HostTarget
from tinymlaas.verify import compare

# relative error vs the interpreter: a GPU sums in another order and fuses multiply-adds; float16 keeps 11 bits
FLOAT_TOLERANCE = {("float32", "cpu"): 1e-5, ("float32", "cuda"): 1e-4, ("float16", "cuda"): 2e-2,
                   ("float16", "cpu"): 2e-2}


def device_of(target: HostTarget):
    """TVM's device for the target, or ToolMissing when this machine has none."""
    import tvm

    dev = tvm.cuda(0) if target.device == "cuda" else tvm.cpu(0)
    if not dev.exist:
        raise ToolMissing(f"target {target.name} needs a {target.device.upper()} device; this machine has none")
    return dev


def describe(tvm_target) -> str:
    """'cuda sm_90' / 'llvm x86_64-...': TVM's JSON form of a target is long."""
    attrs = dict(tvm_target.attrs)
    return " ".join(str(x) for x in (tvm_target.kind.name, attrs.get("arch"), attrs.get("mtriple")) if x)


def tvm_target_of(target: HostTarget, dev):
    import tvm

    if target.device == "cuda":  # the GPU's own architecture and limits (also what tuning measures on)
        return tvm.target.Target.from_device(dev)
    # meta_schedule sizes its CPU parallelism from the target's own core count
    return tvm.target.Target({"kind": target.tvm_target, "num-cores": os.cpu_count() or 1})


def _outputs(result) -> list[np.ndarray]:
    items = [result] if hasattr(result, "numpy") else list(result)
    return [x.numpy() for x in items]


@dataclass(frozen=True)
class HostModule:
    """What a front end hands the host backend: the Relax module, how to call it and what checks it."""
    mod: object  # tvm.IRModule
    lowering: str  # float | integer | mixed
    inputs: list  # [{"name", "shape", "dtype"}]
    outputs: list
    state: list  # variable tensors carried between calls: [{"name", "shape", "dtype", "initial"}]
    weights_bytes: int
    reference: Callable  # batches -> the reference's outputs for each
    reference_name: str  # what that reference is, for the report


def _io(specs) -> list[dict]:
    return [{"name": t.name, "shape": list(t.shape), "dtype": t.dtype} for t in specs]


def build_host(model, graph, target: HostTarget, work: Path, options: HostOptions, stage) -> HostReport:
    """Build `model` (a loaded TFLiteModel and its cleaned graph) for `target` into `work`; verified and timed."""
    from tinymlaas.frontend.to_relax import to_relax

    check_precision(target, options)
    lowering = graph.lowering()
    if options.precision == "float16" and lowering != "float":
        raise BuildFailure("float16 applies to float models; this one is quantized (build it as float32)")
    stage("import")
    t0 = time.monotonic()
    mod = to_relax(graph, target, "tir")
    externs = extern_layers(mod, graph)
    if externs:
        raise UnsupportedOperator(externs, model.name)
    tensors = [graph.tensor(i) for i in graph.state]
    module = HostModule(
        public_functions(mod), lowering, _io(graph.tensor(i) for i in graph.inputs),
        _io(graph.tensor(i) for i in graph.outputs),
        [{**d, "initial": t.zero_point or 0} for d, t in zip(_io(tensors), tensors)],
        int(sum(t.data.nbytes for t in graph.tensors if t.is_const and t.data is not None)),
        lambda batches: reference_outputs(model, batches), "the TFLite interpreter")
    return build_module(model, module, target, work, options, stage, time.monotonic() - t0)


def build_host_external(model, target: HostTarget, work: Path, options: HostOptions, stage) -> HostReport:
    """Build a model of a host-only format (frontend.onnx.OnnxModel, frontend.torch_export.ExportedProgramModel:
    its `to_relax`, `reference_outputs` and `reference_name`) for `target` into `work`; verified against that
    format's own runtime."""
    check_precision(target, options)
    stage("import")
    t0 = time.monotonic()
    module = HostModule(model.to_relax(), "float", _io(model.inputs), _io(model.outputs), [], model.weights_bytes,
                        model.reference_outputs, model.reference_name)
    return build_module(model, module, target, work, options, stage, time.monotonic() - t0)


def check_precision(target: HostTarget, options: HostOptions) -> None:
    if options.precision not in target.precisions:
        raise BuildFailure(f"target {target.name} builds {', '.join(target.precisions)}, not {options.precision}")


def build_module(model, module: HostModule, target: HostTarget, work: Path, options: HostOptions,
                 stage, import_seconds: float = 0.0) -> HostReport:
    """The front end's module tuned (when asked), built, exported, run on the reference's inputs and timed."""
    import tvm
    from tvm import relax

    started, seconds = time.monotonic() - import_seconds, {"import": round(import_seconds, 3)}
    dev = device_of(target)
    tvm_target = tvm_target_of(target, dev)

    stage("lower")
    t0 = time.monotonic()
    sha = hashlib.sha256(model.data).hexdigest()
    # a split-K build tunes functions a plain build has not: its own database (split-K applies to tensor cores only)
    split_k = options.split_k and uses_tensor_cores(target, options.precision)
    variant = options.precision + ("-splitk" if split_k else "")
    db = tuning_folder(target, sha, variant, options.tuning_dir or work.parent / "tuning")
    reused = options.tune_trials > 0 and is_tuned(db)
    if options.tune_trials:
        db.mkdir(parents=True, exist_ok=True)
    mod, tuned = optimize(module.mod, target, tvm_target, options, db)
    seconds["lower"] = round(time.monotonic() - t0, 3)

    stage("codegen")
    t0 = time.monotonic()
    graphs = target.device == "cuda" and options.cuda_graph
    config = {"relax.backend.use_cuda_graph": graphs, **lowering_config(target, options.precision)}
    with tvm.transform.PassContext(config=config):
        with tvm_target:
            lowered = lowering_pipeline(tvm_target)(mod)
        executable = relax.build(lowered, target=tvm_target, relax_pipeline=None)  # its Relax passes ran above
    mode = build_mode(lowered, target, options.precision, options.tune_trials > 0, graphs)
    if options.tune_trials and uses_tensor_cores(target, options.precision):
        mode["split_k"] = options.split_k
    library = work / "model.so"
    executable.export_library(str(library))
    seconds["codegen"] = round(time.monotonic() - t0, 3)

    stage("reference")
    batches = (load_sample_inputs(options.sample_inputs, module.inputs) if options.sample_inputs
               else make_inputs(model, options.inputs, options.seed))
    try:
        want = module.reference(batches)
    except Exception as e:  # a model's own check on its inputs (an index out of range): the inputs are the problem
        given = "the given" if options.sample_inputs else "random"
        hint = "" if options.sample_inputs else "; give inputs it accepts with --sample-inputs FILE.npz"
        raise InvalidModel(f"{module.reference_name} cannot run {model.name} on {given} inputs "
                           f"({type(e).__name__}: {str(e).strip()[:160]}){hint}") from e

    stage("emulate")  # here: run on the host device itself
    t0 = time.monotonic()
    vm = relax.VirtualMachine(tvm.runtime.load_module(str(library)), dev)
    initial = [np.full(v["shape"], v["initial"], dtype=v["dtype"]) for v in module.state]
    state, got, n_out = initial, [], len(module.outputs)
    for batch in batches:  # a stateful model's variables carry over from one input to the next, as in the interpreter
        results = _outputs(vm["main"](*[tvm.runtime.tensor(x, dev) for x in [*batch, *state]]))
        got.append(results[:n_out])
        state = results[n_out:]
    timer = vm.time_evaluator("main", dev, number=1, repeat=options.runs, min_repeat_ms=0)
    latency = 1000 * statistics.median(timer(*[tvm.runtime.tensor(x, dev) for x in [*batches[0], *initial]]).results)
    seconds["emulate"] = round(time.monotonic() - t0, 3)

    stage("verify")
    fidelity = compare(model, got, want, integer_kernels=module.lowering == "integer",
                       float_tolerance=FLOAT_TOLERANCE[options.precision, target.device])
    (work / "inputs.bin").write_bytes(b"".join(x.tobytes() for batch in batches for x in batch))
    (work / "outputs.bin").write_bytes(b"".join(y.tobytes() for batch in got for y in batch))
    (work / "expected_outputs.bin").write_bytes(b"".join(y.tobytes() for batch in want for y in batch))

    stage("measure")
    metadata = {"format": "tinymlaas-host/1", "library": library.name, "entry": "main", "tvm": tvm.__version__,
                "target": target.name, "tvm_target": describe(tvm_target), "device": target.device,
                "precision": options.precision, "cuda_graph": graphs, "mode": mode, "inputs": module.inputs,
                "outputs": module.outputs, "state": module.state,
                "load": "relax.VirtualMachine(tvm.runtime.load_module('model.so'), device)['main'](*inputs, *state) "
                        "-> (*outputs, *next state); state starts at each variable's 'initial'"}
    (work / "metadata.json").write_text(json.dumps(metadata, indent=2) + "\n")
    seconds["measure"] = 0.0
    tuning = {"trials": options.tune_trials, "per_task": options.tune_trials_per_task,
              "minutes": options.tune_minutes, "seconds": tuned.get("seconds", 0.0), "ran": tuned,
              "database": str(db) if options.tune_trials else None, "reused": reused}
    notes = list(model.notes)
    if target.device == "cuda" and not options.tune_trials:
        notes.append("untuned: dlight's default GPU schedules (tune with --tune-trials)")
    return HostReport(
        model=model.name, model_path=str(model.path), target=target.name,
        device=_device_name(dev, target), tvm_target=describe(tvm_target), precision=options.precision,
        lowering=module.lowering, latency_ms=round(latency, 4), latency_runs=options.runs,
        fidelity={**fidelity.to_dict(), "reference": module.reference_name},
        sizes={"library": library.stat().st_size, "weights": module.weights_bytes}, tuning=tuning,
        compile_seconds=round(time.monotonic() - started, 3), stages_seconds=seconds, notes=notes, mode=mode,
        artifacts={"library": "model.so", "metadata": "metadata.json", "inputs": "inputs.bin",
                   "outputs": "outputs.bin", "expected_outputs": "expected_outputs.bin"},
    )


def _device_name(dev, target: HostTarget) -> str:
    if target.device == "cuda":
        return f"{dev.device_name} (compute {dev.compute_version})"
    import platform

    return f"{platform.machine()} CPU ({platform.processor() or platform.system()})"

