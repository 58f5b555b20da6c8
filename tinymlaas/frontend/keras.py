"""Keras (.keras, .h5) and SavedModel input: converted to TFLite with TensorFlow's own converter, as users do.

TensorFlow is an optional dependency (`pip install tinymlaas[tensorflow]`; `make setup` installs it). Quantization:
none (float32), int8 (full integer, float interface) or int16x8 (int16 activations, int8 weights), calibrated on the
user's data (`.npz`: one array per model input, first axis the samples) or, failing that, on generated inputs, with
a warning that accuracy is then unknown.
"""

from __future__ import annotations

import os
import zipfile
from pathlib import Path

import numpy as np

from tinymlaas.errors import InvalidModel, ToolMissing

QUANTIZE = ("none", "int8", "int16x8")


def is_keras_input(path: Path) -> bool:
    return path.suffix in (".keras", ".h5") or (path.is_dir() and (path / "saved_model.pb").exists())


def _tensorflow():
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    try:
        import tensorflow as tf
    except ImportError:
        raise ToolMissing("converting Keras/SavedModel input needs TensorFlow: pip install 'tinymlaas[tensorflow]' "
                          "(`make setup` installs it)") from None
    return tf


def _calibration(path: Path | None, shapes: list[tuple[int, ...]], notes: list[str]):
    if path is not None:
        try:
            with np.load(path) as data:
                arrays = [np.asarray(data[k], dtype=np.float32) for k in data.files]
        except (OSError, ValueError, KeyError, zipfile.BadZipFile) as e:
            raise InvalidModel(f"{path}: not a readable .npz of calibration arrays ({type(e).__name__})") from None
        if len(arrays) != len(shapes):
            raise InvalidModel(f"{path}: {len(arrays)} arrays for a model with {len(shapes)} inputs")
        for a, s in zip(arrays, shapes):
            if tuple(a.shape[1:]) != tuple(s[1:]):
                raise InvalidModel(f"{path}: calibration samples of shape {list(a.shape[1:])}, the model takes {list(s[1:])}")

        def samples():
            for i in range(min(len(a) for a in arrays)):
                yield [a[i:i + 1] for a in arrays]
        return samples
    notes.append("quantized with generated calibration inputs (standard normal): accuracy is unknown; "
                 "pass --calibration data.npz with real samples")
    rng = np.random.default_rng(0)

    def generated():
        for _ in range(64):
            yield [rng.standard_normal(s).astype(np.float32) for s in shapes]
    return generated


def convert_keras(path: Path, out: Path, quantize: str = "none", calibration: Path | None = None) -> list[str]:
    """Write a .tflite for the Keras/SavedModel at `path` to `out`. Returns notes for the report."""
    if quantize not in QUANTIZE:
        raise InvalidModel(f"--quantize must be one of {', '.join(QUANTIZE)}, not '{quantize}'")
    tf = _tensorflow()
    notes = [f"converted from {path.name} with TensorFlow {tf.__version__} (quantization: {quantize})"]
    try:
        if path.is_dir():
            converter = tf.lite.TFLiteConverter.from_saved_model(str(path))
            loaded = tf.saved_model.load(str(path))
            fn = loaded.signatures["serving_default"]
            shapes = [tuple(1 if d is None else int(d) for d in spec.shape) for spec in fn.structured_input_signature[1].values()]
        else:
            model = tf.keras.models.load_model(str(path), compile=False)
            converter = tf.lite.TFLiteConverter.from_keras_model(model)
            shapes = [tuple(1 if d is None else int(d) for d in i.shape) for i in model.inputs]
    except Exception as e:  # noqa: BLE001 - TensorFlow raises anything for a file it cannot load
        raise InvalidModel(f"{path.name}: TensorFlow cannot load it ({type(e).__name__}: "
                           f"{str(e).strip().splitlines()[0][:160] if str(e).strip() else ''})") from None
    if quantize != "none":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.representative_dataset = _calibration(calibration, shapes, notes)
        converter.target_spec.supported_ops = [
            tf.lite.OpsSet.TFLITE_BUILTINS_INT8 if quantize == "int8"
            else tf.lite.OpsSet.EXPERIMENTAL_TFLITE_BUILTINS_ACTIVATIONS_INT16_WEIGHTS_INT8]
    try:
        data = converter.convert()
    except Exception as e:  # noqa: BLE001 - the converter's errors have no common type
        lines = [line for line in str(e).strip().splitlines() if line.strip()]
        raise InvalidModel(f"{path.name}: the TFLite converter refuses it: {lines[-1][:200] if lines else type(e).__name__}") from None
    out.write_bytes(data)
    return notes
