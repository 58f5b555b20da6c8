"""Layer-by-layer schedule tuning of the MLPerf Tiny int8 models: what the "tune" strategy reaches per target, what
its predictor is worth on a model it never saw, and what the tuning log saves. One JSON (and plots) per run.

Usage: python benchmarks/tuning.py [--models DIR] [--targets cortex-m4,rv32imac] [--budget 24] [--reference 100]
                                   [--ibex kws_ref_model,ad01_int8] [--only MODELS] [--append]
                                   [--out benchmarks/results/tuning.json]

Per target, the models are tuned one after another on one fresh tuning log (the anomaly detector, VWW and the
ResNet first, KWS last: KWS is tuned with what the log learned from the others). Costs: estimated cycles on
Cortex-M (llvm-mca's pipeline model x QEMU's exact block counts, zero flash wait states), exact instructions on
RV32; each row's best variant is the spec `tinymlaas compile --variant` takes, built and verified bit-exact.
The rv32imac variants are also run on the Ibex RTL (ibex-maxperf, Verilator) for true cycles, for the models given
to --ibex (about 0.2 M simulated instructions per second).

The predictor block: KWS tuned again on a log of its own with "tune-random" and --reference profiled builds (a
large random sample of every KWS layer's space, measured); the schedule predictor trained only on the other models'
records ranks those samples. Those records: the guided runs' (mostly near their layers' best) and --explore
random builds of each other model on a log of their own (what a worker exploring a fleet's models between builds
adds: samples from the whole space, which ranking a new model's layers needs). Reported per layer: where the truly best sample lands in the predicted order, pairwise
ranking accuracy; and the guided KWS run's tuned-layer cost against the reference's best, with its builds.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from mlperf_tiny import RECORDS

from tinymlaas import __version__
from tinymlaas.build.pipeline import compile_model
from tinymlaas.build.request import BuildRequest
from tinymlaas.frontend.cleanup import clean
from tinymlaas.frontend.tflite import load_tflite
from tinymlaas.search.search import search
from tinymlaas.search.space import Variant
from tinymlaas.targets import get_target

ORDER = ["ad01_int8", "vww_96_int8", "pretrainedResnet_quant", "kws_ref_model"]
HELD_OUT = "kws_ref_model"


def macs(model_path: Path) -> int:
    from tinymlaas.search.features import layer_features

    graph = clean(load_tflite(model_path).graph, shapes_from_interpreter=True)
    return sum(layer_features(graph, op)["macs"] for op in graph.operators)


def tune(model_path: Path, target: str, work: Path, budget: int, strategy: str = "tune", seed: int = 0):
    started = time.monotonic()
    result = search(model_path, target, work, BuildRequest(strategy=strategy, budget=budget, seed=seed,
                                                           workers=min(os.cpu_count() or 1, 2), inputs=1))
    seconds = round(time.monotonic() - started, 1)
    history = json.loads((work / "tuning_history.json").read_text()) if (work / "tuning_history.json").exists() \
        else {"history": [], "layers": []}
    return result, history, seconds


def cost_fields(point) -> dict:
    kind = "estimate" if "estimate" in point.cost_kind else "true" if point.cycles is not None else "instructions"
    return {"instructions": point.instructions, "cycles": point.cost if kind != "instructions" else None,
            "cycles_kind": kind if kind != "instructions" else None}


def row_of(model: str, target: str, result, history: dict, seconds: float, n_macs: int) -> dict:
    pts = result.points
    default, best = pts[0], pts[result.chosen]
    t = get_target(target)
    out = {"model": model, "target": target, "macs": n_macs, "cost_kind": best.cost_kind,
           "default": cost_fields(default), "best": {**cost_fields(best), "cost": best.cost,
                                                        "variant": best.variant,
                                                        "label": best.label, "verified": best.verified,
                                                        "max_lsb_diff": best.fidelity_loss,
                                                        "flash": best.flash, "ram": best.ram},
           "ratio_to_default": round(best.cost / default.cost, 4),
           "instructions_per_mac": {"default": round(default.instructions / n_macs, 3),
                                    "best": round(best.instructions / n_macs, 3)},
           "wall_seconds": seconds, "profiled_builds": len(history["history"]), "notes": result.notes,
           "layers": history["layers"]}
    record = RECORDS.get(target, {}).get(model)
    if record and best.cost is not None and "estimate" in best.cost_kind:
        out["vs_best_published"] = {"record_cycles": record["cycles"], "by": record["by"],
                                    "ratio": round(best.cost / record["cycles"], 3),
                                    "latency_ms_estimate": round(best.cost / t.board.clock_hz * 1e3, 2)}
    return out


def ibex_cycles(model_path: Path, variant: dict, work: Path) -> dict:
    r = compile_model(model_path, "ibex-maxperf", work, BuildRequest(inputs=1, variant=Variant.from_dict(variant)))
    return {"target": "ibex-maxperf", "instructions": r.instructions, "cycles": r.cycles, "verified": r.verified,
            "cycles_source": r.cycles_source}


def predictor_figures(target: str, reference_rows: list[dict], training_rows: list[dict], by_estimate: bool) -> dict:
    """How the predictor trained on the other models ranks the reference's random samples of each KWS layer."""
    import numpy as np

    from tinymlaas.search.tuning import SchedulePredictor, cost_of, training_samples

    train = training_samples(training_rows, by_estimate, exclude_model=HELD_OUT)
    predictor = SchedulePredictor(0).fit(train)
    layers = {}
    for r in reference_rows:
        if r["schedule"] is not None and cost_of(r, by_estimate):
            layers.setdefault(json.dumps(r["layer"], sort_keys=True), []).append(r)
    figures = []
    for key, rows in layers.items():
        shape = training_samples(rows[:1], by_estimate)[0][0]
        samples = training_samples(rows, by_estimate)
        truth = np.array([c for _, _, c in samples])
        predicted = predictor.predict(shape, [s for _, s, _ in samples])
        order = np.argsort(predicted, kind="stable")
        best_rank = int(np.where(order == int(np.argmin(truth)))[0][0])
        i, j = np.triu_indices(len(truth), 1)
        differ = truth[i] != truth[j]
        pairwise = float(np.mean(np.sign(predicted[i] - predicted[j])[differ] == np.sign(truth[i] - truth[j])[differ]))
        layer = json.loads(key)
        figures.append({"layer": {k: layer[k] for k in ("opcode", "input", "weights", "output")},
                        "samples": len(truth), "true_best_rank": best_rank,
                        "true_best_percentile": round(100 * best_rank / len(truth), 1),
                        "predicted_best_regret": round(float(truth[order[0]] / truth.min() - 1), 4),
                        # built in the predicted order, the samples it takes to reach 1.03x the best of them (a
                        # seeded random order takes about (samples + 1) / (those within 3% + 1))
                        "picks_within_3pct": int(np.argmax(truth[order] <= 1.03 * truth.min())) + 1,
                        "pairwise_accuracy": round(pairwise, 3)})
    return {"trained_on": sorted({r["model_name"] for r in training_rows} - {HELD_OUT}),
            "training_rows": len(train), "held_out_model": HELD_OUT, "layers": figures,
            "mean_pairwise_accuracy": round(float(np.mean([f["pairwise_accuracy"] for f in figures])), 3),
            "worst_true_best_percentile": max(f["true_best_percentile"] for f in figures),
            "most_picks_within_3pct": max(f["picks_within_3pct"] for f in figures)}


