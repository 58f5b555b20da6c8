"""Request and response schemas (marshmallow), which also make the OpenAPI document."""

from datetime import UTC

from flask_smorest.fields import Upload
from marshmallow import Schema, ValidationError, fields, validate

from tinymlaas.backends import backend_for
from tinymlaas.ota.package import parse_version
from tinymlaas.ota.rollout import JOB_TIMEOUT_RANGE
from tinymlaas.targets import all_targets

from ..db import MAX_ID, ROLES, SCOPES
from ..services.common import (
    DEVICE_ID,
    DEVICE_ID_RULE,
    GROUP_NAME,
    GROUP_NAME_RULE,
    TOKEN_NAME,
    TOKEN_NAME_RULE,
    USER_NAME,
    USER_NAME_RULE,
)
from .request_schema import request_fields


def Pattern(regex, rule: str) -> validate.Regexp:
    """The service's check of a name, in the document (the service itself matches whole strings)."""
    return validate.Regexp(f"^{regex.pattern}$", error=rule)


def _up_to(limit: int) -> str:
    """A regular expression of the decimal numbers 0..limit, without leading zeros."""
    digits, alternatives = str(limit), []
    for k, d in enumerate(digits):  # the numbers as long as limit: a prefix of it, then a smaller digit
        if k == len(digits) - 1:
            alternatives.append(f"{digits[:k]}[0-{d}]")
        elif d != "0":
            lowest = "1" if k == 0 else "0"
            if int(d) - 1 >= int(lowest):
                alternatives.append(f"{digits[:k]}[{lowest}-{int(d) - 1}][0-9]{{{len(digits) - k - 1}}}")
    if len(digits) > 1:  # the shorter ones
        alternatives.append(f"[1-9][0-9]{{0,{len(digits) - 2}}}" if len(digits) > 2 else "[1-9]")
    alternatives.append("0")
    return "(?:" + "|".join(alternatives) + ")"


# what an MCUboot image header holds (tinymlaas.ota.package VERSION_LIMITS), as the document states it
FIRMWARE_VERSION = (f"^{_up_to(255)}(?:\\.{_up_to(255)}(?:\\.{_up_to(65535)})?)?(?:\\+{_up_to(2**32 - 1)})?$")


class FirmwareVersion(validate.Regexp):
    """A version an MCUboot image header can hold, in the document's pattern, checked again by
    tinymlaas.ota.package.parse_version."""

    def __init__(self):
        super().__init__(FIRMWARE_VERSION, error="'{input}' is not major.minor.revision[+build] within an MCUboot "
                         "header's limits (255.255.65535+4294967295)")

    def __call__(self, value):
        if value is not None:
            super().__call__(value)
            try:
                parse_version(value)
            except ValueError as e:
                raise ValidationError(str(e)) from None
        return value


DEFAULT_TOKEN_DAYS = 90
TARGETS = sorted(all_targets())
DEVICE_TARGETS = sorted(name for name, t in all_targets().items() if backend_for(t).deployable(t))


def Target(names, error: str = "unknown target '{input}'; known targets: {choices}") -> validate.OneOf:
    return validate.OneOf(names, error=error)


class Problem(Schema):
    """Every error's body (RFC 9457), served as application/problem+json."""

    type = fields.String(metadata={"description": "always about:blank"})
    title = fields.String(metadata={"description": "the status code's phrase"})
    status = fields.Integer()
    detail = fields.String(metadata={"description": "what is wrong, in one line"})
    field = fields.String(metadata={"description": "the request field, header or parameter at fault, when one is"})
    errors = fields.Dict(metadata={"description": "validation messages by location and field"})


def Id(**kwargs):
    """An id in a request: a positive integer the database can hold (larger ones would overflow it)."""
    return fields.Integer(strict=True, validate=validate.Range(min=1, max=MAX_ID), **kwargs)


class UtcDateTime(fields.DateTime):
    """RFC 3339 with a timezone: the database keeps UTC without one."""

    def _serialize(self, value, attr, obj, **kwargs):
        if value is not None and value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        return super()._serialize(value, attr, obj, **kwargs)


class DeviceRegister(Schema):
    id = fields.String(required=True, validate=Pattern(DEVICE_ID, DEVICE_ID_RULE),
                       metadata={"description": "device id; also its MQTT user name"})
    target = fields.String(required=True, validate=Target(
        DEVICE_TARGETS, "'{input}' is an unknown target or a core simulated from its RTL for true cycles (no "
        "devices); device targets: {choices}"),
                           metadata={"description": "a target name, see `tinymlaas targets`"})
    group = fields.String(load_default="default", validate=Pattern(GROUP_NAME, GROUP_NAME_RULE))
    firmware_version = fields.String(load_default=None, allow_none=True, validate=FirmwareVersion(), metadata={
        "description": "what the device runs now, major.minor.revision[+build] (an MCUboot image header's)"})


