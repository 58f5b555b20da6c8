from flask import request, send_file
from sqlalchemy import select

from .. import db
from ..broker import check_secret
from ..services.common import ServiceError
from ..services.tenants import principal_for_token
from . import ctx, session
from .blueprint import Blueprint

blp = Blueprint("artifacts", __name__, description="Content-addressed downloads (range requests resume)")


def _device_may_fetch(device_id: str, digest: str) -> bool:
    """A device may fetch the artifacts of builds that a deployment sent to it."""
    rows = session().execute(
        select(db.Build.artifacts).join(db.Deployment, db.Deployment.build_id == db.Build.id)
        .join(db.DeviceJob, db.DeviceJob.deployment_id == db.Deployment.id)
        .where(db.DeviceJob.device_id == device_id)
    ).all()
    return any(digest in (a or {}).values() for (a,) in rows)


def _org_holds(org_id: int, digest: str) -> bool:
    """A user sees the artifacts of its organisation's models and builds, no others."""
    if session().scalar(select(db.Model.id).where(db.Model.org_id == org_id, db.Model.sha256 == digest).limit(1)):
        return True
    rows = session().execute(select(db.Build.artifacts).where(db.Build.org_id == org_id)).all()
    return any(digest in (a or {}).values() for (a,) in rows)


@blp.route("/artifacts/<digest>", methods=["GET"])
@blp.response(200, content_type="application/octet-stream")
@blp.doc(security=[{"token": []}, {"device": []}])
def download(digest):
    """An artifact by its SHA-256, for users (token) and for devices (HTTP Basic: id and MQTT secret)."""
    auth = request.authorization
    allowed = False
    if auth is not None and auth.type == "basic":
        device = session().get(db.Device, auth.username or "")
        allowed = bool(device and check_secret(auth.password or "", device.secret_hash)
                       and _device_may_fetch(device.id, digest))
    elif auth is not None and auth.type == "bearer":
        who = principal_for_token(session(), auth.token or "")
        who.need("read")
        if not _org_holds(who.org_id, digest):  # another tenant's artifact is as absent as a missing one
            raise ServiceError(404, f"no artifact {digest}")
        allowed = True
    if not allowed:
        raise ServiceError(401, "a user token, or the credentials of a device this artifact was deployed to",
                           "Authorization")
    if digest not in ctx().store:
        raise ServiceError(404, f"no artifact {digest}")
    return send_file(ctx().store.path(digest), mimetype="application/octet-stream", conditional=True,
                     etag=digest)
