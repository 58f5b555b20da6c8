"""Deployments: staged rollouts of a build to a device group, and the devices' reports that move them on."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, joinedload

from tinymlaas.ota.delta import MODEL_ONLY_ALLOWANCE
from tinymlaas.ota.package import version_key
from tinymlaas.ota.rollout import TERMINAL, RolloutPlan, decide, stage_bounds

from ..db import Build, Deployment, DeploymentEvent, Device, DeviceJob, now
from .common import Principal, ServiceError, owned


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
        .order_by(Device.name)
    ).all()
    if not devices:
        raise ServiceError(422, f"no {build.target} device in group '{group}'", "group")
    if not force:
        # a downgrade is from a version this organisation built for the target: a version no build of ours
        # carries (a device's own report, factory firmware) cannot hold every later rollout back
        ours = {version_key(v) for v in session.scalars(select(Build.version).where(
            Build.org_id == who.org_id, Build.target == build.target))}
        newer = [d for d in devices if version_key(d.firmware_version) in ours
                 and version_key(d.firmware_version) > version_key(build.version)]
        if newer:
            raise ServiceError(409, f"build {build.id} ({build.version}) is older than the firmware of "
                               f"{len(newer)} device(s) (e.g. {newer[0].name} runs {newer[0].firmware_version}); "
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
            session.add(DeviceJob(id=f"dep{dep.id}-{devices[pos].name}", deployment_id=dep.id,
                                  device_id=devices[pos].id, position=pos, stage=stage))
    record(session, dep.id, "created", f"by {who.user.name}: build {build.id} ({build.version}) to {len(devices)} "
           f"device(s) in {len(bounds)} stage(s)" + (f", rolling back deployment {rollback_of}" if rollback_of else "")
           + (", forced" if force else ""))
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
    cancelled = 0
    for j in jobs_of(session, dep):
        if j.status == "pending":
            j.status, j.message = "cancelled", dep.reason
            cancelled += 1
    record(session, dep.id, "cancelled", f"{dep.reason}; {cancelled} device(s) not notified")
    session.commit()
    return dep


def record(session: Session, deployment_id: int, kind: str, detail: str, stage: int | None = None,
           device_id: str | None = None) -> None:
    """One line of the rollout's history (committed with the change it tells of)."""
    session.add(DeploymentEvent(deployment_id=deployment_id, kind=kind, detail=detail, stage=stage,
                                device_id=device_id))


def events_of(session: Session, dep: Deployment) -> list[dict]:
    """The rollout's history, oldest first, devices by name."""
    rows = session.execute(select(DeploymentEvent, Device.name).outerjoin(Device, Device.id == DeploymentEvent.device_id)
                           .where(DeploymentEvent.deployment_id == dep.id).order_by(DeploymentEvent.id)).all()
    return [{"at": e.at, "kind": e.kind, "stage": e.stage, "device": name, "detail": e.detail} for e, name in rows]


def plan_of(dep: Deployment) -> RolloutPlan:
    return RolloutPlan(tuple(dep.stages), dep.success_threshold, dep.error_threshold, dep.job_timeout)


def jobs_of(session: Session, dep: Deployment) -> list[DeviceJob]:
    return list(session.scalars(select(DeviceJob).where(DeviceJob.deployment_id == dep.id)
                                .options(joinedload(DeviceJob.device)).order_by(DeviceJob.position)))


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
            record(session, dep.id, d.state, d.reason)
            break
        if d.notify_stage is None:
            break
        dep.current_stage = d.notify_stage
        notified = list(session.scalars(pending.where(DeviceJob.stage == d.notify_stage).order_by(DeviceJob.position)))
        for j in notified:
            j.status = "notified"
        to_notify += notified
        record(session, dep.id, "stage_started", f"stage {d.notify_stage + 1}: {len(notified)} device(s) notified",
               stage=d.notify_stage)
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
            record(session, job.deployment_id, "device_timed_out", job.message, job.stage, job.device_id)
    session.commit()
    return expired


