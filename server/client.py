"""A small Python client for the tinymlaas API (what the CLI uses)."""

from __future__ import annotations

import time
from pathlib import Path

import requests

from tinymlaas.build.request import BuildRequest
from tinymlaas.errors import TinyMLaaSError


class ApiError(TinyMLaaSError):
    def __init__(self, status: int, problem: dict):
        self.status, self.problem = status, problem
        field = f" [{problem['field']}]" if problem.get("field") else ""
        super().__init__(f"HTTP {status}{field}: {problem.get('detail') or problem.get('title') or 'error'}")


class Client:
    def __init__(self, url: str, token: str, timeout: float = 60.0):
        self.url = url.rstrip("/") + "/api/v1"
        self.http = requests.Session()
        self.http.headers["Authorization"] = f"Bearer {token}"
        self.timeout = timeout

    def _call(self, method: str, path: str, **kwargs):
        try:
            r = self.http.request(method, self.url + path, timeout=self.timeout, **kwargs)
        except requests.ConnectionError as e:
            raise TinyMLaaSError(f"cannot reach the server at {self.url}: {type(e).__name__}") from None
        if r.status_code >= 400:
            try:
                problem = r.json()
            except ValueError:
                problem = {"detail": r.text[:200]}
            raise ApiError(r.status_code, problem)
        return r

    def register_device(self, device_id: str, target: str, group: str = "default") -> dict:
        return self._call("POST", "/devices", json={"id": device_id, "target": target, "group": group}).json()

    def devices(self, group: str | None = None) -> list[dict]:
        return self._call("GET", "/devices", params={"group": group} if group else None).json()

    def upload_model(self, path: str | Path, quantize: str = "none", calibration: str | Path | None = None) -> dict:
        files = {"file": _named_bytes(path)}
        if calibration is not None:
            files["calibration"] = _named_bytes(calibration)
        return self._call("POST", "/models", files=files, data={"quantize": quantize}).json()

    def upload_validation(self, model_id: int, path: str | Path) -> dict:
        path = Path(path)
        with open(path, "rb") as f:
            return self._call("PUT", f"/models/{model_id}/validation", files={"file": (path.name, f)}).json()

    def request_build(self, model_id: int, target: str, version: str | None = None, variant: dict | None = None,
                      **options) -> dict:
        """options: build options by name (tinymlaas.build.request.BuildRequest: max_ram=..., budget=...,
        precision=...), sent nested as the service's request schema has them; variant: build exactly that search
        point (its JSON)."""
        body = {"model_id": model_id, "target": target, **BuildRequest(**options).grouped()}
        if version:
            body["version"] = version
        if variant is not None:
            body["variant"] = variant
        return self._call("POST", "/builds", json=body).json()

    def build(self, build_id: int) -> dict:
        return self._call("GET", f"/builds/{build_id}").json()

    def wait_build(self, build_id: int, timeout: float = 900.0, on_progress=None) -> dict:
        return _poll(lambda: self.build(build_id), lambda b: b["state"] in ("done", "failed", "cancelled"),
                     timeout, on_progress, lambda b: f"build {build_id} is still {b['state']}", 0.5)

    def cancel_build(self, build_id: int) -> dict:
        return self._call("POST", f"/builds/{build_id}/cancel").json()

    def download_artifact(self, build_id: int, name: str, out: str | Path) -> Path:
        r = self._call("GET", f"/builds/{build_id}/artifacts/{name}")
        Path(out).write_bytes(r.content)
        return Path(out)

    def deploy(self, build_id: int, group: str = "default", stages=(100,), success_threshold: float = 1.0,
               error_threshold: float = 0.1, force: bool = False, job_timeout: int = 1800) -> dict:
        return self._call("POST", "/deployments", json={
            "build_id": build_id, "group": group, "stages": list(stages), "success_threshold": success_threshold,
            "error_threshold": error_threshold, "force": force, "job_timeout": job_timeout}).json()

    def deployment(self, dep_id: int) -> dict:
        return self._call("GET", f"/deployments/{dep_id}").json()

    def deployments(self) -> list[dict]:
        return self._call("GET", "/deployments").json()

    def rollback(self, dep_id: int) -> dict:
        return self._call("POST", f"/deployments/{dep_id}/rollback").json()

    def cancel_deployment(self, dep_id: int) -> dict:
        return self._call("POST", f"/deployments/{dep_id}/cancel").json()

    def me(self) -> dict:
        return self._call("GET", "/me").json()

    def create_user(self, name: str, role: str = "developer") -> dict:
        return self._call("POST", "/users", json={"name": name, "role": role}).json()

    def users(self) -> list[dict]:
        return self._call("GET", "/users").json()

    def create_token(self, name: str, scopes: list[str] | None = None, expires_in_days: int | None = 90) -> dict:
        return self._call("POST", "/tokens", json={"name": name, "scopes": scopes,
                                                   "expires_in_days": expires_in_days}).json()

    def tokens(self) -> list[dict]:
        return self._call("GET", "/tokens").json()

    def revoke_token(self, token_id: int) -> dict:
        return self._call("DELETE", f"/tokens/{token_id}").json()

    def rotate_device_secret(self, device_id: str) -> dict:
        return self._call("POST", f"/devices/{device_id}/credentials").json()

    def wait_deployment(self, dep_id: int, timeout: float = 600.0, on_progress=None) -> dict:
        """Until the rollout has ended and no notified device is still working on it."""
        return _poll(lambda: self.deployment(dep_id),
                     lambda d: d["state"] != "in_progress"
                     and not any(j["status"] in ("notified", "in_progress") for j in d["jobs"]),
                     timeout, on_progress, lambda d: f"deployment {dep_id} is still {d['state']}", 0.3)


