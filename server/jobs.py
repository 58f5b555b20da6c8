"""Build jobs: Huey tasks (SQLite queue by default, Redis by URL) run by worker processes.

A build is a database row (its state and progress are what users see) and a Huey task carrying its
id. The task is idempotent: it does nothing for a build that is already final. A worker that starts
requeues builds left `building`/`emulating` by a worker that died, so no build is ever lost.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import traceback
from pathlib import Path

from sqlalchemy import select

from tinymlaas.errors import TinyMLaaSError
from tinymlaas.measurements import MeasurementStore
from tinymlaas.ota.package import generate_key, package_build
from tinymlaas.ota.store import ArtifactStore
from tinymlaas.pipeline import STAGES, CompileOptions, compile_model
from tinymlaas.targets import get_target

from .config import Settings
from .db import Build, Model, make_engine, make_sessionmaker
from .service import BUILD_FINAL

log = logging.getLogger("tinymlaas.jobs")
EMULATING_FROM = STAGES.index("emulate")
SEARCH_SHARE = 0.8  # of a build's progress, when it searches variants first
_HUEY: dict[str, object] = {}


class BuildCancelled(Exception):
    pass


def make_huey(queue_url: str):
    """One Huey per queue URL and process, with the build task registered on it."""
    if queue_url in _HUEY:
        return _HUEY[queue_url]
    if queue_url.startswith("sqlite:///"):
        from huey import SqliteHuey

        path = Path(queue_url.removeprefix("sqlite:///"))
        path.parent.mkdir(parents=True, exist_ok=True)
        huey = SqliteHuey("tinymlaas", filename=str(path))
    elif queue_url.startswith("redis://"):
        from huey import RedisHuey

        huey = RedisHuey("tinymlaas", url=queue_url)
    else:
        raise ValueError(f"queue URL must be sqlite:///PATH or redis://...: {queue_url}")
    _TASKS[queue_url] = huey.task(name="run_build", retries=0)(_run_build_task)
    _HUEY[queue_url] = huey
    return huey


_TASKS: dict[str, object] = {}


def enqueue_build(queue_url: str, build_id: int) -> None:
    make_huey(queue_url)
    _TASKS[queue_url](build_id)


def _run_build_task(build_id: int) -> None:
    run_build(Settings.from_env(), build_id)


def ensure_signing_key(settings: Settings) -> Path:
    if not settings.signing_key.exists():
        generate_key(settings.signing_key)
    return settings.signing_key


def run_build(settings: Settings, build_id: int) -> None:
    engine = make_engine(settings.database_url)
    sessions = make_sessionmaker(engine)
    store = ArtifactStore(settings.artifacts_dir)
    with sessions() as s:
        build = s.get(Build, build_id)
        if build is None or build.state in BUILD_FINAL:
            return
        build.state, build.stage, build.progress, build.message = "building", "import", 0.0, None
        build.attempts += 1
        s.commit()
        model = s.get(Model, build.model_id)
        target, constraints, version = build.target, dict(build.constraints or {}), build.version
        model_name, model_digest = model.name, model.sha256

    searched_share = [0.0]  # the part of the progress a search took

    def progress(stage: str) -> None:
        with sessions() as s:
            b = s.get(Build, build_id)
            if b.state == "cancelled":
                raise BuildCancelled()
            b.stage = stage
            b.state = "emulating" if STAGES.index(stage) >= EMULATING_FROM else "building"
            done = searched_share[0]
            b.progress = round(done + (1 - done) * STAGES.index(stage) / (len(STAGES) + 1), 3)
            s.commit()

    out = settings.builds_dir / str(build_id)
    try:
        with tempfile.TemporaryDirectory(prefix="tinymlaas-build-") as tmp:
            model_path = Path(tmp) / f"{model_name}.tflite"
            shutil.copyfile(store.path(model_digest), model_path)
            # a core simulated from its RTL runs ~0.5 M cycles/s: its own default (one input and its repeat)
            inputs = settings.build_inputs if get_target(target).rtl is None else None
            variant, searched, summary = None, None, None
            if constraints.get("search"):
                variant, searched, summary = _search(model_path, target, constraints, inputs, Path(tmp), sessions,
                                                     build_id)
                searched_share[0] = SEARCH_SHARE
            options = CompileOptions(inputs=inputs, max_flash=constraints.get("max_flash"),
                                     max_ram=constraints.get("max_ram"), variant=variant)
            report = compile_model(model_path, target, out, options, progress)
            if searched is not None:
                shutil.copyfile(searched / "front.json", out / "front.json")
                shutil.copyfile(searched / "front.png", out / "front.png")
        if not report.verified:
            raise TinyMLaaSError(f"the firmware's outputs differ from the TFLite interpreter's: {report.fidelity}")
        progress("measure")
        artifacts = {"firmware": store.put_file(out / "firmware.elf"), "report": store.put_file(out / "report.json")}
        if (out / "front.json").is_file():
            artifacts.update(front=store.put_file(out / "front.json"), front_plot=store.put_file(out / "front.png"))
        package = None
        if get_target(target).rtl is None:  # a simulated RTL core has no devices: nothing to sign and ship
            package = package_build(out, get_target(target), ensure_signing_key(settings), version)
            artifacts.update(image=store.put_file(package.image), payload=store.put_file(package.payload),
                             selftest=store.put_file(package.selftest))
        with sessions() as s:
            b = s.get(Build, build_id)
            if b.state == "cancelled":
                return
            b.state, b.stage, b.progress = "done", "done", 1.0
            b.report = {k: v for k, v in report.to_dict().items() if k != "artifacts"}
            if summary is not None:
                b.report["search"] = summary
            if package is not None:
                b.report["image"] = {"version": package.info.version, "size": package.info.total_size,
                                     "sha256": package.info.sha256}
            b.artifacts = artifacts
            s.commit()
        MeasurementStore(engine=engine).record_compile(report, Path(report.artifacts["model"]), source="service",
                                                       build_id=build_id)
    except BuildCancelled:
        log.info("build %s cancelled", build_id)
    except TinyMLaaSError as e:
        _fail(sessions, build_id, str(e))
    except Exception as e:  # noqa: BLE001 - a bug, not the user's input: keep the trace in the log, a line in the build
        log.error("build %s: %s", build_id, traceback.format_exc())
        _fail(sessions, build_id, f"internal error: {type(e).__name__}: {e}")


def _search(model_path: Path, target: str, constraints: dict, inputs, tmp: Path, sessions, build_id: int):
    """The variant search a build asked for; its progress is the build's (stage "search", up to SEARCH_SHARE).
    Returns the chosen Variant, the folder with front.json and front.png, and a summary for the build's report."""
    from tinymlaas.search.search import Constraints, search, write_result
    from tinymlaas.search.space import Variant

    asked = constraints["search"]

    def progress(done: int, total: int, point) -> None:
        with sessions() as s:
            b = s.get(Build, build_id)
            if b.state == "cancelled":
                raise BuildCancelled()
            b.stage, b.progress = "search", round(SEARCH_SHARE * done / total, 3)
            b.message = f"search: {done} of {total} variants built"
            s.commit()

    result = search(model_path, target, tmp / "search", budget=int(asked["budget"]),
                    strategy=asked.get("strategy", "nsga2"), seed=int(asked.get("seed", 0)),
                    constraints=Constraints(constraints.get("max_ram"), constraints.get("max_flash"),
                                            float(asked.get("max_fidelity_loss", 0.0))),
                    inputs=inputs or 3, workers=1, progress=progress)
    write_result(result, tmp / "front")
    if result.chosen is None:
        raise TinyMLaaSError(f"no variant of {len(result.points)} built satisfies the constraints")
    with sessions() as s:
        b = s.get(Build, build_id)
        b.message = None
        s.commit()
    return Variant.from_dict(result.points[result.chosen].variant), tmp / "front", result.summary()


