"""Per-step profiles and per-layer checks of a microcontroller build: what the search, the predictor and people
debugging a model look at."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from tinymlaas.backends.mcu.build import build_and_run, build_program
from tinymlaas.backends.mcu.firmware import link_firmware
from tinymlaas.errors import InternalError
from tinymlaas.frontend.cleanup import clean
from tinymlaas.oracle import make_inputs, reference_interpreter, reference_outputs
from tinymlaas.runners import emulator_for
from tinymlaas.verify import compare, compare_layers, split_outputs


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

    def to_dict(self) -> dict:
        """As JSON: the profile, its totals and its steps (what `tinymlaas compile --profile` adds to a report)."""
        d = asdict(self)
        d["totals"] = self.totals()
        return d

    def totals(self) -> dict:
        tot = {"instructions": sum(s.instructions for s in self.steps),
               "memory_accesses": sum(s.memory_accesses for s in self.steps),
               "cycles_estimate": round(sum(s.cycles_estimate or 0 for s in self.steps), 1)}
        if self.cycles_source:
            tot["cycles"] = sum(s.cycles or 0 for s in self.steps)
        return tot


def profile_model(model_path, target_name: str, workdir: Path, kernels: str = "auto",
                  emulator: str | None = None, variant=None, weights: str = "stored", plan: dict | None = None
                  ) -> Profile:
    """Instructions, memory accesses and cycles of each step of one inference, from one profiled build: exact
    counts and per-block counts from QEMU, the llvm-mca estimate from those, and true cycles on Ibex (targets
    simulated from RTL, or emulator="ibex"). variant: a search.space.Variant to build instead of `kernels`; weights:
    BuildRequest.weights; plan: layers below eight bits (operator -> precision)."""
    from tinymlaas.frontend.to_relax import implementations
    from tinymlaas.ir.lower import KernelCall
    from tinymlaas.measure import cycles
    from tinymlaas.runners.qemu import QemuEmulator
    from tinymlaas.search.features import layer_features

    target, model, program, built, driver, lowering = build_program(model_path, target_name, workdir, kernels, variant,
                                                                    weights, plan)
    batches = make_inputs(model, 1, 0)
    (workdir / "inputs.bin").write_bytes(b"".join(x.tobytes() for x in batches[0]))
    want = reference_outputs(model, batches)
    firmware = link_firmware(target, built, driver, workdir, profile=True)
    run = QemuEmulator(blocks=True).run(target, firmware, workdir)

    def verified() -> bool:  # the run just made wrote outputs.bin: the interpreter's outputs?
        got = split_outputs(model, (workdir / "outputs.bin").read_bytes(), 1)
        return compare(model, got, want, integer_kernels=lowering == "integer").passed

    ok = verified()
    estimates, cost_model, fallback_blocks = cycles.estimate_run(firmware.elf, target, run)
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
    precisions = {graph.precision(op) for op in graph.operators if not graph.integer_only(op)} or {"float32"}
    quantization = "mixed" if len(precisions) > 1 else precisions.pop().replace("int16", "int16x8")
    steps = []
    for k, (step, region, true, estimate) in enumerate(zip(program.steps, run.regions, true_cycles, estimates)):
        op = step.op_index
        steps.append(StepProfile(
            step=k, kernel=step.kernel if isinstance(step, KernelCall) else "copy", op_index=op,
            opcode=ops[op].opcode if op in ops else None, implementation=chosen.get(op),
            instructions=region.instructions, memory_accesses=region.memory_accesses,
            cycles_estimate=estimate, cycles=true,
            features=layer_features(graph, ops[op]) if op in ops else None))
    return Profile(model.name, target.name, tuple(steps), f"{cost_model.name} x QEMU block counts", source,
                   fallback_blocks, quantization, ok, variant.to_dict() if variant else None)


def verify_layers(model_path, target_name: str, workdir: Path, inputs: int = 3, seed: int = 0,
                  kernels: str = "auto", plan: dict | None = None) -> list[list]:
    """Every intermediate tensor of an integer build against the interpreter's, for each of `inputs` inputs.
    plan: layers below eight bits (operator -> int4 / paletteN), checked against the interpreter on that model."""
    from tinymlaas.ir.lower import Copy, KernelCall

    model, program, batches, _ = build_and_run(
        model_path, target_name, workdir, lambda m: make_inputs(m, inputs, seed), kernels, plan=plan, trace=True
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


def _written_output(step) -> int | None:
    """The model output a step writes (its last argument, or a copy's destination), if any."""
    from tinymlaas.ir.lower import Copy

    region = step.dst if isinstance(step, Copy) else [a for a in step.args if a.kind != "scratch"][-1]
    return region.index if region.kind == "output" else None


def profile_build(model, target, request, report=None) -> dict:
    """The per-layer profile of the build `request` asks for (the kernels its `report` says were built, or its
    variant, and the layers below eight bits the report lists), as a report carries it."""
    import tempfile

    from tinymlaas.search.space import load_variant

    variant = request.variant or (load_variant(request.variant_file) if request.variant_file else None)
    with tempfile.TemporaryDirectory(prefix="tinymlaas-profile-") as tmp:
        plan = {w["op"]: w["precision"] for w in (report.weights or []) if w["precision"] != "int8"} if report else {}
        kernels = (report.kernels if report else None) or request.kernels  # an in-place plan builds the C kernels
        return profile_model(model.path, target.name, Path(tmp), kernels, request.emulator, variant,
                             request.weights, plan or None).to_dict()

