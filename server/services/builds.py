"""Builds: a request checked and queued (the workers in server/jobs.py run it), and a cancellation."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from tinymlaas.backends import backend_for, builds_format, targets_of
from tinymlaas.build.formats import FORMATS
from tinymlaas.build.request import BuildRequest, InvalidRequest
from tinymlaas.frontend.lowbit import WEIGHT_SETS
from tinymlaas.ota.package import canonical_version
from tinymlaas.runners import runner_class
from tinymlaas.targets import get_target

from ..db import Build, Model, User
from .common import Principal, ServiceError, owned, target_or_422

# a build request's `validation` when it is the model's uploaded set (the worker reads it from the artifact store)
VALIDATION_OF_MODEL = "model"
BUILD_FINAL = ("done", "failed", "cancelled")  # a build is queued, building or emulating before one of these
OPEN_BUILD_STATES = ("queued", "building", "emulating")


def request_build(session: Session, who: Principal, model_id: int, target: str, request: BuildRequest | None = None,
                  version: str | None = None, max_open: int | None = None, store=None) -> Build:
    """Queue a build, its request checked as the CLI and the worker check it. max_open: how many of the user's
    builds may be queued or running at once (429 beyond). store (the artifact store): with it, weights int4 or
    palette with a max_accuracy_drop are measured on the model's validation set before anything is queued (422
    beyond the limit)."""
    who.need("build")
    request = request or BuildRequest()
    checked_request(request, target_or_422(target))
    if max_open is not None:
        # the user's row locked until this transaction ends (a no-op write: a row lock in PostgreSQL, the write
        # lock in SQLite), so that a concurrent request counts after this one's build is in
        session.execute(update(User).where(User.id == who.user.id).values(role=User.role))
        open_builds = session.scalar(select(func.count()).select_from(Build).where(
            Build.owner_id == who.user.id, Build.state.in_(OPEN_BUILD_STATES)))
        if open_builds >= max_open:
            session.rollback()
            raise ServiceError(429, f"{open_builds} of your builds are queued or running, the most at once is "
                               f"{max_open}; wait for some to finish (or cancel them)")
    model = owned(session, who, Model, model_id)
    if model is None:
        raise ServiceError(422, f"no model {model_id}", "model_id")
    fmt = FORMATS[model.format]
    if fmt.name not in backend_for(get_target(target)).formats:
        raise ServiceError(422, f"model {model.id} is one of the {fmt.what}: they build for "
                           f"{targets_of(builds_format(fmt.name))}, not for {target}", "target")
    auto = "auto" in request.weights.split(",")
    if request.weights in WEIGHT_SETS and request.budget is None:
        raise ServiceError(422, f"weights {request.weights} is a set of precisions for a search to explore "
                           "(search.budget); a build takes one: int4, palette, or auto (chosen per layer)", "weights")
    if (auto or request.max_accuracy_drop is not None) and not model.validation_sha256:
        raise ServiceError(422, f"{'weights auto' if auto else 'max_accuracy_drop'} is judged "
                           f"on held-out samples: upload model {model.id}'s first (PUT /api/v1/models/{model.id}/"
                           "validation, an .npz of x and y)", "weights" if auto else "max_accuracy_drop")
    if model.validation_sha256 and backend_for(get_target(target)).name == "mcu":  # its accuracy in every report
        request = checked_request(replace(request, validation=VALIDATION_OF_MODEL), get_target(target))
    if request.weights not in ("stored", "float32") and not model.quantized \
            and request.quantize in ("none", "float16"):
        raise ServiceError(422, f"weights {request.weights} re-quantizes an integer model's int8 weights: model "
                           f"{model.id} is float (upload an int8 model)", "weights")
    if store is not None and request.weights in ("int4", "palette") and request.max_accuracy_drop is not None \
            and request.variant_file is None:
        _within_the_limit(store, model, request)
    if version is not None:
        try:
            version = canonical_version(version)
        except ValueError as e:
            raise ServiceError(422, str(e), "version") from None
    build = Build(model_id=model.id, target=target, request=request, version=version or "",
                  owner_id=who.user.id, org_id=who.org_id)
    session.add(build)
    session.flush()
    if not version:
        build.version = f"1.0.{build.id}+0"  # later builds are newer
    session.commit()
    return build


def _within_the_limit(store, model: Model, request: BuildRequest) -> None:
    """weights int4 or palette (every eligible layer) measured on the model's validation set against its
    max_accuracy_drop, as the build would measure them: 422 naming max_accuracy_drop beyond it (or naming what else
    the model cannot have), so that the refusal comes before anything is queued. The interpreter runs the model
    over the set twice (as given and rewritten): what the worker would do first."""
    import tempfile

    from tinymlaas.errors import TinyMLaaSError
    from tinymlaas.frontend.lowbit import low_bit_weights

    from .models import load_stored

    with tempfile.TemporaryDirectory() as tmp:
        npz = Path(tmp) / "validation.npz"
        npz.write_bytes(store.read(model.validation_sha256))
        try:
            loaded = load_stored(store, model, Path(tmp))
            low_bit_weights(loaded, replace(request, validation=str(npz)))
        except InvalidRequest as e:
            field = request_field(e.name)
            raise ServiceError(422, f"{field} {e.why.replace('--weights', 'weights')}", field) from None
        except TinyMLaaSError as e:  # the model's validation set no longer fits it: the upload is the one to redo
            raise ServiceError(422, str(e).replace(str(npz), "the validation set"), "weights") from None


def with_variant(store, request: BuildRequest, variant) -> BuildRequest:
    """The request building exactly `variant` (a search point's per-layer kernels, schedules, fusion, memory plan and
    weights, as a search's front.json or a build's report.json holds it), checked as `--variant` checks a file and
    kept in the artifact store for the worker; refused with a search (a search chooses its own variant)."""
    import json
    import tempfile

    from tinymlaas.search.space import load_variant

    if request.budget is not None:
        raise ServiceError(422, "a build either searches (search.budget) or builds one given variant, not both",
                           "variant")
    data = json.dumps({"variant": variant}).encode()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "variant.json"
        path.write_bytes(data)
        try:
            load_variant(path)
        except InvalidRequest as e:
            raise ServiceError(422, e.why.replace(f"{path}: ", ""), "variant") from None
    return replace(request, variant_file=str(store.path(store.put_bytes(data))))


def checked_request(request: BuildRequest, target) -> BuildRequest:
    """The request as the CLI checks it, plus what only a service needs: a build for devices is verified on a
    runner whose firmware is linked as a device's image. Errors name the field as the request nests it."""
    try:
        request.check(target)
    except InvalidRequest as e:
        field = request_field(e.name)
        raise ServiceError(422, f"{field} {e.why}", field) from None
    runner = request.emulator
    if runner is not None and backend_for(target).deployable(target) and not runner_class(runner).device_images:
        raise ServiceError(422, f"emulator {runner}: its firmware is not linked as a device's image; builds for "
                           f"{target.name} devices run on a runner whose is", "emulator")
    return request


def request_field(name: str) -> str:
    """Where an option sits in the service's request: `search.budget`, `max_ram` in `constraints`, ..."""
    from tinymlaas.build.request import OPTIONS

    group = OPTIONS[name].group if name in OPTIONS else None
    return f"{group}.{name}" if group else name


def cancel_build(session: Session, who: Principal, build: Build) -> Build:
    who.need("build")
    if build.state in BUILD_FINAL:
        raise ServiceError(409, f"build {build.id} is already {build.state}")
    build.state, build.message = "cancelled", f"cancelled by {who.user.name}"
    session.commit()
    return build
