"""The compile pipeline: model file -> verified, measured firmware for one target.

import -> lower (with a schedule) -> codegen -> driver -> firmware -> emulate -> verify -> measure.
Everything is written to a temporary folder beside the output folder and moved into place only
when the whole pipeline succeeded, so a failure leaves nothing half-written.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from tinymlaas.backends.mcu.codegen import build_kernels
from tinymlaas.backends.mcu.driver import generate_driver
from tinymlaas.backends.mcu.firmware import link_firmware, linked_bytes
from tinymlaas.backends.mcu.measure import measure_firmware
from tinymlaas.errors import InternalError, InvalidModel, ModelTooLarge, TinyMLaaSError
from tinymlaas.frontend.cleanup import clean
from tinymlaas.frontend.keras import convert_keras, is_keras_input
from tinymlaas.frontend.onnx import ONNX_SUFFIX, load_onnx
from tinymlaas.frontend.tflite import import_relax_tvm, load_tflite
from tinymlaas.frontend.to_relax import to_relax
from tinymlaas.frontend.torch_export import PT2_SUFFIX, load_exported_program
from tinymlaas.ir.lower import lower
from tinymlaas.ir.memory import plan as plan_memory
from tinymlaas.ir.schedule import schedule_for
from tinymlaas.runners import emulator_for
from tinymlaas.targets import Target, get_target
from tinymlaas.verify import VerifiedReport, compare, make_inputs, reference_outputs, reference_resolver, split_outputs

STAGES = ("import", "lower", "codegen", "driver", "reference", "link", "emulate", "verify", "measure")


@dataclass
class CompileOptions:
    inputs: int | None = None  # random inputs to verify with; default the runner's (QEMU 10, Ibex 1)
    seed: int = 0
    timeout: float | None = None  # seconds for the run; default the runner's (QEMU 120, Ibex 1800)
    emulator: str | None = None  # runner: qemu, ibex, renode; default the target's (ibex for ibex-* targets)
    max_flash: int | None = None  # user constraints, tighter than the board's
    max_ram: int | None = None
    int8_lowering: str = "integer"  # "integer": our integer kernels; "float": TVM's dequantize/float/quantize
    kernels: str = "auto"  # int8 layers: "tir", "dsp"/"dsp16" (DSP micro-kernels, int8/int16 weights), "auto" (dsp where offered)
    # arena plan (ir/memory.py): tvm | optimal | inplace, or auto: TVM's, and in place when that does not fit the RAM
    # budget; a variant's own plan overrides it
    memory: str = "auto"
    quantize: str = "none"  # Keras/SavedModel input: none | int8 | int16x8
    calibration: str | None = None  # .npz of calibration samples for quantizing Keras/SavedModel input
    variant: object = None  # a search.space.Variant: per-layer kernels, schedule and fusion (overrides `kernels`)
    # host targets (cpu-host, cuda-host)
    precision: str = "float32"  # float16: half-precision weights and activations (CUDA)
    tune_trials: int = 0  # meta_schedule trials (0: TVM's default schedules)
    tune_trials_per_task: int | None = None
    tune_minutes: float | None = None  # a time budget for tuning, checked between rounds
    tuning_dir: str | None = None  # tuning databases (one folder per target and model); default beside the output
    sample_inputs: str | None = None  # .npz: the inputs to verify with instead of random ones (token ids, say)


@dataclass
class CompileReport(VerifiedReport):
    model: str
    model_path: str
    target: str
    board: str
    core: str
    lowering: str  # "float" model, "integer" int8 kernels, or "float-emulated" int8 through float ops
    instructions: int  # one inference, first input
    instructions_min: int
    instructions_max: int
    instructions_repeat_exact: bool | None  # the same input run twice gave the same count (None: the model keeps
    # state between inferences, so the second run starts from another state)
    memory_accesses: int | None  # None where the runner does not count them (Renode)
    fidelity: dict
    sizes: dict
    fits: dict
    stages_seconds: dict
    compile_seconds: float
    notes: list[str] = field(default_factory=list)
    artifacts: dict = field(default_factory=dict)
    runner: str = "qemu"
    clock_hz: int = 0  # the board's
    cycles: int | None = None  # one inference, first input: true cycles from a cycle-accurate runner
    cycles_source: str | None = None
    cycles_repeat_exact: bool | None = None
    cycles_estimate: float | None = None  # QEMU runs of a core with a pipeline table (Ibex): its estimate, first input
    variant: dict | None = None  # the search.space.Variant it was built as, if one was given
    kind: str = "mcu"  # firmware (a host target's build is a backends.host.build.HostReport)


def _fmt(n: int) -> str:
    return f"{n:,}"


def _limits(target: Target, options: CompileOptions) -> tuple[int, int]:
    return (min(target.board.flash_bytes, options.max_flash or target.board.flash_bytes),
            min(target.board.ram_bytes, options.max_ram or target.board.ram_bytes))


def check_fits(model_name: str, target: Target, flash: int, ram: int, options: CompileOptions, detail: str) -> dict:
    flash_limit, ram_limit = _limits(target, options)
    problems = []
    if flash > flash_limit:
        problems.append(f"flash {_fmt(flash)} B > {_fmt(flash_limit)} B")
    if ram > ram_limit:
        problems.append(f"RAM {_fmt(ram)} B > {_fmt(ram_limit)} B")
    if problems:
        board_too_small = flash > target.board.flash_bytes or ram > target.board.ram_bytes
        hint = ("; a host target runs models of any size: --target cuda-host (NVIDIA GPU) or cpu-host"
                if board_too_small else "")
        raise ModelTooLarge(
            f"{model_name} does not fit {target.name} ({target.board.name}): {'; '.join(problems)} ({detail}){hint}"
        )
    return {"flash_limit": flash_limit, "ram_limit": ram_limit, "flash": flash, "ram": ram}


def import_model(model, target: Target, int8_lowering: str = "integer", kernels: str | dict = "auto"):
    """The Relax module for `model` on `target`, every operator through our registry.

    Returns (relax module, lowering, notes): lowering is "float", "integer" (integer kernels, bit-exact) or
    "float-emulated" (int8 through TVM's dequantize/float/quantize, only when asked for).
    """
    notes = list(model.notes)
    if model.quantized and int8_lowering == "float":
        notes.append("int8 operators lowered through float dequantize/op/quantize (as requested): not bit-exact")
        return import_relax_tvm(model), "float-emulated", notes
    graph = clean(model.graph, shapes_from_interpreter=True)
    precisions = {graph.precision(op) for op in graph.operators}
    lowering = "float" if precisions <= {"float32"} else "integer" if "float32" not in precisions else "mixed"
    if reference_resolver(model.data) != "BUILTIN_REF":
        notes.append("the interpreter's reference kernels cannot run this model (an operator missing, aborting or, "
                     "for a quantized SUM, wrong): verified against its builtin (optimized) kernels")
    return to_relax(graph, target, kernels), lowering, notes


def compile_model(
    model_path: str | Path,
    target_name: str,
    out_dir: str | Path | None = None,
    options: CompileOptions | None = None,
    progress: Callable[[str], None] | None = None,
) -> CompileReport:
    """Compile, run, verify and measure. Input problems raise TinyMLaaSError; a bug of ours raises InternalError
    naming the stage (and the operator, where one was being converted)."""
    current = ["import"]

    def track(stage: str) -> None:
        current[0] = stage
        if progress is not None:
            progress(stage)

    try:
        return _compile_model(model_path, target_name, out_dir, options, track)
    except (TinyMLaaSError, InternalError, KeyboardInterrupt):
        raise
    except Exception as e:
        raise InternalError(current[0], None, e) from e


def _compile_model(model_path, target_name, out_dir, options, progress) -> CompileReport:
    options = options or CompileOptions()
    target = get_target(target_name)
    progress = progress or (lambda stage: None)
    watch = _Stopwatch()

    def stage(name: str) -> None:
        watch.lap(name)
        progress(name)

    started = time.monotonic()
    stage("import")
    converted_notes, source = [], Path(model_path)
    if options.sample_inputs and target.kind != "host":
        raise InvalidModel(f"sample inputs apply to the host targets' builds; a {target.name} build is checked on "
                           "random inputs against the reference (--inputs N sets how many)")
    host_only = host_only_format(source)
    if host_only is not None:
        return _compile_host_only(source, host_only, target, out_dir, options, stage)
    if is_keras_input(source):  # Keras / SavedModel: TensorFlow's converter first, as users do
        converted = Path(tempfile.mkdtemp(prefix="tinymlaas-convert-")) / f"{source.stem or 'model'}.tflite"
        converted_notes = convert_keras(source, converted, options.quantize,
                                        Path(options.calibration) if options.calibration else None)
        model_path = converted
    model = load_tflite(model_path)
    model.notes.extend(converted_notes)
    # absolute: the tools run inside the work folder
    out = (Path(out_dir) if out_dir else Path("out") / f"{model.name}-{target.name}").resolve()
    if target.kind == "host":
        return _compile_host(model, target, out, options, stage)
    variant = options.variant
    kernels = dict(variant.kernels) if variant is not None else options.kernels
    relax_mod, lowering, notes = import_model(model, target, options.int8_lowering, kernels)

    stage("lower")
    program = lower(relax_mod, schedule=schedule_for(variant.schedule if variant is not None else None),
                    fuse=variant is None or variant.fusion != "none")
    policy = variant.memory if variant is not None else options.memory
    unplanned = program

    with _staged(out) as work:
        stage("codegen")
        program, kernels = build_kernels(plan_memory(unplanned, "tvm" if policy == "auto" else policy), target, work)
        ram = program.arena_bytes + program.scratch_bytes + program.state_bytes
        if policy == "auto" and ram > _limits(target, options)[1]:  # the smallest arena we can plan, before giving up
            # built again: an overlapped elementwise kernel is compiled without noalias
            program, kernels = build_kernels(plan_memory(unplanned, "inplace"), target, work)
            notes.append(f"TVM's arena plan needs {_fmt(ram)} B of RAM, over the budget of "
                         f"{_fmt(_limits(target, options)[1])} B: planned in place")
        notes.extend(program.notes)
        check_fits(
            model.name, target,
            flash=kernels.code_bytes + program.weight_bytes,
            ram=program.arena_bytes + program.scratch_bytes + program.state_bytes,
            options=options,
            detail=f"code {_fmt(kernels.code_bytes)} B, weights {_fmt(program.weight_bytes)} B, "
            f"arena {_fmt(program.arena_bytes)} B, kernel scratch {_fmt(program.scratch_bytes)} B"
            + (f", recurrent state {_fmt(program.state_bytes)} B" if program.state_bytes else ""),
        )

        stage("driver")
        driver = generate_driver(model, program, kernels, work)

        stage("reference")
        runner = emulator_for(options.emulator or target.default_runner, options.timeout, target)
        # a core whose manual tabulates its pipeline (Ibex) gets a cycle estimate from QEMU's block counts: cheap
        table = runner.name == "qemu" and "pipeline" in (target.estimate or {})
        if table:
            runner.blocks = True
        batches = make_inputs(model, options.inputs or runner.default_inputs, options.seed)
        batches.append(batches[0])  # input 0 again: its count must repeat exactly
        (work / "inputs.bin").write_bytes(b"".join(x.tobytes() for batch in batches for x in batch))
        want = reference_outputs(model, batches)
        (work / "expected_outputs.bin").write_bytes(b"".join(y.tobytes() for batch in want for y in batch))

        stage("link")
        firmware = link_firmware(target, kernels, driver, work, layout=runner.layout, inputs=work / "inputs.bin")

        stage("emulate")
        run = runner.run(target, firmware, work)

        stage("verify")
        got = split_outputs(model, (work / "outputs.bin").read_bytes(), len(batches))
        fidelity = compare(model, got, want, integer_kernels=lowering == "integer")
        counts = [r.instructions for r in run.regions]

        stage("measure")
        sizes = measure_firmware(firmware.elf, target, program, run.harness.get("stack_bytes"),
                                 linked_bytes(firmware.map_file, firmware.kernel_library))
        fits = check_fits(
            model.name, target, flash=sizes.flash_model, ram=sizes.ram_model, options=options,
            detail=f"measured: code {_fmt(sizes.model_code)} B, weights {_fmt(sizes.weights)} B, "
            f"arena {_fmt(sizes.arena)} B, scratch {_fmt(sizes.kernel_scratch)} B, stack {_fmt(sizes.stack_peak or 0)} B",
        )
        watch.lap(None)
        if run.harness.get("overflowed_window"):
            notes.append("stack use exceeded the painted window; stack_peak is a lower bound")
        report = CompileReport(
            model=model.name,
            model_path=str(model.path),
            target=target.name,
            board=target.board.name,
            core=target.core,
            lowering=lowering,
            instructions=counts[0],
            instructions_min=min(counts),
            instructions_max=max(counts),
            instructions_repeat_exact=counts[0] == counts[-1] if not program.state_sizes else None,
            variant=variant.to_dict() if variant is not None else None,
            memory_accesses=run.regions[0].memory_accesses,
            fidelity=fidelity.to_dict(),
            sizes=sizes.to_dict(),
            fits=fits,
            stages_seconds=watch.seconds,
            compile_seconds=round(time.monotonic() - started, 3),
            notes=notes,
            artifacts={
                "firmware": "firmware.elf",
                "driver": "tinymlaas_model.c",
                "header": "tinymlaas_model.h",
                "kernels": "kernels.o",
                "weights": "weights.bin",
                "inputs": "inputs.bin",
                "outputs": "outputs.bin",
                "expected_outputs": "expected_outputs.bin",
            },
        )
        if run.regions[0].cycles is not None:
            report.runner, report.cycles = runner.name, run.regions[0].cycles
            report.clock_hz = target.board.clock_hz
            report.cycles_repeat_exact = (run.regions[0].cycles == run.regions[-1].cycles
                                          if not program.state_sizes else None)
            report.cycles_source = f"true cycles: Ibex '{runner.config}' from its RTL (Verilator)"
        else:
            report.runner = runner.name
        if table:
            from tinymlaas.runners import mca

            report.cycles_estimate = mca.estimate_run(firmware.elf, target, run)[0][0]
        _publish(report, model, work, out)
    return report


def _host_options(options: CompileOptions):
    from tinymlaas.backends.host.build import HostOptions

    return HostOptions(precision=options.precision, tune_trials=options.tune_trials,
                       tune_trials_per_task=options.tune_trials_per_task, tune_minutes=options.tune_minutes,
                       tuning_dir=Path(options.tuning_dir).resolve() if options.tuning_dir else None,
                       inputs=options.inputs or 3, seed=options.seed,
                       sample_inputs=Path(options.sample_inputs) if options.sample_inputs else None)


def _compile_host(model, target, out: Path, options: CompileOptions, stage):
    """A host target: TVM's runtime library instead of firmware (tinymlaas.backends.host), written as atomically."""
    from tinymlaas.backends.host.build import build_host

    graph = clean(model.graph, shapes_from_interpreter=True)
    with _staged(out) as work:
        report = build_host(model, graph, target, work, _host_options(options), stage)
        _publish(report, model, work, out)
    return report


@dataclass(frozen=True)
class HostOnlyFormat:
    """A model format only the host targets build (the firmware reproduces TFLite's integer semantics, not its)."""
    what: str
    convert: str  # how to get a TFLite model of it for a microcontroller
    load: Callable  # path -> a model with to_relax, reference_outputs, reference_name


HOST_ONLY_FORMATS = {
    ONNX_SUFFIX: HostOnlyFormat("ONNX models", "convert it to TFLite (e.g. onnx2tf, or export from the training "
                            "framework through TensorFlow) and compile that", load_onnx),
    PT2_SUFFIX: HostOnlyFormat("PyTorch exported programs", "convert it to TFLite (e.g. ai-edge-torch) and compile "
                           "that", load_exported_program),
}


def host_only_format(path: Path) -> HostOnlyFormat | None:
    return HOST_ONLY_FORMATS.get(Path(path).suffix.lower())


def _compile_host_only(source: Path, fmt: HostOnlyFormat, target, out_dir, options: CompileOptions, stage):
    """An ONNX model or a PyTorch exported program: host targets only."""
    from tinymlaas.backends.host.build import build_host_external

    if target.kind != "host":
        raise InvalidModel(f"{source.name}: {fmt.what} build for the host targets (cpu-host, cuda-host); for "
                           f"{target.name}, {fmt.convert}")
    model = fmt.load(source)
    out = (Path(out_dir) if out_dir else Path("out") / f"{model.name}-{target.name}").resolve()
    with _staged(out) as work:
        report = build_host_external(model, target, work, _host_options(options), stage)
        _publish(report, model, work, out)
    return report


@contextmanager
def _staged(out: Path):
    """A work folder beside `out`: removed if the build fails, so a failure leaves nothing half-written."""
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        yield work
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise


def _publish(report, model, work: Path, out: Path) -> None:
    """What was compiled (a Keras input's conversion) and the report into `work`, `work` into `out`'s place; the
    report's artifacts then name files in `out`."""
    saved = f"model{model.path.suffix.lower() if host_only_format(model.path) else '.tflite'}"
    shutil.copy(model.path, work / saved)
    report.artifacts["model"] = saved
    (work / "report.json").write_text(json.dumps(report.to_dict(), indent=2) + "\n")
    _replace_dir(work, out)
    report.artifacts = {k: str(out / v) for k, v in report.artifacts.items()}
    report.artifacts["dir"] = str(out)


def _build(model_path, target_name: str, workdir: Path, kernels: str, variant=None):
    """variant (search.space.Variant): its kernels, schedule and fusion instead of `kernels` (its memory plan is
    TVM's: the per-step counts of the in-place twins are the same loops')."""
    target = get_target(target_name)
    model = load_tflite(model_path)
    workdir.mkdir(parents=True, exist_ok=True)
    relax_mod, lowering, _ = import_model(model, target, kernels=dict(variant.kernels) if variant else kernels)
    program = lower(relax_mod, schedule=schedule_for(variant.schedule if variant else None),
                    fuse=variant is None or variant.fusion != "none")
    program, built = build_kernels(program, target, workdir)
    return target, model, program, built, generate_driver(model, program, built, workdir), lowering


def _build_and_run(model_path, target_name: str, workdir: Path, batches_of, kernels: str, **link_flags):
    """Build with extra harness options (profile / trace) and run it on the inputs `batches_of(model)` gives."""
    target, model, program, built, driver, _ = _build(model_path, target_name, workdir, kernels)
    firmware = link_firmware(target, built, driver, workdir, **link_flags)
    batches = batches_of(model)
    (workdir / "inputs.bin").write_bytes(b"".join(x.tobytes() for batch in batches for x in batch))
    run = emulator_for("qemu").run(target, firmware, workdir)
    return model, program, batches, run


@dataclass(frozen=True)
class StepProfile:
    """One step of one inference (a kernel call or a copy), keyed by the TFLite operator and kernel variant."""
    step: int
    kernel: str  # the kernel's symbol, or "copy"
    op_index: int | None  # the TFLite operator (the last one, when several were fused)
    opcode: str | None
    implementation: str | None  # the registry's kernel variant for that operator
    instructions: int  # exact (QEMU)
    memory_accesses: int  # exact (QEMU)
    cycles_estimate: float | None  # llvm-mca's model of the core x QEMU's per-block counts
    cycles: int | None = None  # true cycles, where the target's core is simulated from its RTL
    features: dict | None = None  # static features of the operator (tinymlaas.search.features)


@dataclass(frozen=True)
class Profile:
    model: str
    target: str
    steps: tuple[StepProfile, ...]
    estimate_method: str  # e.g. "llvm-mca cortex-m4 x QEMU block counts"
    cycles_source: str | None  # e.g. "Ibex 'small' RTL (Verilator)", None without RTL
    fallback_blocks: int  # blocks llvm-mca could not read (counted one cycle per instruction)
    quantization: str = "float32"  # float32, int8, int16x8 or mixed: the operators' precisions
    verified: bool = False  # the profiled runs' outputs (QEMU's, and Ibex's) match the interpreter's
    variant: dict | None = None  # the search.space.Variant profiled, if one was given

    def totals(self) -> dict:
        tot = {"instructions": sum(s.instructions for s in self.steps),
               "memory_accesses": sum(s.memory_accesses for s in self.steps),
               "cycles_estimate": round(sum(s.cycles_estimate or 0 for s in self.steps), 1)}
        if self.cycles_source:
            tot["cycles"] = sum(s.cycles or 0 for s in self.steps)
        return tot


def profile_model(model_path, target_name: str, workdir: Path, kernels: str = "auto",
                  emulator: str | None = None, variant=None) -> Profile:
    """Instructions, memory accesses and cycles of each step of one inference, from one profiled build: exact
    counts and per-block counts from QEMU, the llvm-mca estimate from those, and true cycles on Ibex (targets
    simulated from RTL, or emulator="ibex"). variant: a search.space.Variant to build instead of `kernels`."""
    from tinymlaas.frontend.to_relax import implementations
    from tinymlaas.ir.lower import KernelCall
    from tinymlaas.runners import mca
    from tinymlaas.runners.qemu import QemuEmulator
    from tinymlaas.search.features import layer_features

    target, model, program, built, driver, lowering = _build(model_path, target_name, workdir, kernels, variant)
    batches = make_inputs(model, 1, 0)
    (workdir / "inputs.bin").write_bytes(b"".join(x.tobytes() for x in batches[0]))
    want = reference_outputs(model, batches)
    firmware = link_firmware(target, built, driver, workdir, profile=True)
    run = QemuEmulator(blocks=True).run(target, firmware, workdir)

    def verified() -> bool:  # the run just made wrote outputs.bin: the interpreter's outputs?
        got = split_outputs(model, (workdir / "outputs.bin").read_bytes(), 1)
        return compare(model, got, want, integer_kernels=lowering == "integer").passed

    ok = verified()
    estimates, cost_model, fallback_blocks = mca.estimate_run(firmware.elf, target, run)
    true_cycles, source = [None] * len(run.regions), None
    runner_name = emulator or target.default_runner
    if runner_name == "ibex":
        rtl = emulator_for("ibex", None, target)
        rtl_fw = link_firmware(target, built, driver, workdir, profile=True, layout=rtl.layout,
                               inputs=workdir / "inputs.bin", name=f"firmware-{rtl.name}")
        rtl_run = rtl.run(target, rtl_fw, workdir)
        if [r.instructions for r in rtl_run.regions] != [r.instructions for r in run.regions]:
            raise InternalError("profile", None, RuntimeError("Ibex and QEMU disagree on per-step instructions"))
        true_cycles, source = [r.cycles for r in rtl_run.regions], f"Ibex '{rtl.config}' RTL (Verilator)"
        ok = ok and verified()
    graph = clean(model.graph, shapes_from_interpreter=True)
    chosen = implementations(graph, target, dict(variant.kernels) if variant else kernels)
    ops = {op.index: op for op in graph.operators}
    precisions = {graph.precision(op) for op in graph.operators} or {"float32"}
    quantization = "mixed" if len(precisions) > 1 else precisions.pop().replace("int16", "int16x8")
    steps = []
    for k, (step, region, cycles, estimate) in enumerate(zip(program.steps, run.regions, true_cycles, estimates)):
        op = step.op_index
        steps.append(StepProfile(
            step=k, kernel=step.kernel if isinstance(step, KernelCall) else "copy", op_index=op,
            opcode=ops[op].opcode if op in ops else None, implementation=chosen.get(op),
            instructions=region.instructions, memory_accesses=region.memory_accesses,
            cycles_estimate=estimate, cycles=cycles,
            features=layer_features(graph, ops[op]) if op in ops else None))
    return Profile(model.name, target.name, tuple(steps), f"{cost_model.name} x QEMU block counts", source,
                   fallback_blocks, quantization, ok, variant.to_dict() if variant else None)


def verify_layers(model_path, target_name: str, workdir: Path, inputs: int = 3, seed: int = 0,
                  kernels: str = "auto") -> list[list]:
    """Every intermediate tensor of an integer build against the interpreter's, for each of `inputs` inputs."""
    from tinymlaas.ir.lower import Copy, KernelCall
    from tinymlaas.verify import compare_layers, reference_interpreter

    model, program, batches, _ = _build_and_run(
        model_path, target_name, workdir, lambda m: make_inputs(m, inputs, seed), kernels, trace=True
    )
    traced = [s for s in program.steps if isinstance(s, (KernelCall, Copy))]
    sizes = [[a for a in s.args if a.kind != "scratch"][-1].nbytes if isinstance(s, KernelCall) else s.nbytes
             for s in traced]
    trace, off, results = (workdir / "trace.bin").read_bytes(), 0, []
    it = reference_interpreter(model.data, preserve_all_tensors=True)  # one: state carries over, as on the device
    for batch in batches:
        steps = []
        for n in sizes:
            steps.append(trace[off:off + n])
            off += n
        results.append(compare_layers(model, batch, steps, [s.op_index for s in traced],
                                      [_written_output(s) for s in traced], it))
    return results


def _repeat(exact: bool | None) -> str:
    return "n/a: recurrent state carried over" if exact is None else "exact" if exact else "DIFFERS"


def _written_output(step) -> int | None:
    """The model output a step writes (its last argument, or a copy's destination), if any."""
    from tinymlaas.ir.lower import Copy

    region = step.dst if isinstance(step, Copy) else [a for a in step.args if a.kind != "scratch"][-1]
    return region.index if region.kind == "output" else None


class _Stopwatch:
    def __init__(self):
        self.seconds: dict[str, float] = {}
        self._name, self._since = None, time.monotonic()

    def lap(self, name: str | None) -> None:
        now = time.monotonic()
        if self._name is not None:
            self.seconds[self._name] = round(now - self._since, 3)
        self._name, self._since = name, now


def _replace_dir(src: Path, dst: Path) -> None:
    if dst.exists():
        old = dst.with_name(dst.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        dst.rename(old)
        src.rename(dst)
        shutil.rmtree(old, ignore_errors=True)
    else:
        src.rename(dst)


def format_report(r: CompileReport) -> str:
    f, s = r.fidelity, r.sizes
    if f["kind"] == "float":
        fid = f"max rel error {f['max_rel_error']:.2e} (abs {f['max_abs_error']:.2e})"
    else:
        fid = f"{f['exact_fraction'] * 100:.2f}% of output bytes bit-exact, max {f['max_lsb_diff']} LSB off"
    rows = [
        ("model", r.model),
        ("target", f"{r.target} ({r.core}, board class {r.board})"),
        ("lowering", {"integer": "integer kernels", "float": "float32", "mixed": "integer and float32 kernels",
                      "float-emulated": "int8 through float ops"}[r.lowering]),
        ("verified", f"{'PASS' if r.verified else 'FAIL'}: {fid} over {f['inputs']} inputs [{f['tolerance']}]"),
        ("instructions/inference", (f"{_fmt(r.instructions)} (range {_fmt(r.instructions_min)}.."
                                    f"{_fmt(r.instructions_max)}, repeat {_repeat(r.instructions_repeat_exact)})")),
        ("memory accesses", _fmt(r.memory_accesses) if r.memory_accesses is not None else "not counted by " + r.runner),
        *([("cycles/inference", (f"{_fmt(r.cycles)} (CPI {r.cycles / max(r.instructions, 1):.2f}, "
                                 f"{r.cycles / r.clock_hz * 1e3:.2f} ms at {r.clock_hz / 1e6:g} MHz, repeat "
                                 f"{_repeat(r.cycles_repeat_exact)}; {r.cycles_source})"))]
          if r.cycles is not None else []),
        *([("cycles/inference", (f"~{_fmt(round(r.cycles_estimate))} estimated (the core's pipeline table x QEMU's "
                                 "block counts; run on its RTL model for true cycles)"))]
          if r.cycles is None and r.cycles_estimate is not None else []),
        ("flash (model)", (f"{_fmt(s['flash_model'])} B = code {_fmt(s['model_code'])} + weights {_fmt(s['weights'])}"
                           f"  [board {_fmt(r.fits['flash_limit'])} B]")),
        ("RAM (model)", (f"{_fmt(s['ram_model'])} B = arena {_fmt(s['arena'])} + scratch {_fmt(s['kernel_scratch'])}"
                         + (f" + state {_fmt(s['state'])}" if s.get("state") else "") + f" + stack {_fmt(s['stack_peak'] or 0)}  [board {_fmt(r.fits['ram_limit'])} B]")),
        ("firmware image", f"flash {_fmt(s['firmware_flash'])} B, other data/bss {_fmt(s['data_bss_other'])} B"),
        ("compile time", f"{r.compile_seconds:.1f} s"),
        ("output", r.artifacts.get("dir", "")),
    ]
    rows += [("note", n) for n in r.notes]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


