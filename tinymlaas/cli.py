"""The `tinymlaas` command line."""

from __future__ import annotations

import argparse
import errno
import hashlib
import json
import logging
import os
import sys
from importlib.metadata import entry_points
from pathlib import Path

from tinymlaas.build.request import InvalidRequest, add_arguments
from tinymlaas.errors import InternalError, TinyMLaaSError


def cmd_targets(args) -> int:
    from tinymlaas.backends import backend_for
    from tinymlaas.targets import all_targets

    targets = all_targets()
    if args.json:
        print(json.dumps({n: t.describe() for n, t in targets.items()}, indent=2))
        return 0
    print(f"{'target':<12} {'core':<12} {'FPU':<4} {'DSP':<4} {'board class':<26} {'flash':>10} {'RAM':>10}  runs in")
    for name, t in targets.items():
        if backend_for(t).firmware:
            runs = (f"Ibex '{t.rtl.config}' RTL (true cycles)" if t.rtl
                    else f"{t.emulator.qemu} -M {t.emulator.machine}"
                    + (f"; Renode: {t.renode.model}" if t.renode else ""))
            print(f"{name:<12} {t.core:<12} {'yes' if t.fpu else 'no':<4} {'yes' if t.dsp else 'no':<4} "
                  f"{t.board.name:<26} {t.board.flash_bytes // 1024:>8}K {t.board.ram_bytes // 1024:>8}K  {runs}")
        else:
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
    from tinymlaas.backends import backend_for
    from tinymlaas.build.pipeline import STAGES, compile_model
    from tinymlaas.build.request import from_args
    from tinymlaas.targets import get_target

    target = get_target(args.target)  # an unknown target fails here, before any work
    backend = backend_for(target)
    if args.platformio and not backend.firmware:
        raise InvalidRequest("platformio", f"applies to firmware builds, not {target.name}'s ({backend.what})")
    request = from_args(args, "compile")
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
        report = compile_model(args.model, args.target, args.out, request, progress)
    finally:
        if bar is not None:
            bar.close()
    print(json.dumps(report.to_dict(), indent=2) if args.json else backend.format_report(report))
    if not args.no_record and backend.firmware:  # the database holds firmware measurements
        _record(report)
    if args.platformio:
        from tinymlaas.backends.platformio import write_project

        project = write_project(Path(report.artifacts["dir"]), target, Path(args.platformio))
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
    from tinymlaas.build.formats import format_of
    from tinymlaas.build.request import from_args
    from tinymlaas.search.result import format_result, write_result
    from tinymlaas.search.search import check_searchable, search
    from tinymlaas.targets import get_target

    target = get_target(args.target)  # an unknown target fails here, before any build
    check_searchable(target)
    fmt = format_of(Path(args.model)).name
    request = from_args(args, "search").check(target, fmt)
    keras = fmt == "keras"
    out = Path(args.out or f"out/search-{Path(args.model).stem}-{args.target}")
    budget = request.budget or 16
    bar = None
    if sys.stderr.isatty() or args.progress:
        from tqdm import tqdm

        from tinymlaas.search.quantization import VARIANTS

        bar = tqdm(total=max(len(VARIANTS), budget) if keras else budget, desc="search", unit="build",
                   file=sys.stderr, leave=False)

    def progress(done: int, total: int, point) -> None:
        if bar is not None:
            bar.update(done - bar.n)
            if point is None:  # a build profiled layer by layer (the tune strategy)
                bar.set_postfix_str("layers profiled")
            else:
                bar.set_postfix_str(f"{point.label}: {point.cost:,}" if point.cost is not None else point.label)

    try:
        if keras:  # a float model: TensorFlow's quantization variants, fidelity against the float model
            from tinymlaas.search.quantization import search_quantization

            result = search_quantization(args.model, args.target, out / "points", request, progress=progress,
                                         record=not args.no_record)
        else:
            result = search(args.model, args.target, out / "points", request, progress=progress,
                            record=not args.no_record)
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
    from tinymlaas.measure.database import record_report

    warning = record_report(report)
    if warning:
        print(f"tinymlaas: warning: {warning}", file=sys.stderr)


