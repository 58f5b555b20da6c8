"""Host backend (CPU via LLVM, NVIDIA GPU via CUDA): TVM Relax builds run by TVM's runtime, not firmware."""

from __future__ import annotations

import dataclasses
from pathlib import Path


def host_options(request):
    """The build options the host build takes, by name: a request option of the same name as a HostOptions field
    reaches it (paths resolved; unset ones keep HostOptions' defaults)."""
    from tinymlaas.backends.host.options import HostOptions
    from tinymlaas.build.request import OPTIONS

    given = {}
    for f in dataclasses.fields(HostOptions):
        value = getattr(request, f.name, None)
        if f.name in OPTIONS and value is not None:
            given[f.name] = Path(value).resolve() if OPTIONS[f.name].unit == "path" else value
    return HostOptions(**given)


class HostBackend:
    name = "host"
    what = "a TVM runtime library"
    label = "the host targets"
    formats = frozenset({"tflite", "keras", "onnx", "pt2"})
    firmware = False
    stored_artifacts = ("library", "metadata")  # what the service keeps of a build, beside its report
    searchable = False

    def build(self, model, target, work: Path, request, stage):
        from tinymlaas.backends.host.build import build_host, build_host_external
        from tinymlaas.frontend.cleanup import clean
        from tinymlaas.frontend.tflite import TFLiteModel

        options = host_options(request)
        if not isinstance(model, TFLiteModel):  # ONNX, a PyTorch exported program: TVM's frontend of its own
            return build_host_external(model, target, work, options, stage)
        return build_host(model, clean(model.graph, shapes_from_interpreter=True), target, work, options, stage)

    def format_report(self, report) -> str:
        from tinymlaas.backends.host.report import format_host_report

        return format_host_report(report)

    def deployable(self, target) -> bool:
        return False  # a library for a host, not an image for a device

    def request_problem(self, request, target) -> tuple[str, str] | None:
        if request.precision not in target.precisions:
            return "precision", f"{target.name} builds {'/'.join(target.precisions)}, not {request.precision}"
        return None


BACKEND = HostBackend()
