from flask_smorest import Blueprint
from sqlalchemy import select

from tinymlaas.ota.package import public_key_pem

from .. import db
from ..broker import ROOT
from ..jobs import ensure_signing_key
from ..service import register_device
from . import ctx, get_or_404, require_user, schemas, session

blp = Blueprint("devices", __name__, description="Device registry")


@blp.route("/devices", methods=["POST"])
@blp.arguments(schemas.DeviceRegister)
@blp.response(201, schemas.DeviceRegistered)
def register(body):
    """Register a device; the answer holds its MQTT credentials (shown once) and the image signing key."""
    user = require_user()
    device, secret = register_device(session(), user, body["id"], body["target"], body["group"],
                                     body["firmware_version"])
    c = ctx()
    if c.coordinator is not None:
        c.coordinator.credentials_changed()
    out = schemas.Device().dump(device)
    out["mqtt"] = {"host": c.settings.mqtt_host, "port": c.settings.mqtt_port, "username": device.id,
                   "password": secret, "topic_root": f"{ROOT}/devices/{device.id}"}
    out["signing_key"] = public_key_pem(ensure_signing_key(c.settings)).decode()
    out["downloads"] = c.settings.public_url.rstrip("/") + "/api/v1/artifacts/"  # the only place jobs point to
    return out


@blp.route("/devices", methods=["GET"])
@blp.arguments(schemas.DeviceQuery, location="query")
@blp.response(200, schemas.Device(many=True))
def list_devices(query):
    require_user()
    q = select(db.Device).order_by(db.Device.id)
    if query.get("group"):
        q = q.where(db.Device.group == query["group"])
    return session().scalars(q).all()


@blp.route("/devices/<device_id>", methods=["GET"])
@blp.response(200, schemas.Device)
def get_device(device_id):
    require_user()
    return get_or_404(db.Device, device_id, "device")
