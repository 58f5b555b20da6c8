"""The learned runtime predictor: a layer's features -> cycles on a core, gradient-boosted trees (LightGBM).

Trained from the measurement database (tinymlaas.measure.database): per-layer rows with their static features
(operator, precision, kernel variant, shapes, bytes, MACs, loop geometry), the schedule and fusion they were built
with, the core, and optionally QEMU's exact statistics (instructions, memory accesses) when a candidate has been
built. The label is cycles (or QEMU's instructions, where those are the cost); rows measured on a device weigh more
than true cycles from RTL simulation, and those more than estimates ("device outranks estimate").
A variant's predicted cost is the sum of its layers' (LayerwiseCost): layers of one shape cost the same in any
model, so what is learned on some models ranks the variants of another.
"""

from __future__ import annotations

import functools
import json
import math
from dataclasses import dataclass, field

import numpy as np

from tinymlaas.search.features import GEOMETRY

WEIGHTS = {"device": 4.0, "true": 2.0, "estimate": 1.0}
CATEGORICAL = ("core", "opcode", "precision", "implementation")
NUMERIC = ("macs", "bytes_in", "bytes_out", "const_bytes", "output_elements", *GEOMETRY)
QEMU = ("instructions", "memory_accesses")
LABELS = ("cycles", "instructions")
C_KERNELS = ("dsp", "dsp16", "c")  # our C micro-kernels: what a TIR schedule does not touch


@dataclass(frozen=True)
class Sample:
    """One layer on one core: what the predictor sees, and (for training) what was measured."""
    core: str
    features: dict
    implementation: str | None = None
    instructions: int | None = None
    memory_accesses: int | None = None
    cycles: float | None = None
    cycles_kind: str | None = None
    model_hash: str | None = None
    schedule: dict | None = None  # the variant's schedule parameters and fusion policy (None: the defaults)

    @classmethod
    def from_row(cls, row) -> Sample:
        return cls(core=row.core, features=row.features or {}, implementation=row.implementation,
                   instructions=row.instructions, memory_accesses=row.memory_accesses, cycles=row.cycles,
                   cycles_kind=row.cycles_kind, model_hash=row.model_hash, schedule=row.schedule)

    def label(self, kind: str) -> float | None:
        return self.cycles if kind == "cycles" else self.instructions


@dataclass
class Predictor:
    """use_qemu: also learn from the exact instruction and memory-access counts (a built candidate); label: what is
    predicted, cycles or QEMU's instructions (the cost on targets without a cycle model)."""
    use_qemu: bool = True
    label: str = "cycles"
    categories: dict = field(default_factory=dict)  # categorical column -> its values, in code order
    booster: object = None

    def _row(self, s: Sample) -> list[float]:
        f = s.features
        values = {"core": s.core, "opcode": f.get("opcode"), "precision": f.get("precision"),
                  "implementation": s.implementation}
        row = [float(self.categories[c].index(values[c])) if values[c] in self.categories[c] else math.nan
               for c in CATEGORICAL]
        row += [math.log1p(float(f.get(k) or 0)) for k in NUMERIC]
        sched = {} if s.implementation in C_KERNELS else s.schedule or {}  # the schedule shapes TIR loops only
        row += [float(bool(sched.get("decompose_init"))), float(sched.get("unroll") or 0),
                float((s.schedule or {}).get("fusion") == "none")]
        if self.use_qemu:
            row += [math.log1p(float(getattr(s, k))) if getattr(s, k) is not None else math.nan for k in QEMU]
        return row

    def _matrix(self, samples) -> np.ndarray:
        return np.array([self._row(s) for s in samples], dtype=np.float64)

    def fit(self, samples: list[Sample], rounds: int = 300, seed: int = 0) -> Predictor:
        import lightgbm as lgb

        if self.label not in LABELS:
            raise ValueError(f"label {self.label!r}: one of {', '.join(LABELS)}")
        samples = [s for s in samples if (s.label(self.label) or 0) > 0 and s.features]
        if len(samples) < 8:
            raise ValueError(f"{len(samples)} measured layers: too few to learn from (at least 8)")
        self.categories = {c: sorted({v for v in (_category(s, c) for s in samples) if v is not None})
                           for c in CATEGORICAL}
        data = lgb.Dataset(self._matrix(samples), label=np.log([s.label(self.label) for s in samples]),
                           weight=[WEIGHTS.get(s.cycles_kind, 1.0) for s in samples],
                           categorical_feature=list(range(len(CATEGORICAL))), free_raw_data=False)
        params = {"objective": "regression", "learning_rate": 0.05, "num_leaves": 15, "min_data_in_leaf": 2,
                  "min_data_per_group": 1, "cat_smooth": 1, "verbose": -1, "seed": seed, "deterministic": True,
                  "num_threads": 1}
        self.booster = lgb.train(params, data, num_boost_round=rounds)
        return self

    def predict(self, samples: list[Sample]) -> np.ndarray:
        """Predicted cycles (or instructions) per sample."""
        if self.booster is None:
            raise ValueError("the predictor is not trained")
        return np.exp(self.booster.predict(self._matrix(samples)))

    def rank(self, candidates: list[list[Sample]]) -> list[int]:
        """Candidate builds (each a list of its layers) in order of predicted cycles, fastest first."""
        totals = [float(self.predict(layers).sum()) for layers in candidates]
        return sorted(range(len(candidates)), key=totals.__getitem__)


