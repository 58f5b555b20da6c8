"""Build jobs: Huey tasks (SQLite queue by default, Redis by URL) run by worker processes.

A build is a database row (its state and progress are what users see) and a Huey task carrying its
id. The task is idempotent: it does nothing for a build that is already final, and runs a build only
after claiming it in the database (a lease: owner and expiry, renewed while it runs), so two workers
never run one build at once. Every worker requeues, now and then, the builds whose lease lapsed (their
worker died with its server, or was killed), so no build is ever lost or run twice.
"""

from __future__ import annotations

import datetime as dt
import errno
import logging
import os
import shutil
import socket
import tempfile
import threading
import time
import traceback
import uuid
from dataclasses import replace
from pathlib import Path

from sqlalchemy import or_, select, update

from tinymlaas.backends import backend_for
from tinymlaas.build.pipeline import STAGES, compile_model
from tinymlaas.build.request import BuildRequest
from tinymlaas.errors import TinyMLaaSError
from tinymlaas.measure.database import MeasurementStore
from tinymlaas.ota.package import generate_key, package_build
from tinymlaas.ota.store import ArtifactStore
from tinymlaas.targets import get_target

from .config import Settings
from .db import Build, Model, make_engine, make_sessionmaker, now
from .services.builds import OPEN_BUILD_STATES, VALIDATION_OF_MODEL

log = logging.getLogger("tinymlaas.jobs")
EMULATING_FROM = STAGES.index("emulate")
SEARCH_SHARE = 0.8  # of a build's progress, when it searches variants first
_HUEY: dict[str, object] = {}


class BuildCancelled(Exception):
    pass


class LeaseLost(BuildCancelled):
    """Another worker took the build over (this one stalled past its lease): stop without writing a result."""


class Lease:
    """This worker's claim on one build, renewed by a thread every third of its length while the build runs."""

    def __init__(self, sessions, build_id: int, seconds: float):
        self.sessions, self.build_id, self.seconds = sessions, build_id, seconds
        self.owner = f"{socket.gethostname()[:40]}:{os.getpid()}:{uuid.uuid4().hex[:12]}"
        self.lost = threading.Event()
        self._stop = threading.Event()

    def _expiry(self) -> dt.datetime:
        return now() + dt.timedelta(seconds=self.seconds)

    def claim(self) -> bool:
        """Take the build if it is open and nobody holds a live claim on it (one UPDATE: atomic on every database)."""
        with self.sessions() as s:
            claimed = s.execute(
                update(Build).where(Build.id == self.build_id, Build.state.in_(OPEN_BUILD_STATES),
                                    or_(Build.lease_owner.is_(None), Build.lease_expires_at < now()))
                .values(state="building", stage="import", progress=0.0, message=None, attempts=Build.attempts + 1,
                        lease_owner=self.owner, lease_expires_at=self._expiry())
            ).rowcount == 1
            s.commit()
        if claimed:
            threading.Thread(target=self._renew, name=f"lease-{self.build_id}", daemon=True).start()
        return claimed

    def _renew(self) -> None:
        while not self._stop.wait(self.seconds / 3):
            with self.sessions() as s:
                held = s.execute(update(Build).where(Build.id == self.build_id, Build.lease_owner == self.owner)
                                 .values(lease_expires_at=self._expiry())).rowcount == 1
                s.commit()
            if not held:
                self.lost.set()
                return

    def check(self, build: Build) -> None:
        """Within a session that has the build loaded: stop if the claim is gone or the build was cancelled."""
        if self.lost.is_set() or build.lease_owner != self.owner:
            raise LeaseLost()
        if build.state == "cancelled":
            raise BuildCancelled()

    def release(self) -> None:
        self._stop.set()
        with self.sessions() as s:
            s.execute(update(Build).where(Build.id == self.build_id, Build.lease_owner == self.owner)
                      .values(lease_owner=None, lease_expires_at=None))
            s.commit()


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


def release_queue(queue_url: str) -> None:
    """Close this process's connection to a queue (made again on next use)."""
    huey = _HUEY.pop(queue_url, None)
    _TASKS.pop(queue_url, None)
    if huey is not None:
        huey.storage.close()


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
    lease = Lease(sessions, build_id, settings.build_lease_seconds)
    if not lease.claim():
        log.info("build %s is final, gone or held by another worker: not run here", build_id)
        engine.dispose()
        return
    try:
        _run_claimed_build(settings, build_id, sessions, engine, store, lease)
    finally:
        lease.release()
        engine.dispose()  # its pooled connections are file descriptors: a long-lived process must not pile them up