def plot(doc: dict, out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for target in doc["targets"]:
        rows = [r for r in doc["rows"] if r["target"] == target]
        fig, ax = plt.subplots(figsize=(7, 3.6))
        names = [r["model"].replace("_int8", "").replace("_ref_model", "").replace("pretrainedResnet_quant", "ic")
                 for r in rows]
        key = "cycles" if all(r["best"]["cycles"] is not None for r in rows) else "instructions"
        x = range(len(rows))
        ax.bar([i - 0.27 for i in x], [r["default"][key] / 1e6 for r in rows], 0.27, label="default build")
        ax.bar(list(x), [r["best"][key] / 1e6 for r in rows], 0.27, label="tuned")
        recs = [r.get("vs_best_published", {}).get("record_cycles") for r in rows]
        if any(recs):
            ax.bar([i + 0.27 for i in x], [(v or 0) / 1e6 for v in recs], 0.27, label="best published")
        ax.set_xticks(list(x), names)
        ax.set_ylabel(f"M {key}" + (" (estimate)" if key == "cycles" and target.startswith("cortex") else ""))
        ax.set_title(f"Layer-by-layer tuning on {target}")
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = out.parent / f"tuning_{target}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path.name)
    pred = doc.get("predictor", {})
    if pred:
        fig, ax = plt.subplots(figsize=(7, 3.6))
        for target, block in pred.items():
            for name in ("guided", "random"):
                hist = [h["tuned_layers_cost"] for h in block["convergence"][name] if h["tuned_layers_cost"]]
                if hist:
                    ax.plot(range(1, len(hist) + 1), [v / hist[0] for v in hist], label=f"{target} {name}")
        ax.set_xlabel("profiled builds")
        ax.set_ylabel("tuned layers' cost / first build's")
        ax.set_title(f"{HELD_OUT}: predictor-guided vs random candidates")
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = out.parent / "tuning_convergence.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path.name)
    return written


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=str(ROOT.parent / "shared" / "models" / "mlperf-tiny"))
    parser.add_argument("--targets", default="cortex-m4,rv32imac")
    parser.add_argument("--budget", type=int, default=24, help="builds per model (profiled + the two points)")
    parser.add_argument("--reference", type=int, default=100, help="tune-random builds of the held-out model")
    parser.add_argument("--explore", type=int, default=24, help="tune-random builds of each other model, for the "
                        "predictor's training records (0: the guided runs' records only)")
    parser.add_argument("--ibex", default="kws_ref_model,ad01_int8", help="models whose rv32imac variants run on "
                        "the Ibex RTL ('' for none)")
    parser.add_argument("--only", default=",".join(ORDER), help="the models, in tuning order (the held-out one last)")
    parser.add_argument("--append", action="store_true", help="add these targets to the rows already in --out")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "tuning.json"))
    parser.add_argument("--dump", default="", help="a folder: every target's measured records (training, explore, "
                        "reference) and histories written there as TARGET.json, to study the predictor offline")
    parser.add_argument("--refigure", default="", help="a --dump folder: no build; the predictor figures of --targets "
                        "in --out computed again from that run's records (after a change to the predictor or to "
                        "what is reported)")
    args = parser.parse_args()
    models_dir, out = Path(args.models), Path(args.out)
    targets = [t for t in args.targets.split(",") if t]
    measured = list(targets)  # what this run tunes (with --append, `targets` also lists those kept)
    rows, predictor, reuse, runs = [], {}, {}, {}
    started = time.monotonic()
    if args.refigure:
        doc = json.loads(out.read_text())
        for target in targets:
            d = json.loads((Path(args.refigure) / f"{target}.json").read_text())
            fresh = predictor_figures(target, d["reference_rows"], d["training_rows"] + d["explored_rows"],
                                      d["by_estimate"])
            doc["predictor"][target].update({k: fresh[k] for k in ("layers", "mean_pairwise_accuracy",
                                                                   "worst_true_best_percentile",
                                                                   "most_picks_within_3pct")})
        out.write_text(json.dumps(doc, indent=1) + "\n")
        return 0
    if args.append and out.exists():  # more targets into an existing run's file
        before = json.loads(out.read_text())
        rows = [r for r in before["rows"] if r["target"] not in targets]
        predictor = {t: v for t, v in before.get("predictor", {}).items() if t not in targets}
        reuse = {t: v for t, v in before.get("reuse", {}).items() if t not in targets}
        runs = {}  # earlier runs, less the targets tuned again (a run of several keeps its others' record)
        for k, v in before.get("runs", {}).items():
            kept = [t for t in k.split(", ") if t not in targets]
            if kept:
                runs[", ".join(kept)] = v
        targets = [t for t in before["targets"] if t not in targets] + targets
        rows.sort(key=lambda r: targets.index(r["target"]))

    def write() -> dict:  # after every target: a run cut short keeps what it measured
        doc = {"benchmark": "tuning", "tinymlaas_version": __version__,
               "host": {"machine": platform.machine(), "cpus": os.cpu_count(), "python": platform.python_version()},
               "targets": [t for t in targets if any(r["target"] == t for r in rows)],
               "budget_per_model": args.budget, "seconds": round(time.monotonic() - started, 1),
               "cost": {"arm": "estimated cycles: llvm-mca's model of the core (on Cortex-M3/M4 with the Technical "
                        "Reference Manual's load/store timing) x QEMU's per-block counts, zero flash wait states "
                        "(tinymlaas.measure.cycles)", "riscv": "exact instructions (QEMU)"},
               "rows": rows, "reuse": reuse, "predictor": predictor,
               "runs": {**runs, ", ".join(measured): {"date": time.strftime("%Y-%m-%d"), "models": args.only,
                                                      "seconds": round(time.monotonic() - started, 1)}}}
        out.write_text(json.dumps(doc, indent=1) + "\n")
        return doc

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for target in measured:
            by_estimate = get_target(target).arch == "arm"
            os.environ["TINYMLAAS_MEASUREMENTS"] = str(tmp / f"log-{target}.db")  # the tuning log of this target
            for model in args.only.split(","):
                path = models_dir / f"{model}.tflite"
                print(f"{target} {model} ...", file=sys.stderr, flush=True)
                result, history, seconds = tune(path, target, tmp / target / model, args.budget)
                row = row_of(model, target, result, history, seconds, macs(path))
                if target == "rv32imac" and model in args.ibex.split(","):  # true cycles of the same variants
                    row["ibex"] = {"default": ibex_cycles(path, result.points[0].variant, tmp / "ibex" / f"{model}-d"),
                                   "best": ibex_cycles(path, row["best"]["variant"], tmp / "ibex" / f"{model}-b")}
                    for which in ("default", "best"):
                        row[which]["cycles"] = row["ibex"][which]["cycles"]
                        row[which]["cycles_kind"] = "true (ibex-maxperf RTL)"
                rows.append(row)
                print(f"  {row['ratio_to_default']}x the default in {seconds} s", file=sys.stderr, flush=True)
                if model == HELD_OUT:
                    guided_history, guided_baseline = history["history"], history.get("baseline_builds")
            # the log again: the same model costs no search now
            again, again_history, again_seconds = tune(models_dir / f"{HELD_OUT}.tflite", target,
                                                       tmp / target / "again", args.budget)
            first = next(r for r in rows if r["target"] == target and r["model"] == HELD_OUT)
            reuse[target] = {"model": HELD_OUT, "first_seconds": first["wall_seconds"],
                             "first_profiled_builds": first["profiled_builds"], "again_seconds": again_seconds,
                             "again_profiled_builds": len(again_history["history"]),
                             "same_best": again.points[again.chosen].cost == first["best"]["cost"]}
            from tinymlaas.measure.tuning_log import TuningLog
            from tinymlaas.search.tuning import log_target

            logged_as = log_target(get_target(target))
            training_rows = TuningLog().rows(logged_as)
            explored_rows, explore_seconds = [], 0.0
            if args.explore:  # random samples of the other models' layers, on a log of their own
                os.environ["TINYMLAAS_MEASUREMENTS"] = str(tmp / f"explore-{target}.db")
                for model in (m for m in args.only.split(",") if m != HELD_OUT):
                    print(f"{target} explore {model} ({args.explore} random builds) ...", file=sys.stderr, flush=True)
                    _, _, seconds = tune(models_dir / f"{model}.tflite", target, tmp / target / f"explore-{model}",
                                         args.explore, strategy="tune-random", seed=1)
                    explore_seconds += seconds
                explored_rows = TuningLog().rows(logged_as)
            # the reference: a large random sample of every KWS layer, on a log of its own
            os.environ["TINYMLAAS_MEASUREMENTS"] = str(tmp / f"reference-{target}.db")
            print(f"{target} reference ({args.reference} random builds) ...", file=sys.stderr, flush=True)
            _, ref_history, ref_seconds = tune(models_dir / f"{HELD_OUT}.tflite", target, tmp / target / "ref",
                                                 args.reference, strategy="tune-random")
            reference_rows = TuningLog().rows(logged_as)
            block = predictor_figures(target, reference_rows, training_rows + explored_rows, by_estimate)
            if args.dump:
                Path(args.dump).mkdir(parents=True, exist_ok=True)
                (Path(args.dump) / f"{target}.json").write_text(json.dumps(
                    {"by_estimate": by_estimate, "training_rows": training_rows, "explored_rows": explored_rows,
                     "reference_rows": reference_rows, "guided_history": guided_history,
                     "reference_history": ref_history["history"], "baseline_builds": guided_baseline}))
            block["training"] = {"guided_rows": len(training_rows), "explored_rows": len(explored_rows),
                                 "explore_builds_per_model": args.explore, "explore_seconds": round(explore_seconds, 1)}
            ref_best = ref_history["history"][-1]["tuned_layers_cost"]
            guided_best = guided_history[-1]["tuned_layers_cost"]
            ref_builds = len(ref_history["history"])
            within = next((h["build"] for h in guided_history
                           if h["tuned_layers_cost"] and h["tuned_layers_cost"] <= 1.03 * ref_best), None)
            block.update({
                "reference": {"strategy": "tune-random", "profiled_builds": ref_builds,
                              "tuned_layers_cost": ref_best, "wall_seconds": ref_seconds,
                              "baseline_builds": ref_history.get("baseline_builds")},
                "guided": {"profiled_builds": len(guided_history), "tuned_layers_cost": guided_best,
                           "vs_reference": round(guided_best / ref_best, 4),
                           "builds_share": round(len(guided_history) / ref_builds, 3),
                           # the first build whose tuned layers cost at most 1.03x the reference's best, and
                           # what share of the reference's builds that is (the first baseline_builds are the
                           # same fixed candidates in both runs: C kernels, plain TIR, register-blocked seeds)
                           "builds_within_3pct": within,
                           "within_3pct_share": round(within / ref_builds, 3) if within else None,
                           "baseline_builds": guided_baseline},
                "convergence": {"guided": guided_history, "random": ref_history["history"]}})
            predictor[target] = block
            write()
    doc = write()
    doc["plots"] = plot(doc, out)
    out.write_text(json.dumps(doc, indent=1) + "\n")
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
