"""The microcontroller backend's build: a TFLite model -> verified, measured firmware for one target.

import -> lower (with a schedule) -> codegen -> driver -> reference -> link -> emulate -> verify -> measure.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from tinymlaas.backends.mcu.codegen import build_kernels
from tinymlaas.backends.mcu.driver import generate_driver
from tinymlaas.backends.mcu.firmware import link_firmware, linked_bytes
from tinymlaas.build.request import BuildRequest
from tinymlaas.errors import InvalidModel, ModelTooLarge, ToolMissing
from tinymlaas.frontend.cleanup import clean
from tinymlaas.frontend.lowbit import low_bit_weights
from tinymlaas.frontend.tflite import import_relax_tvm
from tinymlaas.frontend.to_relax import to_relax
from tinymlaas.ir.lower import KernelCall, lower
from tinymlaas.ir.memory import STREAMING_TWINS
from tinymlaas.ir.memory import plan as plan_memory
from tinymlaas.ir.schedule import schedule_for
from tinymlaas.measure.sizes import measure_firmware
from tinymlaas.oracle import load_sample_inputs, make_inputs, reference_outputs, reference_resolver
from tinymlaas.runners import emulator_for
from tinymlaas.search.space import load_variant
from tinymlaas.targets import Target, get_target
from tinymlaas.verify import VerifiedReport, compare, source_fidelity, split_outputs


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
    cycles_estimate: float | None = None  # from QEMU's block counts (asked for, or a core with a pipeline table)
    cycles_estimate_method: str | None = None  # the core's cost model and what it assumes
    profile: dict | None = None  # per layer, when asked for (backends.mcu.profile.Profile.to_dict())
    variant: dict | None = None  # the search.space.Variant it was built as, if one was given
    # per layer with weights: its weight precision (int8 | int4) and the flash its weights take (frontend/lowbit.py)
    weights: list | None = None
    # on --validation: {"metric", "value", "reference" (the model as given), "drop" (points), "samples"}
    accuracy: dict | None = None
    kind: str = "mcu"  # the backend that built it
    # the kernel choice built: the request's; where an in-place plan took the C kernels (they stream in place), dsp,
    # or {operator index: "dsp"} for the layers it overlaps (the others as the default builds them)
    kernels: str | dict | None = None


def fmt(n: int) -> str:
    return f"{n:,}"


def limits(target: Target, request: BuildRequest) -> tuple[int, int]:
    return (min(target.board.flash_bytes, request.max_flash or target.board.flash_bytes),
            min(target.board.ram_bytes, request.max_ram or target.board.ram_bytes))


def check_fits(model_name: str, target: Target, flash: int, ram: int, request: BuildRequest, detail: str) -> dict:
    flash_limit, ram_limit = limits(target, request)
    problems = []
    if flash > flash_limit:
        problems.append(f"flash {fmt(flash)} B > {fmt(flash_limit)} B")
    if ram > ram_limit:
        problems.append(f"RAM {fmt(ram)} B > {fmt(ram_limit)} B")
    if problems:
        board_too_small = flash > target.board.flash_bytes or ram > target.board.ram_bytes
        hint = ("; a host target runs models of any size: --target cuda-host (NVIDIA GPU) or cpu-host"
                if board_too_small else "")
        raise ModelTooLarge(
            f"{model_name} does not fit {target.name} ({target.board.name}): {'; '.join(problems)} ({detail}){hint}"
        )
    return {"flash_limit": flash_limit, "ram_limit": ram_limit, "flash": flash, "ram": ram}


def import_model(model, target: Target, int8_lowering: str = "integer", kernels: str | dict = "auto",
                 schedules: dict | None = None):
    """The Relax module for `model` on `target`, every operator through our registry.

    Returns (relax module, lowering, notes): lowering is "float", "integer" (integer kernels, bit-exact) or
    "float-emulated" (int8 through TVM's dequantize/float/quantize, only when asked for).
    """
    notes = list(model.notes)
    if model.quantized and int8_lowering == "float":
        notes.append("int8 operators lowered through float dequantize/op/quantize (as requested): not bit-exact")
        return import_relax_tvm(model), "float-emulated", notes
    graph = clean(model.graph, shapes_from_interpreter=True)
    notes += [n for n in graph.notes if n not in model.graph.notes]  # what the clean-up rewrote
    if isinstance(kernels, dict):
        check_choices(graph, target, kernels)
    if schedules:
        check_schedules(graph, target, kernels, schedules)
    lowering = graph.lowering()
    if reference_resolver(model.data) != "BUILTIN_REF":
        notes.append("the interpreter's reference kernels cannot run this model (an operator missing, aborting or, "
                     "for a quantized SUM, wrong): verified against its builtin (optimized) kernels")
    return to_relax(graph, target, kernels, schedules), lowering, notes



def weight_storage(model, target: Target, weights: str = "stored", layers=()) -> dict:
    """lower()'s arguments for the model's narrow weights (float16, dynamic-range int8): kept so in flash unless
    `weights` (BuildRequest.weights) is float32; an integer model's layers below eight bits (`layers`:
    frontend/lowbit.py LayerWeights): 4-bit weights two to a byte, palettes as indices."""
    from tinymlaas.frontend.tflite import read_graph
    from tinymlaas.ir.weight_storage import StoredWeights, stored_weights

    if any(w.precision != "int8" for w in layers) and model.quantized:
        palettes = [int(w.precision.removeprefix("palette")) for w in layers if w.precision.startswith("palette")]
        return {"stored": StoredWeights(int4=any(w.precision == "int4" for w in layers), palette=max(palettes, default=0))}
    if weights == "float32" or model.quantized:
        return {}
    stored = stored_weights(read_graph(model.original_data or model.data, model.name))
    # every Arm FPU here (FPv4-SP, FPv5, Armv8-M) converts half to single in one instruction; RV32F has none
    half = ("convert" if target.arch == "arm" else "scale") if target.fpu else "integer"
    return {"stored": stored, "half": half} if stored else {}


def check_choices(graph, target: Target, kernels: dict) -> None:
    """Every per-layer kernel choice names a layer of this model that offers it on this target (a variant searched
    for another model or target is refused, not silently built as something else)."""
    from tinymlaas.build.request import InvalidRequest
    from tinymlaas.ops.registry import candidates

    ops = {op.index: op for op in graph.operators}
    for index, impl in sorted(kernels.items()):
        offered = candidates(graph, ops[index], target) if index in ops else []
        if impl not in offered:
            what = (f"operator #{index} ({ops[index].opcode}) offers {', '.join(offered) or 'no choice'}"
                    if index in ops else f"{graph.name} has no operator #{index}")
            raise InvalidRequest("variant_file", f"asks for {impl} at operator #{index}, but {what} on "
                                 f"{target.name}: the variant was made for another model or target")


def check_schedules(graph, target: Target, kernels, schedules: dict) -> None:
    """Every per-layer schedule names a layer whose TIR kernel takes it, built with that kernel, and lies in that
    layer's space (ir/layer_schedule.py)."""
    from tinymlaas.build.request import InvalidRequest
    from tinymlaas.frontend.to_relax import implementations
    from tinymlaas.ir.layer_schedule import check, kernel_shape

    ops = {op.index: op for op in graph.operators}
    chosen = implementations(graph, target, kernels)
    for index, schedule in sorted(schedules.items()):
        shape = kernel_shape(graph, ops[index], target) if index in ops else None
        if shape is None:
            what = "is not a convolution or fully connected layer with constant weights" if index in ops \
                else "does not exist"
            raise InvalidRequest("variant_file", f"has a layer schedule for operator #{index} of {graph.name}, "
                                 f"which {what}")
        if chosen.get(index) != "tir":
            raise InvalidRequest("variant_file", f"has a layer schedule for operator #{index}, built with the "
                                 f"{chosen.get(index)} kernels: a schedule is for the tir implementation")
        problem = check(shape, schedule)
        if problem:
            raise InvalidRequest("variant_file", f"operator #{index}: {problem} (made for another model?)")


