"""What the API and the MQTT coordinator do, over the database: the server's one place for fleet logic.

The web layer and the coordinator translate requests and messages into these calls; the decisions
themselves (rollout stages, image checks, compilation) are the core's.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import re
import secrets
import tempfile
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from tinymlaas.errors import TinyMLaaSError, UnknownTarget
from tinymlaas.frontend.keras import QUANTIZE
from tinymlaas.frontend.onnx import ONNX_SUFFIX
from tinymlaas.frontend.torch_export import PT2_SUFFIX
from tinymlaas.measurements import device_measurement
from tinymlaas.ota.package import canonical_version, version_key
from tinymlaas.ota.rollout import TERMINAL, RolloutPlan, decide, stage_bounds
from tinymlaas.ota.store import ArtifactStore
from tinymlaas.targets import get_target

from .broker import hash_secret
from .db import ROLES, SCOPES, ApiToken, Build, Deployment, Device, DeviceJob, Model, Organization, Telemetry, User, now

BUILD_FINAL = ("done", "failed", "cancelled")  # a build is queued, building or emulating before one of these
DEVICE_ID = re.compile(r"[a-z0-9][a-z0-9_-]{0,63}")  # whole strings (fullmatch: "$" lets a newline in)
DEVICE_ID_RULE = "lower-case letters, digits, '-' and '_', at most 64, starting with a letter or digit"


class ServiceError(Exception):
    """A request the server refuses: HTTP status, the field at fault (if any), and why."""

    def __init__(self, status: int, message: str, field: str | None = None):
        self.status, self.field = status, field
        super().__init__(message)


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


# tenants, users and tokens

TOKEN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9 ._-]{0,63}")
TOKEN_NAME_RULE = "a token name: letters, digits, ' ', '.', '_', '-', at most 64"
USER_NAME = re.compile(r"[a-z0-9][a-z0-9._@-]{0,63}")
USER_NAME_RULE = "a user name: lower-case letters, digits, '.', '_', '-', '@', at most 64"


@dataclass(frozen=True)
class Principal:
    """Who a request acts as: the user, its organisation, and the scopes its token grants within the user's role."""

    user: User
    token: ApiToken
    scopes: frozenset

    @property
    def org_id(self) -> int:
        return self.user.org_id

    def need(self, scope: str) -> None:
        if scope not in self.scopes:
            why = (f"your role ({self.user.role}) does not allow it" if scope not in ROLES[self.user.role]
                   else f"this token ('{self.token.name}') is limited to {', '.join(sorted(self.token.scopes))}")
            raise ServiceError(403, f"this needs the '{scope}' scope: {why}", "Authorization")


def create_organization(session: Session, name: str) -> Organization:
    if not USER_NAME.fullmatch(name or ""):
        raise ServiceError(422, "an organisation name: lower-case letters, digits, '.', '_', '-', '@', at most 64",
                           "name")
    if session.scalar(select(Organization).where(Organization.name == name)):
        raise ServiceError(409, f"organisation '{name}' exists", "name")
    org = Organization(name=name)
    session.add(org)
    session.flush()
    return org


def create_user(session: Session, name: str, org: Organization | None = None, role: str = "admin",
                token_days: int | None = None) -> tuple[User, str]:
    """A user and its first token (all of its role's scopes). No `org`: a new organisation of the same name,
    whose admin the user is (how the service's first user, and each new tenant, starts)."""
    if not USER_NAME.fullmatch(name or ""):
        raise ServiceError(422, USER_NAME_RULE, "name")
    if role not in ROLES:
        raise ServiceError(422, f"role must be one of {', '.join(ROLES)}, not '{str(role)[:20]}'", "role")
    if session.scalar(select(User).where(User.name == name)):
        raise ServiceError(409, f"user '{name}' exists", "name")
    if org is None:
        org = create_organization(session, name)
    user = User(name=name, org_id=org.id, role=role)
    session.add(user)
    session.flush()
    _, token = issue_token(session, user, "initial", ROLES[role], token_days)
    return user, token