def _category(s: Sample, column: str):
    return {"core": s.core, "opcode": s.features.get("opcode"), "precision": s.features.get("precision"),
            "implementation": s.implementation}[column]


def layer_samples(rows, cycles_kinds=("true", "device")) -> list[Sample]:
    """Per-layer measurements (with features) of the given kinds, from measurement-database rows."""
    return [Sample.from_row(r) for r in rows
            if r.layer is not None and r.features and r.cycles_kind in cycles_kinds and r.cycles]


def profile_samples(profile, core: str, model_hash: str | None = None, cycles: str = "true") -> list[Sample]:
    """The layers of a backends.mcu.profile.Profile as samples, with the schedule and fusion of the variant profiled:
    instructions always, and as cycles the true ones (where the core was simulated from its RTL) or, with
    cycles="estimate", the pipeline-table estimate."""
    variant = profile.variant or {}
    schedule = {**variant.get("schedule", {}), "fusion": variant.get("fusion", "default")}
    out = []
    for s in profile.steps:
        if s.features:
            c = s.cycles_estimate if cycles == "estimate" else s.cycles
            out.append(Sample(core, s.features, s.implementation, s.instructions, s.memory_accesses, c,
                              cycles if c is not None else None, model_hash or profile.model, schedule))
    return out


class LayerwiseCost:
    """A variant's predicted cost from static features alone: the sum over the model's operators of the layer
    predictor's cost for the implementation the variant gives each, under its schedule and fusion."""

    def __init__(self, predictor: Predictor, graph, target):
        from tinymlaas.search.features import layer_features

        self.predictor, self.graph, self.target = predictor, graph, target
        self.features = {op.index: layer_features(graph, op) for op in graph.operators}

    def samples(self, variant) -> list[Sample]:
        from tinymlaas.frontend.to_relax import implementations

        chosen = implementations(self.graph, self.target, dict(variant.kernels))
        schedule = {**variant.schedule.to_dict(), "fusion": variant.fusion}
        return [Sample(self.target.core, f, chosen.get(i), schedule=schedule) for i, f in self.features.items()]

    def __call__(self, variants) -> np.ndarray:
        """Predicted cost of each variant."""
        rows = [self.samples(v) for v in variants]
        flat = self.predictor.predict([s for r in rows for s in r])
        return np.add.reduceat(flat, np.cumsum([0] + [len(r) for r in rows[:-1]]))


# The variant-level model: what the search's guided strategy screens candidates with. Its features do not name the
# model: the shares of the model's MACs, bytes and layers each kernel implementation takes, the model's size, the
# schedule and the fusion policy; its label is the cost relative to the model's default build. So it can learn
# across models (benchmarks/predictor.py measures that).
IMPLEMENTATIONS = ("tir", "dsp", "dsp16", "c", "relax", "lut", "interpolated")