def build_firmware(model, target: Target, work: Path, request: BuildRequest, stage) -> CompileReport:
    """A TFLite model as firmware for `target` in `work`: lowered, generated, linked, run in the target's emulator,
    verified against the interpreter and measured. `stage` (tinymlaas.build.pipeline.Stages) is told each stage."""
    stage("import")
    variant = request.variant or (load_variant(request.variant_file) if request.variant_file else None)
    choice = dict(variant.kernels) if variant is not None else request.kernels
    policy = variant.memory if variant is not None else request.memory
    streams = choice == "auto" and policy == "inplace"  # the streaming kernels are C: planned on them first
    if streams:
        choice = "dsp"
    model, layer_weights, accuracy = low_bit_weights(model, request, dict(variant.weights) if variant else None)

    def imported(choice, stages: bool = True):
        relax_mod, lowering, notes = import_model(model, target, request.int8_lowering, choice,
                                                  dict(variant.layers) if variant is not None else None)
        if stages:
            stage("lower")
        program = lower(relax_mod, schedule=schedule_for(variant.schedule if variant is not None else None),
                        fuse=variant is None or variant.fusion != "none",
                        **weight_storage(model, target, request.weights, layer_weights))
        return program, lowering, notes

    unplanned, lowering, notes = imported(choice)

    def in_place_on_c_kernels(unplanned):
        """The in-place plan on the C kernels, then the default's kernels back on the layers it did not overlap
        when the arena stays as small (only a streaming kernel's layer needs the C kernel: TIR's depthwise is 2x
        faster than the C one on Cortex-M4)."""
        planned = plan_memory(unplanned, "inplace")
        streamed = {step.op_index: "dsp" for step in planned.steps
                    if isinstance(step, KernelCall) and step.kernel in STREAMING_TWINS}
        mixed = plan_memory(imported(streamed, stages=False)[0], "inplace")
        return (mixed, streamed) if mixed.arena_bytes <= planned.arena_bytes else (planned, "dsp")

    stage("codegen")
    # auto: the optimal plan (TVM's where it is no larger); in place where even that does not fit
    if streams:
        planned, choice = in_place_on_c_kernels(unplanned)
    else:
        planned = plan_memory(unplanned, "optimal" if policy == "auto" else policy)
    program, kernels = build_kernels(planned, target, work)
    ram = program.arena_bytes + program.scratch_bytes + program.state_bytes
    if policy == "auto" and ram > limits(target, request)[1]:  # the smallest arena we can plan, before giving up
        streaming = ""
        if choice == "auto":  # the C kernels where the default took TIR: those stream in place
            planned, choice = in_place_on_c_kernels(imported("dsp", stages=False)[0])
            streaming = " with the C kernels where they stream in place"
        else:
            planned = plan_memory(unplanned, "inplace")
        # built again: an overlapped elementwise kernel is compiled without noalias
        program, kernels = build_kernels(planned, target, work)
        notes.append(f"the optimal arena plan needs {fmt(ram)} B of RAM, over the budget of "
                     f"{fmt(limits(target, request)[1])} B: planned in place{streaming}")
    notes.extend(program.notes)
    check_fits(
        model.name, target,
        flash=kernels.code_bytes + program.weight_bytes,
        ram=program.arena_bytes + program.scratch_bytes + program.state_bytes,
        request=request,
        detail=f"code {fmt(kernels.code_bytes)} B, weights {fmt(program.weight_bytes)} B, "
        f"arena {fmt(program.arena_bytes)} B, kernel scratch {fmt(program.scratch_bytes)} B"
        + (f", recurrent state {fmt(program.state_bytes)} B" if program.state_bytes else ""),
    )

    stage("driver")
    driver = generate_driver(model, program, kernels, work)

    stage("reference")
    runner = emulator_for(request.emulator or target.default_runner, request.timeout, target)
    # a cycle estimate from QEMU's block counts: asked for, or cheap (a core whose manual tabulates its pipeline)
    estimate = runner.name == "qemu" and (request.estimate_cycles or "pipeline" in (target.estimate or {}))
    if estimate:
        runner.blocks = True
    if request.sample_inputs:  # the user's own: as many as the file holds (at most --inputs, if given)
        specs = [{"name": s.name, "shape": s.shape, "dtype": s.dtype} for s in model.inputs]
        batches = load_sample_inputs(Path(request.sample_inputs), specs)[:request.inputs or None]
    else:
        batches = make_inputs(model, request.inputs or runner.default_inputs, request.seed)
    batches.append(batches[0])  # input 0 again: its count must repeat exactly
    (work / "inputs.bin").write_bytes(b"".join(x.tobytes() for batch in batches for x in batch))
    try:
        want = reference_outputs(model, batches)
    except RuntimeError as e:  # the interpreter's own check on its inputs (an index out of range)
        given = "the given" if request.sample_inputs else "random"
        hint = "" if request.sample_inputs else "; give inputs it accepts with --sample-inputs FILE.npz"
        raise InvalidModel(f"the interpreter cannot run {model.name} on {given} inputs "
                           f"({str(e).strip().splitlines()[0][:160]}){hint}") from e
    (work / "expected_outputs.bin").write_bytes(b"".join(y.tobytes() for batch in want for y in batch))

    stage("link")
    firmware = link_firmware(target, kernels, driver, work, layout=runner.layout, inputs=work / "inputs.bin")

    stage("emulate")
    run = runner.run(target, firmware, work)

    stage("verify")
    got = split_outputs(model, (work / "outputs.bin").read_bytes(), len(batches))
    fidelity = compare(model, got, want, integer_kernels=lowering == "integer").to_dict()
    source = source_fidelity(model, batches, want)  # a converted ONNX/PyTorch model against its own framework
    if source is not None:
        fidelity["source"] = source
        fidelity["passed"] = fidelity["passed"] and source["passed"]
    counts = [r.instructions for r in run.regions]

    stage("measure")
    sizes = measure_firmware(firmware.elf, target, program, run.harness.get("stack_bytes"),
                             linked_bytes(firmware.map_file, firmware.kernel_library))
    fits = check_fits(
        model.name, target, flash=sizes.flash_model, ram=sizes.ram_model, request=request,
        detail=f"measured: code {fmt(sizes.model_code)} B, weights {fmt(sizes.weights)} B, "
        f"arena {fmt(sizes.arena)} B, scratch {fmt(sizes.kernel_scratch)} B, stack {fmt(sizes.stack_peak or 0)} B",
    )
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
        kernels=choice if variant is None else None,
        weights=[w.to_dict() for w in layer_weights] or None,
        accuracy=accuracy,
        memory_accesses=run.regions[0].memory_accesses,
        fidelity=fidelity,
        sizes=sizes.to_dict(),
        fits=fits,
        stages_seconds=stage.finish(),
        compile_seconds=stage.elapsed(),
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
    report.clock_hz = target.board.clock_hz
    if run.regions[0].cycles is not None:
        report.runner, report.cycles = runner.name, run.regions[0].cycles
        report.cycles_repeat_exact = (run.regions[0].cycles == run.regions[-1].cycles
                                      if not program.state_sizes else None)
        report.cycles_source = f"true cycles: Ibex '{runner.config}' from its RTL (Verilator)"
    else:
        report.runner = runner.name
    if estimate:
        from tinymlaas.measure import cycles

        try:
            estimates, cost_model, _ = cycles.estimate_run(firmware.elf, target, run)
        except (ToolMissing, OSError, ValueError) as e:  # the build stands without it: say why
            report.notes.append(f"no cycle estimate: {e}")
        else:
            report.cycles_estimate = estimates[0]
            report.cycles_estimate_method = f"{cost_model.name} x QEMU's block counts, zero flash wait states"
    return report


