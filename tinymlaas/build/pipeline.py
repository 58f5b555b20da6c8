"""One build: load the model -> the target's backend builds it -> publish the result.

Everything is written to a temporary folder beside the output folder and moved into place only when the whole
build succeeded, so a failure leaves nothing half-written.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

from tinymlaas.backends import backend_for, builds_format, targets_of
from tinymlaas.build.formats import format_of
from tinymlaas.build.request import BuildRequest
from tinymlaas.errors import InternalError, InvalidModel, TinyMLaaSError
from tinymlaas.targets import get_target

# the stages a build goes through, in order (a host build skips driver and link); progress reports them
STAGES = ("import", "lower", "codegen", "driver", "reference", "link", "emulate", "verify", "measure")


class Stages:
    """Tells `progress` each stage a build enters (once), and times them."""

    def __init__(self, progress: Callable[[str], None] | None = None):
        self.progress = progress or (lambda stage: None)
        self.current: str | None = None
        self.seconds: dict[str, float] = {}
        self.started = self._since = time.monotonic()

    def __call__(self, name: str) -> None:
        if name == self.current:
            return
        self._lap()
        self.current = name
        self.progress(name)

    def _lap(self) -> None:
        now = time.monotonic()
        if self.current is not None:
            self.seconds[self.current] = round(self.seconds.get(self.current, 0.0) + now - self._since, 3)
        self._since = now

    def finish(self) -> dict[str, float]:
        """The seconds of each stage so far (the current one ends here)."""
        self._lap()
        self.current = None
        return dict(self.seconds)

    def elapsed(self) -> float:
        return round(time.monotonic() - self.started, 3)


def compile_model(
    model_path: str | Path,
    target_name: str,
    out_dir: str | Path | None = None,
    request: BuildRequest | None = None,
    progress: Callable[[str], None] | None = None,
):
    """Build, run, verify and measure. Input problems raise TinyMLaaSError; a bug of ours raises InternalError
    naming the stage (and the operator, where one was being converted). Returns the backend's report."""
    stage = Stages(progress)
    try:
        return _compile(Path(model_path), target_name, out_dir, request or BuildRequest(), stage)
    except (TinyMLaaSError, InternalError, KeyboardInterrupt):
        raise
    except Exception as e:
        raise InternalError(stage.current or "import", None, e) from e


def _compile(source: Path, target_name: str, out_dir, request: BuildRequest, stage: Stages):
    target = get_target(target_name)
    backend = backend_for(target)
    fmt = format_of(source)
    if fmt.name not in backend.formats:
        raise InvalidModel(f"{source.name}: {fmt.what} build for {targets_of(builds_format(fmt.name))}, not for "
                           f"{target.name}")
    request.check(target, fmt.name)
    stage("import")
    model = fmt.load(source, request)
    # absolute: the tools run inside the work folder
    out = (Path(out_dir) if out_dir else Path("out") / f"{model.name}-{target.name}").resolve()
    with staged(out) as work:
        report = backend.build(model, target, work, request, stage)
        publish(report, model, fmt.saved_suffix, work, out)
    return report


@contextmanager
def staged(out: Path):
    """A work folder beside `out`: removed if the build fails, so a failure leaves nothing half-written."""
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        yield work
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise


def publish(report, model, suffix: str, work: Path, out: Path) -> None:
    """What was compiled (a Keras input's conversion) and the report into `work`, `work` into `out`'s place; the
    report's artifacts then name files in `out`."""
    saved = f"model{suffix}"
    shutil.copy(model.path, work / saved)
    report.artifacts["model"] = saved
    (work / "report.json").write_text(json.dumps(report.to_dict(), indent=2) + "\n")
    _replace_dir(work, out)
    report.artifacts = {k: str(out / v) for k, v in report.artifacts.items()}
    report.artifacts["dir"] = str(out)


def _replace_dir(src: Path, dst: Path) -> None:
    if dst.exists():
        old = dst.with_name(dst.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        dst.rename(old)
        src.rename(dst)
        shutil.rmtree(old, ignore_errors=True)
    else:
        src.rename(dst)
