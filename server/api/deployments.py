from tinymlaas.ota.rollout import RolloutPlan

from .. import db
from ..services.common import of_org
from ..services.deployments import (
    cancel_deployment,
    create_deployment,
    deployment_summary,
    events_of,
    jobs_of,
    rollback,
)
from . import ctx, get_or_404, require, schemas, session
from .blueprint import Blueprint

blp = Blueprint("deployments", __name__, description="Staged OTA rollouts of a build to a device group")


def _started(dep: db.Deployment) -> db.Deployment:
    ctx().deployment_started(dep.id)
    session().refresh(dep)
    return dep


@blp.route("/deployments", methods=["POST"])
@blp.arguments(schemas.DeploymentRequest)
@blp.response(201, schemas.Deployment)
def create(body):
    """Deploy a finished build to a group, stage by stage; immutable once created."""
    who = require("deploy")
    plan = RolloutPlan(tuple(body["stages"]), body["success_threshold"], body["error_threshold"], body["job_timeout"])
    dep = create_deployment(session(), who, body["build_id"], body["group"], plan, body["force"])
    return _started(dep)


@blp.route("/deployments", methods=["GET"])
@blp.response(200, schemas.Deployment(many=True))
def list_deployments():
    who = require()
    return session().scalars(of_org(who, db.Deployment)).all()


def _deployment(dep_id: int, who) -> db.Deployment:
    return get_or_404(db.Deployment, dep_id, "deployment", who)


@blp.route("/deployments/<int:dep_id>", methods=["GET"])
@blp.response(200, schemas.DeploymentStatus)
def status(dep_id):
    """The rollout: state, per-stage device statuses, every device's job and the rollout's history."""
    dep = _deployment(dep_id, require())
    out = {c.name: getattr(dep, c.name) for c in db.Deployment.__table__.columns}
    return {**out, "summary": deployment_summary(session(), dep), "jobs": jobs_of(session(), dep),
            "events": events_of(session(), dep)}


@blp.route("/deployments/<int:dep_id>/rollback", methods=["POST"])
@blp.response(201, schemas.Deployment)
def roll_back(dep_id):
    """A new deployment of the build the group ran before this one (forced: it is a downgrade)."""
    who = require("deploy")
    return _started(rollback(session(), who, _deployment(dep_id, who).id))


@blp.route("/deployments/<int:dep_id>/cancel", methods=["POST"])
@blp.response(200, schemas.Deployment)
def cancel(dep_id):
    """Stop a rollout in progress: no further device is notified (those already updating finish); the group is free
    for a new deployment."""
    who = require("deploy")
    return cancel_deployment(session(), who, _deployment(dep_id, who).id)