class VariantFeatures:
    """Features of any Variant of one model's Space, from the layers' static features (computed once)."""

    def __init__(self, graph, space):
        from tinymlaas.search.features import layer_features

        ops = {op.index: op for op in graph.operators}
        self.space = space
        self.layers = [layer_features(graph, ops[layer.op_index]) for layer in space.layers]
        every = [layer_features(graph, op) for op in graph.operators]
        self.totals = (max(1.0, float(sum(f["macs"] for f in every))),
                       max(1.0, float(sum(f["bytes_in"] + f["bytes_out"] + f["const_bytes"] for f in every))),
                       float(len(every)))

    def names(self) -> list[str]:
        per_impl = [f"{k}_share_{impl}" for impl in IMPLEMENTATIONS for k in ("macs", "bytes", "layers")]
        return per_impl + ["log_macs", "log_bytes", "operators", "decompose_init", "unroll", "no_fusion", "in_place"]

    def __call__(self, variant) -> list[float]:
        chosen = dict(variant.kernels)
        sums = {impl: [0.0, 0.0, 0.0] for impl in IMPLEMENTATIONS}
        for layer, f in zip(self.space.layers, self.layers):
            impl = chosen.get(layer.op_index, layer.choices[0])
            if impl in sums:
                s = sums[impl]
                s[0] += f["macs"]
                s[1] += f["bytes_in"] + f["bytes_out"] + f["const_bytes"]
                s[2] += 1
        row = [v / total for impl in IMPLEMENTATIONS for v, total in zip(sums[impl], self.totals)]
        row += [math.log1p(self.totals[0]), math.log1p(self.totals[1]), self.totals[2]]
        return row + [float(variant.schedule.decompose_init), float(variant.schedule.unroll),
                      float(variant.fusion == "none"), float(variant.memory == "inplace")]


@dataclass
class VariantModel:
    """Gradient-boosted trees (LightGBM): VariantFeatures -> log cost (instructions or cycles), best given relative
    to the model's default build so that models of any size teach each other."""
    seed: int = 0
    booster: object = None

    def fit(self, features: list[list[float]], costs: list[float], rounds: int = 200) -> VariantModel:
        import lightgbm as lgb

        if len(features) < 3:
            raise ValueError(f"{len(features)} measured variants: too few to learn from (at least 3)")
        params = {"objective": "regression", "learning_rate": 0.1, "num_leaves": 7, "min_data_in_leaf": 1,
                  "min_data_in_bin": 1, "min_sum_hessian_in_leaf": 0.0, "verbose": -1, "seed": self.seed,
                  "deterministic": True, "num_threads": 1}
        data = lgb.Dataset(np.array(features, dtype=np.float64), label=np.log(np.array(costs, dtype=np.float64)),
                           params={"min_data_in_bin": 1, "verbose": -1})
        self.booster = lgb.train(params, data, num_boost_round=rounds)
        return self

    def predict(self, features: list[list[float]]) -> np.ndarray:
        if self.booster is None:
            raise ValueError("the variant model is not trained")
        return np.exp(self.booster.predict(np.array(features, dtype=np.float64)))


def ranking_quality(predicted, truth, ks=(1, 5)) -> dict:
    """How well an ordering by `predicted` finds the truly cheapest (both: cost per candidate, lower is better).

    best_percentile: where the truly best candidate falls in the predicted order (0 = first); pairwise accuracy: the
    fraction of pairs of different cost ordered right; peak@k: the true optimum over the best true cost among the
    predicted top k (1 = found); spearman."""
    from scipy.stats import spearmanr

    p, t = np.asarray(predicted, dtype=float), np.asarray(truth, dtype=float)
    order = np.argsort(p, kind="stable")
    best = int(np.argmin(t))
    position = int(np.where(order == best)[0][0])
    i, j = np.triu_indices(len(t), 1)
    differ = t[i] != t[j]
    right = np.sign(p[i] - p[j])[differ] == np.sign(t[i] - t[j])[differ]
    return {"candidates": len(t), "best_percentile": round(100.0 * position / max(len(t) - 1, 1), 2),
            "pairwise_accuracy": round(float(right.mean()) if right.size else 1.0, 4),
            **{f"peak@{k}": round(float(t.min() / t[order[:k]].min()), 4) for k in ks},
            "spearman": round(float(spearmanr(p, t)[0]), 4) if len(t) > 2 else None}