def platformio_zip(build: Path, target) -> Path:
    """The build as a PlatformIO project (offline qemu/renode environments and the target's real board), zipped."""
    from tinymlaas.backends.platformio import write_project

    with tempfile.TemporaryDirectory(prefix="tinymlaas-pio-") as tmp:
        project = write_project(build, target, Path(tmp) / "project")
        return Path(shutil.make_archive(str(build / "platformio"), "zip", project))


def _run_claimed_build(settings: Settings, build_id: int, sessions, engine, store: ArtifactStore,
                       lease: Lease) -> None:
    with sessions() as s:
        build = s.get(Build, build_id)
        model = s.get(Model, build.model_id)
        target, request, version = get_target(build.target), build.request, build.version
        org_id = build.org_id
        model_name, model_digest, model_format = model.name, model.sha256, model.format
        validation_digest = model.validation_sha256
    backend = backend_for(target)

    searched_share = [0.0]  # the part of the progress a search took

    def progress(stage: str) -> None:
        with sessions() as s:
            b = s.get(Build, build_id)
            lease.check(b)
            b.stage = stage
            b.state = "emulating" if STAGES.index(stage) >= EMULATING_FROM else "building"
            done = searched_share[0]
            b.progress = round(done + (1 - done) * STAGES.index(stage) / (len(STAGES) + 1), 3)
            s.commit()

    out = settings.builds_dir / str(build_id)
    try:
        # checked as the API checked it: the targets or the rules may have changed while it was queued
        request.check(target)
        # a core simulated from its RTL runs ~0.5 M cycles/s: its own default (one input and its repeat);
        # tuning databases per tenant (then per target, model and precision): a rebuild reuses its own
        request = request.applying(target, inputs=settings.build_inputs if target.rtl is None else None,
                                   tuning_dir=str(settings.data_dir / "tuning" / str(org_id)))
        if request.validation == VALIDATION_OF_MODEL:  # the model's uploaded set, from the artifact store
            if validation_digest is None or validation_digest not in store:
                raise TinyMLaaSError("the model's validation set is gone: upload it again")
            request = replace(request, validation=str(store.path(validation_digest)))
        with tempfile.TemporaryDirectory(prefix="tinymlaas-build-") as tmp:
            model_path = Path(tmp) / f"{model_name}.{model_format}"  # the suffix tells the compiler the format
            shutil.copyfile(store.path(model_digest), model_path)
            searched, summary = None, None
            if request.budget is not None:  # a search first; its chosen variant is what gets built
                variant, searched, summary = _search(model_path, target.name, request, Path(tmp), sessions,
                                                     build_id, lease)
                request = replace(request, variant=variant)
                searched_share[0] = SEARCH_SHARE
            report = compile_model(model_path, target.name, out, request, progress)
            if searched is not None:
                shutil.copyfile(searched / "front.json", out / "front.json")
                shutil.copyfile(searched / "front.png", out / "front.png")
        if not report.verified:
            raise TinyMLaaSError(f"the build's outputs differ from the reference's: {report.fidelity}")
        progress("measure")
        artifacts = {name: store.put_file(Path(report.artifacts[name])) for name in backend.stored_artifacts}
        artifacts["report"] = store.put_file(out / "report.json")
        if backend.firmware:
            artifacts["platformio"] = store.put_file(platformio_zip(out, target))
        if (out / "front.json").is_file():
            artifacts.update(front=store.put_file(out / "front.json"), front_plot=store.put_file(out / "front.png"))
        package = None
        if backend.deployable(target):
            package = package_build(out, target, ensure_signing_key(settings), version)
            artifacts.update(image=store.put_file(package.image), payload=store.put_file(package.payload),
                             selftest=store.put_file(package.selftest))
            if package.model_image is not None:  # the model alone, for devices running this build's code part
                artifacts["model_image"] = store.put_file(package.model_image)
        with sessions() as s:
            b = s.get(Build, build_id)
            lease.check(b)
            b.state, b.stage, b.progress = "done", "done", 1.0
            b.report = {k: v for k, v in report.to_dict().items() if k != "artifacts"}
            if summary is not None:
                b.report["search"] = summary
            if package is not None:
                b.report["image"] = {"version": package.info.version, "size": package.info.total_size,
                                     "sha256": package.info.sha256, "abi": package.abi}
            b.artifacts = artifacts
            s.commit()
        if backend.firmware:  # the database holds firmware measurements
            MeasurementStore(engine=engine).record_compile(report, Path(report.artifacts["model"]),
                                                           source="service", build_id=build_id)
    except LeaseLost:
        log.warning("build %s: another worker took it over; this run stops", build_id)
    except BuildCancelled:
        log.info("build %s cancelled", build_id)
    except TinyMLaaSError as e:
        _fail(sessions, build_id, lease, str(e))
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            log.error("build %s: %s", build_id, traceback.format_exc())
            _fail(sessions, build_id, lease, f"internal error: {type(e).__name__}: {e}")
        else:
            _fail(sessions, build_id, lease, f"no space left on device ({e.filename or 'the build folder'})")
    except Exception as e:  # noqa: BLE001 - a bug, not the user's input: keep the trace in the log, a line in the build
        log.error("build %s: %s", build_id, traceback.format_exc())
        _fail(sessions, build_id, lease, f"internal error: {type(e).__name__}: {e}")