def issue_token(session: Session, user: User, name: str, scopes, days: int | None) -> tuple[ApiToken, str]:
    """A new token of `user` (shown once; only its hash is kept), valid for `days` (None: until revoked)."""
    if not TOKEN_NAME.fullmatch(name or ""):
        raise ServiceError(422, TOKEN_NAME_RULE, "name")
    unknown = [x for x in scopes if x not in SCOPES]
    if unknown or not scopes:
        raise ServiceError(422, f"scopes: one or more of {', '.join(SCOPES)} (not {', '.join(map(str, unknown))})"
                           if unknown else f"scopes: one or more of {', '.join(SCOPES)}", "scopes")
    beyond = sorted(set(scopes) - set(ROLES[user.role]))
    if beyond:
        raise ServiceError(403, f"a {user.role} cannot hold the scope(s) {', '.join(beyond)}", "scopes")
    if days is not None and not 1 <= days <= 3650:
        raise ServiceError(422, "expires_in_days: 1 to 3650 (or none: until revoked)", "expires_in_days")
    token = "tmk_" + secrets.token_urlsafe(32)
    row = ApiToken(user_id=user.id, name=name, token_hash=token_hash(token),
                   scopes=[x for x in SCOPES if x in scopes],
                   expires_at=None if days is None else now() + dt.timedelta(days=days))
    session.add(row)
    session.commit()
    return row, token


def principal_for_token(session: Session, token: str) -> Principal:
    """The principal a bearer token stands for; 401 naming why when none (unknown, expired, revoked)."""
    row = session.scalar(select(ApiToken).where(ApiToken.token_hash == token_hash(token))) if token else None
    if row is None:
        raise ServiceError(401, "a valid API token is needed: 'Authorization: Bearer <token>'", "Authorization")
    if row.revoked_at is not None:
        raise ServiceError(401, f"this token ('{row.name}') was revoked", "Authorization")
    t = now()
    if row.expires_at is not None and row.expires_at <= t:
        raise ServiceError(401, f"this token ('{row.name}') expired on {row.expires_at:%Y-%m-%d %H:%M} UTC",
                           "Authorization")
    user = session.get(User, row.user_id)
    if row.last_used_at is None or (t - row.last_used_at).total_seconds() > 60:  # not a write per request
        row.last_used_at = t
        session.commit()
    return Principal(user, row, frozenset(row.scopes) & frozenset(ROLES[user.role]))


def tokens_visible_to(session: Session, who: Principal) -> list[ApiToken]:
    """One's own tokens; an admin sees every token of the organisation."""
    q = select(ApiToken).join(User, User.id == ApiToken.user_id).where(User.org_id == who.org_id)
    if "admin" not in who.scopes:
        q = q.where(ApiToken.user_id == who.user.id)
    return list(session.scalars(q.order_by(ApiToken.id)))


def revoke_token(session: Session, who: Principal, token_id: int) -> ApiToken:
    row = next((t for t in tokens_visible_to(session, who) if t.id == token_id), None)
    if row is None:
        raise ServiceError(404, f"no token {token_id}")
    if row.revoked_at is None:
        row.revoked_at = now()
        session.commit()
    return row


def owned(session: Session, who: Principal, model, key):
    """The row of `who`'s organisation with this key, or None: another tenant's rows do not exist for it."""
    row = session.get(model, key)
    return row if row is not None and row.org_id == who.org_id else None


# devices

def register_device(session: Session, who: Principal, device_id: str, target: str, group: str = "default",
                    firmware_version: str | None = None) -> tuple[Device, str]:
    who.need("deploy")
    if not DEVICE_ID.fullmatch(device_id or ""):
        raise ServiceError(422, DEVICE_ID_RULE,
                           "id")
    if _target(target).rtl is not None:
        raise ServiceError(422, f"'{target}' is a core simulated from its RTL for true cycles (builds only), not a "
                           "board a device can be", "target")
    if _target(target).kind == "host":
        raise ServiceError(422, f"'{target}' is a host target (a TVM runtime library for builds), not a board a "
                           "device can be", "target")
    if session.get(Device, device_id):  # ids are global (they are MQTT user names): taken, whoever has it
        raise ServiceError(409, f"device '{device_id}' is already registered (device ids are unique across the "
                           "service)", "id")
    t = get_target(target)
    secret = secrets.token_urlsafe(24)
    device = Device(id=device_id, target=target, group=group or "default", flash_bytes=t.board.flash_bytes,
                    ram_bytes=t.board.ram_bytes, firmware_version=firmware_version, secret_hash=hash_secret(secret),
                    owner_id=who.user.id, org_id=who.org_id)
    session.add(device)
    session.commit()
    return device, secret


