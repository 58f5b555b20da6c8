from datetime import UTC

from flask import jsonify
from marshmallow import RAISE

from tinymlaas.ota.package import public_key_pem

from .. import db
from ..broker import ROOT
from ..jobs import ensure_signing_key
from ..services.common import ServiceError, of_org
from ..services.devices import device_named, register_device, rotate_device_secret
from ..tls import DevCA
from . import ctx, require, schemas, session
from .blueprint import Blueprint

blp = Blueprint("devices", __name__, description="Device registry")


@blp.route("/devices", methods=["POST"])
@blp.arguments(schemas.DeviceRegister)
@blp.response(201, schemas.DeviceRegistered)
def register(body):
    """Register a device; the answer holds its MQTT credentials (shown once) and the image signing key."""
    device, secret = register_device(session(), require("deploy"), body["id"], body["target"], body["group"],
                                     body["firmware_version"])
    c = ctx()
    if c.coordinator is not None:
        c.coordinator.credentials_changed()
    # the device's attributes (the response schema dumps them: its `id` is the device's name)
    out = {f.attribute or k: getattr(device, f.attribute or k) for k, f in schemas.Device().fields.items()}
    out["mqtt"] = {"host": c.settings.mqtt_host, "port": c.settings.mqtt_port, "username": device.id,
                   "password": secret, "topic_root": f"{ROOT}/devices/{device.id}", **_tls_credentials(device.id)}
    out["signing_key"] = public_key_pem(ensure_signing_key(c.settings)).decode()
    out["downloads"] = c.settings.public_url.rstrip("/") + "/api/v1/artifacts/"  # the only place jobs point to
    return out


def _tls_credentials(device_id: str) -> dict:
    """With MQTT over TLS: the CA to verify the broker with, and (when the broker asks for one) the device's own
    certificate and key, issued now (shown once, like the secret)."""
    s = ctx().settings
    if not s.mqtt_tls:
        return {"tls": False}
    ca = DevCA(s.tls_dir)
    out = {"tls": True, "ca": ca.ca_cert.read_text()}
    if s.mqtt_client_certs:
        cert, key = ca.issue(device_id)
        out.update(certificate=cert.decode(), private_key=key.decode())
    return out


LISTED = tuple(schemas.Device().fields)  # the schema's fields, in its order


@blp.route("/devices", methods=["GET"])
@blp.arguments(schemas.DeviceQuery, location="query", unknown=RAISE)  # a misspelt filter: 422, not every device
@blp.response(200, schemas.Device(many=True))
def list_devices(query):
    """The organisation's devices (of a group). Rows straight from the columns the schema lists, not ORM objects
    through marshmallow: a fleet's list is the API's hottest answer (200 rows: 8.6 -> ~2 ms)."""
    who = require()
    columns = [getattr(db.Device, field.attribute or name) for name, field in schemas.Device().fields.items()]
    q = of_org(who, *columns, order=db.Device.name)
    if query.get("group"):
        q = q.where(db.Device.group == query["group"])
    return jsonify([device_row(row) for row in session().execute(q)])


def _device_or_404(name: str, who) -> db.Device:
    device = device_named(session(), who, name)
    if device is None:
        raise ServiceError(404, f"no device {name!r}")
    return device


def device_row(row) -> dict:
    """One device as schemas.Device dumps it (tests/service/test_api.py compares the two)."""
    out = dict(zip(LISTED, row, strict=True))
    seen = out["last_seen"]
    out["last_seen"] = None if seen is None else (seen if seen.tzinfo else seen.replace(tzinfo=UTC)).isoformat()
    return out


@blp.route("/devices/<device_id>", methods=["GET"])
@blp.response(200, schemas.Device)
def get_device(device_id):
    return _device_or_404(device_id, require())


@blp.route("/devices/<device_id>/credentials", methods=["POST"])
@blp.response(200, schemas.DeviceCredentials)
def rotate(device_id):
    """Rotate a device's secret: the answer holds the new one (shown once); downloads and new MQTT connections
    with the old one are refused from now on."""
    who = require("deploy")
    device = _device_or_404(device_id, who)
    secret = rotate_device_secret(session(), who, device)
    if ctx().coordinator is not None:
        ctx().coordinator.credentials_changed()
    return {"username": device.id, "password": secret}
