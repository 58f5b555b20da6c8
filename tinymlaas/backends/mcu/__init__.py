"""Microcontroller backend: bare-metal firmware (one static arena, weights in flash, no runtime), run in QEMU,
Renode or on the Ibex RTL, verified against the interpreter and measured."""

from __future__ import annotations

from pathlib import Path


class McuBackend:
    name = "mcu"
    what = "firmware"
    label = "the microcontroller targets"
    formats = frozenset({"tflite", "keras", "onnx", "pt2"})
    firmware = True
    stored_artifacts = ("firmware",)  # what the service keeps of a build, beside its report
    searchable = True

    def build(self, model, target, work: Path, request, stage):
        from tinymlaas.backends.mcu.build import build_firmware

        converted = as_tflite(model)
        report = build_firmware(converted, target, work, request, stage)
        if converted is not model:  # what was built, for TFLite Micro or a look in a viewer
            (work / "converted.tflite").write_bytes(converted.data)
            report.artifacts["converted"] = "converted.tflite"
        model = converted
        if request.profile:
            from tinymlaas.backends.mcu.profile import profile_build

            report.profile = profile_build(model, target, request, report)
        return report

    def format_report(self, report) -> str:
        from tinymlaas.backends.mcu.report import format_report

        return format_report(report)

    def deployable(self, target) -> bool:
        return target.rtl is None  # a core simulated from its RTL measures true cycles; no device is one

    def request_problem(self, request, target) -> tuple[str, str] | None:
        if request.emulator is not None:
            from tinymlaas.runners import runner_class

            why = runner_class(request.emulator).problem(target)
            if why is not None:
                return "emulator", f"cannot be {request.emulator} for {target.name}: {why}"
        return None


def as_tflite(model):
    """The model as TFLite operators: ONNX and PyTorch models converted (frontend/onnx_tflite.py)."""
    from tinymlaas.frontend.onnx import OnnxModel, onnx_as_tflite
    from tinymlaas.frontend.torch_export import ExportedProgramModel, exported_program_as_tflite

    if isinstance(model, OnnxModel):
        return onnx_as_tflite(model)
    if isinstance(model, ExportedProgramModel):
        return exported_program_as_tflite(model)
    return model


def load_firmware_model(path):
    """The model file at `path` (TFLite, ONNX, .pt2; Keras with default options) as TFLite operators."""
    from tinymlaas.build.formats import format_of
    from tinymlaas.build.request import BuildRequest

    return as_tflite(format_of(path).load(Path(path), BuildRequest()))


BACKEND = McuBackend()
