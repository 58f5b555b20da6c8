"""Fixtures of the service tests only."""

import pytest

from server.config import Settings
from server.services.tenants import create_user


@pytest.fixture
def app(tmp_path, database_url, make_app):
    """The app on a fresh database (SQLite or PostgreSQL, by `database_url`), with a user alice and her token."""
    app = make_app(Settings(data_dir=tmp_path / "data", database_url=database_url,
                            max_upload_bytes=2 * 1024 * 1024))
    with app.extensions["tinymlaas"].sessions() as s:
        _, app.token = create_user(s, "alice")
    return app


@pytest.fixture
def client(app):
    """A test client of `app` with alice's token in `client.auth`."""
    c = app.test_client()
    c.auth = {"Authorization": f"Bearer {app.token}"}
    return c


@pytest.fixture(scope="session")
def small_firmware(tmp_path_factory):
    """A one-layer int8 model compiled for cortex-m4, with a signing key: the OTA tests' firmware."""
    from tests.helpers import quantized_layers as q
    from tinymlaas.build.pipeline import compile_model
    from tinymlaas.build.request import BuildRequest
    from tinymlaas.ota.package import generate_key, package_build
    from tinymlaas.targets import get_target

    work = tmp_path_factory.mktemp("ota")
    model = work / "fc.tflite"
    model.write_bytes(q.fully_connected(7, [1, 37], 11, 1))
    compile_model(model, "cortex-m4", work / "build", BuildRequest(inputs=3))
    key = generate_key(work / "keys" / "signing.pem")
    package = package_build(work / "build", get_target("cortex-m4"), key, "1.0.1")
    # the firmware image's payload: the code part, then the model (its weights at the model region)
    return {"dir": work, "key": key, "package": package, "payload": package.payload}
