"""Cycles per model and layer: true on Ibex (two configurations, from the RTL), estimated on Cortex-M4/M7.

Usage: python benchmarks/cycles.py [--models DIR] [--out FILE] [--measurements URL] [--jobs N]

For each int8 MLPerf Tiny model, one profiled build per target: exact instructions and memory accesses (QEMU),
the cycle estimate (llvm-mca's model of the core x QEMU's per-block counts) and, on Ibex, the true cycles of
every layer from the simulated core's own counters, with the outputs checked against the interpreter. On Ibex the
same estimator (an in-order RISC-V model) is compared with the truth: that error, per model and per layer (mean
and worst), is what the Cortex-M estimates can be expected to carry. Every row also lands in the measurement
database (--measurements, default $TINYMLAAS_MEASUREMENTS).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tinymlaas import __version__

MODELS = ["kws_ref_model", "vww_96_int8", "pretrainedResnet_quant", "ad01_int8"]
TARGETS = ["ibex-small", "ibex-maxperf", "cortex-m4", "cortex-m7"]


def _one(args):
    model_file, target = args
    from tinymlaas.backends.mcu.profile import profile_model

    started = time.monotonic()
    with tempfile.TemporaryDirectory() as tmp:
        prof = profile_model(model_file, target, Path(tmp))
    return model_file, target, prof, round(time.monotonic() - started, 1)


def _error_stats(prof) -> dict | None:
    """The estimate's relative error against the true cycles: whole model, and per layer (mean |e| and worst)."""
    layers = [(s.cycles_estimate - s.cycles) / s.cycles for s in prof.steps if s.cycles]
    if not layers:
        return None
    tot = prof.totals()
    worst = max(layers, key=abs)
    return {"model": round((tot["cycles_estimate"] - tot["cycles"]) / tot["cycles"], 4),
            "layer_mean_abs": round(sum(abs(e) for e in layers) / len(layers), 4), "layer_worst": round(worst, 4)}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default=str(ROOT.parent / "shared" / "models" / "mlperf-tiny"))
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "cycles.json"))
    ap.add_argument("--measurements", help="database URL or SQLite path (default $TINYMLAAS_MEASUREMENTS)")
    ap.add_argument("--jobs", type=int, default=2, help="builds in parallel (Ibex runs are single-threaded)")
    ap.add_argument("--only", help="comma-separated model names (default: the four int8 models)")
    args = ap.parse_args()

    from tinymlaas.measure.database import MeasurementStore
    from tinymlaas.targets import get_target

    store = MeasurementStore(args.measurements)
    models = args.only.split(",") if args.only else MODELS
    work = [(str(Path(args.models) / f"{m}.tflite"), t) for m in models for t in TARGETS]
    results, started = [], time.monotonic()
    with ProcessPoolExecutor(args.jobs) as pool:
        for model_file, target, prof, seconds in pool.map(_one, work):
            store.record_profile(prof, Path(model_file), get_target(target), source="benchmark")
            tot = prof.totals()
            cycles = tot.get("cycles")
            row = {"model": prof.model, "target": target, "verified": prof.verified,
                   "instructions": tot["instructions"], "memory_accesses": tot["memory_accesses"],
                   "cycles": cycles, "cycles_kind": "true" if cycles else "estimate",
                   "cycles_source": prof.cycles_source or prof.estimate_method,
                   "cycles_estimate": tot["cycles_estimate"], "estimate_method": prof.estimate_method,
                   "cpi": round((cycles or tot["cycles_estimate"]) / tot["instructions"], 3),
                   "estimate_error_vs_true": _error_stats(prof), "fallback_blocks": prof.fallback_blocks,
                   "seconds": seconds, "layers": [asdict(s) | {"features": None} for s in prof.steps]}
            results.append(row)
            err = row["estimate_error_vs_true"]
            print(f"{prof.model:<24} {target:<13} {'ok ' if prof.verified else 'BAD'} instr {tot['instructions']:>12,}"
                  f" cycles {cycles or tot['cycles_estimate']:>14,.0f} ({row['cycles_kind']}) CPI {row['cpi']:.2f}"
                  + (f"  estimate error {err['model']:+.1%} (layers: mean {err['layer_mean_abs']:.1%}, worst "
                     f"{err['layer_worst']:+.1%})" if err else "") + f"  [{seconds:.0f} s]", flush=True)
    # side by side: per model, instructions and cycles on each target
    summary = {}
    for r in results:
        summary.setdefault(r["model"], {})[r["target"]] = {
            "instructions": r["instructions"], "cycles": r["cycles"] or r["cycles_estimate"], "kind": r["cycles_kind"],
            "cpi": r["cpi"]}
    errors = [r["estimate_error_vs_true"] for r in results if r["estimate_error_vs_true"]]
    doc = {
        "benchmark": "cycles per model and layer: true (Ibex RTL, Verilator) and estimated (llvm-mca x QEMU blocks)",
        "tinymlaas_version": __version__,
        "host": {"machine": platform.machine(), "python": platform.python_version()},
        "inputs": "one random input (seed 0) per build; outputs checked against the TFLite interpreter",
        "seconds": round(time.monotonic() - started, 1),
        "summary": summary,
        "estimate_error_on_ibex": {
            "models_mean_abs": round(sum(abs(e["model"]) for e in errors) / len(errors), 4) if errors else None,
            "models_worst": max((e["model"] for e in errors), key=abs) if errors else None,
            "layers_worst": max((e["layer_worst"] for e in errors), key=abs) if errors else None,
        },
        "results": results,
    }
    Path(args.out).write_text(json.dumps(doc, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0 if all(r["verified"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
