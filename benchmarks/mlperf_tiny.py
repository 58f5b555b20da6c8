"""Compile every MLPerf Tiny model for Cortex-M4 and RV32IMAFC; one JSON with the measured figures.

Usage: python benchmarks/mlperf_tiny.py [--models DIR] [--targets cortex-m4,rv32imafc] [--out FILE]

Instruction counts are exact (QEMU -icount with our counting plugin) and repeatable, so one run
per configuration suffices. The int8 rows carry the ratio to TFLite Micro + CMSIS-NN measured in
the same QEMU with the same counter (figures from the project's issue tracker, listed in BASELINE).
int8 models on cores with DSP are built twice: the default kernels (int8 weights in flash) and the
"dsp16" variant (weights pre-widened to int16: faster, twice the weight flash).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

from tqdm import tqdm

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tinymlaas import __version__
from tinymlaas.build.pipeline import compile_model
from tinymlaas.build.request import BuildRequest
from tinymlaas.targets import get_target

MODELS = [
    "kws_ref_model", "kws_ref_model_float32", "vww_96_int8", "vww_96_float",
    "pretrainedResnet_quant", "pretrainedResnet", "ad01_int8", "ad01_fp32",
]

# TFLite Micro (90b983c) + CMSIS-NN (4ab83cc), -O2, Cortex-M4F, QEMU mps2-an386 -icount shift=0,
# second Invoke(): instructions per inference and arena bytes used.
BASELINE = {
    "source": "TFLM 90b983c + CMSIS-NN 4ab83cc on cortex-m4 (mps2-an386), as measured for issue #3",
    "cortex-m4": {
        "kws_ref_model": {"instructions": 7_698_080, "arena_bytes": 22_820},
        "vww_96_int8": {"instructions": 24_102_320, "arena_bytes": 100_708},
        "pretrainedResnet_quant": {"instructions": 29_861_800, "arena_bytes": 54_996},
        "ad01_int8": {"instructions": 583_080, "arena_bytes": 2_580},
    },
}


# The best published MLPerf Tiny results on the board class of a target (closed division, int8; latency = 1 / median
# throughput, from mlcommons/tiny_results_v1.0..v1.3 performance/results.txt), in cycles at the board's clock.
RECORDS = {"cortex-m4": {
    "kws_ref_model": {"cycles": 5_182_800, "ms": 43.19, "by": "ST X-CUBE-AI 9.0, NUCLEO-L4R5ZI @120 MHz (v1.2)"},
    "vww_96_int8": {"cycles": 10_671_600, "ms": 88.93, "by": "ST X-CUBE-AI 9.0, NUCLEO-L4R5ZI @120 MHz (v1.2)"},
    "pretrainedResnet_quant": {"cycles": 19_815_600, "ms": 165.13,
                               "by": "ST X-CUBE-AI 9.0, NUCLEO-L4R5ZI @120 MHz (v1.2)"},
    "ad01_int8": {"cycles": 486_000, "ms": 4.05, "by": "Plumerai, NUCLEO-L4R5ZI @120 MHz (v1.1)"},
}, "cortex-m7": {  # the Cortex-M7 board class: NUCLEO-H7A3ZI-Q @280 MHz (cycles as issue #33 states them)
    "kws_ref_model": {"cycles": 3_170_000, "ms": 11.32, "by": "ST X-CUBE-AI, NUCLEO-H7A3ZI-Q @280 MHz"},
    "vww_96_int8": {"cycles": 6_670_000, "ms": 23.82, "by": "ST X-CUBE-AI, NUCLEO-H7A3ZI-Q @280 MHz"},
    "pretrainedResnet_quant": {"cycles": 11_440_000, "ms": 40.86, "by": "ST X-CUBE-AI, NUCLEO-H7A3ZI-Q @280 MHz"},
    "ad01_int8": {"cycles": 303_000, "ms": None, "by": "Bosch (Cortex-M7 board)"},
}}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=str(ROOT.parent / "shared" / "models" / "mlperf-tiny"))
    ap.add_argument("--targets", default="cortex-m4,rv32imafc")
    ap.add_argument("--inputs", type=int, default=10)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "mlperf_tiny.json"))
    args = ap.parse_args()
    targets = args.targets.split(",")
    rows = []
    jobs = [(m, t, "auto") for m in MODELS for t in targets]
    jobs += [(m, t, "dsp16") for m, t, _ in jobs if get_target(t).dsp and m in BASELINE.get(t, {})]
    with tempfile.TemporaryDirectory() as tmp:
        for model, target, kernels in tqdm(jobs, desc="mlperf-tiny", unit="build"):
            started = time.monotonic()
            r = compile_model(Path(args.models) / f"{model}.tflite", target,
                              Path(tmp) / f"{model}-{target}-{kernels}", BuildRequest(inputs=args.inputs, kernels=kernels))
            s = r.sizes
            row = {
                "model": model,
                "target": target,
                "kernels": kernels,
                "lowering": r.lowering,
                "instructions": r.instructions,
                "instructions_repeat_exact": r.instructions_repeat_exact,
                "memory_accesses": r.memory_accesses,
                "flash": {"model_code": s["model_code"], "weights": s["weights"], "model_total": s["flash_model"],
                          "firmware_image": s["firmware_flash"]},
                "ram": {"arena": s["arena"], "kernel_scratch": s["kernel_scratch"], "stack_peak": s["stack_peak"],
                        "model_total": s["ram_model"]},
                "fidelity": r.fidelity,
                "compile_seconds": round(time.monotonic() - started, 2),
                "stages_seconds": r.stages_seconds,
            }
            if r.cycles_estimate is not None:
                row["cycles_estimate"] = round(r.cycles_estimate)
                row["cycles_estimate_method"] = r.cycles_estimate_method
                row["latency_ms_estimate"] = round(r.cycles_estimate / r.clock_hz * 1e3, 3)
                record = RECORDS.get(target, {}).get(model)
                if record:  # real boards (flash wait states, caches) against our zero-wait-state estimate
                    row["vs_best_published"] = {"cycles_ratio": round(r.cycles_estimate / record["cycles"], 3),
                                                **record}
            base = BASELINE.get(target, {}).get(model)
            if base:
                row["vs_tflm_cmsis_nn"] = {
                    "instructions_ratio": round(r.instructions / base["instructions"], 3),
                    "ram_ratio": round(s["ram_model"] / base["arena_bytes"], 3),
                    "baseline": base,
                }
            rows.append(row)
    result = {
        "benchmark": "mlperf_tiny",
        "tinymlaas_version": __version__,
        "host": platform.platform(),
        "inputs_per_build": args.inputs,
        "baseline": BASELINE["source"],
        "results": rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"{'model':<24}{'target':<11}{'kernels':<8}{'instructions':>14}{'est. cycles':>13}{'flash':>11}{'RAM':>10}  "
          "fidelity            vs TFLM+CMSIS-NN          vs best published")
    for row in rows:
        f = row["fidelity"]
        fid = (f"rel {f['max_rel_error']:.1e}" if f["kind"] == "float"
               else f"{f['exact_fraction'] * 100:.1f}% exact, {f['max_lsb_diff']} LSB")
        vs = row.get("vs_tflm_cmsis_nn")
        vs_text = f"{vs['instructions_ratio']:.2f}x instr, {vs['ram_ratio']:.2f}x RAM" if vs else ""
        rec = row.get("vs_best_published")
        print(f"{row['model']:<24}{row['target']:<11}{row['kernels']:<8}{row['instructions']:>14,}"
              f"{row.get('cycles_estimate', 0):>13,}{row['flash']['model_total']:>11,}"
              f"{row['ram']['model_total']:>10,}  {fid:<20}{vs_text:<26}"
              + (f"{rec['cycles_ratio']:.2f}x cycles" if rec else ""))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
