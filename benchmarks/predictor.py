"""The learned runtime predictors on the int8 MLPerf Tiny models: how well they order variants of a model they did
not train on, and what the guided search finds compared with random search at the same budget.

Usage: python benchmarks/predictor.py [--models DIR] [--targets rv32imac,cortex-m4] [--points 48] [--budget 16]
                                      [--seed 0] [--workers 2] [--ibex 24] [--out FILE]

Per target, every model's `points` random variants are built, run in QEMU and verified (their exact instructions
are the truth), and a handful of variants per model are profiled layer by layer (each implementation on every
layer, TIR under each schedule, no fusion). Written to JSON, side by side:
- across models, two predictors fitted on three models and ranking every variant of the fourth: the layer
  predictor (predictor.Predictor on the profiled layers, a variant's cost the sum of its layers': LayerwiseCost)
  and the variant model (predictor.VariantModel on the other models' variants' shares of MACs per implementation);
  Spearman, where the truly best variant falls in the predicted order as a percentile, pairwise ranking accuracy,
  peak@1 and @5 (the true optimum over the best true cost among the predicted top k);
- held out within a model: the variant model fitted on two thirds of its variants, ranking the other third;
- guided vs random search with the same budget and seed: the best instructions each found;
- --ibex N (ibex-small, true cycles from the RTL): the layer predictor fitted on the other models' layers profiled on
  Ibex (true cycles per layer) ranks N random variants of KWS and AD01 each run on Ibex: where the variant with the
  fewest true cycles falls in the predicted order.
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
from tinymlaas.backends.mcu.profile import profile_model
from tinymlaas.build.request import BuildRequest
from tinymlaas.frontend.cleanup import clean
from tinymlaas.frontend.tflite import load_tflite
from tinymlaas.search.evaluate import Job, evaluate
from tinymlaas.search.predictor import LayerwiseCost, Predictor, VariantFeatures, VariantModel, profile_samples, ranking_quality
from tinymlaas.search.search import search
from tinymlaas.search.space import Space, Variant
from tinymlaas.targets import get_target

MODELS = ["kws_ref_model", "vww_96_int8", "pretrainedResnet_quant", "ad01_int8"]
IBEX_HELD_OUT = ["kws_ref_model", "ad01_int8"]  # the two whose variants Ibex runs in minutes


def graph_and_space(path: Path, target: str):
    graph = clean(load_tflite(path).graph, shapes_from_interpreter=True)
    return graph, Space.of(graph, get_target(target))


def measured(path: Path, target: str, points: int, seed: int, workers: int) -> tuple[list, list, list]:
    """Variants, their features and instructions (relative to the default build's) of `points` random variants,
    all built and verified."""
    graph, space = graph_and_space(path, target)
    featurize = VariantFeatures(graph, space)
    with tempfile.TemporaryDirectory(prefix="tinymlaas-predictor-") as tmp:
        r = search(path, target, Path(tmp), BuildRequest(budget=points, strategy="random", seed=seed, workers=workers))
    ok = [p for p in r.points if p.verified and p.cost]
    base = r.points[r.default].cost  # relative to the default build, as the guided search fits it
    variants = [Variant.from_dict(p.variant) for p in ok]
    return variants, [featurize(v) for v in variants], [p.cost / base for p in ok]


def _profile(job):
    path, target, variant = job
    with tempfile.TemporaryDirectory(prefix="tinymlaas-predictor-") as tmp:
        prof = profile_model(path, target, Path(tmp), variant=variant)
    if not prof.verified:
        raise RuntimeError(f"{path.name} {variant.short()} on {target}: the profiled build is not bit-exact")
    return profile_samples(prof, get_target(target).core, path.stem)


def layers_profiled(path: Path, target: str, schedules: bool, workers: int) -> list:
    """Per-layer samples (instructions; true cycles on Ibex) of the profiled variants of one model."""
    from concurrent.futures import ProcessPoolExecutor

    _, space = graph_and_space(path, target)
    jobs = [(path, target, v) for v in space.profiled(schedules)]
    with ProcessPoolExecutor(workers) as pool:
        return [s for samples in pool.map(_profile, jobs) for s in samples]


def layerwise_ranking(train: list, path: Path, target: str, variants: list, truth: list, label: str) -> dict:
    graph, _ = graph_and_space(path, target)
    predictor = Predictor(use_qemu=False, label=label).fit(train)
    return ranking_quality(LayerwiseCost(predictor, graph, get_target(target))(variants), truth)


def ibex_truth(path: Path, points: int, seed: int, workers: int) -> tuple[list, list]:
    """`points` variants of one model (the default, each implementation everywhere, then random ones) built for
    ibex-small and run on the RTL model: their true cycles."""
    from concurrent.futures import ProcessPoolExecutor

    import numpy as np

    _, space = graph_and_space(path, "ibex-small")
    rng = np.random.default_rng(seed)
    variants = space.profiled(schedules=False)
    for _ in range(100 * points):
        if len(variants) >= points:
            break
        v = space.sample(rng)
        if v not in variants:
            variants.append(v)
    with tempfile.TemporaryDirectory(prefix="tinymlaas-predictor-") as tmp, ProcessPoolExecutor(workers) as pool:
        points_ = list(pool.map(evaluate, [Job(str(path), "ibex-small", v.to_dict(), str(Path(tmp) / f"v{k}"), 1, seed)
                                           for k, v in enumerate(variants)]))
    ok = [(v, p.cycles) for v, p in zip(variants, points_) if p.verified and p.cycles]
    return [v for v, _ in ok], [c for _, c in ok]


def best_of(path: Path, target: str, strategy: str, budget: int, seed: int, workers: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="tinymlaas-predictor-") as tmp:
        started = time.monotonic()
        r = search(path, target, Path(tmp), BuildRequest(budget=budget, strategy=strategy, seed=seed, workers=workers))
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
    ap.add_argument("--ibex", type=int, default=0, help="variants per held-out model run on Ibex (0: none)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "predictor.json"))
    args = ap.parse_args()
    models = {name: Path(args.models) / f"{name}.tflite" for name in MODELS}
    results = []
    for target in [t for t in args.targets.split(",") if t]:
        data, layers = {}, {}
        for name, path in models.items():
            started = time.monotonic()
            data[name] = measured(path, target, args.points, args.seed, args.workers)
            layers[name] = layers_profiled(path, target, True, args.workers)
            print(f"{target} {name}: {len(data[name][2])} variants measured, {len(layers[name])} layers profiled "
                  f"[{time.monotonic() - started:.0f} s]", flush=True)
        within, across, layerwise, searches = {}, {}, {}, {}
        for name, (variants, x, y) in data.items():
            test = list(range(2, len(y), 3))
            train = [i for i in range(len(y)) if i not in test]
            fitted = VariantModel(seed=args.seed).fit([x[i] for i in train], [y[i] for i in train])
            within[name] = ranking_quality(fitted.predict([x[i] for i in test]), [y[i] for i in test])
            others = [m for m in MODELS if m != name]
            fitted = VariantModel(seed=args.seed).fit([f for m in others for f in data[m][1]],
                                                      [c for m in others for c in data[m][2]])
            across[name] = ranking_quality(fitted.predict(x), y)
            layerwise[name] = layerwise_ranking([s for m in others for s in layers[m]], models[name], target,
                                                variants, y, "instructions")
            searches[name] = {s: best_of(models[name], target, s, args.budget, args.seed, args.workers)
                              for s in ("random", "guided")}
            g, r = searches[name]["guided"], searches[name]["random"]
            searches[name]["guided_vs_random"] = round(g["best_instructions"] / r["best_instructions"], 4)
            print(f"{target} {name}: layer predictor {layerwise[name]}\n  variant model {across[name]}\n  guided "
                  f"{g['best_instructions']:,} vs random {r['best_instructions']:,} at budget {args.budget}",
                  flush=True)
        results.append({"target": target, "cost": "instructions (QEMU)",
                        "variants_per_model": {m: len(d[2]) for m, d in data.items()},
                        "layers_profiled_per_model": {m: len(v) for m, v in layers.items()},
                        "held_out_model_layer_predictor": layerwise, "held_out_model_layer_predictor_mean": mean(layerwise),
                        "held_out_model_variant_model": across, "held_out_model_variant_model_mean": mean(across),
                        "held_out_within_model_variant_model": within, "search_at_budget": searches})
    if args.ibex:
        layers = {}
        for name, path in models.items():
            started = time.monotonic()
            layers[name] = layers_profiled(path, "ibex-small", False, args.workers)
            print(f"ibex-small {name}: {len(layers[name])} layers profiled [{time.monotonic() - started:.0f} s]",
                  flush=True)
        held = {}
        for name in IBEX_HELD_OUT:
            started = time.monotonic()
            variants, cycles = ibex_truth(models[name], args.ibex, args.seed, args.workers)
            held[name] = layerwise_ranking([s for m in MODELS if m != name for s in layers[m]], models[name],
                                           "ibex-small", variants, cycles, "cycles")
            held[name]["ibex_seconds"] = round(time.monotonic() - started, 1)
            print(f"ibex-small {name}: {held[name]}", flush=True)
        results.append({"target": "ibex-small", "cost": "true cycles (Ibex RTL, Verilator)",
                        "layers_profiled_per_model": {m: len(v) for m, v in layers.items()},
                        "held_out_model_layer_predictor": held, "held_out_model_layer_predictor_mean": mean(held)})
    out = Path(args.out)
    out.write_text(json.dumps({
        "what": "learned predictors ranking variants of a model they did not train on (cost: exact QEMU "
                "instructions of built and verified variants; on ibex-small true cycles from the RTL), and guided "
                "vs random search at the same budget",
        "tinymlaas": __version__, "host": platform.node(), "python": platform.python_version(),
        "points_per_model": args.points, "search_budget": args.budget, "ibex_points": args.ibex, "seed": args.seed,
        "results": results,
    }, indent=1) + "\n")
    print(f"wrote {out}")


def mean(quality: dict) -> dict:
    keys = ("spearman", "best_percentile", "pairwise_accuracy", "peak@1", "peak@5")
    return {k: round(sum(q[k] for q in quality.values()) / len(quality), 4) for k in keys} if quality else {}


if __name__ == "__main__":
    main()
