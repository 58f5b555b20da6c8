"""The `tinymlaas` command line."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from importlib.metadata import entry_points
from pathlib import Path

from tinymlaas.errors import InternalError, TinyMLaaSError
from tinymlaas.runners import RUNNERS


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def _count(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError("must be 0 or more")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError("must be more than 0")
    return value


def _size(text: str) -> int:
    """Bytes, with an optional K/M suffix (powers of 1024)."""
    t = text.strip().upper().removesuffix("B")
    mult = {"K": 1024, "M": 1024 * 1024}.get(t[-1:], 1)
    try:
        return int(float(t.rstrip("KM")) * mult)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a size (e.g. 256K, 1M, 65536)") from None


def cmd_targets(args) -> int:
    from tinymlaas.targets import all_targets

    targets = all_targets()
    mcus = {n: t for n, t in targets.items() if t.kind == "mcu"}
    hosts = {n: t for n, t in targets.items() if t.kind == "host"}
    if args.json:
        out = {n: {"kind": "mcu", "description": t.description, "board": t.board.__dict__,
                   "emulator": t.emulator.machine, "runner": t.default_runner,
                   "renode": t.renode.model if t.renode else None} for n, t in mcus.items()}
        out.update({n: {"kind": "host", "description": t.description, "device": t.device, "tvm_target": t.tvm_target,
                        "precisions": list(t.precisions)} for n, t in hosts.items()})
        print(json.dumps(out, indent=2))
        return 0
    print(f"{'target':<12} {'core':<12} {'FPU':<4} {'DSP':<4} {'board class':<26} {'flash':>10} {'RAM':>10}  runs in")
    for name, t in mcus.items():
        runs = (f"Ibex '{t.rtl.config}' RTL (true cycles)" if t.rtl
                else f"{t.emulator.qemu} -M {t.emulator.machine}"
                + (f"; Renode: {t.renode.model}" if t.renode else ""))
        print(f"{name:<12} {t.core:<12} {'yes' if t.fpu else 'no':<4} {'yes' if t.dsp else 'no':<4} {t.board.name:<26} "
              f"{t.board.flash_bytes // 1024:>8}K {t.board.ram_bytes // 1024:>8}K  {runs}")
    for name, t in hosts.items():
        print(f"{name:<12} {t.core:<12} host: TVM runtime library, {'/'.join(t.precisions)} "
              f"(TVM target {t.tvm_target}); runs on this machine's {t.device.upper()}")
    return 0


def cmd_operators(args) -> int:
    from tinymlaas.ops.registry import PRECISIONS, table

    rows = table()
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"{'operator':<28} " + " ".join(f"{p:<14}" for p in PRECISIONS))
    for opcode, by_precision in rows.items():
        cells = [",".join(by_precision[p]) if p in by_precision else "-" for p in PRECISIONS]
        print(f"{opcode:<28} " + " ".join(f"{c:<14}" for c in cells))
    counts = {p: sum(p in r for r in rows.values()) for p in PRECISIONS}
    print(f"{len(rows)} operators: " + ", ".join(f"{n} in {p}" for p, n in counts.items()))
    return 0


def cmd_compile(args) -> int:
    from tinymlaas.pipeline import STAGES, CompileOptions, compile_model, format_report

    options = CompileOptions(
        inputs=args.inputs, seed=args.seed, timeout=args.timeout, emulator=args.emulator, max_flash=args.max_flash, max_ram=args.max_ram,
        int8_lowering=args.int8_lowering, kernels=args.kernels, memory=args.memory, quantize=args.quantize,
        calibration=args.calibration, precision=args.precision, tune_trials=args.tune_trials, tune_trials_per_task=args.tune_trials_per_task,
        tune_minutes=args.tune_minutes,
        tuning_dir=args.tuning_dir, sample_inputs=args.sample_inputs,
    )
    bar = None
    if not args.json and sys.stderr.isatty() or args.progress:
        from tqdm import tqdm

        bar = tqdm(total=len(STAGES), desc="compile", unit="stage", file=sys.stderr, leave=False)

    def progress(stage: str) -> None:
        if bar is not None:
            if bar.n or stage != STAGES[0]:
                bar.update(1)
            bar.set_postfix_str(stage)

    try:
        report = compile_model(args.model, args.target, args.out, options, progress)
    finally:
        if bar is not None:
            bar.close()
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
    elif report.kind == "host":
        from tinymlaas.backends.host.build import format_host_report

        print(format_host_report(report))
    else:
        print(format_report(report))
    if not args.no_record and report.kind == "mcu":  # the database holds firmware measurements
        _record(report)
    if args.platformio and report.kind == "mcu":
        from tinymlaas.backends.platformio import write_project
        from tinymlaas.targets import get_target

        project = write_project(Path(report.artifacts["dir"]), get_target(report.target), Path(args.platformio))
        print(f"PlatformIO project: {project} (offline: pio run -d {project} -e qemu -t qemu)", file=sys.stderr)
    return 0 if report.verified else 1


def cmd_run(args) -> int:
    """Run a firmware ELF (a PlatformIO project's, a build's) in QEMU or Renode on an inputs file."""
    from tinymlaas.runners import run_elf
    from tinymlaas.targets import get_target

    run, outputs = run_elf(Path(args.firmware), get_target(args.target), args.emulator, Path(args.inputs))
    counts = [r.instructions for r in run.regions]
    print(f"{args.firmware}: {len(counts)} inferences on {args.emulator}, instructions/inference "
          f"{counts[0]:,} (range {min(counts):,}..{max(counts):,}), {run.seconds:.1f} s")
    if args.expected:
        expected = Path(args.expected).read_bytes()
        if outputs != expected:
            diff = sum(a != b for a, b in zip(outputs, expected)) + abs(len(outputs) - len(expected))
            print(f"outputs: {diff} of {len(expected)} bytes differ from {args.expected}")
            return 1
        print(f"outputs: all {len(expected)} bytes equal {args.expected}")
    return 0


def cmd_search(args) -> int:
    from tinymlaas.errors import InvalidModel
    from tinymlaas.frontend.keras import is_keras_input
    from tinymlaas.search.search import Constraints, format_result, search, write_result
    from tinymlaas.targets import get_target

    keras = is_keras_input(Path(args.model))
    if args.calibration and not keras:
        raise InvalidModel("--calibration is for Keras/SavedModel input (its quantization variants); "
                           f"{args.model} is already a TFLite model")
    get_target(args.target)  # an unknown target fails here, before any build
    out = Path(args.out or f"out/search-{Path(args.model).stem}-{args.target}")
    bar = None
    if sys.stderr.isatty() or args.progress:
        from tqdm import tqdm

        from tinymlaas.search.quantization import VARIANTS

        bar = tqdm(total=max(len(VARIANTS), args.budget) if keras else args.budget, desc="search", unit="build", file=sys.stderr,
                   leave=False)

    def progress(done: int, total: int, point) -> None:
        if bar is not None:
            bar.update(done - bar.n)
            bar.set_postfix_str(f"{point.label}: {point.cost:,}" if point.cost is not None else point.label)

    constraints = Constraints(args.max_ram, args.max_flash, args.max_fidelity_loss)
    try:
        if keras:  # a float model: TensorFlow's quantization variants, fidelity against the float model
            from tinymlaas.search.quantization import search_quantization

            result = search_quantization(args.model, args.target, out / "points",
                                         Path(args.calibration) if args.calibration else None, constraints,
                                         inputs=args.inputs, seed=args.seed, progress=progress, budget=args.budget,
                                         strategy=args.strategy, workers=args.workers, record=not args.no_record,
                                         ray_address=args.ray)
        else:
            result = search(args.model, args.target, out / "points", budget=args.budget, strategy=args.strategy,
                            seed=args.seed, constraints=constraints, inputs=args.inputs, workers=args.workers,
                            progress=progress, record=not args.no_record, ray_address=args.ray)
    finally:
        if bar is not None:
            bar.close()
    artifacts = write_result(result, out)
    if args.json:
        print(json.dumps({**result.to_dict(), "artifacts": artifacts}, indent=1))
    else:
        print(format_result(result, artifacts))
    return 0 if result.chosen is not None else 1


def _record(report) -> None:
    from tinymlaas.measurements import record_report

    warning = record_report(report)
    if warning:
        print(f"tinymlaas: warning: {warning}", file=sys.stderr)


def build_parser() -> argparse.ArgumentParser:
    from tinymlaas.frontend.keras import QUANTIZE
    from tinymlaas.search.search import STRATEGIES

    parser = argparse.ArgumentParser(prog="tinymlaas", description="Trained models to verified bare-metal firmware.")
    parser.add_argument("--debug", action="store_true", help="show Python tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("targets", help="list the boards tinymlaas can build for")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_targets)

    p = sub.add_parser("compile", help="compile a TFLite model to firmware, run it in the emulator, verify and measure")
    p.add_argument("model", help="a .tflite file (float32, int8, int16x8, dynamic-range), a .keras/.h5 file or a "
                   "SavedModel folder (converted with TensorFlow), an .onnx file or a PyTorch exported program "
                   "(.pt2, torch.export.save) for the host targets")
    p.add_argument("--quantize", choices=QUANTIZE, default="none",
                   help="Keras/SavedModel input: quantize when converting (default none: float32; mixed: int8 with "
                   "the layer int8 hurts most left in float)")
    p.add_argument("--calibration", help="Keras/SavedModel input: .npz of calibration samples, one array per input")
    p.add_argument("--target", "-t", required=True, help="a target name (see `tinymlaas targets`)")
    p.add_argument("--out", "-o", help="output folder (default out/MODEL-TARGET); replaced only on success")
    p.add_argument("--inputs", "-n", type=_positive_int,
                   help="random inputs to verify with (default 10 in QEMU, 1 on Ibex)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random inputs (default 0)")
    p.add_argument("--timeout", type=float,
                   help="emulator time limit in seconds (default 120 in QEMU, 300 in Renode, 1800 on Ibex)")
    p.add_argument("--emulator", choices=RUNNERS,
                   help="where to run it: qemu (exact instruction counts), renode (Renode's model of a real MCU of the "
                   "target's class, exact instruction counts) or ibex (the Ibex core simulated from its RTL: true "
                   "cycles, RV32 without FPU); default: the target's (ibex for ibex-* targets)")
    p.add_argument("--max-flash", type=_size, help="flash budget for the model, e.g. 512K (default: the board's)")
    p.add_argument("--max-ram", type=_size, help="RAM budget for the model, e.g. 128K (default: the board's)")
    p.add_argument("--int8-lowering", choices=("integer", "float"), default="integer",
                   help="int8 models: integer kernels (bit-exact, default) or TVM's float emulation of int8 ops")
    p.add_argument("--kernels", choices=("auto", "tir", "dsp", "dsp16"), default="auto",
                   help="int8 layers: TIR kernels, DSP micro-kernels (SMLAD) with the int8 weights or int16 (dsp16, faster, 2x weight flash), or auto: dsp where the core has DSP")
    p.add_argument("--memory", choices=("auto", "tvm", "optimal", "inplace"), default="auto",
                   help="arena plan: TVM's, optimal offsets over tensor lifetimes, inplace: optimal with streaming "
                   "kernels writing over their dying input (smallest RAM), or auto (default): TVM's, in place when "
                   "that does not fit the RAM budget")
    p.add_argument("--precision", choices=("float32", "float16"), default="float32",
                   help="host targets: float16 halves weights and activations (cuda-host; float models)")
    p.add_argument("--tune-trials", type=_count, default=0, metavar="N",
                   help="host targets: tune with meta_schedule, at most N trials (default 0: TVM's default schedules)")
    p.add_argument("--tune-trials-per-task", type=_positive_int, metavar="M", help="host targets: at most M per task")
    p.add_argument("--tune-minutes", type=_positive_float, metavar="MIN",
                   help="host targets: stop tuning once MIN minutes have passed (checked between rounds)")
    p.add_argument("--sample-inputs", metavar="NPZ",
                   help="host targets: verify with these inputs instead of random ones (one array per input name, "
                   "samples on a leading axis): for inputs random values do not suit, such as token ids")
    p.add_argument("--tuning-dir", help="host targets: tuning databases, reused by later builds of the same model "
                   "(default OUT/../tuning)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--progress", action="store_true", help="show a progress bar even when stderr is not a terminal")
    p.add_argument("--no-record", action="store_true",
                   help="do not add the figures to the measurement database ($TINYMLAAS_MEASUREMENTS, default "
                   "~/.local/share/tinymlaas/measurements.db)")
    p.add_argument("--platformio", metavar="DIR", help="also write a PlatformIO project of the build to DIR "
                   "(offline environments qemu and renode, and the target's real board)")
    p.set_defaults(func=cmd_compile)

    p = sub.add_parser("run", help="run a firmware ELF in QEMU or Renode on an inputs file (e.g. a PlatformIO build)")
    p.add_argument("firmware", help="the ELF (built with the measurement harness)")
    p.add_argument("--target", "-t", required=True)
    p.add_argument("--emulator", choices=("qemu", "renode"), default="qemu")
    p.add_argument("--inputs", required=True, help="the inputs, one inference's bytes after another")
    p.add_argument("--expected", help="outputs the run must reproduce byte for byte (exit 1 if not)")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("search", help="search kernel, schedule and fusion variants of a model for a target (or the "
                       "quantization variants of a Keras/SavedModel model): every point built, run and verified; "
                       "writes the Pareto front (JSON, PNG) and the best build")
    p.add_argument("model", help="a .tflite file, or a .keras/.h5/SavedModel folder (quantization variants)")
    p.add_argument("--target", "-t", required=True, help="a target name (see `tinymlaas targets`)")
    p.add_argument("--budget", "-b", type=_positive_int, default=16, help="at most this many builds (default 16; Keras "
                   "input: the 5 quantization variants first, then the kernel search on the chosen one)")
    p.add_argument("--strategy", choices=STRATEGIES, default="nsga2",
                   help="NSGA-II (default), random, or guided (a learned model screens sampled candidates, only its "
                   "best are built; on Ibex targets the best are confirmed in true cycles); all seeded with the "
                   "default build and uniform kernels")
    p.add_argument("--seed", type=int, default=0, help="seed of the search and of the verification inputs")
    p.add_argument("--max-ram", type=_size, help="RAM budget for the model, e.g. 64K")
    p.add_argument("--max-flash", type=_size, help="flash budget for the model, e.g. 256K")
    p.add_argument("--max-fidelity-loss", type=float, default=0.0,
                   help="largest accepted fidelity loss (int8: LSB off the interpreter; float: relative error "
                   "beyond the compiler's tolerance is never accepted; Keras input: the quantized variant's output "
                   "RMSE relative to the float model's); default 0")
    p.add_argument("--calibration", help="Keras/SavedModel input: .npz of calibration samples (one array per input; "
                   "an array `labels` adds accuracy); the search then compares float32, int8, int16x8 and mixed "
                   "precision")
    p.add_argument("--inputs", "-n", type=_positive_int, default=3, help="random inputs each point is verified with")
    p.add_argument("--workers", "-j", type=_positive_int, help="parallel builds (default: the CPU count, at most 8)")
    p.add_argument("--ray", metavar="ADDRESS", help="build on a Ray cluster (e.g. auto, ray://head:10001; local: one "
                   "started on this machine); its workers need tinymlaas and the model's folder shared")
    p.add_argument("--out", "-o", help="output folder (default out/search-MODEL-TARGET)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--progress", action="store_true", help="show a progress bar even when stderr is not a terminal")
    p.add_argument("--no-record", action="store_true", help="do not add the points to the measurement database")
    p.set_defaults(func=cmd_search)

    p = sub.add_parser("operators", help="the operators the compiler takes, per precision, with their kernel variants")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_operators)

    # Other packages add subcommands (the service registers serve, agent, devices, models, builds, deploy, ...).
    for entry in entry_points(group="tinymlaas.commands"):
        entry.load()(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    # TVM and the interpreter log to stderr at import; users want our lines only.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    logging.getLogger("tvm").setLevel(logging.ERROR)
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except TinyMLaaSError as e:
        if args.debug:
            raise
        print(f"tinymlaas: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("tinymlaas: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader went away (`tinymlaas targets | head`): not an error of ours
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error when Python flushes stdout
        return 0
    except Exception as e:  # a bug of ours: one line, and a reproducer to send us
        if args.debug:
            raise
        where = e if isinstance(e, InternalError) else InternalError(args.command, None, e)
        folder = _write_reproducer(args, argv if argv is not None else sys.argv[1:])
        print(f"tinymlaas: {where} (reproducer: {folder}; --debug shows the traceback)", file=sys.stderr)
        return 1


def _write_reproducer(args, argv: list[str]) -> Path:
    """The model, the command line and the traceback in a new owner-only folder."""
    import shutil
    import tempfile
    import traceback

    folder = Path(tempfile.mkdtemp(prefix="tinymlaas-crash-"))
    model = getattr(args, "model", None)
    if isinstance(model, str) and Path(model).is_file():
        shutil.copy(model, folder / Path(model).name)
    (folder / "command.txt").write_text("tinymlaas " + " ".join(argv) + "\n")
    (folder / "traceback.txt").write_text(traceback.format_exc())
    return folder


if __name__ == "__main__":
    sys.exit(main())