def payload_for(session: Session, store, signing_key: Path, job: DeviceJob, build: Build) -> dict:
    """The smallest valid payload of `build`'s image for the job's device, recorded on the job: a signed patch from
    the firmware image the device runs (when this service shipped it), the model image alone (when that image's
    code part is the new build's: the same model ABI; preferred within MODEL_ONLY_ALLOWANCE of the smallest), the
    image compressed (LZMA2), or the image itself. Patches and compressed images are made once and kept as the
    build's artifacts (`delta_from_<build>`, `image_xz`, `model_from_<base>`, `model_xz`). The device checks the base, and what it makes, against the image's hash; it
    falls back to the full image (`image` in the job document) when it cannot use the payload."""
    from tinymlaas.ota.delta import compress_image, make_patch

    artifacts = dict(build.artifacts)
    image = lambda: store.path(artifacts["image"]).read_bytes()  # read only when a payload is made
    if "image_xz" not in artifacts:
        artifacts["image_xz"] = store.put_bytes(compress_image(image()))
    options = [{"kind": "full", "sha256": artifacts["image"]}, {"kind": "compressed", "sha256": artifacts["image_xz"]}]
    device = session.get(Device, job.device_id)
    running = session.get(Build, device.build_id) if device is not None and device.build_id else None
    flashed = session.get(Build, device.image_build_id) if running is not None and device.image_build_id else running
    if flashed is not None and running.id != build.id and (flashed.artifacts or {}).get("image") in store:
        name = f"delta_from_{flashed.id}"
        if name not in artifacts:
            artifacts[name] = store.put_bytes(make_patch(store.path(flashed.artifacts["image"]).read_bytes(), image(),
                                                         signing_key))
        options.append({"kind": "delta", "sha256": artifacts[name], "base": flashed.artifacts["image"]})
        if same_model_abi(flashed, build) and "model_image" in artifacts:
            # the device runs its model from its firmware image, or (after a model-only update) from a model slot
            base = flashed.artifacts["image"] if running.id == flashed.id else running.artifacts.get("model_image")
            if base in store:
                options.append(model_payload(store, signing_key, artifacts, base))
    if artifacts != build.artifacts:
        build.artifacts = artifacts
    size = lambda o: store.path(o["sha256"]).stat().st_size
    chosen = min(options, key=size)
    model = next((o for o in options if o["kind"] == "model"), None)
    if model is not None and size(model) <= MODEL_ONLY_ALLOWANCE * size(chosen):
        chosen = model
    job.payload, job.payload_bytes = chosen["kind"], size(chosen)
    return {**chosen, "size": job.payload_bytes}


def same_model_abi(base: Build, build: Build) -> bool:
    """Is `build`'s code part byte for byte `base`'s (both images carry the same model ABI)?"""
    abi = lambda b: ((b.report or {}).get("image") or {}).get("abi")
    return abi(build) is not None and abi(build) == abi(base)


def model_payload(store, signing_key: Path, artifacts: dict, base: str) -> dict:
    """A model-only payload (recorded in `artifacts`): the smaller of the model image compressed and a signed patch
    from `base`, the signed image the device runs its model from (a firmware image or a model image)."""
    from tinymlaas.ota.delta import compress_image, make_patch

    model_image = store.path(artifacts["model_image"]).read_bytes()
    if "model_xz" not in artifacts:
        artifacts["model_xz"] = store.put_bytes(compress_image(model_image))
    name = f"model_from_{base[:16]}"
    if name not in artifacts:
        artifacts[name] = store.put_bytes(make_patch(store.path(base).read_bytes(), model_image, signing_key))
    patch = {"kind": "model", "sha256": artifacts[name], "base": base, "image": artifacts["model_image"]}
    packed = {"kind": "model", "sha256": artifacts["model_xz"], "image": artifacts["model_image"]}
    return min((patch, packed), key=lambda o: store.path(o["sha256"]).stat().st_size)


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
    if isinstance(update.get("payload"), str) and isinstance(update.get("bytes"), int):  # what the device received
        job.payload, job.payload_bytes = update["payload"][:48], max(0, update["bytes"])
    device = session.get(Device, device_id)
    if update.get("instructions"):
        job.instructions = int(update["instructions"])
    dep = session.get(Deployment, job.deployment_id)
    if status == "succeeded":
        build = session.get(Build, dep.build_id)
        if job.payload != "model":  # a firmware image went to its slot (a model-only update leaves the one there)
            device.image_build_id = build.id
        elif device.image_build_id is None:
            device.image_build_id = device.build_id
        device.firmware_version, device.build_id = build.version, build.id
        if job.instructions:
            device.instructions = job.instructions
    if status in TERMINAL:
        record(session, dep.id, f"device_{status}", (job.message or status)
               + (f" ({job.instructions:,} instructions)" if job.instructions else ""), job.stage, device_id)
    session.commit()
    # only a finished job can change the rollout's decision (it counts successes, failures and what is finished)
    return JobUpdate(True, deployment=dep if status in TERMINAL else None)


def deployment_summary(session: Session, dep: Deployment) -> dict:
    jobs = jobs_of(session, dep)
    counts = dict(session.execute(select(DeviceJob.status, func.count()).where(DeviceJob.deployment_id == dep.id)
                                  .group_by(DeviceJob.status)).all())
    stages = []
    for stage in sorted({j.stage for j in jobs}):
        members = [j for j in jobs if j.stage == stage]
        stages.append({"stage": stage, "percent": dep.stages[stage] if stage < len(dep.stages) else 100,
                       "devices": len(members), "statuses": [j.status for j in members]})
    sent: dict[str, int] = {}
    for j in jobs:
        if j.payload_bytes is not None:
            kind = j.payload.split(" ")[0] if j.payload else "full"
            sent[kind] = sent.get(kind, 0) + j.payload_bytes
    return {"counts": counts, "stages": stages, "bytes": {"total": sum(sent.values()), **sent}}
