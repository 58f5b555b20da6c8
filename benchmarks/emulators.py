"""Emulators side by side: wall time per inference and emulated MIPS of QEMU, Renode and Ibex, in one run.

Usage: python benchmarks/emulators.py [--models DIR] [--out FILE] [--inputs N] [--ibex-models M,...]

Per model and target, one firmware per runner (each runner's machine has its own memory map, so each links its
own image of the same code), run twice: on 1 input and on N inputs (each input list ends with input 0 again;
N = --inputs on Renode, 2 on Ibex, and on QEMU enough for 500 M instructions more).
Wall time per inference = (t(N inputs) - t(1 input)) / (N - 1): the start-up of the emulator (QEMU's boot,
Verilator's model build-up) drops out. Renode's start-up (Mono, platform loading) varies by seconds from run to
run, more than an inference takes: there the hooks at the two marks clock each inference on the host, and the
median is taken. Emulated MIPS = the inference's exact instructions / that time. Every run's outputs are checked against the TFLite interpreter, and its instruction
count against QEMU's (equal on Renode; on Ibex, the same minstret count).
Ibex (ibex-small, the RTL at ~0.5 M cycles/s) runs the models in --ibex-models only, on the rv32imac row.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tinymlaas import __version__

MODELS = ["kws_ref_model", "pretrainedResnet_quant", "ad01_int8"]
TARGETS = ["cortex-m4", "cortex-m7", "cortex-m33", "rv32imac"]
QEMU_EXTRA = 500_000_000


def _run(model_file: Path, target_name: str, runner_name: str, inputs: int, work: Path) -> dict:
    """Build once for the runner's machine, run on 1 and on `inputs` inputs; the figures of the two runs."""
    from tinymlaas.backends.mcu.build import build_program
    from tinymlaas.backends.mcu.firmware import link_firmware
    from tinymlaas.oracle import make_inputs, reference_outputs
    from tinymlaas.runners import emulator_for
    from tinymlaas.targets import get_target
    from tinymlaas.verify import compare, split_outputs

    build_target = "ibex-small" if runner_name == "ibex" else target_name
    target, model, _, built, driver, lowering = build_program(model_file, build_target, work, "auto")
    runner = emulator_for(runner_name, 1800, get_target(build_target))
    runs = {}
    n = 1
    while n not in runs:
        batches = make_inputs(model, n, 0)
        batches.append(batches[0])
        (work / "inputs.bin").write_bytes(b"".join(x.tobytes() for batch in batches for x in batch))
        firmware = link_firmware(target, built, driver, work, layout=runner.layout, inputs=work / "inputs.bin",
                                 name=f"fw{n}")
        run = runner.run(target, firmware, work)
        got = split_outputs(model, (work / "outputs.bin").read_bytes(), len(batches))
        fidelity = compare(model, got, reference_outputs(model, batches), integer_kernels=lowering == "integer")
        runs[n] = {"seconds": run.seconds, "inferences": len(run.regions), "verified": fidelity.passed,
                   "instructions": run.regions[0].instructions, "cycles": run.regions[0].cycles,
                   "clocked": [r.wall_seconds for r in run.regions if r.wall_seconds is not None]}
        # QEMU runs a small model's inference in milliseconds, within its start-up's noise: enough inputs for
        # QEMU_EXTRA instructions more; Ibex (~0.5 M cycles/s) takes one input more
        n = {"qemu": max(inputs, math.ceil(QEMU_EXTRA / runs[1]["instructions"])), "ibex": 2}.get(runner_name, inputs)
    one, many = runs[1], runs[n]
    if many["clocked"]:  # Renode: its start-up varies by seconds, more than an inference; the hooks clock each one
        per, method = statistics.median(many["clocked"]), "median of the inferences clocked at the marks"
    else:
        per = (many["seconds"] - one["seconds"]) / (many["inferences"] - one["inferences"])
        method = "(t(N inputs) - t(1 input)) / extra inferences"
    return {"runner": runner_name, "machine": _machine(get_target(build_target), runner_name), "method": method,
            "instructions": one["instructions"], "cycles": one["cycles"],
            "verified": one["verified"] and many["verified"],
            "seconds_1_input": round(one["seconds"], 2), "inputs": n, "seconds_n_inputs": round(many["seconds"], 2),
            "startup_seconds": round(one["seconds"] - per * one["inferences"], 2),
            "seconds_per_inference": round(per, 4), "mips": round(one["instructions"] / per / 1e6, 1)}


def _machine(target, runner: str) -> str:
    if runner == "renode":
        return target.renode.model
    if runner == "ibex":
        return "Ibex simple system 'small' (Verilator)"
    return f"{target.emulator.qemu} -M {target.emulator.machine}"


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default=str(ROOT.parent / "shared" / "models" / "mlperf-tiny"))
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "emulators.json"))
    ap.add_argument("--inputs", type=int, default=5, help="inputs of the longer run (default 5)")
    ap.add_argument("--ibex-models", default="ad01_int8,kws_ref_model",
                    help="models also run on Ibex's RTL (slow: ~0.5 M cycles/s)")
    ap.add_argument("--model", action="append", help="only these models (default: KWS, ResNet-8, AD01)")
    args = ap.parse_args()
    ibex_models = set(filter(None, args.ibex_models.split(",")))
    started = time.monotonic()
    rows = []
    for name in args.model or MODELS:
        model_file = Path(args.models) / f"{name}.tflite"
        for target in TARGETS:
            row = {"model": name, "target": target, "runners": {}}
            runners = ["qemu", "renode"] + (["ibex"] if target == "rv32imac" and name in ibex_models else [])
            for runner in runners:
                with tempfile.TemporaryDirectory() as tmp:
                    r = _run(model_file, target, runner, args.inputs, Path(tmp))
                row["runners"][runner] = r
                print(f"{name:24s} {target:11s} {runner:7s} {r['seconds_per_inference'] * 1e3:9.1f} ms/inference "
                      f"{r['mips']:7.1f} MIPS  start-up {r['startup_seconds']:5.1f} s  "
                      f"{r['instructions']:>11,} instr  verified {r['verified']}", flush=True)
            q = row["runners"]["qemu"]
            row["renode_instructions_equal_qemu"] = row["runners"]["renode"]["instructions"] == q["instructions"]
            row["renode_vs_qemu_time"] = round(row["runners"]["renode"]["seconds_per_inference"]
                                               / q["seconds_per_inference"], 2)
            if "ibex" in row["runners"]:
                row["ibex_vs_qemu_time"] = round(row["runners"]["ibex"]["seconds_per_inference"]
                                                 / q["seconds_per_inference"], 1)
            rows.append(row)
    out = {"benchmark": "emulators", "tinymlaas_version": __version__,
           "host": {"machine": platform.machine(), "python": platform.python_version(), "cpus": _cpus()},
           "inputs": args.inputs,
           "seconds": round(time.monotonic() - started, 1), "rows": rows}
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


def _cpus() -> int:
    import os

    return os.cpu_count() or 1


if __name__ == "__main__":
    sys.exit(main())