def build_program(model_path, target_name: str, workdir: Path, kernels: str, variant=None, weights: str = "stored",
                  plan: dict | None = None):
    """A TFLite model's program, kernels and driver in `workdir`, not linked: (target, model, program, kernels,
    driver, lowering). variant (search.space.Variant): its kernels, schedule and fusion instead of `kernels` (its
    memory plan is TVM's: the per-step counts of the in-place twins are the same loops'); plan: layers below eight
    bits (operator -> precision, as a build's report lists them), else the variant's."""
    from tinymlaas.backends.mcu import load_firmware_model

    target = get_target(target_name)
    model = load_firmware_model(model_path)
    plan = plan or (dict(variant.weights) if variant is not None and variant.weights else None)
    model, layers, _ = low_bit_weights(model, BuildRequest(), plan) if plan else (model, [], None)
    workdir.mkdir(parents=True, exist_ok=True)
    relax_mod, lowering, _ = import_model(model, target, kernels=dict(variant.kernels) if variant else kernels,
                                          schedules=dict(variant.layers) if variant else None)
    program = lower(relax_mod, schedule=schedule_for(variant.schedule if variant else None),
                    fuse=variant is None or variant.fusion != "none", **weight_storage(model, target, weights, layers))
    program, built = build_kernels(program, target, workdir)
    return target, model, program, built, generate_driver(model, program, built, workdir), lowering


def build_and_run(model_path, target_name: str, workdir: Path, batches_of, kernels: str, plan: dict | None = None,
                  **link_flags):
    """Build with extra harness options (profile / trace) and run it on the inputs `batches_of(model)` gives.
    plan: layers below eight bits (the model given back is the one they make, the interpreter's reference)."""
    target, model, program, built, driver, _ = build_program(model_path, target_name, workdir, kernels, plan=plan)
    firmware = link_firmware(target, built, driver, workdir, **link_flags)
    batches = batches_of(model)
    (workdir / "inputs.bin").write_bytes(b"".join(x.tobytes() for batch in batches for x in batch))
    run = emulator_for("qemu").run(target, firmware, workdir)
    return model, program, batches, run