def rotate_device_secret(session: Session, who: Principal, device: Device) -> str:
    """A new secret for a device (MQTT and downloads); the old one stops working at once."""
    who.need("deploy")
    secret = secrets.token_urlsafe(24)
    device.secret_hash = hash_secret(secret)
    session.commit()
    return secret


def _target(name: str):
    try:
        return get_target(name)
    except UnknownTarget as e:
        raise ServiceError(422, str(e), "target") from None


# models

def add_model(session: Session, store: ArtifactStore, who: Principal, filename: str, data: bytes,
              quantize: str = "none") -> Model:
    from tinymlaas.frontend.keras import convert_keras, is_keras_input
    from tinymlaas.frontend.onnx import load_onnx
    from tinymlaas.frontend.tflite import load_tflite
    from tinymlaas.frontend.to_relax import unsupported_operators

    who.need("build")
    if not data:
        raise ServiceError(422, "the file is empty", "file")
    if quantize not in QUANTIZE:
        raise ServiceError(422, f"quantize must be one of {', '.join(QUANTIZE)}, not '{quantize[:20]}'", "quantize")
    name = Path(filename or "model.tflite").name
    if name in ("", ".", "..") or len(name) > 200 or any(ord(ch) < 32 for ch in name):
        raise ServiceError(422, f"the file name '{name[:40]}' is not usable: a plain name of at most 200 "
                           "characters (e.g. model.tflite)", "file")
    suffix = Path(name).suffix.lower()
    if suffix == PT2_SUFFIX:
        raise ServiceError(422, "PyTorch exported programs (.pt2) hold pickled objects that run code when loaded, so "
                           "the service does not load them: export the model to ONNX (torch.onnx.export) and upload "
                           "that, or build the .pt2 on your own machine with `tinymlaas compile`", "file")
    if suffix == ONNX_SUFFIX and quantize != "none":
        raise ServiceError(422, "quantize applies to Keras models (TensorFlow's converter); an ONNX model builds as "
                           "it is", "quantize")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / name
        path.write_bytes(data)
        try:
            if suffix == ONNX_SUFFIX:  # imported now, so an operator TVM's ONNX frontend lacks is named at upload
                model = load_onnx(path)
                model.to_relax()
                quantized, operators, unsupported = False, model.operators(), []
            else:
                if is_keras_input(path):  # kept as the TFLite model TensorFlow's converter makes of it
                    converted = path.with_suffix(".tflite")
                    convert_keras(path, converted, quantize)
                    path, data = converted, converted.read_bytes()
                model = load_tflite(path)
                quantized, operators = bool(model.quantized), sorted(set(model.operators))
                unsupported = unsupported_operators(model)
        except TinyMLaaSError as e:
            raise ServiceError(422, str(e), "file") from None
    if unsupported:
        raise ServiceError(422, f"unsupported operator(s): {', '.join(sorted(set(unsupported)))}", "file")
    row = Model(name=model.name, sha256=store.put_bytes(data), size=len(data), quantized=quantized,
                operators=operators, format="onnx" if suffix == ONNX_SUFFIX else "tflite", owner_id=who.user.id,
                org_id=who.org_id)
    session.add(row)
    session.commit()
    return row


# builds

OPEN_BUILD_STATES = ("queued", "building", "emulating")


