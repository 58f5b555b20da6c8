"""The MQTT coordinator: device state, job notifications and updates, telemetry, rollout progress.

Topics (under tinymlaas/v1/devices/<id>/), in the AWS IoT Jobs shape:
  state                    retained; {"state": "online", ...}; the device's last will sets "lost"
  jobs/notify-next         retained, server -> device: the job document, or empty when none
  jobs/<job>/update        device -> server: {"status": IN_PROGRESS|SUCCEEDED|FAILED|REJECTED, "step", ...}
  jobs/<job>/update/accepted|rejected   server -> device: the answer to an update
  telemetry                device -> server: {"instructions": ..., "errors": ...}; at most TELEMETRY_MAX_BYTES,
                           TELEMETRY_PER_MINUTE per device (a burst of TELEMETRY_BURST): the rest is dropped
All QoS 1. Job ids are stable, so a repeated notification or update is harmless.
"""

from __future__ import annotations

import json
import logging
import threading
import time

import paho.mqtt.client as mqtt
from sqlalchemy import select

from .broker import ROOT, SERVER_USER
from .db import Build, Deployment, DeviceJob
from .mqtt_loop import MqttLoop
from .services.deployments import advance, apply_job_update, expire_silent_jobs, payload_for
from .services.devices import record_state, record_telemetry

log = logging.getLogger("tinymlaas.coordinator")

HEARTBEAT_TOPIC = f"{ROOT}/server/heartbeat"  # published and received by the coordinator: the broker's pulse
HEARTBEAT_EVERY = 1.0  # seconds
TELEMETRY_MAX_BYTES = 4096  # a device's figures fit in far less; a 1 MB message was stored as it came
TELEMETRY_PER_MINUTE = 60
TELEMETRY_BURST = 10


class TelemetryGate:
    """Which telemetry messages are stored: none larger than max_bytes, and per device a token bucket of `burst`
    refilled at per_minute. Counts what it drops, per device and reason."""

    def __init__(self, max_bytes: int = TELEMETRY_MAX_BYTES, per_minute: float = TELEMETRY_PER_MINUTE,
                 burst: int = TELEMETRY_BURST, clock=time.monotonic):
        self.max_bytes, self.rate, self.burst, self.clock = max_bytes, per_minute / 60.0, burst, clock
        self.buckets: dict[str, tuple[float, float]] = {}  # device -> (tokens, when)
        self.dropped: dict[tuple[str, str], int] = {}

    def admit(self, device_id: str, size: int) -> bool:
        reason = None
        if size > self.max_bytes:
            reason = "too large"
        else:
            now = self.clock()
            tokens, then = self.buckets.get(device_id, (float(self.burst), now))
            tokens = min(float(self.burst), tokens + (now - then) * self.rate)
            if tokens >= 1.0:
                self.buckets[device_id] = (tokens - 1.0, now)
            else:
                self.buckets[device_id] = (tokens, now)
                reason = "over the rate"
        if reason is None:
            return True
        key = (device_id, reason)
        self.dropped[key] = self.dropped.get(key, 0) + 1
        if self.dropped[key] in (1, 10, 100, 1000) or self.dropped[key] % 10000 == 0:  # a log line, not a flood
            log.warning("telemetry of %s dropped (%s; %d so far)", device_id, reason, self.dropped[key])
        return False


