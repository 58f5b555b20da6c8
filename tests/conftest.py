import os
import subprocess
import sys
from pathlib import Path

import pytest

from tinymlaas import PROJECT_ROOT

MODELS_DIR = Path(os.environ.get("TINYMLAAS_MODELS", PROJECT_ROOT.parent / "shared" / "models" / "mlperf-tiny")).resolve()

ALL_MODELS = [
    "kws_ref_model",
    "kws_ref_model_float32",
    "vww_96_int8",
    "vww_96_float",
    "pretrainedResnet_quant",
    "pretrainedResnet",
    "ad01_int8",
    "ad01_fp32",
]


@pytest.fixture(scope="session")
def models_dir() -> Path:
    if not (MODELS_DIR / "kws_ref_model.tflite").exists():
        pytest.fail(f"MLPerf Tiny models not found in {MODELS_DIR} (set TINYMLAAS_MODELS)")
    return MODELS_DIR


def cli(*args, cwd=None) -> subprocess.CompletedProcess:
    """`tinymlaas ARGS` as a user runs it: a new process, its exit status and its output."""
    return subprocess.run([sys.executable, "-m", "tinymlaas", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, check=False)


def model_path(name: str) -> Path:
    return MODELS_DIR / f"{name}.tflite"


def done_build(app, client, headers: dict, group: str) -> tuple[int, dict]:
    """A device `<group>-dev` in `group`, an uploaded model, and a finished build of it with an image, the build
    written straight to the database (for tests of rollouts and access, not of the compiler): (build id, model)."""
    import io

    from server.db import Build, Model

    r = client.post("/api/v1/devices", json={"id": f"{group}-dev", "target": "cortex-m4", "group": group},
                    headers=headers)
    assert r.status_code == 201, r.get_json()
    m = client.post("/api/v1/models", data={"file": (io.BytesIO(model_path("ad01_int8").read_bytes()), "ad.tflite")},
                    headers=headers).get_json()
    with app.extensions["tinymlaas"].sessions() as s:
        row = s.get(Model, m["id"])
        b = Build(model_id=row.id, target="cortex-m4", version="1.0.7+0", state="done",
                  artifacts={"image": "0" * 64, "selftest": "1" * 64}, owner_id=row.owner_id, org_id=row.org_id)
        s.add(b)
        s.commit()
        return b.id, m


@pytest.fixture(scope="session")
def small_firmware(tmp_path_factory):
    """A one-layer int8 model compiled for cortex-m4, with a signing key: the OTA tests' firmware."""
    import quantized_layers as q

    from tinymlaas.ota.package import firmware_payload, generate_key, package_build
    from tinymlaas.build.pipeline import compile_model
    from tinymlaas.build.request import BuildRequest
    from tinymlaas.targets import get_target

    work = tmp_path_factory.mktemp("ota")
    model = work / "fc.tflite"
    model.write_bytes(q.fully_connected(7, [1, 37], 11, 1))
    compile_model(model, "cortex-m4", work / "build", BuildRequest(inputs=3))
    key = generate_key(work / "keys" / "signing.pem")
    package = package_build(work / "build", get_target("cortex-m4"), key, "1.0.1")
    firmware_payload(work / "build" / "firmware.elf", get_target("cortex-m4"), work / "payload.bin")
    return {"dir": work, "key": key, "package": package, "payload": work / "payload.bin"}


def _postgres_bin() -> Path | None:
    root = Path("/usr/lib/postgresql")
    versions = sorted(root.glob("*/bin/initdb")) if root.exists() else []
    return versions[-1].parent if versions else None


@pytest.fixture(scope="session")
def postgres_url():
    """A throwaway PostgreSQL server on loopback (initdb in a temporary folder), for the whole session."""
    import shutil
    import subprocess
    import tempfile

    from server.broker import free_port

    bindir = _postgres_bin()
    if bindir is None:
        if os.environ.get("TINYMLAAS_REQUIRE_POSTGRES"):
            pytest.fail("PostgreSQL is not installed but TINYMLAAS_REQUIRE_POSTGRES is set")
        pytest.skip("PostgreSQL server binaries not installed (make setup installs them)")
    data = Path(tempfile.mkdtemp(prefix="tinymlaas-pg-"))
    as_user = []
    if os.geteuid() == 0:  # initdb refuses to run as root
        shutil.chown(data, "postgres", "postgres")
        as_user = ["runuser", "-u", "postgres", "--"]
    port = free_port()

    def pg(*cmd):
        subprocess.run(as_user + [str(bindir / cmd[0]), *cmd[1:]], check=True, capture_output=True)

    pg("initdb", "-D", str(data / "db"), "-A", "trust", "-U", "tinymlaas")
    pg("pg_ctl", "-D", str(data / "db"), "-w", "-l", str(data / "log"), "-o",
       f"-p {port} -k {data} -c listen_addresses=127.0.0.1 -c fsync=off", "start")
    try:
        pg("createdb", "-h", "127.0.0.1", "-p", str(port), "-U", "tinymlaas", "tinymlaas")
        yield f"postgresql+psycopg://tinymlaas@127.0.0.1:{port}/tinymlaas"
    finally:
        pg("pg_ctl", "-D", str(data / "db"), "-m", "immediate", "stop")
        shutil.rmtree(data, ignore_errors=True)


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request, tmp_path):
    """Each API test runs on SQLite and on a real PostgreSQL (a fresh database each time)."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'db.sqlite'}"
    url = request.getfixturevalue("postgres_url")
    from sqlalchemy import create_engine, text

    engine = create_engine(url)
    with engine.begin() as conn:
        conn.execute(text("DROP SCHEMA public CASCADE"))
        conn.execute(text("CREATE SCHEMA public"))
    engine.dispose()
    return url


@pytest.fixture
def make_app():
    """create_app(settings), closed after the test (its database and queue connections are given back)."""
    from server import create_app

    apps = []

    def make(settings, **kwargs):
        apps.append(create_app(settings, **kwargs))
        return apps[-1]

    yield make
    for app in apps:
        app.extensions["tinymlaas"].close()


@pytest.fixture(autouse=True, scope="session")
def _measurements_in_a_temporary_database(tmp_path_factory):
    """Compiles the tests run record into a database of their own, not the user's."""
    db = tmp_path_factory.mktemp("measurements") / "measurements.db"
    os.environ["TINYMLAAS_MEASUREMENTS"] = f"sqlite:///{db}"
    yield db
