"""Backends: what turns a loaded model into a verified, measured build for a target.

A target file names its backend (`kind:` in targets/*.yaml, "mcu" unless said); `backend_for(target)` finds it in
BACKENDS. The microcontroller backend makes bare-metal firmware run in an emulator; the host backend makes a TVM
runtime library run on this machine's CPU or GPU. Questions whose answer differs between them (which model formats,
which options, is there an image to deploy) are asked of the backend, nowhere else.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from pathlib import Path
from typing import Protocol


class Backend(Protocol):
    name: str  # the `kind` of the targets it builds for
    what: str  # what its builds are, for people ("firmware", "a TVM runtime library")
    label: str  # its targets, for people ("the microcontroller targets")
    formats: frozenset[str]  # the model formats it builds (tinymlaas.build.formats)
    firmware: bool  # builds run as firmware: emulators, PlatformIO projects, the measurement database
    searchable: bool  # the variant search runs on its builds
    stored_artifacts: tuple[str, ...]  # the report's artifacts the service keeps (beside report.json)

    def build(self, model, target, work: Path, request, stage: Callable[[str], None]):
        """`model` (loaded) for `target` into the folder `work`: a report (a tinymlaas.verify.VerifiedReport)
        whose `artifacts` name files in `work`."""

    def format_report(self, report) -> str:
        """The report for people, one line per figure."""

    def deployable(self, target) -> bool:
        """Whether its builds for `target` are images devices of the fleet take."""

    def request_problem(self, request, target) -> tuple[str, str] | None:
        """(option, why) when the request asks what this backend cannot do for `target`, else None."""


# kind -> "module:object"; imported when used (the host backend needs TVM's runtime pieces only when it builds)
BACKENDS = {
    "mcu": "tinymlaas.backends.mcu:BACKEND",
    "host": "tinymlaas.backends.host:BACKEND",
}


def backend_named(kind: str) -> Backend:
    module, name = BACKENDS[kind].split(":")
    return getattr(importlib.import_module(module), name)


def backend_for(target) -> Backend:
    return backend_named(target.kind)


def targets_of(kinds) -> str:
    """The targets the backends `kinds` build for, for people: "the host targets (cpu-host, cuda-host)"."""
    from tinymlaas.targets import all_targets

    names = [n for n, t in all_targets().items() if t.kind in kinds]
    return f"{' and '.join(backend_named(k).label for k in sorted(kinds))} ({', '.join(names)})"


def builds_format(fmt: str) -> set[str]:
    """The backends that build models of the format `fmt`."""
    return {kind for kind in BACKENDS if fmt in backend_named(kind).formats}
