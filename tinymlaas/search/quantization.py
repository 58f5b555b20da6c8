"""Quantization variants of a float Keras/SavedModel model: float32, int8, int16x8 and mixed precision (int8 with the
layers int8 hurts most left in float), each converted by TensorFlow with the user's calibration data, built, run and
verified like any point of the search.

Fidelity is measured against the float model, on the calibration samples: the RMSE of a variant's outputs over the
RMS of the float model's (its own build is bit-exact with its interpreter, so the interpreter's outputs are the
device's). With labels in the calibration file, each point also gets its accuracy.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np

from tinymlaas.build.request import BuildRequest
from tinymlaas.search.result import Constraints, Point, SearchResult, pareto_front
from tinymlaas.search.search import search

# (name, convert_keras quantize, layers kept float)
VARIANTS = (("float32", "none", 0), ("int8", "int8", 0), ("int16x8", "int16x8", 0), ("mixed-1", "mixed", 1),
            ("mixed-2", "mixed", 2))


def _outputs(tflite: bytes, samples: list) -> list[np.ndarray]:
    """The interpreter's outputs (dequantized to float) for each sample, the state reset between them."""
    from tinymlaas.accuracy import interpreter_scores

    return list(interpreter_scores(tflite, samples))


def fidelity(reference: list[np.ndarray], variant: list[np.ndarray]) -> float:
    """RMSE of the variant's outputs over the RMS of the reference's (0: the same outputs)."""
    ref, var = np.concatenate(reference), np.concatenate(variant)
    rms = float(np.sqrt(np.mean(ref ** 2))) or 1.0
    return round(float(np.sqrt(np.mean((var - ref) ** 2))) / rms, 6)


def accuracy(outputs: list[np.ndarray], labels) -> float | None:
    from tinymlaas.accuracy import score

    if labels is None or len(labels) == 0:
        return None
    n = min(len(outputs), len(labels))
    return round(score(np.stack(outputs[:n]), np.asarray(labels)[:n], "top1"), 4)


def search_quantization(source, target: str, workdir, request: BuildRequest | None = None, *,
                        progress: Callable | None = None, record: bool = False) -> SearchResult:
    """Every quantization variant of the Keras/SavedModel `source`, built with the default kernels on `target`;
    then, with a `request.budget` above the number of variants, the kernel search (`request.strategy`) on the
    chosen variant with the builds left. From the request also: the calibration samples, the constraints, the
    inputs per point (default 3), the seed, and for the kernel search the workers and the Ray address."""
    from tinymlaas.build.pipeline import compile_model
    from tinymlaas.errors import TinyMLaaSError
    from tinymlaas.frontend.keras import calibration_samples, convert_keras
    from tinymlaas.frontend.tflite import load_tflite

    request = request or BuildRequest()
    constraints = Constraints.of(request)
    calibration = Path(request.calibration) if request.calibration else None
    inputs, seed, budget = request.inputs or 3, request.seed, request.budget
    if budget is not None and budget < len(VARIANTS):
        raise TinyMLaaSError(f"--budget {budget} is below the {len(VARIANTS)} quantization variants every Keras/"
                            f"SavedModel search builds ({', '.join(v[0] for v in VARIANTS)})")
    total = budget or len(VARIANTS)
    started = time.monotonic()
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    source = Path(source)
    points: list[Point] = []
    notes: list[str] = []
    reference = samples = labels = None
    for k, (name, quantize, keep) in enumerate(VARIANTS):
        t0 = time.monotonic()
        tflite = workdir / f"{name}.tflite"
        spec = {"quantization": name}
        try:
            converted = convert_keras(source, tflite, quantize, calibration, keep_float=keep)
            if samples is None:  # the float model comes first: its inputs and outputs are the reference
                model = load_tflite(tflite)
                samples, labels = calibration_samples(calibration, [(s.name, tuple(s.shape)) for s in model.inputs])
                reference = _outputs(tflite.read_bytes(), samples)
            outputs = _outputs(tflite.read_bytes(), samples)
            r = compile_model(tflite, target, workdir / f"point{k:02d}-{name}",
                              BuildRequest(inputs=inputs, seed=seed, estimate_cycles=False))
        except TinyMLaaSError as e:
            points.append(Point.refused(spec, name, e, time.monotonic() - t0))
            continue
        notes += [f"{name}: {n}" for n in converted if "left in float" in n]
        acc = accuracy(outputs, labels)
        if acc is not None:
            spec["accuracy"] = acc
        points.append(Point.of_report(spec, name, r, workdir / f"point{k:02d}-{name}", time.monotonic() - t0,
                                      fidelity_loss=fidelity(reference, outputs)))
        if progress:
            progress(len(points), total, points[-1])
    if calibration is None:
        notes.append("fidelity measured on generated inputs (standard normal): pass --calibration data.npz with "
                     "real samples (and `labels` for accuracy)")
    front, chosen = _front_and_choice(points, constraints)
    if chosen is not None and total > len(VARIANTS):
        kernels = replace(request, budget=total - len(VARIANTS), max_fidelity_loss=0.0, calibration=None)
        points += _kernel_points(points[chosen], workdir, target, kernels, record,
                                 (lambda done, _t, p: progress(len(VARIANTS) + done, total, p)) if progress else None)
        front, chosen = _front_and_choice(points, constraints)
    if chosen is None:
        notes.append("no variant satisfied the constraints")
    elif points[chosen].label == "float32" and constraints.max_fidelity_loss == 0:
        notes.append("float32 chosen: only it has no quantization loss; accept some with --max-fidelity-loss "
                     "(relative output RMSE, e.g. 0.05)")
    return SearchResult(source.name, target,
                        "quantization" if total == len(VARIANTS) else f"quantization+{request.strategy}",
                        total, seed, len(VARIANTS), asdict(constraints), points, front, chosen, 0,
                        round(time.monotonic() - started, 1), notes)


def _front_and_choice(points: list[Point], constraints: Constraints) -> tuple[list[int], int | None]:
    # the front shows the trade-off whatever the loss; the fidelity constraint only decides which point is chosen
    front = pareto_front(points, replace(constraints, max_fidelity_loss=float("inf")))
    allowed = [i for i in front if constraints.violation(points[i]) == 0]
    return front, (min(allowed, key=lambda i: points[i].objectives()) if allowed else None)


def _kernel_points(base: Point, workdir: Path, target: str, request: BuildRequest, record: bool,
                   progress: Callable | None) -> list[Point]:
    """The kernel search on one quantization variant's model; its points carry that variant's quantization and its
    fidelity loss against the float model (the kernels themselves are checked against that variant's interpreter)."""
    name = base.variant["quantization"]
    result = search(workdir / f"{name}.tflite", target, workdir / f"kernels-{name}", request, progress=progress,
                    record=record)
    return [replace(p, variant={**base.variant, **p.variant}, label=f"{name} {p.label}",
                    fidelity_loss=base.fidelity_loss + p.fidelity_loss) for p in result.points]
