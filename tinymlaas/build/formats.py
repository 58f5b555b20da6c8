"""Model formats: how a file is recognised and loaded, in one table.

A backend lists the formats it builds (tinymlaas.backends); a format a target's backend does not take is refused
with how to get one it does.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tinymlaas.frontend.keras import convert_keras, is_keras_input
from tinymlaas.frontend.onnx import ONNX_SUFFIX
from tinymlaas.frontend.torch_export import PT2_SUFFIX


@dataclass(frozen=True)
class ModelFormat:
    name: str
    what: str  # for people: "ONNX models"
    matches: Callable[[Path], bool]
    load: Callable  # (path, request) -> a loaded model (TFLiteModel, OnnxModel, ExportedProgramModel)
    saved_suffix: str = ".tflite"  # the model kept beside the build (a Keras model is kept as its conversion)


def _load_tflite(path: Path, request):
    from tinymlaas.frontend.tflite import load_tflite

    return load_tflite(path)


def _load_keras(path: Path, request):
    """TensorFlow's converter first, as users do; the TFLite model it makes is what gets built."""
    from tinymlaas.frontend.tflite import load_tflite

    converted = Path(tempfile.mkdtemp(prefix="tinymlaas-convert-")) / f"{path.stem or 'model'}.tflite"
    notes = convert_keras(path, converted, request.quantize, Path(request.calibration) if request.calibration else None)
    model = load_tflite(converted)
    model.notes.extend(notes)
    return model


def _load_onnx(path: Path, request):
    from tinymlaas.frontend.onnx import load_onnx

    return load_onnx(path)


def _load_pt2(path: Path, request):
    from tinymlaas.frontend.torch_export import load_exported_program

    return load_exported_program(path)


FORMATS = {f.name: f for f in (
    ModelFormat("keras", "Keras/SavedModel models", is_keras_input, _load_keras),
    ModelFormat("onnx", "ONNX models", lambda p: p.suffix.lower() == ONNX_SUFFIX, _load_onnx,
                saved_suffix=ONNX_SUFFIX),
    ModelFormat("pt2", "PyTorch exported programs", lambda p: p.suffix.lower() == PT2_SUFFIX, _load_pt2,
                saved_suffix=PT2_SUFFIX),
    # anything else is taken for a TFLite flatbuffer: its loader says clearly when it is not one
    ModelFormat("tflite", "TFLite models", lambda p: True, _load_tflite),
)}


def format_of(path: str | Path) -> ModelFormat:
    return next(f for f in FORMATS.values() if f.matches(Path(path)))