class Device(Schema):
    id = fields.String(attribute="name", metadata={"description": "the device's name, unique within the organisation"})
    target = fields.String()
    group = fields.String()
    flash_bytes = fields.Integer()
    ram_bytes = fields.Integer()
    firmware_version = fields.String(allow_none=True)
    build_id = fields.Integer(allow_none=True)
    state = fields.String()
    last_seen = UtcDateTime(allow_none=True)
    instructions = fields.Integer(allow_none=True, metadata={"description": "last measured instructions/inference"})
    slot = fields.Integer(allow_none=True, metadata={"description": "the A/B slot it booted (0: A, 1: B), as it "
                                                     "reports it"})


class MqttCredentials(Schema):
    host = fields.String()
    port = fields.Integer()
    username = fields.String()
    password = fields.String()
    topic_root = fields.String()
    tls = fields.Boolean(metadata={"description": "connect with TLS, verifying the broker with `ca`"})
    ca = fields.String(metadata={"description": "PEM: the CA the broker's certificate is signed by"})
    certificate = fields.String(metadata={"description": "PEM: this device's client certificate, when the broker "
                                          "asks for one"})
    private_key = fields.String(metadata={"description": "PEM: its key (shown once)"})


class DeviceRegistered(Device):
    mqtt = fields.Nested(MqttCredentials)
    signing_key = fields.String(metadata={"description": "PEM public key the device trusts for images"})
    downloads = fields.String(metadata={"description": "where job documents may point the device for images; a "
                                        "device follows no other download URL"})


class DeviceQuery(Schema):
    group = fields.String(validate=Pattern(GROUP_NAME, GROUP_NAME_RULE))


class ModelUpload(Schema):
    file = Upload(required=True, metadata={"description": "a .tflite file, a .keras/.h5 file (converted with TensorFlow), "
                                                          "or an .onnx file (float or QDQ int8; every target)"})
    calibration = Upload(metadata={"description": "for a Keras model quantized here (form field `quantize`): an .npz "
                                                  "of its calibration samples, one array per input named after it "
                                                  "(samples first); without one it is calibrated on generated inputs "
                                                  "and its notes say so"})


class Model(Schema):
    id = fields.Integer()
    name = fields.String()
    sha256 = fields.String()
    size = fields.Integer()
    quantized = fields.Boolean()
    operators = fields.List(fields.String())
    format = fields.String(metadata={"description": "tflite or onnx (both for every target)"})
    notes = fields.List(fields.String(), metadata={"description": "what converting it did (a Keras model: "
                                                                  "TensorFlow's version, quantization, calibration)"})
    validation_samples = fields.Integer(allow_none=True, metadata={
        "description": "samples of its validation set (PUT /models/{id}/validation), none without one: every "
                       "microcontroller build reports its accuracy on them"})
    created_at = UtcDateTime()


class ValidationUpload(Schema):
    file = Upload(required=True, metadata={"description": "an .npz with `x` (samples, the sample axis first) and "
                                                          "`y` (labels, or target outputs for mse)"})


class BuildRequestBase(Schema):
    model_id = Id(required=True)
    target = fields.String(required=True, validate=Target(TARGETS))
    version = fields.String(load_default=None, allow_none=True, validate=validate.Regexp(
                                r"^\d+(\.\d+){0,2}(\+\d+)?$", error="'{input}' is not major.minor.revision[+build]"),
                            metadata={"description": "image version major.minor.revision[+build]; default 1.0.<id>"})
    variant = fields.Dict(load_default=None, allow_none=True, metadata={
        "description": "build exactly this variant: per-layer `kernels`, `layers` (schedules), `schedule`, `fusion`, "
                       "`memory`, `weights`, as a search's front.json point or a build's report holds it (not with "
                       "a search)"})


# the build options come from their one declaration (tinymlaas.build.request), as the CLI's flags do
BuildRequest = type("BuildRequest", (BuildRequestBase,), request_fields())


class Build(Schema):
    id = fields.Integer()
    model_id = fields.Integer()
    target = fields.String()
    request = fields.Function(lambda b: b.request.grouped(), metadata={
        "description": "the build options asked for (those not at their defaults), nested as in the request"})
    constraints = fields.Function(lambda b: b.request.grouped().get("constraints", {}),
                                  metadata={"description": "the budgets asked for (also in `request`)"})
    version = fields.String()
    state = fields.String(metadata={"description": "queued, building, emulating, done, failed, cancelled"})
    stage = fields.String(allow_none=True)
    progress = fields.Float()
    message = fields.String(allow_none=True)
    report = fields.Dict(allow_none=True)
    artifacts = fields.Dict(keys=fields.String(), values=fields.String())
    created_at = UtcDateTime()
    updated_at = UtcDateTime()


