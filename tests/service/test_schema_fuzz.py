"""The OpenAPI document tells the truth: schemathesis generates requests from it (valid and invalid), sends them over
real HTTP to a live server (cheroot on a loopback socket, the real app on a real database, the broker beside it),
and checks every response: no 5xx, status codes and bodies as documented, content types, headers. Bounded: a fixed
number of examples per operation, derandomized so the run repeats."""

import atexit
import shutil
import tempfile
from pathlib import Path

import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import positive_data_acceptance

from server.client import Client
from tests.helpers.fleet import start_server
from tests.helpers.paths import model_path


def _live_server():
    """A server of its own with a device and a model (ids 1) so that lookups do not all answer 404. Started at import:
    schemathesis reads the live document when it collects the tests; stopped when the run ends."""
    root = Path(tempfile.mkdtemp(prefix="tinymlaas-schema-"))
    server = start_server(root / "data", workers=0, supervise_every=None, max_upload_bytes=1024 * 1024)
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    atexit.register(server.stop)
    client = Client(server.url, server.admin_token)
    client.register_device("dev-1", "cortex-m4")
    path = root / "ad.tflite"
    path.write_bytes(model_path("ad01_int8").read_bytes())
    client.upload_model(path)
    return server


SERVER = _live_server()
schema = schemathesis.openapi.from_url(f"{SERVER.url}/api/v1/openapi.json")


# Requests whose acceptance depends on more than their shape: a model file's content, whether a referenced build or
# model exists and is done, version fields in range, stages strictly increasing. A schema-valid request may get a
# (documented) 4xx there; every other check still applies to them.
DEPENDS_ON_DATA = {("POST", "/api/v1/models"), ("POST", "/api/v1/builds"), ("POST", "/api/v1/deployments")}


@schema.parametrize()
@settings(max_examples=25, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
def test_every_operation_answers_as_documented(case):
    excluded = [positive_data_acceptance] if (case.method, case.path) in DEPENDS_ON_DATA else []
    case.call_and_validate(headers={"Authorization": f"Bearer {SERVER.admin_token}"}, excluded_checks=excluded,
                           timeout=30)
