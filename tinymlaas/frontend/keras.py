"""Keras (.keras, .h5) and SavedModel input: converted to TFLite with TensorFlow's own converter, as users do.

TensorFlow is an optional dependency (`pip install tinymlaas[tensorflow]`; `make setup` installs it). Quantization:
none (float32), int8 (full integer, float interface), int16x8 (int16 activations, int8 weights) or mixed (int8 with
the layers most hurt by quantization left in float: TensorFlow's QuantizationDebugger measures each layer's error
against its float twin, RMSE over scale, and denylists the worst), calibrated on the user's data (`.npz`: one array
per model input, first axis the samples; an array named `labels` is not an input but the classes the samples belong
to) or, failing that, on generated inputs, with a warning that accuracy is then unknown.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import zipfile
from pathlib import Path

import numpy as np

from tinymlaas.errors import InvalidCalibration, InvalidModel, ToolMissing
from tinymlaas.frontend.tflite import array_for_input, short_input_name

QUANTIZE = ("none", "int8", "int16x8", "mixed")
LABELS = "labels"  # the array of a calibration .npz that holds classes, not inputs


def is_keras_input(path: Path) -> bool:
    return path.suffix in (".keras", ".h5") or (path.is_dir() and (path / "saved_model.pb").exists())


@contextlib.contextmanager
def _stdout_to_stderr():
    """TensorFlow prints while it loads and converts (Python prints and its C++ logging): to stderr, so that
    stdout stays the caller's (`--json` output is JSON and nothing else)."""
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        os.dup2(2, 1)
        with contextlib.redirect_stdout(sys.stderr):  # where sys.stdout is not file descriptor 1 (an embedding host)
            yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def _tensorflow():
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    try:
        import tensorflow as tf
    except ImportError:
        raise ToolMissing("converting Keras/SavedModel input needs TensorFlow: pip install 'tinymlaas[tensorflow]' "
                          "(`make setup` installs it)") from None
    return tf


def _calibration_arrays(path: Path, inputs: list[tuple[str, tuple[int, ...]]]) -> list[np.ndarray]:
    """The .npz's arrays in the order of `inputs` (name, shape): matched by name; a single array for a single input
    whatever its name. InvalidCalibration when they cannot be matched (never one input calibrated on another's data)."""
    try:
        with np.load(path) as data:
            arrays = {k: np.asarray(data[k], dtype=np.float32) for k in data.files if k != LABELS}
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as e:
        raise InvalidCalibration(f"{path}: not a readable .npz of calibration arrays ({type(e).__name__})") from None
    names = [short_input_name(n) for n, _ in inputs]
    keys = [array_for_input(arrays, n) for n, _ in inputs]
    if len(inputs) == 1 and len(arrays) == 1:
        ordered = list(arrays.values())
    elif None not in keys:
        ordered = [arrays[k] for k in keys]
    else:
        raise InvalidCalibration(f"{path}: the model's inputs are {', '.join(names)}; the file holds "
                           f"{', '.join(sorted(arrays)) or 'no arrays'}: name each array after the input it feeds")
    for a, name, (_, shape) in zip(ordered, names, inputs):
        if tuple(a.shape[1:]) != tuple(shape[1:]):
            raise InvalidCalibration(f"{path}: calibration samples of shape {list(a.shape[1:])} for input '{name}', the "
                               f"model takes {list(shape[1:])}")
    return ordered


def _calibration(path: Path | None, inputs: list[tuple[str, tuple[int, ...]]], notes: list[str], keyed=False):
    """The samples (a generator function, as TensorFlow's converter takes): lists in the order of `inputs`, or with
    keyed=True dicts by input name (the converter matches a multi-input model's samples by name)."""
    shapes = [shape for _, shape in inputs]
    if path is not None:
        arrays = _calibration_arrays(path, inputs)

        def samples():
            for i in range(min(len(a) for a in arrays)):
                batch = [a[i:i + 1] for a in arrays]
                yield {n: b for (n, _), b in zip(inputs, batch)} if keyed else batch
        return samples
    notes.append("quantized with generated calibration inputs (standard normal): accuracy is unknown; "
                 "pass --calibration data.npz with real samples (one array per input, named after it)")
    rng = np.random.default_rng(0)

    def generated():
        for _ in range(64):
            batch = [rng.standard_normal(s).astype(np.float32) for s in shapes]
            yield {n: b for (n, _), b in zip(inputs, batch)} if keyed else batch
    return generated