def request_build(session: Session, who: Principal, model_id: int, target: str, constraints: dict | None = None,
                  version: str | None = None, max_open: int | None = None) -> Build:
    """Queue a build. max_open: how many of the user's builds may be queued or running at once (429 beyond)."""
    who.need("build")
    if max_open is not None:
        open_builds = session.scalar(select(func.count()).select_from(Build).where(
            Build.owner_id == who.user.id, Build.state.in_(OPEN_BUILD_STATES)))
        if open_builds >= max_open:
            raise ServiceError(429, f"{open_builds} of your builds are queued or running, the most at once is "
                               f"{max_open}; wait for some to finish (or cancel them)")
    model = owned(session, who, Model, model_id)
    if model is None:
        raise ServiceError(422, f"no model {model_id}", "model_id")
    if _target(target).kind != "host" and model.format != "tflite":  # the target checked for every model
        raise ServiceError(422, f"model {model.id} is an {model.format.upper()} model: it builds for the host targets "
                           f"(cpu-host, cuda-host); for {target}, upload a TFLite conversion of it", "target")
    if version is not None:
        try:
            version = canonical_version(version)
        except ValueError as e:
            raise ServiceError(422, str(e), "version") from None
    build = Build(model_id=model.id, target=target, constraints=constraints or {}, version=version or "",
                  owner_id=who.user.id, org_id=who.org_id)
    session.add(build)
    session.flush()
    if not version:
        build.version = f"1.0.{build.id}+0"  # later builds are newer
    session.commit()
    return build


def cancel_build(session: Session, who: Principal, build: Build) -> Build:
    who.need("build")
    if build.state in BUILD_FINAL:
        raise ServiceError(409, f"build {build.id} is already {build.state}")
    build.state, build.message = "cancelled", f"cancelled by {who.user.name}"
    session.commit()
    return build


# deployments

def create_deployment(session: Session, who: Principal, build_id: int, group: str, plan: RolloutPlan,
                      force: bool = False, rollback_of: int | None = None) -> Deployment:
    who.need("deploy")
    build = owned(session, who, Build, build_id)
    if build is None:
        raise ServiceError(422, f"no build {build_id}", "build_id")
    if build.state != "done":
        raise ServiceError(409, f"build {build_id} is {build.state}, not done", "build_id")
    if "image" not in (build.artifacts or {}):
        raise ServiceError(409, f"build {build_id} is for {build.target}, a core simulated from its RTL: it has no "
                           "signed image to deploy", "build_id")
    problems = plan.problems()
    if problems:
        field, why = next(iter(problems.items()))
        raise ServiceError(422, why, field)
    devices = session.scalars(
        select(Device).where(Device.org_id == who.org_id, Device.group == group, Device.target == build.target)
        .order_by(Device.id)
    ).all()
    if not devices:
        raise ServiceError(422, f"no {build.target} device in group '{group}'", "group")
    if not force:
        newer = [d for d in devices if version_key(d.firmware_version) > version_key(build.version)]
        if newer:
            raise ServiceError(409, f"build {build.id} ({build.version}) is older than the firmware of "
                               f"{len(newer)} device(s) (e.g. {newer[0].id} runs {newer[0].firmware_version}); "
                               "a downgrade needs force", "force")
    active = session.scalar(select(Deployment).join(Build, Build.id == Deployment.build_id).where(
        Deployment.org_id == who.org_id, Deployment.group == group, Build.target == build.target,
        Deployment.state == "in_progress"))
    if active is not None:
        raise ServiceError(409, f"deployment {active.id} is still in progress for the {build.target} devices of "
                           f"group '{group}'", "group")
    dep = Deployment(build_id=build.id, group=group, stages=list(plan.stages), success_threshold=plan.success_threshold,
                     error_threshold=plan.error_threshold, job_timeout=plan.job_timeout, force=force, rollback_of=rollback_of,
                     owner_id=who.user.id, org_id=who.org_id, active_key=f"{who.org_id}/{group}/{build.target}")
    session.add(dep)
    try:
        session.flush()
    except IntegrityError:  # another request started a rollout to these devices between the check and now
        session.rollback()
        raise ServiceError(409, f"another deployment to the {build.target} devices of group '{group}' started at "
                           "the same time", "group") from None
    bounds = stage_bounds(plan, len(devices))
    for stage, (start, end) in enumerate(bounds):
        for pos in range(start, end):
            session.add(DeviceJob(id=f"dep{dep.id}-{devices[pos].id}", deployment_id=dep.id,
                                  device_id=devices[pos].id, position=pos, stage=stage))
    session.commit()
    return dep