# --- the schedule predictor of layer-by-layer tuning (search/tuning.py) -----------------------------------------

@dataclass(frozen=True)
class TunedLayer:
    """A layer as the tuning log knows it: its kernel shape (ir.layer_schedule.KernelShape) and its signature
    (JSON: shapes, strides, padding; "" where unknown). Two layers of one kernel shape may differ in geometry."""
    shape: object
    signature: str = ""

    @functools.cached_property
    def layer(self) -> dict:
        return json.loads(self.signature) if self.signature else {}


def as_layer(layer) -> TunedLayer:
    return layer if isinstance(layer, TunedLayer) else TunedLayer(layer)


class SchedulePredictor:
    """A (layer, schedule)'s log cost on one target relative to the other schedules of its layer, from the tuning
    log: LightGBM over features.schedule_features (the knobs, the code they imply per MAC, the padded share). Ranks
    a layer's space without building it.

    The label is each sample's log cost less the mean of its layer's: only the order within a layer is ever used.
    The per-MAC counts that can only add cycles are monotone constraints, and `members` models fitted on bagged
    rows and columns are averaged: the records hold some forty schedules of each of a few dozen layers, and one
    tree ensemble fitted on them moves with the order of its rows by as much as a feature gains (held-out figures:
    benchmarks/tuning.py)."""

    def __init__(self, seed: int = 0, members: int = 4):
        self.seed, self.members, self.boosters, self.names = seed, members, [], None

    def _matrix(self, layer: TunedLayer, schedules) -> np.ndarray:
        from tinymlaas.search.features import schedule_features

        rows = [schedule_features(layer.shape, s, layer.layer) for s in schedules]
        return np.array([[r[n] for n in self.names] for r in rows], dtype=float)

    def fit(self, samples: list[tuple], rounds: int = 600) -> SchedulePredictor:
        """samples: (TunedLayer or KernelShape, LayerSchedule, cost)."""
        import lightgbm as lgb

        from tinymlaas.search.features import MONOTONE, schedule_features

        if len(samples) < 8:
            raise ValueError("too few measured schedules to learn from")
        layers = [as_layer(x) for x, _, _ in samples]
        rows = [schedule_features(la.shape, s, la.layer) for la, (_, s, _) in zip(layers, samples)]
        self.names = sorted(rows[0])
        X = np.array([[r[n] for n in self.names] for r in rows], dtype=float)
        y = np.log(np.array([c for _, _, c in samples], dtype=float))
        by_layer: dict[TunedLayer, list[int]] = {}
        for i, la in enumerate(layers):
            by_layer.setdefault(la, []).append(i)
        for same in by_layer.values():
            y[same] -= y[same].mean()
        params = {"objective": "regression", "learning_rate": 0.05, "num_leaves": 15, "min_data_in_leaf": 5,
                  "bagging_fraction": 0.7, "bagging_freq": 1, "feature_fraction": 0.7, "deterministic": True,
                  "monotone_constraints": [int(n in MONOTONE) for n in self.names], "num_threads": 1, "verbose": -1}
        data = lgb.Dataset(X, y, free_raw_data=False)
        self.boosters = [lgb.train({**params, "seed": self.seed * 1000 + k}, data, num_boost_round=rounds)
                         for k in range(self.members)]
        return self

    def predict(self, layer, schedules) -> np.ndarray:
        """Predicted log cost of each schedule relative to its layer's (TunedLayer or KernelShape)."""
        if not self.boosters:
            raise ValueError("the schedule predictor is not trained")
        X = self._matrix(as_layer(layer), schedules)
        return np.mean([b.predict(X) for b in self.boosters], axis=0)
