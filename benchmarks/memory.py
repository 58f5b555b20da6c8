"""Memory plans side by side: the arena and RAM of TVM's plan, the optimal plan and the in-place plan, in one run.

Usage: python benchmarks/memory.py [--models DIR] [--out FILE] [--targets T,...] [--inputs N]

Per model (the four int8 MLPerf Tiny models and the int8 architectures of tests/corpus, which the planner was not
tuned for) and target, one build per plan: each is run in QEMU and verified against the TFLite interpreter; its
arena, RAM (arena + kernel scratch + measured stack) and instruction count are recorded with the planner's time.
Ratios are to TVM's plan (StaticPlanBlockMemory); the default build (`--memory auto`) is the optimal plan, which
also writes concatenations in place (ir/concat_in_place.py: the instruction counts show the copies saved). Beside
them, the arena TFLite Micro itself allocates for the same file (measure/tflm.py, tflite-micro's host interpreter;
its `tail` holds 64-bit pointers, about twice a 32-bit core's) and each plan's RAM over it.
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tinymlaas import __version__

MLPERF = ["kws_ref_model", "vww_96_int8", "pretrainedResnet_quant", "ad01_int8"]
CORPUS = ROOT / "tests" / "corpus"
POLICIES = ("tvm", "optimal", "inplace")


def _models(models_dir: Path) -> list[tuple[str, Path]]:
    manifest = json.loads((CORPUS / "manifest.json").read_text())
    corpus = sorted((k, CORPUS / v["file"]) for k, v in manifest.items()
                    if "file" in v and v.get("architecture") and v["precision"] == "int8")
    return [(m, models_dir / f"{m}.tflite") for m in MLPERF] + corpus


def _row(name: str, path: Path, target: str, inputs: int, work: Path) -> dict:
    from tinymlaas.build.pipeline import compile_model
    from tinymlaas.build.request import BuildRequest
    from tinymlaas.errors import TinyMLaaSError
    from tinymlaas.measure.tflm import tflm_arena

    row = {"model": name, "target": target}
    tflm = tflm_arena(path)
    row["tflm_arena"] = {"refused": tflm.refused} if tflm.refused else {"total": tflm.total, "head": tflm.head,
                                                                        "tail": tflm.tail}
    for policy in POLICIES:
        started = time.monotonic()
        try:
            r = compile_model(path, target, work / policy, BuildRequest(inputs=inputs, memory=policy))
        except TinyMLaaSError as e:
            row[policy] = {"error": str(e).splitlines()[0][:200]}
            continue
        plan_note = next((n for n in r.notes if n.startswith("memory:")), "")
        row[policy] = {"arena": r.sizes["arena"], "ram": r.sizes["ram_model"], "instructions": r.instructions,
                       "verified": r.verified, "bit_exact": r.fidelity.get("max_lsb_diff") == 0,
                       "in_place_layers": int(m.group(1)) if (m := re.search(r"(\d+) layer\(s\) in place", plan_note)) else 0,
                       "lower_stage_seconds": r.stages_seconds.get("lower"),
                       "compile_seconds": round(time.monotonic() - started, 2)}
    base = row["tvm"]
    if "arena" in base:
        for policy in POLICIES[1:]:
            if "arena" in row[policy]:
                row[policy]["arena_vs_tvm"] = round(row[policy]["arena"] / max(base["arena"], 1), 3)
                row[policy]["ram_vs_tvm"] = round(row[policy]["ram"] / max(base["ram"], 1), 3)
                row[policy]["instructions_vs_tvm"] = round(row[policy]["instructions"] / max(base["instructions"], 1), 4)
    for policy in POLICIES:
        if "ram" in row[policy] and not tflm.refused:
            row[policy]["ram_vs_tflm_arena"] = round(row[policy]["ram"] / tflm.total, 3)
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", type=Path, default=ROOT.parent / "shared" / "models" / "mlperf-tiny")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "memory.json")
    ap.add_argument("--targets", default="cortex-m4,rv32imac")
    ap.add_argument("--inputs", type=int, default=3)
    args = ap.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory(prefix="tinymlaas-memory-") as tmp:
        for target in args.targets.split(","):
            for name, path in _models(args.models):
                row = _row(name, path, target, args.inputs, Path(tmp) / target / name)
                rows.append(row)
                cells = "  ".join(f"{p} {row[p].get('ram', row[p].get('error', '?'))!s:>8}" for p in POLICIES)
                tflm = row["tflm_arena"].get("total", "-")
                print(f"{target:10} {name:28} RAM {cells}  TFLite Micro arena {tflm}", flush=True)
    result = {
        "what": "arena and RAM of TVM's memory plan, the optimal plan (the default; concatenations in place) and the "
                "in-place plan, each build run in QEMU and verified against the TFLite interpreter, beside the arena "
                "TFLite Micro allocates for the same file (tflite-micro's host interpreter)",
        "tinymlaas": __version__,
        "host": platform.node(),
        "python": platform.python_version(),
        "rows": rows,
    }
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