class Coordinator:
    def __init__(self, context, host: str, port: int, password: str, broker=None, watch_every: float = 2.0,
                 tls: dict | None = None):
        self.ctx = context
        self.broker = broker
        self.watch_every = watch_every  # seconds between checks for devices silent past their job's timeout
        self._stopping = threading.Event()
        self.lock = threading.RLock()  # one rollout decision at a time
        self.connected = threading.Event()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=SERVER_USER,
                                  clean_session=True)
        self.client.username_pw_set(SERVER_USER, password)
        if tls is not None:  # {ca_certs, certfile, keyfile}: the broker verified against our CA
            self.client.tls_set(**tls)
        self.client.max_queued_messages_set(0)
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = lambda *a: self.connected.clear()
        self.client.on_message = self._on_message
        self.host, self.port = host, port
        self.loop: MqttLoop | None = None
        self.telemetry = TelemetryGate()
        self.last_echo = time.monotonic()  # when the broker last returned our heartbeat

    def start(self) -> None:
        self.loop = MqttLoop("coordinator-mqtt")  # its own thread: never behind a fleet of emulated devices
        self.loop.connect(self.client, self.host, self.port, keepalive=30)
        if not self.connected.wait(15):
            raise TimeoutError(f"the coordinator could not connect to MQTT at {self.host}:{self.port}")
        threading.Thread(target=self._watch, name="coordinator-timeouts", daemon=True).start()
        threading.Thread(target=self._heartbeat, name="coordinator-heartbeat", daemon=True).start()

    def _heartbeat(self) -> None:
        self.last_echo = time.monotonic()
        while not self._stopping.wait(HEARTBEAT_EVERY):
            if self.connected.is_set():
                self.client.publish(HEARTBEAT_TOPIC, b"1", qos=0)

    def stop(self) -> None:
        self._stopping.set()
        if self.loop is not None:
            self.loop.disconnect(self.client)
            self.loop.close()

    def credentials_changed(self) -> None:
        if self.broker is not None:
            self.broker.credentials_changed()

    # connection

    def _on_connect(self, client, _userdata, _flags, reason, _props):
        if reason.is_failure:
            log.error("MQTT connection refused: %s", reason)
            return
        client.subscribe([(f"{ROOT}/devices/+/state", 1), (f"{ROOT}/devices/+/jobs/+/update", 1),
                          (f"{ROOT}/devices/+/telemetry", 1), (HEARTBEAT_TOPIC, 0)])
        self.connected.set()
        threading.Thread(target=self.resync, name="coordinator-resync", daemon=True).start()

    def resync(self) -> None:
        """After any (re)connection: advance every open rollout and re-send every open notification."""
        with self.ctx.sessions() as s:
            for dep in s.scalars(select(Deployment).where(Deployment.state == "in_progress")).all():
                self.kick(dep.id)
            jobs = s.scalars(select(DeviceJob).where(DeviceJob.status.in_(("notified", "in_progress")))).all()
            for job in jobs:
                self._notify(s, job)

    # rollouts

    def kick(self, deployment_id: int) -> None:
        with self.lock, self.ctx.sessions() as s:
            dep = s.get(Deployment, deployment_id)
            for job in advance(s, dep):
                self._notify(s, job)

    def _watch(self) -> None:
        while not self._stopping.wait(self.watch_every):
            try:
                self.expire_silent_jobs()
            except Exception:  # e.g. the database briefly locked: next round
                log.exception("checking job timeouts")

    def expire_silent_jobs(self) -> None:
        """Time out the jobs of devices that stayed silent, take back their notifications, and let each rollout
        decide again (it may halt, or go on to its next stage)."""
        with self.lock, self.ctx.sessions() as s:
            expired = expire_silent_jobs(s)
            for jobs in expired.values():
                for job in jobs:
                    log.warning("job %s timed out", job.id)
                    self.client.publish(f"{ROOT}/devices/{job.device_id}/jobs/notify-next", b"", qos=1, retain=True)
        for deployment_id in expired:
            self.kick(deployment_id)

    def _job_document(self, s, job: DeviceJob) -> dict:
        dep = s.get(Deployment, job.deployment_id)
        build = s.get(Build, dep.build_id)
        payload = payload_for(s, self.ctx.store, self.ctx.settings.signing_key, job, build)
        s.commit()
        base = self.ctx.settings.public_url.rstrip("/") + "/api/v1/artifacts/"
        return {
            "jobId": job.id,
            "deployment": dep.id,
            "build": build.id,
            "version": build.version,
            "target": build.target,
            "allow_downgrade": dep.force,
            "image": {"url": base + build.artifacts["image"], "sha256": build.artifacts["image"],
                      "size": (build.report or {}).get("image", {}).get("size")},
            "selftest": {"url": base + build.artifacts["selftest"], "sha256": build.artifacts["selftest"]},
            "payload": {**payload, "url": base + payload["sha256"]},
        }

    def _notify(self, s, job: DeviceJob) -> None:
        self.client.publish(f"{ROOT}/devices/{job.device_id}/jobs/notify-next",
                            json.dumps(self._job_document(s, job)), qos=1, retain=True)

    # messages

    def echo_age(self) -> float:
        """Seconds since the broker last delivered our heartbeat back (a broker that is stopped or hung stops)."""
        return time.monotonic() - self.last_echo

    def _on_message(self, client, _userdata, msg):
        if msg.topic == HEARTBEAT_TOPIC:
            self.last_echo = time.monotonic()
            return
        parts = msg.topic.split("/")
        if len(parts) < 4 or not msg.payload:
            return
        device_id = parts[3]
        if parts[4:] == ["telemetry"] and not self.telemetry.admit(device_id, len(msg.payload)):
            return  # before parsing: a megabyte of JSON costs the coordinator's thread
        try:
            payload = json.loads(msg.payload)
        except ValueError as e:
            log.warning("%s: bad payload (%s)", msg.topic, e)
            return
        if not isinstance(payload, dict):
            log.warning("%s: bad payload (not an object)", msg.topic)
            return
        try:
            if parts[4:] == ["state"]:
                with self.ctx.sessions() as s:
                    record_state(s, device_id, payload)
            elif parts[4:] == ["telemetry"]:
                with self.ctx.sessions() as s:
                    record_telemetry(s, device_id, payload)
            elif len(parts) == 7 and parts[4] == "jobs" and parts[6] == "update":
                self._job_update(client, device_id, parts[5], payload)
        except Exception:  # one bad message must not stop the coordinator
            log.exception("handling %s", msg.topic)

    def _job_update(self, client, device_id: str, job_id: str, payload: dict) -> None:
        with self.lock, self.ctx.sessions() as s:
            result = apply_job_update(s, device_id, job_id, payload)
            topic = f"{ROOT}/devices/{device_id}/jobs/{job_id}/update/"
            answer = {"jobId": job_id, "status": payload.get("status")}
            if not result.accepted:
                answer["reason"] = result.reason
            client.publish(topic + ("accepted" if result.accepted else "rejected"), json.dumps(answer), qos=1)
            if result.accepted and payload.get("status") != "IN_PROGRESS":
                # done with this job: clear the retained notification so a reconnect does not repeat it
                client.publish(f"{ROOT}/devices/{device_id}/jobs/notify-next", b"", qos=1, retain=True)
            if result.deployment is not None:
                for job in advance(s, result.deployment):
                    self._notify(s, job)