def _search(model_path: Path, target: str, request: BuildRequest, tmp: Path, sessions, build_id: int,
            lease: Lease):
    """The variant search a build asked for; its progress is the build's (stage "search", up to SEARCH_SHARE).
    Returns the chosen Variant, the folder with front.json and front.png, and a summary for the build's report."""
    from tinymlaas.search.result import write_result
    from tinymlaas.search.search import search
    from tinymlaas.search.space import Variant

    def progress(done: int, total: int, point) -> None:
        with sessions() as s:
            b = s.get(Build, build_id)
            lease.check(b)
            b.stage, b.progress = "search", round(SEARCH_SHARE * done / total, 3)
            b.message = f"search: {done} of {total} variants built"
            s.commit()

    result = search(model_path, target, tmp / "search", replace(request, inputs=request.inputs or 3, workers=1),
                    progress=progress)
    write_result(result, tmp / "front")
    if result.chosen is None:
        raise TinyMLaaSError(f"no variant of {len(result.points)} built satisfies the constraints")
    with sessions() as s:
        b = s.get(Build, build_id)
        b.message = None
        s.commit()
    return Variant.from_dict(result.points[result.chosen].variant), tmp / "front", result.summary()


def _fail(sessions, build_id: int, lease: Lease, message: str) -> None:
    with sessions() as s:
        b = s.get(Build, build_id)
        if b.state != "cancelled" and b.lease_owner == lease.owner:
            b.state, b.message = "failed", message[:2000]
            s.commit()


def recover_builds(settings: Settings) -> list[int]:
    """Open builds that nobody runs go back to the queue (they restart from scratch): those whose worker's lease
    lapsed, and queued ones whose task is not in the queue. Each is taken back with one conditional UPDATE, so
    workers recovering at the same time requeue a build once."""
    engine = make_engine(settings.database_url)
    try:
        return _recover_builds(settings, make_sessionmaker(engine))
    finally:
        engine.dispose()  # called once a lease length: without this each call leaves connections open


def _recover_builds(settings: Settings, sessions) -> list[int]:
    huey = make_huey(settings.queue_url)
    queued_ids = {t.args[0] for t in huey.pending() if t.name.endswith("run_build") and t.args}
    unclaimed = or_(Build.lease_owner.is_(None), Build.lease_expires_at < now())
    requeued = []
    with sessions() as s:
        ids = s.scalars(select(Build.id).where(Build.state.in_(OPEN_BUILD_STATES), unclaimed)).all()
        for build_id in ids:
            if build_id in queued_ids:
                continue
            open_unclaimed = (Build.id == build_id, Build.state.in_(OPEN_BUILD_STATES), unclaimed)
            if s.execute(update(Build).where(*open_unclaimed, Build.attempts >= 3).values(
                    state="failed", lease_owner=None, message="gave up after 3 interrupted attempts")).rowcount:
                continue
            if s.execute(update(Build).where(*open_unclaimed).values(
                    state="queued", stage=None, progress=0.0, lease_owner=None, lease_expires_at=None,
                    message="resumed after its worker stopped")).rowcount:
                requeued.append(build_id)
        s.commit()
    for build_id in requeued:
        enqueue_build(settings.queue_url, build_id)
    return requeued


def _keep_recovering(settings: Settings) -> None:
    while True:
        time.sleep(settings.build_lease_seconds)
        try:
            requeued = recover_builds(settings)
        except Exception:  # noqa: BLE001 - the database may be briefly unavailable; try again next round
            log.warning("recovering builds failed: %s", traceback.format_exc())
            continue
        if requeued:
            log.warning("requeued builds whose worker stopped: %s", requeued)


def run_worker(settings: Settings, workers: int = 1) -> None:
    """A Huey consumer in this process (signals handled by Huey): `tinymlaas worker`. It also requeues, once a
    lease length, builds whose worker stopped (a killed server's workers die with it, their leases lapse)."""
    ensure_signing_key(settings)
    huey = make_huey(settings.queue_url)
    requeued = recover_builds(settings)
    if requeued:
        log.warning("requeued interrupted builds: %s", requeued)
    threading.Thread(target=_keep_recovering, args=(settings,), name="recover", daemon=True).start()
    huey.create_consumer(workers=workers, worker_type="process" if workers > 1 else "thread",
                         periodic=False).run()