def _fail(sessions, build_id: int, message: str) -> None:
    with sessions() as s:
        b = s.get(Build, build_id)
        if b.state != "cancelled":
            b.state, b.message = "failed", message[:2000]
            s.commit()


def recover_builds(settings: Settings) -> list[int]:
    """At worker start: builds a dead worker left running go back to the queue (they restart from scratch)."""
    sessions = make_sessionmaker(make_engine(settings.database_url))
    huey = make_huey(settings.queue_url)
    queued_ids = {t.args[0] for t in huey.pending() if t.name.endswith("run_build") and t.args}
    requeued = []
    with sessions() as s:
        for b in s.scalars(select(Build).where(Build.state.in_(("queued", "building", "emulating")))):
            if b.state == "queued" and b.id in queued_ids:
                continue
            if b.attempts >= 3:
                b.state, b.message = "failed", f"gave up after {b.attempts} interrupted attempts"
                continue
            b.state, b.stage, b.progress = "queued", None, 0.0
            b.message = "resumed after a worker restart"
            requeued.append(b.id)
        s.commit()
    for build_id in requeued:
        enqueue_build(settings.queue_url, build_id)
    return requeued


def run_worker(settings: Settings, workers: int = 1) -> None:
    """A Huey consumer in this process (signals handled by Huey): `tinymlaas worker`."""
    ensure_signing_key(settings)
    huey = make_huey(settings.queue_url)
    requeued = recover_builds(settings)
    if requeued:
        log.warning("requeued interrupted builds: %s", requeued)
    huey.create_consumer(workers=workers, worker_type="process" if workers > 1 else "thread",
                         periodic=False).run()
