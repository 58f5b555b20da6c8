"""The learned runtime predictor: a layer's features -> cycles on a core, gradient-boosted trees (LightGBM).

Trained from the measurement database (tinymlaas.measurements): per-layer rows with their static features
(operator, precision, kernel variant, shapes, bytes, MACs), the core, and optionally QEMU's exact statistics
(instructions, memory accesses) when a candidate has been built. The label is cycles; rows measured on a device
weigh more than true cycles from RTL simulation, and those more than estimates ("device outranks estimate").
The search uses it to rank candidates so that only the promising ones are built and run.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

WEIGHTS = {"device": 4.0, "true": 2.0, "estimate": 1.0}
CATEGORICAL = ("core", "opcode", "precision", "implementation")
NUMERIC = ("macs", "bytes_in", "bytes_out", "const_bytes", "output_elements")
QEMU = ("instructions", "memory_accesses")


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

    @classmethod
    def from_row(cls, row) -> Sample:
        return cls(core=row.core, features=row.features or {}, implementation=row.implementation,
                   instructions=row.instructions, memory_accesses=row.memory_accesses, cycles=row.cycles,
                   cycles_kind=row.cycles_kind, model_hash=row.model_hash)


@dataclass
class Predictor:
    """use_qemu: also learn from the exact instruction and memory-access counts (a built candidate)."""
    use_qemu: bool = True
    categories: dict = field(default_factory=dict)  # categorical column -> its values, in code order
    booster: object = None

    def _row(self, s: Sample) -> list[float]:
        f = s.features
        values = {"core": s.core, "opcode": f.get("opcode"), "precision": f.get("precision"),
                  "implementation": s.implementation}
        row = [float(self.categories[c].index(values[c])) if values[c] in self.categories[c] else math.nan
               for c in CATEGORICAL]
        row += [math.log1p(float(f.get(k) or 0)) for k in NUMERIC]
        if self.use_qemu:
            row += [math.log1p(float(getattr(s, k))) if getattr(s, k) is not None else math.nan for k in QEMU]
        return row

    def _matrix(self, samples) -> np.ndarray:
        return np.array([self._row(s) for s in samples], dtype=np.float64)

    def fit(self, samples: list[Sample], rounds: int = 300, seed: int = 0) -> Predictor:
        import lightgbm as lgb

        samples = [s for s in samples if s.cycles and s.cycles > 0 and s.features]
        if len(samples) < 8:
            raise ValueError(f"{len(samples)} measured layers: too few to learn from (at least 8)")
        self.categories = {c: sorted({v for v in (_category(s, c) for s in samples) if v is not None})
                           for c in CATEGORICAL}
        data = lgb.Dataset(self._matrix(samples), label=np.log([s.cycles for s in samples]),
                           weight=[WEIGHTS.get(s.cycles_kind, 1.0) for s in samples],
                           categorical_feature=list(range(len(CATEGORICAL))), free_raw_data=False)
        params = {"objective": "regression", "learning_rate": 0.05, "num_leaves": 15, "min_data_in_leaf": 2,
                  "min_data_per_group": 1, "cat_smooth": 1, "verbose": -1, "seed": seed, "deterministic": True,
                  "num_threads": 1}
        self.booster = lgb.train(params, data, num_boost_round=rounds)
        return self

    def predict(self, samples: list[Sample]) -> np.ndarray:
        """Predicted cycles per sample."""
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
