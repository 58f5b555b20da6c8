"""Weights below eight bits, side by side in one run: int8 and int4 weights with the default (C) kernels, which read
int4 weights in their loop (convolutions and fully connected layers: gemm_w4, gemv_w4; no RAM) or unpacked into RAM
right before their layer (the others), and with the TIR kernels, which decode each weight they read (no RAM);
palettes of 16 and 8 values on the default kernels (convolutions and fully connected layers decoded a block of
output channels at a time: unpack_weights.c gemm_p8/gemv_p8):
weight bytes, flash, RAM, instructions (and the Cortex-M4 cycle estimate), every build verified against the TFLite
interpreter (the int4 ones against the interpreter on the int4 model).

Usage: python benchmarks/lowbit.py [--models DIR] [--out FILE] [--targets T,...] [--inputs N]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tinymlaas import __version__

MLPERF = ["kws_ref_model", "vww_96_int8", "pretrainedResnet_quant", "ad01_int8"]
TRAINED = ROOT / "tests" / "corpus" / "trained"  # tests/corpus/trained.py: trained on scikit-learn's digits
ACCURACY_MODELS = ["digits_cnn", "digits_signal"]
LIMITS = (1.0, 0.5)  # --max-accuracy-drop for auto, points of top-1 (1: the bound we hold int4 to)
VARIANTS = {  # name -> BuildRequest options
    "int8": {},
    "int4": {"weights": "int4"},
    "palette4": {"weights": "palette", "palette_bits": 4},
    "palette3": {"weights": "palette", "palette_bits": 3},
    "int8_tir": {"kernels": "tir"},
    "int4_tir": {"weights": "int4", "kernels": "tir"},
}


def _build(path: Path, target: str, options: dict, inputs: int, work: Path) -> dict:
    from tinymlaas.build.pipeline import compile_model
    from tinymlaas.build.request import BuildRequest
    from tinymlaas.errors import TinyMLaaSError

    started = time.monotonic()
    try:
        r = compile_model(path, target, work, BuildRequest(inputs=inputs, **options))
    except TinyMLaaSError as e:
        return {"error": str(e).splitlines()[0][:200]}
    out = {"weights_bytes": r.sizes["weights"], "flash_model": r.sizes["flash_model"], "ram_model": r.sizes["ram_model"],
           "instructions": r.instructions, "verified": r.verified, "bit_exact": r.fidelity.get("max_lsb_diff") == 0,
           "compile_seconds": round(time.monotonic() - started, 1)}
    if r.cycles_estimate is not None:
        out["cycles_estimate"] = round(r.cycles_estimate)
    if r.weights:
        out["layers"] = dict(Counter(w["precision"] for w in r.weights))
    if r.accuracy:
        out["accuracy"] = r.accuracy
    return out


def _row(name: str, path: Path, target: str, inputs: int, work: Path) -> dict:
    row = {"model": name, "target": target}
    for variant, options in VARIANTS.items():
        row[variant] = _build(path, target, options, inputs, work / variant)
    for low, base in (("int4", "int8"), ("palette4", "int8"), ("palette3", "int8"), ("int4_tir", "int8_tir")):
        a, b = row[low], row[base]
        if "weights_bytes" not in a or "weights_bytes" not in b:
            continue
        for key, label in (("weights_bytes", "weights"), ("flash_model", "flash"), ("ram_model", "ram"),
                          ("instructions", "instructions"), ("cycles_estimate", "cycles")):
            if key in a and key in b:
                a[f"{label}_vs_{base}"] = round(a[key] / b[key], 3)
    if "instructions" in row["int4"] and "instructions" in row["int8"]:
        row["int4_tir"]["instructions_vs_int8"] = round(row["int4_tir"].get("instructions", 0) /
                                                        row["int8"]["instructions"], 3)
    return row


def _accuracy_row(name: str, target: str, inputs: int, work: Path) -> dict:
    """int8, int4 everywhere and auto within each of LIMITS, each with its top-1 on the held-out digits."""
    model, validation = TRAINED / f"{name}_int8.tflite", TRAINED / f"{name}_validation.npz"
    row = {"model": name, "target": target}
    variants = {"int8": {}, "int4": {"weights": "int4"},
                **{f"palette{b}": {"weights": "palette", "palette_bits": b} for b in (4, 3, 2)},
                **{f"auto_{limit:g}": {"weights": "auto", "max_accuracy_drop": limit} for limit in LIMITS}}
    for variant, options in variants.items():
        row[variant] = _build(model, target, {**options, "validation": str(validation)}, inputs, work / variant)
    for variant in list(variants)[1:]:
        a, b = row[variant], row["int8"]
        if "weights_bytes" in a and "weights_bytes" in b:
            for key, label in (("weights_bytes", "weights"), ("flash_model", "flash"), ("ram_model", "ram"),
                               ("instructions", "instructions")):
                a[f"{label}_vs_int8"] = round(a[key] / b[key], 3)
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", type=Path, default=ROOT.parent / "shared" / "models" / "mlperf-tiny")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "lowbit.json")
    ap.add_argument("--targets", default="cortex-m4,rv32imac")
    ap.add_argument("--inputs", type=int, default=3)
    args = ap.parse_args(argv)
    rows, accuracy_rows, started = [], [], time.monotonic()
    with tempfile.TemporaryDirectory(prefix="tinymlaas-lowbit-") as tmp:
        for target in args.targets.split(","):
            for name in MLPERF:
                row = _row(name, args.models / f"{name}.tflite", target, args.inputs, Path(tmp) / target / name)
                rows.append(row)
                print(json.dumps({k: (v if not isinstance(v, dict) else {x: v.get(x) for x in (
                    "weights_bytes", "instructions", "ram_model", "weights_vs_int8", "instructions_vs_int8",
                    "instructions_vs_int8_tir", "error") if x in v}) for k, v in row.items()}), flush=True)
            for name in ACCURACY_MODELS:
                row = _accuracy_row(name, target, args.inputs, Path(tmp) / target / name)
                accuracy_rows.append(row)
                print(json.dumps({k: v.get("accuracy", v.get("error")) if isinstance(v, dict) else v
                                  for k, v in row.items()}), flush=True)
    result = {
        "benchmark": "lowbit",
        "tinymlaas_version": __version__,
        "host": {"machine": platform.machine(), "python": platform.python_version()},
        "method": "per model and target, builds in one run: int8 and int4 weights (--weights int4: every "
                  "eligible conv/depthwise/FC layer re-quantized to 4 bits per channel, two to a byte in flash) with "
                  "the default kernels (C micro-kernels; int4 read in the loop by convolutions and FC layers of a "
                  "proven requantization (gemm_w4, gemv_w4), else unpacked into RAM before each layer) and with the TIR kernels (int4 decoded on each read); palettized "
                  "weights (--weights palette: 16 or 8 k-means values a layer, kept as indices) on the default "
                  "kernels: the matrix kernels (convolutions, fully connected) decode them a block of output channels "
                  "at a time into an arena scratch of one block (the whole layer where the arena has room beside the "
                  "layer's tensors), one-row layers of 16 values read them in the loop (gemv_p4), the others "
                  "(depthwise, TIR) get them unpacked into RAM before the layer; ratios against int8 on the same kernels; each verified against the "
                  "TFLite interpreter on the model it computes (the rewritten one), instructions from QEMU, "
                  "Cortex-M4 cycles estimated (llvm-mca x QEMU blocks, the TRM's load/store timing)",
        "seconds": round(time.monotonic() - started),
        "rows": rows,
        "accuracy_method": f"models trained on scikit-learn's digits (tests/corpus/trained.py), int8; top-1 on "
                           f"their held-out 20% (360 samples, never trained on) by the reference interpreter on "
                           f"the model each build computes (bit-exact with it): int8, int4 in every eligible "
                           f"layer, and --weights auto within {' and '.join(f'{x:g}' for x in LIMITS)} point(s) "
                           "of the int8 model (auto_<limit>)",
        "accuracy_rows": accuracy_rows,
    }
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
