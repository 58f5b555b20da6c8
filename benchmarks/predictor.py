"""The learned variant model (predictor.VariantModel) on the int8 MLPerf Tiny models: how well it orders variants it
did not train on, and what the guided search finds with it compared with random search at the same budget.

Usage: python benchmarks/predictor.py [--models DIR] [--targets rv32imac,cortex-m4] [--points 48] [--budget 16]
                                      [--seed 0] [--workers 2] [--out FILE]

Per target, every model's `points` random variants are built, run in QEMU and verified (their exact instructions
are the truth). Written to JSON, side by side:
- held out within a model: fitted on two thirds of its variants, ranking the other third;
- across models: fitted on three models' variants, ranking every variant of the fourth (Spearman, where the truly
  best variant falls in the predicted order as a percentile, pairwise ranking accuracy, peak@1 and @5 = the true
  optimum over the best true cost among the predicted top k);
- guided vs random search with the same budget and seed: the best instructions each found.
The cost is QEMU's exact instruction count: on rv32imac it is the count of the same ELF the Ibex targets run; true
cycles (Ibex, from RTL) only confirm the guided search's best few there (tests/test_search.py), they are too slow
to label hundreds of variants here.
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
from tinymlaas.frontend.cleanup import clean
from tinymlaas.frontend.tflite import load_tflite
from tinymlaas.search.predictor import VariantFeatures, VariantModel, ranking_quality
from tinymlaas.search.search import search
from tinymlaas.search.space import Space, Variant
from tinymlaas.targets import get_target

MODELS = ["kws_ref_model", "vww_96_int8", "pretrainedResnet_quant", "ad01_int8"]


def measured(path: Path, target: str, points: int, seed: int, workers: int) -> tuple[list, list]:
    """Features and instructions (relative to the default build's) of `points` random variants, all built and
    verified."""
    graph = clean(load_tflite(path).graph, shapes_from_interpreter=True)
    featurize = VariantFeatures(graph, Space.of(graph, get_target(target)))
    with tempfile.TemporaryDirectory(prefix="tinymlaas-predictor-") as tmp:
        r = search(path, target, Path(tmp), budget=points, strategy="random", seed=seed, workers=workers)
    ok = [p for p in r.points if p.verified and p.cost]
    base = r.points[r.default].cost  # relative to the default build, as the guided search fits it
    return [featurize(Variant.from_dict(p.variant)) for p in ok], [p.cost / base for p in ok]


def best_of(path: Path, target: str, strategy: str, budget: int, seed: int, workers: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="tinymlaas-predictor-") as tmp:
        started = time.monotonic()
        r = search(path, target, Path(tmp), budget=budget, strategy=strategy, seed=seed, workers=workers)
    return {"best_instructions": r.points[r.chosen].cost, "default_instructions": r.points[r.default].cost,
            "built": len(r.points), "screened": r.screened, "seconds": round(time.monotonic() - started, 1)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default=str(ROOT.parent / "shared" / "models" / "mlperf-tiny"))
    ap.add_argument("--targets", default="rv32imac,cortex-m4")
    ap.add_argument("--points", type=int, default=48)
    ap.add_argument("--budget", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "predictor.json"))
    args = ap.parse_args()
    results = []
    for target in args.targets.split(","):
        data = {}
        for name in MODELS:
            started = time.monotonic()
            data[name] = measured(Path(args.models) / f"{name}.tflite", target, args.points, args.seed, args.workers)
            print(f"{target} {name}: {len(data[name][1])} variants measured [{time.monotonic() - started:.0f} s]",
                  flush=True)
        within, across, searches = {}, {}, {}
        for name, (x, y) in data.items():
            test = list(range(2, len(y), 3))
            train = [i for i in range(len(y)) if i not in test]
            fitted = VariantModel(seed=args.seed).fit([x[i] for i in train], [y[i] for i in train])
            within[name] = ranking_quality(fitted.predict([x[i] for i in test]), [y[i] for i in test])
            others = [m for m in MODELS if m != name]
            fitted = VariantModel(seed=args.seed).fit([f for m in others for f in data[m][0]],
                                                      [c for m in others for c in data[m][1]])
            across[name] = ranking_quality(fitted.predict(x), y)
            path = Path(args.models) / f"{name}.tflite"
            searches[name] = {s: best_of(path, target, s, args.budget, args.seed, args.workers)
                              for s in ("random", "guided")}
            g, r = searches[name]["guided"], searches[name]["random"]
            searches[name]["guided_vs_random"] = round(g["best_instructions"] / r["best_instructions"], 4)
            print(f"{target} {name}: within {within[name]}\n  across {across[name]}\n  guided "
                  f"{g['best_instructions']:,} vs random {r['best_instructions']:,} at budget {args.budget}",
                  flush=True)
        mean = {k: round(sum(q[k] for q in across.values()) / len(across), 4)
                for k in ("spearman", "best_percentile", "pairwise_accuracy", "peak@1", "peak@5")}
        results.append({"target": target, "variants_per_model": {m: len(d[1]) for m, d in data.items()},
                        "held_out_within_model": within, "held_out_model": across, "held_out_model_mean": mean,
                        "search_at_budget": searches})
    out = Path(args.out)
    out.write_text(json.dumps({
        "what": "the learned variant model ranking variants it did not train on (cost: exact QEMU instructions of "
                "built and verified variants), and guided vs random search at the same budget",
        "tinymlaas": __version__, "host": platform.node(), "python": platform.python_version(),
        "points_per_model": args.points, "search_budget": args.budget, "seed": args.seed, "results": results,
    }, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
