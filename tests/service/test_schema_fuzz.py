"""The OpenAPI document tells the truth: schemathesis generates requests from it (valid and invalid), sends them to
the real app on a real database, and checks every response — no 5xx, status codes and bodies as documented, content
types, headers. Bounded: a fixed number of examples per operation, derandomized so the run repeats."""

import atexit
import io
import shutil
import tempfile
from pathlib import Path

import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import positive_data_acceptance

from server import create_app
from server.config import Settings
from server.services.tenants import create_user
from tests.helpers.paths import model_path


def _fuzzed_app():
    """The app on its own database, with a device and a model (ids 1) so that lookups do not all answer 404. Made at
    import: schemathesis reads the document when it collects the tests."""
    root = Path(tempfile.mkdtemp(prefix="tinymlaas-schema-"))
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    app = create_app(Settings(data_dir=root / "data", database_url=f"sqlite:///{root / 'db.sqlite'}",
                              max_upload_bytes=1024 * 1024))
    with app.extensions["tinymlaas"].sessions() as s:
        _, app.token = create_user(s, "fuzz")
    c, auth = app.test_client(), {"Authorization": f"Bearer {app.token}"}
    assert c.post("/api/v1/devices", json={"id": "dev-1", "target": "cortex-m4"}, headers=auth).status_code == 201
    assert c.post("/api/v1/models", data={"file": (io.BytesIO(model_path("ad01_int8").read_bytes()), "ad.tflite")},
                  headers=auth).status_code == 201
    return app


APP = _fuzzed_app()
schema = schemathesis.openapi.from_wsgi("/api/v1/openapi.json", APP)


# Requests whose acceptance depends on more than their shape: a model file's content, whether a referenced build or
# model exists and is done, version fields in range, stages strictly increasing. A schema-valid request may get a
# (documented) 4xx there; every other check still applies to them.
DEPENDS_ON_DATA = {("POST", "/api/v1/models"), ("POST", "/api/v1/builds"), ("POST", "/api/v1/deployments")}


@schema.parametrize()
@settings(max_examples=25, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
def test_every_operation_answers_as_documented(case):
    excluded = [positive_data_acceptance] if (case.method, case.path) in DEPENDS_ON_DATA else []
    case.call_and_validate(headers={"Authorization": f"Bearer {APP.token}"}, excluded_checks=excluded)
