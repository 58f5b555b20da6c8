"""Accuracy on the user's data: a validation file's samples through the TFLite interpreter, scored by a metric.

The interpreter runs the model a build computes (int8 models bit-exact with their firmware, so its outputs are the
device's), over every sample of the file: the emulator would take minutes for what the interpreter does in a second.
A validation file is an .npz with `x` (samples, the batch axis first; float values are quantized as the model's input
asks) and `y` (a class index per sample for top-k and AUC, target outputs for MSE).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tinymlaas.errors import TinyMLaaSError

METRICS = ("top1", "top5", "mse", "auc")


class InvalidValidation(TinyMLaaSError):
    """A validation file that cannot be read or does not fit the model: says which array and why."""


@dataclass(frozen=True)
class Validation:
    samples: list  # one list of input arrays per sample
    labels: np.ndarray
    path: str

    def __len__(self) -> int:
        return len(self.samples)


def load_validation(path, model) -> Validation:
    """`path`'s arrays `x` and `y` as samples of `model`'s single input (TFLiteModel.inputs) and their labels."""
    import zipfile

    path = Path(path)
    if not path.is_file() or not zipfile.is_zipfile(path):  # else np.load takes it for a pickle
        raise InvalidValidation(f"{path.name}: not an .npz file (numpy.savez: a zip of arrays x and y)")
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.files}
    except (OSError, ValueError, zipfile.BadZipFile) as e:
        raise InvalidValidation(f"{path.name}: not a readable .npz file ({str(e).splitlines()[0][:120]})") from None
    missing = [k for k in ("x", "y") if k not in arrays]
    if missing:
        raise InvalidValidation(f"{path.name}: no array {' or '.join(missing)} (it holds {', '.join(arrays) or 'none'})")
    if len(model.inputs) != 1:
        raise InvalidValidation(f"{path.name}: {model.name} has {len(model.inputs)} inputs; a validation file "
                                "holds samples of one")
    x, y = arrays["x"], arrays["y"]
    shape = tuple(model.inputs[0].shape[1:])
    if x.ndim < 1 or x.shape[0] == 0 or int(np.prod(x.shape[1:])) != int(np.prod(shape)):
        raise InvalidValidation(f"{path.name}: x is {x.shape}, not samples of the model's input {shape} (the "
                                "sample axis first)")
    if len(y) != len(x):
        raise InvalidValidation(f"{path.name}: {len(x)} samples in x but {len(y)} labels in y")
    if not np.issubdtype(x.dtype, np.number) or not np.all(np.isfinite(x.astype(np.float64))):
        raise InvalidValidation(f"{path.name}: x must hold finite numbers")
    return Validation([[s.reshape((1, *shape))] for s in x], np.asarray(y), str(path))


def interpreter_scores(data: bytes, samples: list) -> np.ndarray:
    """The reference interpreter's outputs (the kernels a build reproduces; dequantized to float, concatenated) for
    each sample: [samples, values]. Float inputs are quantized as an integer input asks; the state is reset between
    samples."""
    from tinymlaas.oracle import reference_interpreter

    it = reference_interpreter(data)
    ins, outs = it.get_input_details(), it.get_output_details()
    result = []
    for sample in samples:
        it.reset_all_variables()
        for d, x in zip(ins, sample, strict=False):
            scale, zero = d["quantization"]
            if d["dtype"] != np.float32 and np.issubdtype(np.asarray(x).dtype, np.floating) and scale:
                info = np.iinfo(d["dtype"])
                x = np.clip(np.round(x / scale) + zero, info.min, info.max)
            it.set_tensor(d["index"], np.asarray(x).astype(d["dtype"]).reshape(d["shape"]))
        it.invoke()
        ys = []
        for d in outs:
            y = it.get_tensor(d["index"]).astype(np.float64)
            scale, zero = d["quantization"]
            ys.append((y - zero) * scale if d["dtype"] != np.float32 and scale else y)
        result.append(np.concatenate([y.ravel() for y in ys]))
    return np.stack(result)


def score(scores: np.ndarray, labels: np.ndarray, metric: str) -> float:
    """The metric of outputs `scores` [samples, values] against `labels`: top-k as a fraction, AUC of the positive
    class's score (a single output, or the second of two), MSE of the outputs against the targets."""
    if metric != "mse":  # a class index per sample (one-hot rows taken as their index)
        if labels.ndim == 2 and labels.shape == scores.shape:
            labels = labels.argmax(axis=1)
        if labels.size != len(scores):
            raise InvalidValidation(f"y holds {labels.size} values for {len(scores)} samples: {metric} needs one "
                                    "class index per sample (or one-hot rows)")
    elif labels.size != scores.size:
        raise InvalidValidation(f"y holds {labels.size} values for {scores.size} outputs: mse needs the target "
                                "outputs of every sample")
    if metric in ("top1", "top5"):
        k = 1 if metric == "top1" else 5
        top = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        return float(np.mean(np.any(top == labels.reshape(-1, 1).astype(np.int64), axis=1)))
    if metric == "mse":
        return float(np.mean((scores - labels.reshape(scores.shape).astype(np.float64)) ** 2))
    if metric == "auc":
        positive = scores[:, 1] if scores.shape[1] == 2 else scores[:, 0]
        return _auc(positive, labels.astype(bool).ravel())
    raise ValueError(f"unknown metric {metric!r}")


def _auc(score_of: np.ndarray, positive: np.ndarray) -> float:
    """Area under the ROC curve: the probability that a positive sample scores above a negative one (ties half)."""
    from scipy.stats import rankdata

    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if not n_pos or not n_neg:
        raise InvalidValidation("AUC needs both classes among the labels")
    ranks = rankdata(score_of)
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def measure(data: bytes, validation: Validation, metric: str) -> float:
    return round(score(interpreter_scores(data, validation.samples), validation.labels, metric), 6)


def drop(reference: float, value: float, metric: str) -> float:
    """How much worse `value` is than `reference`, in points: percentage points for top-k and AUC, percent of the
    reference's error for MSE (0 or less: no worse)."""
    if metric == "mse":
        return 100.0 * (value - reference) / reference if reference > 0 else (0.0 if value <= 0 else float("inf"))
    return 100.0 * (reference - value)
