"""Host backend: a model built by TVM Relax for a CPU (LLVM) or an NVIDIA GPU (CUDA) and run by TVM's runtime.

The same front end as the microcontroller builds (every operator through our registry; integer layers as their
bit-exact TIR kernels), then TVM's own route for a host: the zero pipeline, dlight's default GPU schedules (CUDA),
optionally meta_schedule tuning (`static_shape_tuning`, its database kept per target and model so a rebuild costs
no tuning), `relax.build`, and the library exported (`model.so`) with the metadata a host needs to load and call it.
The build is then loaded back, run on the same inputs as the TFLite interpreter (fidelity) and timed on the device.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import json
import os
import shutil
import statistics
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from tinymlaas.errors import BuildFailure, InvalidModel, ToolMissing, UnsupportedOperator
from tinymlaas.targets import HostTarget
from tinymlaas.verify import VerifiedReport, compare, make_inputs, reference_outputs

# relative error vs the interpreter: a GPU sums in another order and fuses multiply-adds; float16 keeps 11 bits
FLOAT_TOLERANCE = {("float32", "cpu"): 1e-5, ("float32", "cuda"): 1e-4, ("float16", "cuda"): 2e-2,
                   ("float16", "cpu"): 2e-2}


@dataclass(frozen=True)
class HostOptions:
    precision: str = "float32"  # float16: weights and activations in half precision, accumulation in float32
    tune_trials: int = 0  # meta_schedule trials in all (0: dlight's defaults only)
    tune_trials_per_task: int | None = None
    tune_minutes: float | None = None  # stop tuning after the round that passes this many minutes
    tuning_dir: Path | None = None  # databases, one folder per target and model; default beside the output
    inputs: int = 3  # random inputs checked against the reference (TFLite interpreter, ONNX Runtime)
    seed: int = 0
    runs: int = 50  # timed calls (median) after warm-up
    cuda_graph: bool = True  # CUDA: kernel launches captured once and replayed as CUDA graphs
    sample_inputs: Path | None = None  # .npz of inputs to check with instead of `inputs` random ones


@dataclass
class HostReport(VerifiedReport):
    model: str
    model_path: str
    target: str
    device: str  # the device it ran on, by name
    tvm_target: str
    precision: str
    lowering: str
    latency_ms: float  # median of `latency_runs` timed calls
    latency_runs: int
    fidelity: dict
    sizes: dict
    tuning: dict
    compile_seconds: float
    stages_seconds: dict
    notes: list[str] = field(default_factory=list)
    artifacts: dict = field(default_factory=dict)
    kind: str = "host"


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
    import os

    # meta_schedule sizes its CPU parallelism from the target's own core count
    return tvm.target.Target({"kind": target.tvm_target, "num-cores": os.cpu_count() or 1})


def extern_layers(mod, graph) -> list[str]:
    """Layers lowered to C micro-kernels (call_dps_packed), which only the firmware links: 'OPCODE #i (kernel)'."""
    from tvm import relax

    from tinymlaas.frontend.to_relax import OP_VAR

    ops, found = {op.index: op for op in graph.operators}, []
    for binding in (b for block in mod["main"].body.blocks for b in block.bindings):
        value = binding.value
        if isinstance(value, relax.Call) and getattr(value.op, "name", "") == "relax.call_dps_packed":
            m = OP_VAR.match(binding.var.name)
            op = ops.get(int(m.group(1))) if m else None
            where = f"{op.opcode} #{op.index} ({graph.precision(op)})" if op else "a layer"
            found.append(f"{where}: C micro-kernel {value.args[0].global_symbol}, not linked on host targets yet")
    return found


def _public_names(mod):
    """Our TE kernels are PrimFuncs all named "main" (te.create_prim_func); the host library exports each one, so
    each gets its own global symbol."""
    import tvm

    for gv, func in list(mod.functions.items()):
        if isinstance(func, tvm.tirx.PrimFunc):
            mod[gv] = func.with_attr("global_symbol", gv.name_hint)
    return mod


def tuning_folder(target: HostTarget, model_sha256: str, precision: str, base: Path) -> Path:
    return base / target.name / f"{model_sha256[:16]}-{precision}"


# trials per function in each tuning round (a time budget is checked between rounds). Each round pays the evolutionary
# search once per function (~18 s on the lent H100's host, whatever the trials): rounds of 4 were mostly that
ROUNDS = (32, 64, 128)
# meta_schedule's evolutionary search, smaller than its defaults (a population of 512 evolved 4 times): picking 32
# tensor-core candidates for one resnet18 convolution took 95 s on 2 cores and 54 s on the H100's host, 36 s here
# with 256 and 2 - time a time-boxed tuning spends measuring instead (the first round's cost model is untrained, so
# its evolution ranks by nothing)
SEARCH = {"population_size": 256, "genetic_num_iters": 2}
BUILD_THREADS = 16
# the functions tuned: the fewest, heaviest first, that hold this share of the model's floating-point work (the
# rest keep dlight's schedules). On resnet18 the convolutions; elementwise and pooling functions are memory-bound and
# each round's ~18 s of search per function bought them little.
FLOP_SHARE = 0.95


def heaviest_tasks(tasks, share: float = FLOP_SHARE) -> list:
    """The tasks (meta_schedule ExtractedTask) carrying `share` of the FLOPs (per call x calls), heaviest first; a
    function the estimator cannot read is tuned too (first); all of them when none has measurable FLOPs."""
    from tvm.s_tir.analysis import estimate_tir_flops

    def flops(task) -> float | None:
        try:
            return float(estimate_tir_flops(task.dispatched[0])) * int(task.weight)
        except Exception:  # noqa: BLE001 - unreadable: tuned, not dropped
            return None

    measured = {id(t): flops(t) for t in tasks}
    unread = [t for t in tasks if measured[id(t)] is None]
    ranked = sorted((t for t in tasks if measured[id(t)] is not None), key=lambda t: measured[id(t)], reverse=True)
    total = sum(measured[id(t)] for t in ranked)
    if total <= 0:
        return unread + ranked
    chosen, covered = list(unread), 0.0
    for task in ranked:
        if covered >= share * total:
            break
        chosen.append(task)
        covered += measured[id(task)]
    return chosen


def unmeasured_first(tasks, work_dir: Path) -> list:
    """The tasks the database in `work_dir` holds no measurement of first, then the rest, each group in its given
    order: a round's trials run out in task order, so a tuning cut short and resumed (or given too few trials to reach
    every function) measures the functions it never reached before it re-tunes the others."""
    if not (work_dir / "database_tuning_record.json").is_file():
        return list(tasks)
    from tvm.s_tir import meta_schedule as ms

    db = ms.database.JSONDatabase(work_dir=str(work_dir))

    def measured(task) -> bool:
        mod = task.dispatched[0]
        return db.has_workload(mod) and bool(db.get_top_k(db.commit_workload(mod), 1))

    return sorted(tasks, key=measured)  # stable: False (unmeasured) first


def uses_tensor_cores(target: HostTarget, precision: str) -> bool:
    return target.device == "cuda" and precision == "float16"


def lowering_config(target: HostTarget, precision: str) -> dict:
    """PassContext settings for lowering this build's TIR (tuning candidates and the final build alike).

    Tensor-core schedules: TVM 0.27's StorageRewrite shares a float16 shared-memory buffer with the float32 staging
    buffer of a tensor-core accumulator and then fails its own check ("tvm_access_ptr element type must match the
    source buffer") - 7 of 8 sampled resnet-style convolution schedules; without it all of them build."""
    return {"tirx.disable_storage_rewrite": True} if uses_tensor_cores(target, precision) else {}


def tensor_core_space():
    """meta_schedule's design space with tensor-core tiling (wmma 16x16x16, float16 inputs, float32 or float16
    accumulation) first, the plain CUDA rules for what does not tensorize. TVM's own "cuda-tensorcore" set also holds
    an mma rule whose software pipeline fails on a convolution with a fused epilogue ("not a stage pipeline"), which
    would end the tuning of that function: left out."""
    import tvm.s_tir.tensor_intrin.cuda  # noqa: F401 - registers the wmma intrinsics the rule names
    from tvm.s_tir import meta_schedule as ms
    from tvm.s_tir.meta_schedule.schedule_rule import MultiLevelTilingTensorCore, ReuseType, ScheduleRule

    def group(accumulate: str, trans: str) -> dict:
        return {"init": f"wmma_fill_16x16x16_{accumulate}", "load_a": "wmma_load_16x16x16_f16_a_shared_dyn",
                "load_b": f"wmma_load_16x16x16_f16_b{trans}_shared_dyn",
                "compute": f"wmma_sync_16x16x16_f16f16{accumulate}{trans}",
                "store": f"wmma_store_16x16x16_{accumulate}_shared_dyn"}

    wmma = MultiLevelTilingTensorCore(
        intrin_groups=[group(acc, trans) for acc in ("f32", "f16") for trans in ("", "_trans")],
        structure="SSSRRSRS", tile_binds=["blockIdx.y", "blockIdx.x", "threadIdx.y"], max_innermost_factor=4,
        vector_load_lens=[1, 2, 3, 4, 8, 16], reuse_read=ReuseType("must", [4], "shared.dyn"),
        reuse_write=ReuseType("must", [2], "shared.dyn"))
    cuda = list(ScheduleRule.create("cuda"))  # [apply-custom-rule, ...the rest]
    return ms.space_generator.PostOrderApply(sch_rules=[cuda[0], wmma, *cuda[1:]], postprocs="cuda-tensorcore",
                                             mutator_probs="cuda-tensorcore")


def in_process_builder(threads: int = BUILD_THREADS, config: dict | None = None):
    """A meta_schedule builder that builds candidates in threads of this process (nvcc runs as subprocesses).

    meta_schedule's LocalBuilder starts a fresh pool of processes for every batch of candidates, and each imports TVM
    (8-10 s on the lent H100's host, more when 16 start at once): on the H100 a batch of 16 took 47 s to build, and
    with its 30 s timeout 61 of 94 candidates of one resnet18 round failed, even elementwise ones. Built here, a
    candidate costs its compilation only."""
    from concurrent.futures import ThreadPoolExecutor

    import tvm
    from tvm.ir.utils import derived_object
    from tvm.s_tir.meta_schedule.builder import BuilderResult, PyBuilder
    from tvm.s_tir.meta_schedule.builder.local_builder import default_build, default_export

    def one(build_input):
        try:
            with tvm.transform.PassContext(config=config or {}):  # a pass context holds per thread
                built = default_build(build_input.mod, build_input.target, None)
            return BuilderResult(default_export(built), None)
        except Exception as e:  # noqa: BLE001 - a candidate that does not build is a failed trial, not a failed tuning
            return BuilderResult(None, f"in-process builder: {type(e).__name__}: {str(e)[-300:]}")

    @derived_object
    class InProcessBuilder(PyBuilder):
        def build(self, build_inputs):
            with ThreadPoolExecutor(max_workers=threads) as pool:
                return list(pool.map(one, build_inputs))

    return InProcessBuilder()


@contextlib.contextmanager
def parallel_cuda_compiler():
    """CUDA candidates compiled by nvcc (subprocesses) while tuning, where nvcc is installed. TVM 0.27 compiles with
    NVRTC in-process by default, and concurrent NVRTC compilations serialize: on the lent H100's host 12 tensor-core
    candidates built in 16 threads took 14.7 s with NVRTC and 6.7 s with nvcc (one at a time 2.9 vs 2.5 s each) - a
    tuning round spent 40-48 s of its ~80 s per function building 32. A compiler the user chose is left alone."""
    chosen = "TVM_CUDA_COMPILE_MODE" in os.environ
    if not chosen and shutil.which("nvcc"):
        os.environ["TVM_CUDA_COMPILE_MODE"] = "nvcc"
    try:
        yield
    finally:
        if not chosen:
            os.environ.pop("TVM_CUDA_COMPILE_MODE", None)


@contextlib.contextmanager
def fast_tvmscript_parsing():
    """TVM's TVMScript parser takes `inspect.stack()` for every function it parses (496 when meta_schedule first
    imports TVM's tensor intrinsics, in every tuning process), and `inspect` looks up the module of each frame whose
    file is a pseudo-file (`<frozen importlib._bootstrap>`, parsed code) by scanning all of sys.modules, every time:
    that import took 39 s in a bare process and 132 s in one with the service and TensorFlow loaded (5,100 modules),
    3.7 s with this. A pseudo-file belongs to no module - the answer the scan comes to - so it is given at once."""
    scan = inspect.getmodule
    if getattr(scan, "pseudo_files_have_no_module", False):  # already in place (another build, nested)
        yield
        return

    def getmodule(obj, _filename=None):
        if _filename is not None and _filename.startswith("<") and _filename.endswith(">"):
            return None
        return scan(obj, _filename)

    getmodule.pseudo_files_have_no_module = True
    inspect.getmodule = getmodule
    try:
        yield
    finally:
        inspect.getmodule = scan


# written when a tuning ends: a database without it is from a tuning cut short (its records are kept, and the next
# build goes on tuning from them instead of taking a half-measured database as done)
TUNED = "tuning.json"


def is_tuned(work_dir: Path) -> bool:
    return (work_dir / TUNED).is_file()


def tune(mod, tvm_target, work_dir: Path, trials: int, per_task: int | None = None,
         minutes: float | None = None, seed: int = 0, tensor_cores: bool = False, config: dict | None = None) -> dict:
    """meta_schedule over the module's fused functions (the module after the zero pipeline), its database in
    `work_dir`. In rounds of a few trials per function (ROUNDS, growing), so a time budget can stop it between rounds;
    each round's search starts from the best schedules measured so far (they are in the database). tensor_cores: the
    design space tries wmma tiling first (float16 modules); config: PassContext settings the candidates are lowered
    with. Returns what ran."""
    import logging

    from tvm.s_tir import meta_schedule as ms

    # its per-round tables go to work_dir/logs; on the console (stdout, where --json writes) only warnings
    logger = logging.getLogger("tvm.s_tir.meta_schedule")
    logger.setLevel(logging.WARNING)
    # meta_schedule reconfigures this logger naming every handler it holds, and fails on one without a name (such as
    # pytest's capture handlers, attached during an earlier tuning in the same process)
    for handler in [h for h in logger.handlers if not h.get_name()]:
        logger.removeHandler(handler)
    every = ms.relax_integration.extract_tasks(mod, tvm_target)
    tasks = unmeasured_first(heaviest_tasks(every), work_dir)
    per_task = per_task or trials
    records = work_dir / "database_tuning_record.json"
    started, asked, given, rounds, stopped_by = time.monotonic(), 0, 0, 0, "trials"
    while asked < trials and given < per_task:
        if minutes is not None and time.monotonic() - started >= 60 * minutes:
            stopped_by = "minutes"
            break
        share = min(ROUNDS[min(rounds, len(ROUNDS) - 1)], per_task - given)
        n = min(trials - asked, share * max(1, len(tasks)))
        contexts, weights = ms.relax_integration.extracted_tasks_to_tune_contexts(
            tasks, str(work_dir), space=tensor_core_space() if tensor_cores else "post-order-apply",
            strategy=ms.search_strategy.EvolutionarySearch(**SEARCH), seed=seed + rounds)
        with parallel_cuda_compiler() if tvm_target.kind.name == "cuda" else contextlib.nullcontext():
            ms.relax_integration.tune_tasks(tasks=contexts, task_weights=weights, work_dir=str(work_dir),
                                            max_trials_global=n, max_trials_per_task=share,
                                            builder=in_process_builder(config=config), runner="local",
                                            database="json", cost_model="xgb", measure_callbacks="default",
                                            task_scheduler="gradient")
        asked, given, rounds = asked + n, given + share, rounds + 1
    # what was measured (a function with few possible schedules runs out of candidates before its share)
    measured = len(records.read_text().splitlines()) if records.exists() else 0
    ran = {"tasks": len(tasks), "functions": len(every), "rounds": rounds, "trials": measured,
           "seconds": round(time.monotonic() - started, 1), "stopped_by": stopped_by}
    (work_dir / TUNED).write_text(json.dumps(ran) + "\n")
    return ran


def clip_gather_indices(mod):
    """Every `take` (gather, embedding lookup) clamps its indices into range: TVM's frontends emit mode "fast", which
    reads outside the table for an index out of range (a token id past the vocabulary) - a library a service loads
    must not. In range, the result is the same."""
    import tvm
    from tvm import relax

    @relax.expr_functor.mutator
    class ClipTake(relax.PyExprMutator):
        def visit_call_(self, call):
            call = super().visit_call_(call)
            if isinstance(call.op, tvm.ir.Op) and call.op.name == "relax.take" and call.attrs.mode == "fast":
                return relax.op.take(call.args[0], call.args[1], call.attrs.axis, mode="clip")
            return call

    mutator = ClipTake(mod)
    for gv, func in mod.functions.items():
        if isinstance(func, relax.Function):
            mutator.builder_.update_func(gv, mutator.visit_expr(func))
    return mutator.builder_.get()


def tuning_preparation(tensor_cores: bool):
    """The graph rewrites ahead of tuning (before mixed precision): batch norm folded into the convolution before it
    (its weights and bias are constants: the epilogue keeps a bias add, not a subtract, divide, multiply and add per
    element), and for tensor cores convolutions in NHWC with OHWI weights (channels innermost, as wmma tiles load
    them: one resnet18 convolution at batch 32 on the H100, 32 trials, 56 us in NHWC vs 122 us after 64 in NCHW).
    Layout-following operators (pooling, adds) follow; a transpose stays only where the model's own layout meets it.
    Not without tuning: dlight's fallback schedules a depthwise convolution with a fused epilogue badly."""
    import tvm
    from tvm import relax

    passes = [relax.transform.FoldBatchnormToConv2D(), relax.transform.FoldConstant()]
    if tensor_cores:
        passes += [relax.transform.ConvertLayout({"relax.nn.conv2d": ["NHWC", "OHWI"]}), elementwise_keeps_layout(),
                   relax.transform.DeadCodeElimination(), relax.transform.FoldConstant()]
    return tvm.transform.Sequential(passes)


# elementwise operators TVM 0.27's ConvertLayout has no layout rule for: it wraps each in a transpose back and forth
# (mobilenet_v2's ReLU6 is a clip: two transposes per activation)
LAYOUT_FREE = ("relax.clip", "relax.nn.leakyrelu")


def elementwise_keeps_layout():
    """A pass: permute_dims(f(permute_dims(x, p)), q) with q undoing p, f elementwise, becomes f(x)."""
    import tvm
    from tvm import relax
    from tvm.relax.dpl import is_op, rewrite_call, wildcard

    x = wildcard()
    inner = is_op("relax.permute_dims")(x)
    elementwise = None
    for name in LAYOUT_FREE:
        one = is_op(name)(inner) | is_op(name)(inner, wildcard(), wildcard())
        elementwise = one if elementwise is None else elementwise | one
    outer = is_op("relax.permute_dims")(elementwise)

    def undoes(p, q) -> bool:
        return p is not None and q is not None and [int(p[int(i)]) for i in q] == list(range(len(p)))

    def rewrite(expr, matched):
        call = matched[elementwise]
        if not undoes(matched[inner].attrs.axes, matched[outer].attrs.axes):
            return expr
        return relax.Call(call.op, [matched[x], *call.args[1:]], call.attrs)

    @tvm.transform.module_pass(opt_level=0, name="ElementwiseKeepsLayout")
    def apply(mod, _ctx):
        return tvm.IRModule({gv: rewrite_call(outer, rewrite, f) if isinstance(f, relax.Function) else f
                             for gv, f in mod.functions.items()}, attrs=mod.attrs)

    return apply


def optimize(mod, target: HostTarget, tvm_target, options: HostOptions, work_dir: Path | None) -> tuple:
    """Relax module -> (the module relax.build takes, tuning statistics): precision, the zero pipeline, tuning when
    asked and no database for this model exists yet, the database's schedules, dlight's rules for the rest (GPU)."""
    import tvm
    from tvm import relax

    tensor_cores = uses_tensor_cores(target, options.precision)
    mod = clip_gather_indices(mod)
    if options.tune_trials:
        mod = tuning_preparation(tensor_cores)(mod)
    if options.precision == "float16":
        mod = relax.transform.ToMixedPrecision(out_dtype="float32")(mod)
    stats = {}
    with tvm_target:
        if options.tune_trials:
            # what batch norm is left, decomposed, fuses with its neighbours; CanonicalizeBindings removes the tuple
            # the decomposition leaves, which otherwise keeps the activation after it out of the fused function
            mod = tvm.transform.Sequential([relax.transform.DecomposeOpsForInference(),
                                            relax.transform.CanonicalizeBindings()])(mod)
        mod = relax.get_pipeline("zero")(mod)
        if options.tune_trials:
            with fast_tvmscript_parsing():  # meta_schedule parses TVM's tensor intrinsics on first use
                if tensor_cores:
                    # a database of tensor-core schedules names wmma intrinsics: a rebuild in a new process, which
                    # tunes nothing, must register them before the database loads
                    import tvm.s_tir.tensor_intrin.cuda
                if not is_tuned(work_dir):
                    stats = tune(mod, tvm_target, work_dir, options.tune_trials, options.tune_trials_per_task,
                                 options.tune_minutes, options.seed, tensor_cores,
                                 lowering_config(target, options.precision))
                mod = relax.transform.MetaScheduleApplyDatabase(str(work_dir))(mod)
        if target.device == "cuda":  # whatever tuning left unscheduled gets dlight's rules
            import tvm.s_tir.dlight as dl

            mod = dl.ApplyDefaultSchedule(dl.gpu.Matmul(), dl.gpu.GEMV(), dl.gpu.Reduction(),
                                          dl.gpu.GeneralReduction(), dl.gpu.Fallback())(mod)
    return mod, stats


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
    precisions = {graph.precision(op) for op in graph.operators}
    lowering = "float" if precisions <= {"float32"} else "integer" if "float32" not in precisions else "mixed"
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
        _public_names(mod), lowering, _io(graph.tensor(i) for i in graph.inputs),
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


def load_sample_inputs(path: Path, inputs: list[dict]) -> list[list[np.ndarray]]:
    """An .npz with one array per model input, by name, samples on a leading axis (or one sample as the input's own
    shape): the batches to check with. InvalidModel names a missing, misshapen or mistyped input."""
    try:
        data = np.load(path, allow_pickle=False)
        if not isinstance(data, np.lib.npyio.NpzFile):  # a single .npy array: no names to match the inputs by
            raise TypeError("one array, not named ones")
        with data:
            arrays = {k: data[k] for k in data.files}
    except (OSError, ValueError, TypeError, zipfile.BadZipFile) as e:
        raise InvalidModel(f"sample inputs {Path(path).name}: not a readable .npz of named arrays "
                           f"({type(e).__name__})") from None
    columns = []
    for spec in inputs:
        name, shape = spec["name"], tuple(spec["shape"])
        if name not in arrays:
            raise InvalidModel(f"sample inputs {Path(path).name}: no array '{name}' (it holds "
                               f"{', '.join(sorted(arrays)) or 'none'})")
        a = arrays[name]
        a = a[None] if a.shape == shape else a
        if a.shape[1:] != shape or len(a) == 0:
            raise InvalidModel(f"sample inputs {Path(path).name}: '{name}' has shape {a.shape}; the model takes "
                               f"{shape} (or N samples of it: (N, {', '.join(map(str, shape))}))")
        if not np.can_cast(a.dtype, spec["dtype"], casting="same_kind"):
            raise InvalidModel(f"sample inputs {Path(path).name}: '{name}' is {a.dtype}; the model takes "
                               f"{spec['dtype']}")
        columns.append(a.astype(spec["dtype"]))
    if len({len(c) for c in columns}) > 1:
        raise InvalidModel(f"sample inputs {Path(path).name}: the inputs hold different numbers of samples "
                           f"({', '.join(str(len(c)) for c in columns)})")
    return [[c[i] for c in columns] for i in range(len(columns[0]))] if columns else []


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
    db = tuning_folder(target, sha, options.precision, options.tuning_dir or work.parent / "tuning")
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
        executable = relax.build(mod, target=tvm_target)
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
                "precision": options.precision, "cuda_graph": graphs, "inputs": module.inputs,
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
        compile_seconds=round(time.monotonic() - started, 3), stages_seconds=seconds, notes=notes,
        artifacts={"library": "model.so", "metadata": "metadata.json", "inputs": "inputs.bin",
                   "outputs": "outputs.bin", "expected_outputs": "expected_outputs.bin"},
    )