def convert_keras(path: Path, out: Path, quantize: str = "none", calibration: Path | None = None,
                  keep_float: int = 1) -> list[str]:
    """Write a .tflite for the Keras/SavedModel at `path` to `out`. Returns notes for the report.

    keep_float: for "mixed", how many of the most quantization-sensitive layers stay float."""
    with _stdout_to_stderr():
        return _convert(path, out, quantize, calibration, keep_float)


def _convert(path: Path, out: Path, quantize: str, calibration: Path | None, keep_float: int) -> list[str]:
    if quantize not in QUANTIZE:
        raise InvalidModel(f"--quantize must be one of {', '.join(QUANTIZE)}, not '{quantize}'")
    tf = _tensorflow()
    notes = [f"converted from {path.name} with TensorFlow {tf.__version__} (quantization: {quantize})"]
    try:
        if path.is_dir():
            converter = tf.lite.TFLiteConverter.from_saved_model(str(path))
            loaded = tf.saved_model.load(str(path))
            fn = loaded.signatures["serving_default"]
            inputs = [(name, tuple(1 if d is None else int(d) for d in spec.shape))
                      for name, spec in fn.structured_input_signature[1].items()]
        else:
            model = tf.keras.models.load_model(str(path), compile=False)
            converter = tf.lite.TFLiteConverter.from_keras_model(model)
            inputs = [(i.name, tuple(1 if d is None else int(d) for d in i.shape)) for i in model.inputs]
    except Exception as e:  # noqa: BLE001 - TensorFlow raises anything for a file it cannot load
        raise InvalidModel(f"{path.name}: TensorFlow cannot load it ({type(e).__name__}: "
                           f"{str(e).strip().splitlines()[0][:160] if str(e).strip() else ''})") from None
    if quantize != "none":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.representative_dataset = _calibration(calibration, inputs, notes, keyed=len(inputs) > 1)
        if quantize != "mixed":  # mixed keeps float kernels allowed
            converter.target_spec.supported_ops = [
                tf.lite.OpsSet.TFLITE_BUILTINS_INT8 if quantize == "int8"
                else tf.lite.OpsSet.EXPERIMENTAL_TFLITE_BUILTINS_ACTIVATIONS_INT16_WEIGHTS_INT8]
    try:
        data = _mixed(tf, converter, keep_float, notes) if quantize == "mixed" else converter.convert()
    except Exception as e:  # noqa: BLE001 - the converter's errors have no common type
        lines = [line for line in str(e).strip().splitlines() if line.strip()]
        raise InvalidModel(f"{path.name}: the TFLite converter refuses it: {lines[-1][:200] if lines else type(e).__name__}") from None
    out.write_bytes(data)
    return notes


def _mixed(tf, converter, keep_float: int, notes: list[str]) -> bytes:
    """int8 with the `keep_float` layers of the largest RMSE/scale against their float twins left in float."""
    import csv
    import io

    samples = converter.representative_dataset
    debugger = tf.lite.experimental.QuantizationDebugger(converter=converter, debug_dataset=samples)
    debugger.run()
    dump = io.StringIO()
    debugger.layer_statistics_dump(dump)
    rows = [r for r in csv.DictReader(io.StringIO(dump.getvalue())) if float(r["scale"] or 0) > 0]
    worst = sorted(rows, key=lambda r: -math.sqrt(float(r["mean_squared_error"])) / float(r["scale"]))[:keep_float]
    names = [r["tensor_name"] for r in worst]
    notes.append("left in float (most hurt by int8, by RMSE/scale): "
                 + ", ".join(f"{r['op_name']} '{r['tensor_name'][:40]}'" for r in worst))
    options = tf.lite.experimental.QuantizationDebugOptions(denylisted_nodes=names)
    return tf.lite.experimental.QuantizationDebugger(converter=converter, debug_dataset=samples,
                                                     debug_options=options).get_nondebug_quantized_model()


def calibration_samples(path: Path | None, inputs: list[tuple[str, tuple[int, ...]]],
                        count: int = 32) -> tuple[list, object]:
    """Up to `count` samples (each a list of arrays in the order of `inputs`, (name, shape) pairs) from a
    calibration .npz, or generated ones; and its labels (None without)."""
    notes: list[str] = []
    samples = [x for _, x in zip(range(count), _calibration(path, inputs, notes)())]
    labels = None
    if path is not None:
        with np.load(path) as data:
            if LABELS in data.files:
                labels = np.asarray(data[LABELS]).reshape(-1)[:len(samples)]
    return samples, labels
