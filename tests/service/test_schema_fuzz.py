"""The OpenAPI document tells the truth: schemathesis generates requests from it (valid and invalid), sends them over
real HTTP to a live server (cheroot on a loopback socket, the real app on a real database, the broker beside it),
and checks every response: no 5xx, status codes and bodies as documented, content types, headers. Bounded: a fixed
number of examples per operation, derandomized so the run repeats."""

import tempfile
from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import positive_data_acceptance

from server import create_app
from server.client import Client
from server.config import Settings
from tests.helpers.fleet import start_server
from tests.helpers.paths import model_path


@pytest.fixture(scope="module")
def live_server(tmp_path_factory):
    """A server of its own with a device and a model (ids 1) so that lookups do not all answer 404; started when the
    tests run (not at collection: its threads would outlive a run that deselects them), stopped after them."""
    root = tmp_path_factory.mktemp("schema")
    server = start_server(root / "data", workers=0, supervise_every=None, max_upload_bytes=1024 * 1024)
    try:
        client = Client(server.url, server.admin_token)
        client.register_device("dev-1", "cortex-m4")
        path = root / "ad.tflite"
        path.write_bytes(model_path("ad01_int8").read_bytes())
        client.upload_model(path)
        yield server
    finally:
        server.stop()


def _document() -> dict:
    """The OpenAPI document, read at collection from the app itself (no server yet: schemathesis needs it to
    generate the tests); the live server serves the same one."""
    with tempfile.TemporaryDirectory(prefix="tinymlaas-schema-") as tmp:
        app = create_app(Settings(data_dir=Path(tmp) / "data", database_url=f"sqlite:///{tmp}/db.sqlite"))
        try:
            return app.test_client().get("/api/v1/openapi.json").get_json()
        finally:
            app.extensions["tinymlaas"].close()


schema = schemathesis.openapi.from_dict(_document())


# Requests whose acceptance depends on more than their shape: a model file's content, whether a referenced build or
# model exists and is done, version fields in range, stages strictly increasing. A schema-valid request may get a
# (documented) 4xx there; every other check still applies to them.
DEPENDS_ON_DATA = {("POST", "/api/v1/models"), ("POST", "/api/v1/builds"), ("POST", "/api/v1/deployments"),
                   ("PUT", "/api/v1/models/{model_id}/validation")}


@schema.parametrize()
@settings(max_examples=25, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
def test_every_operation_answers_as_documented(case, live_server):
    excluded = [positive_data_acceptance] if (case.method, case.path) in DEPENDS_ON_DATA else []
    case.call_and_validate(base_url=live_server.url, headers={"Authorization": f"Bearer {live_server.admin_token}"},
                           excluded_checks=excluded, timeout=30)
