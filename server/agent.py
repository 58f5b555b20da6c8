"""`tinymlaas agent`: one emulated device. The device side of OTA, over HTTP and MQTT.

It registers (once; credentials persist in its state folder), connects to MQTT with its own
credentials and a last will, and for each job: downloads the image with resume, checks hash,
signature, size and version, writes the inactive slot, boots it as a test image on its emulated
board (QEMU, or Renode's model of a real part), runs the self-test, then confirms or reverts —
reporting every step. A model-only update (a model image for the running firmware's model ABI)
goes the same way through a model slot, the firmware staying in place. Its flash (A/B slots) and its state file are on disk, so a kill at any
moment restarts into a valid image and finishes or fails the job.

The physical board is the one stand-in: its flash is a file and its CPU is QEMU or Renode.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import queue
import threading
import time
from pathlib import Path

import paho.mqtt.client as mqtt
import requests

from tinymlaas.errors import TinyMLaaSError
from tinymlaas.ota.delta import DeltaRejected, apply_patch, decompress_image
from tinymlaas.ota.package import ImageRejected, inspect_image, inspect_model_image, model_slot_size, slot_size
from tinymlaas.ota.selftest import run_selftest
from tinymlaas.ota.slots import BootedImage, Bootloader, Flash, NoBootableImage
from tinymlaas.private import write_private
from tinymlaas.targets import get_target

from .mqtt_loop import shared_loop

log = logging.getLogger("tinymlaas.agent")
DOWNLOAD_CHUNK = 16 * 1024
# QEMU self-tests of many agents in one process share the machine's cores.
SELFTEST_SLOTS = threading.BoundedSemaphore(max(1, os.cpu_count() or 1))


_PORTS = {"http": 80, "https": 443}


class Agent:
    def __init__(self, server: str, device_id: str, target: str, state_dir: Path, token: str | None = None,
                 group: str = "default", faults: tuple[str, ...] = (), mqtt_port: int | None = None,
                 download_patience: float = 300.0, board: str = "qemu"):
        self.server = server.rstrip("/")
        self.download_patience = download_patience  # seconds a download keeps retrying through an outage
        self.device_id, self.target, self.group, self.token = device_id, target, group, token
        self.dir = Path(state_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.faults = set(faults)  # "selftest": this device's self-test fails (fault injection for tests)
        self.board = board  # the emulated board: "qemu" (the target's QEMU machine) or "renode" (a real part's model)
        self.mqtt_port = mqtt_port
        self.state = self._load()
        self.flash = Flash(self.dir / "flash.img", slot_size(get_target(target)), model_slot_size(get_target(target)))
        self.booted: BootedImage | None = None
        self.client: mqtt.Client | None = None
        self.jobs: queue.Queue = queue.Queue()
        self.connected = threading.Event()
        self.stopped = threading.Event()
        self.crashed: BaseException | None = None  # set when the job thread died (e.g. an injected reset)
        self._worker: threading.Thread | None = None
        self.events: list[dict] = []  # every update sent, for tests and the CLI
        self.resumed_downloads = 0

    # persistent state

    def _load(self) -> dict:
        path = self.dir / "agent.json"
        return json.loads(path.read_text()) if path.exists() else {"done_jobs": {}}

    def _save(self) -> None:
        write_private(self.dir / "agent.json", json.dumps(self.state, indent=1))  # it holds the device secret

    @property
    def bootloader(self) -> Bootloader:
        return Bootloader(self.flash, self.state["signing_key"].encode())

    @property
    def version(self) -> str | None:
        return self.booted.version if self.booted else None

    # life cycle

    def register(self) -> None:
        if "mqtt" in self.state:
            return
        if not self.token:
            raise TinyMLaaSError("this device is not registered yet: an API token is needed to register it")
        r = requests.post(f"{self.server}/api/v1/devices", headers={"Authorization": f"Bearer {self.token}"},
                          json={"id": self.device_id, "target": self.target, "group": self.group}, timeout=30)
        if r.status_code != 201:
            raise TinyMLaaSError(f"registration refused ({r.status_code}): {r.json().get('detail', r.text)}")
        body = r.json()
        self.state.update(mqtt=body["mqtt"], signing_key=body["signing_key"], downloads=body.get("downloads"))
        self._save()

    def boot(self) -> BootedImage | None:
        """Power-on: the bootloader's decision, then finishing a test boot that a reset interrupted."""
        self._boot()
        job = self.state.get("job")
        if self.booted is not None and self.booted.test:
            if job and job.get("phase") == "staged":
                self._finish_test_boot(job)
            else:
                self.bootloader.revert()
                self._boot()
        elif job and job.get("phase") in ("staged", "testing"):
            self._finish(job, "FAILED", step="reverted",
                         message="reset before the self-test confirmed the image: reverted to the previous image")
        return self.booted

    def _boot(self) -> BootedImage | None:
        try:
            self.booted = self.bootloader.boot()
        except NoBootableImage:  # nothing installed yet (or nothing valid): wait for an update
            self.booted = None
        return self.booted

    def start(self) -> Agent:
        self.register()
        self.boot()
        m = self.state["mqtt"]
        # the broker knows the device by the key the server gave it (its name is unique in its organisation only)
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=m["username"], clean_session=True)
        self.client.username_pw_set(m["username"], m["password"])
        if m.get("tls"):
            self.client.tls_set(**self._tls_files(m))
        self.client.will_set(self._topic("state"), json.dumps({"state": "lost"}), qos=1, retain=True)
        self.client.max_queued_messages_set(0)
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = lambda *a: self.connected.clear()
        self.client.on_message = self._on_message
        shared_loop().connect(self.client, m["host"], self.mqtt_port or m["port"], keepalive=15)
        self._worker = threading.Thread(target=self._work, name=f"agent-{self.device_id}", daemon=True)
        self._worker.start()
        return self

    def _tls_files(self, m: dict) -> dict:
        """paho wants files: the CA, and this device's certificate and key when it has them (the key owner-only)."""
        files = {"ca_certs": str(write_private(self.dir / "mqtt-ca.pem", m["ca"]))}
        if m.get("certificate"):
            files.update(certfile=str(write_private(self.dir / "mqtt-cert.pem", m["certificate"])),
                         keyfile=str(write_private(self.dir / "mqtt-key.pem", m["private_key"])))
        return files

    def stop(self, clean: bool = True) -> None:
        """clean=False drops the connection without a goodbye, as a power cut does (the will fires)."""
        self.stopped.set()
        self.jobs.put(None)
        if self.client is not None:
            if clean:
                self._publish("state", {"state": "offline", "firmware_version": self.version}, retain=True)
            shared_loop().disconnect(self.client, clean)

    def _topic(self, suffix: str) -> str:
        return f"{self.state['mqtt']['topic_root']}/{suffix}"

    def _publish(self, suffix: str, payload: dict, retain: bool = False) -> None:
        if self.client is not None:
            self.client.publish(self._topic(suffix), json.dumps(payload), qos=1, retain=retain)

    def _on_connect(self, client, _userdata, _flags, reason, _props):
        if reason.is_failure:
            log.error("%s: MQTT connection refused: %s", self.device_id, reason)
            return
        self._publish("state", {"state": "online", "firmware_version": self.version, "target": self.target,
                                "slot": self.booted.slot if self.booted else None}, retain=True)
        client.subscribe(self._topic("jobs/notify-next"), qos=1)
        job = self.state.get("job")
        if job and job.get("last_update"):  # the broker may have restarted: say again where we are
            self._publish(f"jobs/{job['jobId']}/update", job["last_update"])
        self.connected.set()

    def _on_message(self, _client, _userdata, msg):
        if msg.topic == self._topic("jobs/notify-next") and msg.payload:
            try:
                self.jobs.put(json.loads(msg.payload))
            except ValueError:
                log.warning("%s: unreadable job document", self.device_id)

    def _work(self) -> None:
        while not self.stopped.is_set():
            doc = self.jobs.get()
            if doc is None:
                return
            try:
                self.handle_job(doc)
            except BaseException as e:  # noqa: BLE001 - an injected reset or a crash: the device stops here, as a board would
                self.crashed = e
                log.info("%s: stopped: %s", self.device_id, e)
                return

    # the update

    def _update(self, job: dict, status: str, **fields) -> None:
        payload = {"status": status, **{k: v for k, v in fields.items() if v is not None}}
        job["last_update"] = payload
        self._save()
        self.events.append({"job": job["jobId"], **payload})
        self._publish(f"jobs/{job['jobId']}/update", payload)

    def _finish(self, job: dict, status: str, **fields) -> None:
        if job.get("received"):  # what came over the air for this update: the payload kind and its bytes
            fields = {**job["received"], **fields}
        self._update(job, status, **fields)
        self.state["done_jobs"][job["jobId"]] = job["last_update"]
        self.state.pop("job", None)
        for name in ("download.part", "delta.part", "download.xz", "model.part", "selftest.json"):
            (self.dir / name).unlink(missing_ok=True)
        self._save()
        self._publish("state", {"state": "online", "firmware_version": self.version,
                                "slot": self.booted.slot if self.booted else None}, retain=True)

    def handle_job(self, doc: dict) -> None:
        job_id = doc.get("jobId")
        if not job_id:
            return
        if job_id in self.state["done_jobs"]:  # a repeated notification: repeat the final answer
            self._publish(f"jobs/{job_id}/update", self.state["done_jobs"][job_id])
            return
        job = self.state.get("job")
        if not job or job["jobId"] != job_id:
            job = {**doc, "phase": "download"}
            self.state["job"] = job
            self._save()
        if job["phase"] != "download":
            return  # staged already: the boot path finishes it
        self._update(job, "IN_PROGRESS", step="downloading", progress=0.0)
        urls = [job["image"]["url"], job["selftest"]["url"], *([job["payload"]["url"]] if job.get("payload") else [])]
        foreign = [u for u in urls if not self._enrolled_origin(u)]
        if foreign:  # the agent's credentials go only to the server it enrolled with
            self._finish(job, "REJECTED", step="download", reason="foreign-url",
                         message=f"download URL {foreign[0][:120]} is not on {self.server}")
            return
        try:
            image, sent = self._fetch_image(job)
            spec = json.loads(self._download(job["selftest"]["url"], job["selftest"]["sha256"],
                                             self.dir / "selftest.json", None))
        except (requests.RequestException, TinyMLaaSError) as e:
            self._finish(job, "FAILED", step="download", message=str(e)[:300])
            return
        job["received"] = sent
        if sent["payload"] != "model":  # a model image was inspected where it was made (_model_image)
            try:
                inspect_image(image, self.state["signing_key"].encode(), self.flash.slot_size, self.version,
                              allow_downgrade=bool(job.get("allow_downgrade")))
            except ImageRejected as e:
                self._finish(job, "REJECTED", step="verify", reason=e.reason, message=str(e))
                return
        self._update(job, "IN_PROGRESS", step="installing", progress=0.6)
        if sent["payload"] == "model":
            self.bootloader.stage_model(image)
        else:
            self.bootloader.stage(image)
        job["phase"] = "staged"
        self._save()
        self._update(job, "IN_PROGRESS", step="rebooting", progress=0.8)
        if self._boot() is None or not self.booted.test:
            self._finish(job, "FAILED", step="boot", message="the bootloader did not start the new image")
            return
        self._finish_test_boot(job, spec)

    def _fetch_image(self, job: dict) -> tuple[bytes, dict]:
        """The new image by the payload the server chose for this device: a patch against the image it runs (its
        base checked before anything is fetched or written), the image compressed, or the image itself; the
        result always checked against the image's hash. A patch or a compressed image that cannot make the image
        falls back to the full image. Returns the image and what was received ({"payload", "bytes"})."""
        payload, want = job.get("payload") or {}, job["image"]["sha256"]
        kind = payload.get("kind", "full")
        running = self.bootloader.image_in(self.booted.slot) if kind == "delta" and self.booted else None
        try:
            if kind == "model":
                image = self._model_image(job, payload)
                return image, {"payload": "model", "bytes": payload["size"]}
            if kind == "delta" and running is not None and hashlib.sha256(running).hexdigest() == payload.get("base"):
                patch = self._download(payload["url"], payload["sha256"], self.dir / "delta.part", job)
                image = apply_patch(running, patch, self.state["signing_key"].encode(), self.flash.slot_size)
            elif kind == "compressed":
                packed = self._download(payload["url"], payload["sha256"], self.dir / "download.xz", job)
                image = decompress_image(packed, self.flash.slot_size)
            else:
                kind = "full" if kind != "delta" else "full (the running image is not the patch's base)"
                image = None
            if image is not None:
                if hashlib.sha256(image).hexdigest() != want:
                    raise DeltaRejected("bad-result", "the bytes made are not the image the job names")
                return image, {"payload": kind, "bytes": payload["size"]}
        except (DeltaRejected, ImageRejected) as e:
            log.warning("%s: %s; fetching the full image", self.device_id, e)
            kind = f"full ({e.reason} {kind})"
        image = self._download(job["image"]["url"], want, self.dir / "download.part", job)
        return image, {"payload": kind, "bytes": len(image)}

    def _model_image(self, job: dict, payload: dict) -> bytes:
        """A model-only update's model image: a patch against the signed image the device runs its model from (its
        base checked before anything is fetched) or the image compressed, checked against the image's hash, then
        inspected before anything is written: hash, signature, kind, version, and that it was made for the running
        firmware's model ABI. Raises DeltaRejected or ImageRejected (the caller takes the full image)."""
        booted = self.booted
        if booted is None or booted.layout is None:
            raise ImageRejected("abi-mismatch", "the running firmware has no model region")
        source = self.bootloader.model_source(booted) if payload.get("base") else None
        if payload.get("base") and (source is None or hashlib.sha256(source).hexdigest() != payload["base"]):
            raise DeltaRejected("wrong-base", "the patch was made for another image than the one the model runs from")
        data = self._download(payload["url"], payload["sha256"], self.dir / "model.part", job)
        key = self.state["signing_key"].encode()
        image = (apply_patch(source, data, key, self.flash.model_slot_size) if source is not None
                 else decompress_image(data, self.flash.model_slot_size))
        if hashlib.sha256(image).hexdigest() != payload.get("image"):
            raise DeltaRejected("bad-result", "the bytes made are not the model image the job names")
        inspect_model_image(image, key, self.flash.model_slot_size, booted.layout.abi, self.version,
                            allow_downgrade=bool(job.get("allow_downgrade")))
        return image

    def _finish_test_boot(self, job: dict, spec: dict | None = None) -> None:
        """Running the new image once as a test image: self-test, then confirm or revert."""
        spec = spec or json.loads((self.dir / "selftest.json").read_text())
        job["phase"] = "testing"
        self._save()
        self._update(job, "IN_PROGRESS", step="self-test", progress=0.9)
        if "selftest" in self.faults:
            raw = bytearray(base64.b64decode(spec["expected_outputs"]))
            raw[0] ^= 0xFF
            spec = {**spec, "expected_outputs": base64.b64encode(bytes(raw)).decode()}
        with SELFTEST_SLOTS:
            result = run_selftest(self.booted.payload, spec, board=self.board, model=self.booted.model_region)
        if result.passed:
            self.bootloader.confirm()
            self._boot()
            self._publish("telemetry", {"instructions": result.instructions, "build": job.get("build"),
                                        "version": self.version})
            self._finish(job, "SUCCEEDED", step="confirmed", progress=1.0, instructions=result.instructions,
                         message=result.detail)
        else:
            self.bootloader.revert()
            self._boot()
            self._publish("telemetry", {"errors": [f"self-test failed: {result.detail}"], "build": job.get("build")})
            self._finish(job, "FAILED", step="reverted", message=f"self-test failed: {result.detail}")

    def _enrolled_origin(self, url: str) -> bool:
        """Is `url` under the download location the server named at registration (its artifacts)?"""
        from urllib.parse import urlsplit

        base = self.state.get("downloads") or f"{self.server}/api/v1/artifacts/"  # enrolled before servers said
        a, b = urlsplit(url), urlsplit(base)
        origin = lambda u: (u.scheme, u.hostname, u.port or _PORTS.get(u.scheme))
        return origin(a) == origin(b) and a.path.startswith(b.path) and ".." not in a.path.split("/")

    def _download(self, url: str, sha256: str, part: Path, job: dict | None) -> bytes:
        """GET with resume: a dropped connection continues from the bytes already on disk (HTTP Range). Connection
        failures and 502/503/504 are retried with exponential backoff (0.2 s doubling, at most 10 s apart) for
        `download_patience` seconds: a server restarting or a proxy down for a while costs time, not the update."""
        m = self.state["mqtt"]
        auth = (m["username"], m["password"])
        deadline, attempt = time.monotonic() + self.download_patience, 0
        while True:
            attempt += 1
            have = part.stat().st_size if part.exists() else 0
            headers = {"Range": f"bytes={have}-"} if have else {}
            try:
                with requests.get(url, headers=headers, auth=auth, stream=True, timeout=30) as r:
                    if r.status_code == 416:  # already complete
                        pass
                    elif r.status_code in (502, 503, 504):
                        raise requests.ConnectionError(f"server unavailable ({r.status_code})")
                    elif r.status_code not in (200, 206):
                        raise TinyMLaaSError(f"download refused ({r.status_code}): {r.text[:200]}")
                    else:
                        mode = "ab" if r.status_code == 206 else "wb"
                        with open(part, mode) as f:
                            for block in r.iter_content(DOWNLOAD_CHUNK):
                                f.write(block)
                                f.flush()
            except (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError) as e:
                wait = min(0.2 * 2 ** (attempt - 1), 10.0)
                if time.monotonic() + wait > deadline:
                    raise TinyMLaaSError(f"download of {url} failed for {self.download_patience:.0f} s "
                                         f"({attempt} attempts): {type(e).__name__}") from None
                log.info("%s: download interrupted at %d B (%s); retrying in %.1f s", self.device_id,
                         part.stat().st_size if part.exists() else 0, type(e).__name__, wait)
                self.resumed_downloads += 1
                time.sleep(wait)
                continue
            data = part.read_bytes()
            if hashlib.sha256(data).hexdigest() == sha256:
                return data
            part.unlink()  # corrupted in transit: start over
            if time.monotonic() > deadline:
                raise TinyMLaaSError(f"download of {url} kept arriving corrupted for {self.download_patience:.0f} s")