def _device_name(dev, target: HostTarget) -> str:
    if target.device == "cuda":
        return f"{dev.device_name} (compute {dev.compute_version})"
    import platform

    return f"{platform.machine()} CPU ({platform.processor() or platform.system()})"


def format_host_report(r: HostReport) -> str:
    f = r.fidelity
    lines = [
        f"{r.model} on {r.target} ({r.device}); TVM target {r.tvm_target}",
        f"  precision {r.precision}, lowering {r.lowering}",
        f"  latency   {r.latency_ms:.4f} ms (median of {r.latency_runs} runs)",
        f"  fidelity  {'PASS' if r.verified else 'FAIL'}: " + ", ".join(
            f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in f.items()
            if k in ("max_abs_error", "max_rel_error", "max_lsb_diff", "inputs")),
        f"  library   {r.sizes['library']:,} B (weights {r.sizes['weights']:,} B)",
    ]
    if r.tuning["trials"]:
        ran = r.tuning["ran"]
        did = (f"{ran['trials']} of {r.tuning['trials']} trials over {ran['tasks']} functions in {ran['seconds']:.0f} s"
               f" (stopped by {ran['stopped_by']})" if ran else "database reused, no trials")
        lines.append(f"  tuning    {did}: {r.tuning['database']}")
    lines += [f"  note: {n}" for n in r.notes]
    return "\n".join(lines)