class DeploymentRequest(Schema):
    build_id = Id(required=True)
    group = fields.String(load_default="default", validate=Pattern(GROUP_NAME, GROUP_NAME_RULE))
    stages = fields.List(fields.Integer(validate=validate.Range(1, 100)), load_default=lambda: [100],
                         validate=validate.Length(1, 100),
                         metadata={"description": "cumulative percentages of the group, strictly increasing, the last "
                                   "100, e.g. [10, 50, 100]"})
    # apispec writes Range(min_inclusive=False) as a plain minimum: the exclusive bound stated here (OpenAPI 3.0)
    success_threshold = fields.Float(load_default=1.0, validate=validate.Range(0, 1, min_inclusive=False),
                                     metadata={"exclusiveMinimum": True})
    error_threshold = fields.Float(load_default=0.1, validate=validate.Range(0, 1, min_inclusive=False),
                                   metadata={"exclusiveMinimum": True})
    job_timeout = fields.Integer(load_default=1800, validate=validate.Range(*JOB_TIMEOUT_RANGE), metadata={
        "description": "seconds a notified device may stay silent before its job counts as failed (timed_out)"})
    force = fields.Boolean(load_default=False, metadata={"description": "allow a downgrade"})


class Deployment(Schema):
    id = fields.Integer(metadata={"description": "also the deployment's sequence number"})
    build_id = fields.Integer()
    group = fields.String()
    stages = fields.List(fields.Integer())
    success_threshold = fields.Float()
    error_threshold = fields.Float()
    job_timeout = fields.Integer()
    force = fields.Boolean()
    rollback_of = fields.Integer(allow_none=True)
    state = fields.String(metadata={"description": "in_progress, succeeded, halted, cancelled"})
    current_stage = fields.Integer()
    reason = fields.String(allow_none=True)
    created_at = UtcDateTime()


class DeviceJob(Schema):
    id = fields.String()
    device_id = fields.String(attribute="device.name", metadata={"description": "the device's name"})
    stage = fields.Integer()
    status = fields.String()
    step = fields.String(allow_none=True)
    progress = fields.Float()
    message = fields.String(allow_none=True)
    instructions = fields.Integer(allow_none=True)
    payload = fields.String(allow_none=True, metadata={
        "description": "what went over the air: delta (a signed patch from the image the device ran), compressed "
                       "(LZMA2) or full; a device that could not use a patch says so (e.g. 'full (wrong-base "
                       "delta)')"})
    payload_bytes = fields.Integer(allow_none=True)


class DeploymentEvent(Schema):
    at = UtcDateTime()
    kind = fields.String(metadata={"description": "created, stage_started, device_succeeded, device_failed, "
                                                  "device_rejected, device_timed_out, succeeded, halted, cancelled"})
    stage = fields.Integer(allow_none=True, metadata={"description": "the stage (from 0), where one applies"})
    device = fields.String(allow_none=True, metadata={"description": "the device's name, where one applies"})
    detail = fields.String(allow_none=True)


class DeploymentStatus(Deployment):
    summary = fields.Dict()
    jobs = fields.List(fields.Nested(DeviceJob))
    events = fields.List(fields.Nested(DeploymentEvent), metadata={"description": "the rollout's history, oldest "
                                                                                   "first"})


# tenants: users and tokens

SCOPE = fields.String(validate=validate.OneOf(SCOPES))


class UserCreate(Schema):
    name = fields.String(required=True, validate=Pattern(USER_NAME, USER_NAME_RULE),
                         metadata={"description": "lower-case letters, digits, '.', '_', '-', '@'"})
    role = fields.String(load_default="developer", validate=validate.OneOf(tuple(ROLES)))


class User(Schema):
    id = fields.Integer()
    name = fields.String()
    role = fields.String(metadata={"description": "admin (everything, users and tokens), developer (models, builds, "
                                   "devices, deployments), viewer (read only)"})
    created_at = UtcDateTime()


class UserCreated(User):
    token = fields.String(metadata={"description": "the user's first API token (shown once)"})


class Me(Schema):
    user = fields.String()
    organization = fields.String()
    role = fields.String()
    scopes = fields.List(fields.String(), metadata={"description": "what this token may do"})
    token = fields.String(metadata={"description": "this token's name"})


class TokenCreate(Schema):
    name = fields.String(required=True, validate=Pattern(TOKEN_NAME, TOKEN_NAME_RULE))
    scopes = fields.List(SCOPE, load_default=None, allow_none=True, validate=validate.Length(min=1),
                         metadata={"description": "default: every scope of your role"})
    expires_in_days = fields.Integer(allow_none=True, strict=True, validate=validate.Range(min=1, max=3650),
                                     metadata={"description": f"null: until revoked; default {DEFAULT_TOKEN_DAYS}, "
                                               "cut to the end of the token that creates it"})


class Token(Schema):
    id = fields.Integer()
    name = fields.String()
    user_id = fields.Integer()
    scopes = fields.List(fields.String())
    expires_at = UtcDateTime(allow_none=True)
    revoked_at = UtcDateTime(allow_none=True)
    last_used_at = UtcDateTime(allow_none=True)
    created_at = UtcDateTime()


class TokenCreated(Token):
    token = fields.String(metadata={"description": "the bearer token (shown once; the server keeps its hash)"})


class DeviceCredentials(Schema):
    username = fields.String()
    password = fields.String(metadata={"description": "the new MQTT and download secret (shown once); the old one "
                                       "stops working now"})