def _poll(fetch, finished, timeout: float, on_progress, still, interval: float) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        obj = fetch()
        if on_progress:
            on_progress(obj)
        if finished(obj):
            return obj
        if time.monotonic() > deadline:
            raise TinyMLaaSError(f"{still(obj)} after {timeout:g} s")
        time.sleep(interval)


def draw_rollout(d: dict, width: int = 60) -> str:
    """The rollout as text: one row per stage, one mark per device."""
    marks = {"succeeded": "#", "failed": "X", "rejected": "R", "timed_out": "T", "in_progress": "~", "notified": ".",
             "pending": " ", "cancelled": "-"}
    lines = [f"deployment {d['id']} (build {d['build_id']} -> group '{d['group']}'): {d['state'].upper()}"
             + (f" — {d['reason']}" if d.get("reason") else "")]
    for st in d["summary"]["stages"]:
        row = "".join(marks.get(s, "?") for s in st["statuses"])
        rows = [row[i:i + width] for i in range(0, len(row), width)] or [""]
        label = f"stage {st['stage'] + 1} ({st['devices']:>3} dev)"
        lines.append(f"  {label} [{rows[0]:<{width}}]")
        lines += [f"  {'':<{len(label)}} [{r:<{width}}]" for r in rows[1:]]
    sent = d["summary"].get("bytes") or {}
    if sent.get("total"):
        lines.append(f"  sent {sent['total']:,} B over the air ("
                     + ", ".join(f"{k} {v:,} B" for k, v in sorted(sent.items()) if k != "total") + ")")
    counts = ", ".join(f"{k} {v}" for k, v in sorted(d["summary"]["counts"].items()))
    lines.append(f"  {counts}    (# succeeded, X failed, R rejected, T timed out, ~ updating, . notified, - cancelled)")
    return "\n".join(lines)


def draw_history(d: dict) -> str:
    """The rollout's history as text, a line per event."""
    lines = ["  history:"]
    for e in d.get("events") or []:
        where = " ".join(x for x in (f"stage {e['stage'] + 1}" if e.get("stage") is not None else "",
                                     e.get("device") or "") if x)
        lines.append(f"    {e['at'][:19].replace('T', ' ')}  {e['kind'].replace('_', ' '):<17} {where:<24} "
                     f"{e.get('detail') or ''}".rstrip())
    return "\n".join(lines)


def _named_bytes(path: str | Path) -> tuple[str, bytes]:
    """A file to upload, as (name, content); a clear error when it cannot be read."""
    path = Path(path)
    try:
        return path.name, path.read_bytes()
    except OSError as e:
        raise TinyMLaaSError(f"cannot read {path}: {e.strerror or type(e).__name__}") from None