def rollback(session: Session, who: Principal, deployment_id: int) -> Deployment:
    """A new deployment of the build the group ran before `deployment_id` (a downgrade, so forced)."""
    who.need("deploy")
    dep = owned(session, who, Deployment, deployment_id)
    if dep is None:
        raise ServiceError(404, f"no deployment {deployment_id}")
    if dep.state == "in_progress":
        raise ServiceError(409, f"deployment {dep.id} is in progress; it must halt or finish first")
    previous = session.scalar(
        select(Deployment).where(Deployment.org_id == who.org_id, Deployment.group == dep.group, Deployment.id < dep.id,
                                 Deployment.build_id != dep.build_id, Deployment.state == "succeeded")
        .order_by(Deployment.id.desc())
    )
    if previous is None:
        raise ServiceError(409, f"group '{dep.group}' has no earlier successful deployment to roll back to")
    return create_deployment(session, who, previous.build_id, dep.group, plan_of(dep), force=True, rollback_of=dep.id)


def cancel_deployment(session: Session, who: Principal, deployment_id: int) -> Deployment:
    """Stop a rollout: devices not yet notified never are; those already updating finish and report as usual."""
    who.need("deploy")
    dep = owned(session, who, Deployment, deployment_id)
    if dep is None:
        raise ServiceError(404, f"no deployment {deployment_id}")
    if dep.state != "in_progress":
        raise ServiceError(409, f"deployment {dep.id} is {dep.state}; only one in progress can be cancelled")
    dep.state, dep.reason, dep.active_key = "cancelled", f"cancelled by {who.user.name}", None
    for j in jobs_of(session, dep):
        if j.status == "pending":
            j.status, j.message = "cancelled", dep.reason
    session.commit()
    return dep


def plan_of(dep: Deployment) -> RolloutPlan:
    return RolloutPlan(tuple(dep.stages), dep.success_threshold, dep.error_threshold, dep.job_timeout)


def jobs_of(session: Session, dep: Deployment) -> list[DeviceJob]:
    return list(session.scalars(select(DeviceJob).where(DeviceJob.deployment_id == dep.id)
                                .order_by(DeviceJob.position)))


def advance(session: Session, dep: Deployment) -> list[DeviceJob]:
    """Apply the rollout decision; returns the jobs to notify now (already marked notified)."""
    if dep.state != "in_progress":
        return []
    # the statuses alone (it runs on every finished job: loading a 1,000-device rollout's rows each time was
    # quadratic); pending -> notified changes no decision, so the list stays valid through the loop
    statuses = list(session.scalars(select(DeviceJob.status).where(DeviceJob.deployment_id == dep.id)
                                    .order_by(DeviceJob.position)))
    pending = select(DeviceJob).where(DeviceJob.deployment_id == dep.id, DeviceJob.status == "pending")
    to_notify: list[DeviceJob] = []
    while True:
        d = decide(plan_of(dep), statuses, dep.current_stage)
        if d.state != "in_progress":
            dep.state, dep.reason, dep.active_key = d.state, d.reason, None
            for j in session.scalars(pending):
                j.status, j.message = "cancelled", f"rollout {d.state}: {d.reason}"
            break
        if d.notify_stage is None:
            break
        dep.current_stage = d.notify_stage
        for j in session.scalars(pending.where(DeviceJob.stage == d.notify_stage).order_by(DeviceJob.position)):
            j.status = "notified"
            to_notify.append(j)
    session.commit()
    return to_notify


def expire_silent_jobs(session: Session) -> dict[int, list[DeviceJob]]:
    """Jobs of rollouts in progress whose device was notified (or last reported) longer ago than the rollout's
    job_timeout become timed_out, a failure for the thresholds: a device that never answers cannot hold a stage
    open forever. Returns deployment id -> the jobs that timed out now."""
    expired: dict[int, list[DeviceJob]] = {}
    open_jobs = session.execute(
        select(DeviceJob, Deployment.job_timeout).join(Deployment, Deployment.id == DeviceJob.deployment_id)
        .where(Deployment.state == "in_progress", DeviceJob.status.in_(("notified", "in_progress")))).all()
    t = now()
    for job, timeout in open_jobs:
        if job.updated_at < t - dt.timedelta(seconds=timeout):
            job.status = "timed_out"
            job.message = f"no word from the device for {timeout} s (the rollout's job_timeout)"
            expired.setdefault(job.deployment_id, []).append(job)
    session.commit()
    return expired


