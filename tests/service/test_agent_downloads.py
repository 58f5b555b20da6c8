"""The device agent's downloads: only from where the server said at registration, and through outages (exponential
backoff for minutes, not five tries in a second). A real HTTP server on loopback; no broker needed."""

import hashlib
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from server.agent import Agent
from tinymlaas.errors import TinyMLaaSError

PAYLOAD = bytes(range(256)) * 40


class _Flaky(BaseHTTPRequestHandler):
    """503 until `up_at`, then the payload (whole or from a Range)."""
    up_at = 0.0
    hits = 0

    def do_GET(self):
        type(self).hits += 1
        if time.monotonic() < self.up_at:
            self.send_response(503)
            self.end_headers()
            return
        start = int(self.headers.get("Range", "bytes=0-")[6:].split("-")[0] or 0)
        self.send_response(206 if start else 200)
        self.send_header("Content-Length", str(len(PAYLOAD) - start))
        self.end_headers()
        self.wfile.write(PAYLOAD[start:])

    def log_message(self, *args):
        pass


@pytest.fixture
def http():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Flaky)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()


def _agent(tmp_path, server: str, **kwargs) -> Agent:
    (tmp_path / "dev").mkdir()
    (tmp_path / "dev" / "agent.json").write_text(json.dumps({
        "done_jobs": {}, "mqtt": {"username": "dev", "password": "secret"}, "signing_key": "",
        "downloads": f"{server}/api/v1/artifacts/"}))
    return Agent(server, "dev", "cortex-m4", tmp_path / "dev", **kwargs)


def test_a_job_pointing_elsewhere_is_rejected_and_nothing_is_fetched(tmp_path, http):
    _Flaky.hits, _Flaky.up_at = 0, 0.0
    agent = _agent(tmp_path, "http://127.0.0.1:9")  # enrolled with another server than the one that would answer
    digest = hashlib.sha256(PAYLOAD).hexdigest()
    agent.handle_job({"jobId": "j1", "image": {"url": f"{http}/api/v1/artifacts/{digest}", "sha256": digest},
                      "selftest": {"url": f"{http}/api/v1/artifacts/{digest}", "sha256": digest}})
    assert agent.events[-1]["status"] == "REJECTED" and agent.events[-1]["reason"] == "foreign-url"
    assert _Flaky.hits == 0  # the credentials never left for the foreign host
    assert not agent._enrolled_origin("http://127.0.0.1:9/api/v1/artifacts/../devices")
    assert agent._enrolled_origin("http://127.0.0.1:9/api/v1/artifacts/" + digest)


def test_a_download_waits_out_an_outage_with_backoff(tmp_path, http):
    _Flaky.hits, _Flaky.up_at = 0, time.monotonic() + 3.0
    agent = _agent(tmp_path, http, download_patience=30)
    started = time.monotonic()
    data = agent._download(f"{http}/api/v1/artifacts/x", hashlib.sha256(PAYLOAD).hexdigest(), tmp_path / "part", None)
    assert data == PAYLOAD and time.monotonic() - started >= 3.0
    assert 3 <= _Flaky.hits <= 8  # backing off: 0.2, 0.4, 0.8, 1.6 s ... not a busy loop


def test_a_download_gives_up_after_its_patience(tmp_path, http):
    _Flaky.hits, _Flaky.up_at = 0, time.monotonic() + 60.0
    agent = _agent(tmp_path, http, download_patience=1.0)
    with pytest.raises(TinyMLaaSError, match="failed for 1 s"):
        agent._download(f"{http}/api/v1/artifacts/x", "0" * 64, tmp_path / "part", None)
