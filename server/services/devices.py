"""Devices: registration and secrets, and what a device reports of itself (state, telemetry)."""

from __future__ import annotations

import secrets

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from tinymlaas.backends import backend_for
from tinymlaas.measure.database import device_measurement
from tinymlaas.ota.package import parse_version
from tinymlaas.targets import get_target

from ..broker import hash_secret
from ..db import Build, Deployment, Device, DeviceJob, Model, Telemetry, device_key, now
from .common import DEVICE_ID, DEVICE_ID_RULE, GROUP_NAME, GROUP_NAME_RULE, Principal, ServiceError, target_or_422


def register_device(session: Session, who: Principal, name: str, target: str, group: str = "default",
                    firmware_version: str | None = None) -> tuple[Device, str]:
    """A new device of `who`'s organisation and its secret (shown once). `name` is unique within the
    organisation; its key (MQTT user name) holds the organisation's id, so another tenant's names never collide."""
    who.need("deploy")
    if not DEVICE_ID.fullmatch(name or ""):
        raise ServiceError(422, DEVICE_ID_RULE,
                           "id")
    if not GROUP_NAME.fullmatch(group or "default"):
        raise ServiceError(422, GROUP_NAME_RULE, "group")
    if firmware_version is not None and not valid_version(firmware_version):
        raise ServiceError(422, f"'{str(firmware_version)[:40]}' is not a version an image header holds "
                           "(major.minor.revision[+build])", "firmware_version")
    t = target_or_422(target)
    backend = backend_for(t)
    if not backend.deployable(t):
        what = ("a core simulated from its RTL for true cycles (builds only)" if backend.firmware
                else f"a host target ({backend.what} for builds)")
        raise ServiceError(422, f"'{target}' is {what}, not a board a device can be", "target")
    if device_named(session, who, name) is not None:
        raise ServiceError(409, f"device '{name}' is already registered", "id")
    secret = secrets.token_urlsafe(24)
    device = Device(id=device_key(who.org_id, name), name=name, target=target, group=group or "default",
                    flash_bytes=t.board.flash_bytes, ram_bytes=t.board.ram_bytes, firmware_version=firmware_version,
                    secret_hash=hash_secret(secret),
                    owner_id=who.user.id, org_id=who.org_id)
    session.add(device)
    session.commit()
    return device, secret


def device_named(session: Session, who: Principal, name: str) -> Device | None:
    """The device of `who`'s organisation with this name: another tenant's devices do not exist for it."""
    return session.scalar(select(Device).where(Device.org_id == who.org_id, Device.name == name))


def rotate_device_secret(session: Session, who: Principal, device: Device) -> str:
    """A new secret for a device (MQTT and downloads); the old one stops working at once."""
    who.need("deploy")
    secret = secrets.token_urlsafe(24)
    device.secret_hash = hash_secret(secret)
    session.commit()
    return secret


ONLINE_SECONDS = 120  # a device heard from within this is online
PRESENCES = ("online", "offline", "lost", "registered")


def presence(device: Device) -> str:
    """online / offline (heard from within ONLINE_SECONDS or not), lost (its will said so), registered (never heard
    from): what a person watching the fleet needs, beside the state the device last reported."""
    if device.last_seen is None:
        return "registered"
    if device.state == "lost":
        return "lost"
    return "online" if (now() - device.last_seen).total_seconds() <= ONLINE_SECONDS else "offline"


def valid_version(text: str) -> bool:
    try:
        parse_version(text)
    except ValueError:
        return False
    return True


def record_state(session: Session, device_id: str, state: dict) -> None:
    device = session.get(Device, device_id)
    if device is None:
        return
    device.state = str(state.get("state", device.state))[:16]
    reported = state.get("firmware_version")
    if isinstance(reported, str) and valid_version(reported):  # anything else is not a version an image holds
        device.firmware_version = reported
    if state.get("slot") in (0, 1) and not isinstance(state.get("slot"), bool):
        device.slot = state["slot"]
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