@dataclass
class JobUpdate:
    accepted: bool
    reason: str = ""
    deployment: Deployment | None = None


STATUS_FROM_DEVICE = {"IN_PROGRESS": "in_progress", "SUCCEEDED": "succeeded", "FAILED": "failed",
                      "REJECTED": "rejected"}


def apply_job_update(session: Session, device_id: str, job_id: str, update: dict) -> JobUpdate:
    """A device's report on a job. Idempotent: a repeated terminal report is accepted and changes nothing."""
    job = session.get(DeviceJob, job_id)
    if job is None or job.device_id != device_id:
        return JobUpdate(False, f"no job {job_id} for device {device_id}")
    status = STATUS_FROM_DEVICE.get(str(update.get("status")))
    if status is None:
        return JobUpdate(False, f"unknown status {update.get('status')!r}")
    if job.status in TERMINAL:
        same = job.status == status
        return JobUpdate(same, "" if same else f"job {job_id} is already {job.status}")
    if job.status == "pending":
        return JobUpdate(False, f"job {job_id} was not notified")
    job.status = status
    job.step = str(update.get("step") or job.step or "")[:32] or None
    job.progress = float(update.get("progress", 1.0 if status in TERMINAL else job.progress))
    job.message = update.get("message") or job.message
    device = session.get(Device, device_id)
    if update.get("instructions"):
        job.instructions = int(update["instructions"])
    dep = session.get(Deployment, job.deployment_id)
    if status == "succeeded":
        build = session.get(Build, dep.build_id)
        device.firmware_version, device.build_id = build.version, build.id
        if job.instructions:
            device.instructions = job.instructions
    session.commit()
    # only a finished job can change the rollout's decision (it counts successes, failures and what is finished)
    return JobUpdate(True, deployment=dep if status in TERMINAL else None)


def record_state(session: Session, device_id: str, state: dict) -> None:
    device = session.get(Device, device_id)
    if device is None:
        return
    device.state = str(state.get("state", device.state))[:16]
    if state.get("firmware_version"):
        device.firmware_version = str(state["firmware_version"])[:32]
    device.last_seen = now()
    session.commit()


def _sent_to(session: Session, device: Device, build: Build) -> bool:
    """Whether `build` was deployed to `device`: a device reports figures of its own builds only."""
    return device.build_id == build.id or session.scalar(
        select(func.count()).select_from(DeviceJob).join(Deployment, DeviceJob.deployment_id == Deployment.id)
        .where(DeviceJob.device_id == device.id, Deployment.build_id == build.id)) > 0


def record_telemetry(session: Session, device_id: str, data: dict) -> None:
    device = session.get(Device, device_id)
    if device is None:
        return
    session.add(Telemetry(device_id=device_id, data=data))
    if isinstance(data.get("instructions"), int):
        device.instructions = data["instructions"]
    # cycles a board measured itself: a measurement of the build it runs, for the runtime predictor
    build = session.get(Build, data["build"]) if isinstance(data.get("build"), int) else None
    if build is not None and _sent_to(session, device, build):
        model = session.get(Model, build.model_id)
        row = device_measurement(device_id, device.target, get_target(device.target).core, data, model.sha256,
                                 model.name, build.id)
        if row is not None:
            session.add(row)
    session.commit()


def deployment_summary(session: Session, dep: Deployment) -> dict:
    jobs = jobs_of(session, dep)
    counts = dict(session.execute(select(DeviceJob.status, func.count()).where(DeviceJob.deployment_id == dep.id)
                                  .group_by(DeviceJob.status)).all())
    stages = []
    for stage in sorted({j.stage for j in jobs}):
        members = [j for j in jobs if j.stage == stage]
        stages.append({"stage": stage, "percent": dep.stages[stage] if stage < len(dep.stages) else 100,
                       "devices": len(members), "statuses": [j.status for j in members]})
    return {"counts": counts, "stages": stages}