def _read(path: str, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise TinyMLaaSError(f"cannot read the {what} {path}: {e.strerror or type(e).__name__}") from None


def _write(path: str, data: bytes) -> None:
    try:
        Path(path).write_bytes(data)
    except OSError as e:
        raise TinyMLaaSError(f"cannot write {path}: {e.strerror or type(e).__name__}") from None


def cmd_image_delta(args) -> int:
    from tinymlaas.ota.delta import compress_image, make_patch

    old, new = _read(args.old, "old file"), _read(args.new, "new file")
    patch = make_patch(old, new, Path(args.key) if args.key else None)
    _write(args.out, patch)
    print(f"{args.out}: {len(patch):,} B patch ({100 * len(patch) / max(len(new), 1):.1f}% of the new "
          f"{len(new):,} B; compressed whole it is {len(compress_image(new)):,} B)"
          + ("; signed" if args.key else "; unsigned"))
    return 0


def cmd_image_apply(args) -> int:
    from tinymlaas.ota.delta import apply_patch

    key = _read(args.key, "key") if args.key else None
    result = apply_patch(_read(args.old, "old file"), _read(args.patch, "patch"), key)
    _write(args.out, result)
    print(f"{args.out}: {len(result):,} B, SHA-256 {hashlib.sha256(result).hexdigest()}")
    return 0


def cmd_image_inspect(args) -> int:
    """What an image is (firmware or model, version, sizes, model ABI); its hash and signature checked with --key;
    with --firmware, whether a model image can run on that firmware image's code (the same model ABI)."""
    from tinymlaas.ota.package import (
        FIRMWARE_IMAGE,
        MODEL_IMAGE,
        ImageRejected,
        inspect_image,
        inspect_model_image,
        model_layout,
        read_header,
    )

    data = _read(args.image, "image")
    info, layout = read_header(data), model_layout(data)
    kind = layout.kind if layout is not None else None
    if args.key:
        key = _read(args.key, "key")
        if kind == MODEL_IMAGE and args.firmware:
            running = model_layout(_read(args.firmware, "firmware image"))
            inspect_model_image(data, key, len(data), running.abi if running else None)
        else:
            inspect_image(data, key, len(data), kind=kind or FIRMWARE_IMAGE)
    elif kind == MODEL_IMAGE and args.firmware:
        running = model_layout(_read(args.firmware, "firmware image"))
        if running is None or running.abi != layout.abi:
            raise ImageRejected("abi-mismatch", f"{args.firmware} has another model ABI (or none): the model "
                                "image cannot run on it")
    what = "model" if kind == MODEL_IMAGE else "firmware"
    region = (f"model ABI {layout.abi[:16]}, model region {layout.address:#x} ({layout.size:,} B)" if layout
              else "no model region (its constants are linked after the code)")
    print(f"{args.image}: {what} image {info.version}, {info.total_size:,} B ({info.payload_size:,} B payload); "
          f"{region}" + ("; hash and signature verified" if args.key else "")
          + (f"; runs on {args.firmware} (the same model ABI)" if kind == MODEL_IMAGE and args.firmware else ""))
    return 0


def image_runners() -> tuple[str, ...]:
    from tinymlaas.runners import RUNNERS, runner_class

    return tuple(n for n in RUNNERS if runner_class(n).device_images)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tinymlaas", description="Trained models to verified bare-metal firmware.")
    parser.add_argument("--debug", action="store_true", help="show Python tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("targets", help="list the boards tinymlaas can build for")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_targets)

    p = sub.add_parser("compile", help="compile a model to firmware, run it in the emulator, verify and measure")
    p.add_argument("model", help="a .tflite file (float32, int8, int16x8, dynamic-range), a .keras/.h5 file or a "
                   "SavedModel folder (converted with TensorFlow), an .onnx file (float, or QDQ int8) or a PyTorch "
                   "exported program (.pt2, torch.export.save)")
    p.add_argument("--target", "-t", required=True, help="a target name (see `tinymlaas targets`)")
    p.add_argument("--out", "-o", help="output folder (default out/MODEL-TARGET); replaced only on success")
    add_arguments(p, "compile")
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
    p.add_argument("--emulator", choices=image_runners(), default="qemu",
                   help="a runner whose firmware is linked as a device's image, as PlatformIO's environments are")
    p.add_argument("--inputs", required=True, help="the inputs, one inference's bytes after another")
    p.add_argument("--expected", help="outputs the run must reproduce byte for byte (exit 1 if not)")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("search", help="search kernel, schedule and fusion variants of a model for a target (or the "
                       "quantization variants of a Keras/SavedModel model): every point built, run and verified; "
                       "writes the Pareto front (JSON, PNG) and the best build")
    p.add_argument("model", help="a .tflite file, or a .keras/.h5/SavedModel folder (quantization variants)")
    p.add_argument("--target", "-t", required=True, help="a target name (see `tinymlaas targets`)")
    add_arguments(p, "search")
    p.add_argument("--out", "-o", help="output folder (default out/search-MODEL-TARGET)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--progress", action="store_true", help="show a progress bar even when stderr is not a terminal")
    p.add_argument("--no-record", action="store_true", help="do not add the points to the measurement database")
    p.set_defaults(func=cmd_search)

    p = sub.add_parser("operators", help="the operators the compiler takes, per precision, with their kernel variants")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_operators)

    image = sub.add_parser("image", help="smaller updates: a signed patch between two images (or any two files), "
                           "applying one, and what an image is").add_subparsers(dest="what", required=True)
    p = image.add_parser("delta", help="the patch that turns OLD into NEW (signed with --key)")
    p.add_argument("old")
    p.add_argument("new")
    p.add_argument("--out", "-o", required=True, help="the patch file to write")
    p.add_argument("--key", help="an Ed25519 private key (PEM, e.g. the service's signing key) to sign the patch")
    p.set_defaults(func=cmd_image_delta)
    p = image.add_parser("apply", help="apply PATCH to OLD (refused, writing nothing, when OLD is not its base)")
    p.add_argument("old")
    p.add_argument("patch")
    p.add_argument("--out", "-o", required=True, help="the file to write: byte-identical to the patch's NEW")
    p.add_argument("--key", help="a key (PEM, public or private) the patch must be signed with")
    p.set_defaults(func=cmd_image_apply)
    p = image.add_parser("inspect", help="what a signed image is: firmware or model, version, sizes and model ABI "
                         "(refused, exit 2, when --key or --firmware does not accept it)")
    p.add_argument("image")
    p.add_argument("--key", help="a key (PEM, public or private) the image must be signed with")
    p.add_argument("--firmware", help="a firmware image: a model image must have its model ABI")
    p.set_defaults(func=cmd_image_inspect)

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
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS):  # the machine's, not ours
            print(f"tinymlaas: error: {e.strerror.lower()}" + (f" ({e.filename})" if e.filename else ""),
                  file=sys.stderr)
            return 2
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
