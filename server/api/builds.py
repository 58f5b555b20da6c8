from flask import send_file

from tinymlaas.build.request import BuildRequest

from .. import db
from ..services.builds import cancel_build, request_build, with_variant
from ..services.common import ServiceError, of_org
from . import ctx, get_or_404, require, schemas, session
from .blueprint import Blueprint

blp = Blueprint("builds", __name__, description="Build jobs: compile, verify in the emulator, sign")


@blp.route("/builds", methods=["POST"])
@blp.arguments(schemas.BuildRequest)
@blp.response(202, schemas.Build)
def create(body):
    """Queue a build of a model for a target; poll its state and progress."""
    who = require("build")
    request = BuildRequest.from_grouped(body)
    if body.get("variant") is not None:
        request = with_variant(ctx().store, request, body["variant"])
    build = request_build(session(), who, body["model_id"], body["target"], request, body["version"],
                          max_open=ctx().settings.max_open_builds, store=ctx().store)
    ctx().enqueue_build(build.id)
    return build


@blp.route("/builds", methods=["GET"])
@blp.response(200, schemas.Build(many=True))
def list_builds():
    who = require()
    return session().scalars(of_org(who, db.Build)).all()


def _build(build_id: int, who) -> db.Build:
    return get_or_404(db.Build, build_id, "build", who)


@blp.route("/builds/<int:build_id>", methods=["GET"])
@blp.response(200, schemas.Build)
def get_build(build_id):
    return _build(build_id, require())


@blp.route("/builds/<int:build_id>/cancel", methods=["POST"])
@blp.response(200, schemas.Build)
def cancel(build_id):
    who = require("build")
    return cancel_build(session(), who, _build(build_id, who))


ARTIFACT_FILES = {"image": "image.signed.bin", "firmware": "firmware.elf", "payload": "firmware.bin",
                  "report": "report.json", "selftest": "selftest.json", "front": "front.json", "front_plot": "front.png",
                  "library": "model.so", "metadata": "metadata.json",  # these two: host targets
                  "platformio": "platformio.zip", "model_image": "model.signed.bin"}


@blp.route("/builds/<int:build_id>/artifacts/<name>", methods=["GET"])
@blp.response(200, content_type="application/octet-stream")
def artifact(build_id, name):
    """One artifact of a finished build: image (signed MCUboot), firmware (ELF), payload, report, selftest; after a
    search also its Pareto front (front: JSON, front_plot: PNG)."""
    build = _build(build_id, require())
    if name not in ARTIFACT_FILES:
        raise ServiceError(404, f"no artifact '{name}'; one of: {', '.join(ARTIFACT_FILES)}", "name")
    if name not in (build.artifacts or {}):
        raise ServiceError(409, f"build {build_id} is {build.state}; artifacts exist once it is done")
    return send_file(ctx().store.path(build.artifacts[name]), download_name=f"build{build_id}-{ARTIFACT_FILES[name]}",
                     conditional=True)
