"""The variant search on the int8 MLPerf Tiny models: best variant found vs the default build, side by side.

Usage: python benchmarks/search.py [--models DIR] [--targets cortex-m4,rv32imac,ibex-small] [--budget 24] [--seed 0]
                                   [--strategy nsga2] [--ibex-models kws_ref_model,ad01_int8] [--workers 2]
                                   [--out FILE]

Every point is built, run in QEMU (exact instructions) and verified bit-exact against the interpreter. The JSON
holds, per model and target: the default build, the chosen variant (instructions, RAM, flash, fidelity) and the
front point of least RAM (the memory plan is one of the dimensions), the
budget, the search's wall time, the Pareto front's size, and the ratio to TFLite Micro measured in the same QEMU
(the project's baselines: the reference kernels on rv32imafc, CMSIS-NN on cortex-m4). On an Ibex target the guided
strategy runs: candidates in QEMU, the best two and the default build confirmed on the Verilator model of the RTL,
so those rows also hold true cycles (default and chosen); only the --ibex-models run there (Ibex simulates about
0.5-1 M cycles/s). One plot per row is written next to the JSON (search_<model>_<target>.png).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tinymlaas import __version__
from tinymlaas.build.request import BuildRequest
from tinymlaas.search.result import plot_front
from tinymlaas.search.search import search
from tinymlaas.targets import get_target

MODELS = ["kws_ref_model", "vww_96_int8", "pretrainedResnet_quant", "ad01_int8"]
# instructions per inference of TFLite Micro in the same QEMU (from the issue tracker): the reference kernels
# measured on rv32imafc (the int8 path uses no FPU instruction), CMSIS-NN on cortex-m4
TFLM_RV32 = {"kws_ref_model": 44_300_000, "vww_96_int8": 109_900_000, "pretrainedResnet_quant": 125_500_000,
             "ad01_int8": 2_480_000}
TFLM = {"rv32imac": TFLM_RV32, "ibex-small": TFLM_RV32, "ibex-maxperf": TFLM_RV32,
        "cortex-m4": {"kws_ref_model": 7_698_080, "vww_96_int8": 24_102_320, "pretrainedResnet_quant": 29_861_800,
                      "ad01_int8": 583_080}}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default=str(ROOT.parent / "shared" / "models" / "mlperf-tiny"))
    ap.add_argument("--targets", default="cortex-m4,rv32imac,ibex-small")
    ap.add_argument("--ibex-models", default="kws_ref_model,ad01_int8")
    ap.add_argument("--budget", type=int, default=24)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--strategy", default="nsga2")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "search.json"))
    args = ap.parse_args()
    out = Path(args.out)
    rows = []
    for target in args.targets.split(","):
        rtl = get_target(target).rtl is not None
        for name in MODELS:
            if rtl and name not in args.ibex_models.split(","):
                continue
            path = Path(args.models) / f"{name}.tflite"
            strategy = "guided" if rtl else args.strategy
            with tempfile.TemporaryDirectory(prefix="tinymlaas-search-") as tmp:
                started = time.monotonic()
                r = search(path, target, Path(tmp), BuildRequest(budget=args.budget, strategy=strategy, seed=args.seed,
                                                                 workers=args.workers))
                wall = time.monotonic() - started
                plot_front(r, out.parent / f"search_{name}_{target}.png")
            d, c = r.points[r.default], r.points[r.chosen]
            row = {
                "model": name, "target": target, "budget": args.budget, "built": len(r.points),
                "space_size": r.space_size, "front_size": len(r.front), "wall_seconds": round(wall, 1),
                "ranked_by": c.cost_kind,  # instructions, or on Ibex the pipeline-table cycle estimate
                "default": {"variant": d.label, "instructions": d.instructions, "ram": d.ram, "flash": d.flash,
                            "fidelity_loss_lsb": d.fidelity_loss},
                "best": {"variant": c.label, "spec": c.variant, "instructions": c.instructions, "ram": c.ram,
                         "flash": c.flash, "fidelity_loss_lsb": c.fidelity_loss, "verified": c.verified},
                "best_vs_default": round(c.instructions / d.instructions, 3),
                "tflm_instructions": TFLM[target][name],
                "best_vs_tflm": round(c.instructions / TFLM[target][name], 3),
                "default_vs_tflm": round(d.instructions / TFLM[target][name], 3),
                "strategy": strategy,
            }
            small = min((r.points[i] for i in r.front), key=lambda p: (p.ram, p.instructions))
            row["smallest_ram"] = {"variant": small.label, "spec": small.variant, "instructions": small.instructions,
                                   "ram": small.ram, "flash": small.flash, "ram_vs_default": round(small.ram / d.ram, 3),
                                   "instructions_vs_default": round(small.instructions / d.instructions, 3)}
            if r.confirmed:  # true cycles from the RTL model: the default build and the chosen one
                row["default"]["cycles"], row["best"]["cycles"] = d.cycles, c.cycles
                row["best_vs_default_cycles"] = round(c.cycles / d.cycles, 3)
                row["confirmed"] = [{"variant": r.points[i].label, "instructions": r.points[i].instructions,
                                     "cycles": r.points[i].cycles} for i in r.confirmed]
            rows.append(row)
            cycles = f"; cycles {d.cycles:,} -> {c.cycles:,}" if r.confirmed else ""
            print(f"{name:24s} {target:10s} default {d.instructions:>12,} best {c.instructions:>12,} "
                  f"({row['best_vs_default']:.3f}x; "
                  f"{row['best_vs_tflm']:.3f}x TFLM{cycles}) {c.label} [{wall:.0f} s]", flush=True)
    out.write_text(json.dumps({
        "what": "variant search (kernels per layer, schedule, fusion, memory plan) on the int8 MLPerf Tiny models, "
                "every point "
                "built, run in QEMU and verified bit-exact",
        "tinymlaas": __version__, "host": platform.node(), "python": platform.python_version(),
        "strategy": args.strategy, "ibex_strategy": "guided", "seed": args.seed, "workers": args.workers,
        "rows": rows,
    }, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
