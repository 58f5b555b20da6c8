"""Fixtures for every test folder (unit/, integration/, service/); helpers are in tests/helpers/."""

import os
from pathlib import Path

import pytest

from tests.helpers.paths import MODELS_DIR


@pytest.fixture(scope="session")
def models_dir() -> Path:
    if not (MODELS_DIR / "kws_ref_model.tflite").exists():
        pytest.fail(f"MLPerf Tiny models not found in {MODELS_DIR} (set TINYMLAAS_MODELS)")
    return MODELS_DIR


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
