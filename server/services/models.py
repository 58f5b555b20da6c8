"""Models: an upload checked (format, operators the compiler supports) and stored."""

from __future__ import annotations

import tempfile
from pathlib import Path

from sqlalchemy.orm import Session

from tinymlaas.errors import InvalidCalibration, TinyMLaaSError
from tinymlaas.frontend.keras import QUANTIZE
from tinymlaas.frontend.onnx import ONNX_SUFFIX
from tinymlaas.frontend.torch_export import PT2_SUFFIX
from tinymlaas.ota.store import ArtifactStore

from ..db import Model
from .common import Principal, ServiceError


def onnx_paths(model) -> bool:
    """An ONNX upload converted now for the microcontroller targets and imported for the host targets, so that what
    neither can build is named at upload; whether it is quantized (QDQ). One path suffices: a build for a target of
    the other is refused then, naming why."""
    from tinymlaas.backends.mcu import as_tflite
    from tinymlaas.frontend.to_relax import unsupported_operators

    problems, quantized = [], False
    try:
        converted = as_tflite(model)
        quantized = bool(converted.quantized)
        missing = unsupported_operators(converted)
        if missing:
            problems.append(f"for the microcontroller targets: unsupported operator(s): {', '.join(sorted(set(missing)))}")
    except TinyMLaaSError as e:
        problems.append(f"for the microcontroller targets: {e}")
    try:
        model.to_relax()
    except TinyMLaaSError as e:
        problems.append(f"for the host targets: {e}")
    if len(problems) == 2:
        raise ServiceError(422, "; ".join(problems), "file")
    return quantized


def add_model(session: Session, store: ArtifactStore, who: Principal, filename: str, data: bytes,
              quantize: str = "none", calibration: bytes | None = None) -> Model:
    """A model upload checked and kept. A Keras/SavedModel file is converted here (TensorFlow's converter) with
    `quantize`, calibrated on `calibration` (an .npz, one array per input, named after it) or, without one, on
    generated inputs (said in the model's notes)."""
    from tinymlaas.frontend.keras import convert_keras, is_keras_input
    from tinymlaas.frontend.onnx import load_onnx
    from tinymlaas.frontend.tflite import load_tflite
    from tinymlaas.frontend.to_relax import unsupported_operators

    who.need("build")
    if not data:
        raise ServiceError(422, "the file is empty", "file")
    if quantize not in QUANTIZE:
        raise ServiceError(422, f"quantize must be one of {', '.join(QUANTIZE)}, not '{quantize[:20]}'", "quantize")
    name = Path(filename or "model.tflite").name
    if name in ("", ".", "..") or len(name) > 200 or any(ord(ch) < 32 for ch in name):
        raise ServiceError(422, f"the file name '{name[:40]}' is not usable: a plain name of at most 200 "
                           "characters (e.g. model.tflite)", "file")
    suffix = Path(name).suffix.lower()
    if suffix == PT2_SUFFIX:
        raise ServiceError(422, "PyTorch exported programs (.pt2) hold pickled objects that run code when loaded, so "
                           "the service does not load them: export the model to ONNX (torch.onnx.export) and upload "
                           "that, or build the .pt2 on your own machine with `tinymlaas compile`", "file")
    if suffix == ONNX_SUFFIX and quantize != "none":
        raise ServiceError(422, "quantize applies to Keras models (TensorFlow's converter); an ONNX model builds as "
                           "it is", "quantize")
    if calibration is not None and quantize == "none":
        raise ServiceError(422, "calibration samples are for quantizing a Keras model: choose quantize int8, "
                           "int16x8 or mixed, or leave the calibration file out", "calibration")
    notes: list[str] = []
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / name
        path.write_bytes(data)
        samples = None
        if calibration is not None:
            samples = Path(tmp) / "calibration" / "calibration.npz"
            samples.parent.mkdir()
            samples.write_bytes(calibration)
        try:
            if calibration is not None and not is_keras_input(path):
                raise ServiceError(422, f"calibration samples are for quantizing a Keras model; a "
                                   f"{suffix or 'TFLite'} model is built as it is", "calibration")
            if suffix == ONNX_SUFFIX:
                model = load_onnx(path)
                quantized, operators, unsupported = onnx_paths(model), model.operators(), []
            else:
                if is_keras_input(path):  # kept as the TFLite model TensorFlow's converter makes of it
                    converted = path.with_suffix(".tflite")
                    notes = convert_keras(path, converted, quantize, samples)
                    path, data = converted, converted.read_bytes()
                model = load_tflite(path)
                quantized, operators = bool(model.quantized), sorted(set(model.operators))
                unsupported = unsupported_operators(model)
        except InvalidCalibration as e:
            raise ServiceError(422, str(e).replace(str(samples), "the calibration file"), "calibration") from None
        except TinyMLaaSError as e:
            raise ServiceError(422, str(e), "file") from None
    if unsupported:
        raise ServiceError(422, f"unsupported operator(s): {', '.join(sorted(set(unsupported)))}", "file")
    row = Model(name=model.name, sha256=store.put_bytes(data), size=len(data), quantized=quantized,
                operators=operators, format="onnx" if suffix == ONNX_SUFFIX else "tflite", notes=notes,
                owner_id=who.user.id, org_id=who.org_id)
    session.add(row)
    session.commit()
    return row


def load_stored(store: ArtifactStore, model: Model, folder: Path):
    """The stored model written into `folder` and loaded as TFLite operators (backends.mcu.load_firmware_model:
    what a microcontroller build reads)."""
    from tinymlaas.backends.mcu import load_firmware_model

    model_file = folder / f"model.{model.format}"
    model_file.write_bytes(store.read(model.sha256))
    return load_firmware_model(model_file)


def set_validation(session: Session, store: ArtifactStore, who: Principal, model: Model, data: bytes) -> Model:
    """The model's validation set (an .npz of x and y, checked against its input) kept, replacing any earlier one:
    every microcontroller build of it then reports its accuracy on those samples, and --weights auto and
    max_accuracy_drop measure on them."""
    from tinymlaas.accuracy import load_validation

    who.need("build")
    if not data:
        raise ServiceError(422, "the file is empty", "file")
    with tempfile.TemporaryDirectory() as tmp:
        npz = Path(tmp) / "validation.npz"
        npz.write_bytes(data)
        try:
            loaded = load_stored(store, model, Path(tmp))
            samples = len(load_validation(npz, loaded))
        except TinyMLaaSError as e:
            raise ServiceError(422, str(e).replace(str(npz), "the file").replace(npz.name, "the file"),
                               "file") from None
    model.validation_sha256, model.validation_samples = store.put_bytes(data), samples
    session.commit()
    return model
