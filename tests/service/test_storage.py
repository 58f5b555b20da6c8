"""A full or read-only data folder, on real file systems: a small tmpfs, or one mounted read-only (root only; the
tests skip, saying why, where no tmpfs can be mounted)."""

import io
import os
import shutil
import subprocess
import sys

import pytest

from server.config import Settings
from server.db import Model
from server.services.tenants import create_user
from tests.helpers.paths import REPO_ROOT, model_path


def _mount(path, options: str) -> None:
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    path.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True, text=True,
                       check=False)
    if r.returncode:
        pytest.skip(f"no tmpfs can be mounted here: {r.stderr.strip()}")


@pytest.fixture
def small_disk(tmp_path):
    path = tmp_path / "disk"
    _mount(path, "size=8m")
    yield path
    subprocess.run(["umount", "-l", str(path)], check=False)


def _user(app) -> dict:
    with app.extensions["tinymlaas"].sessions() as s:
        _, token = create_user(s, "dora")
    return {"Authorization": f"Bearer {token}"}


def _fill(disk, leave: int) -> None:
    (disk / "filler").write_bytes(b"\0" * max(shutil.disk_usage(disk).free - leave, 0))


def test_a_full_disk_is_a_507_that_stores_nothing_and_health_says_so(small_disk, make_app):
    app = make_app(Settings(data_dir=small_disk / "data"))
    c, auth = app.test_client(), _user(app)
    assert c.get("/api/v1/health").get_json()["checks"]["storage"] != "ok"  # 8 MiB: under the 64 MiB it wants
    _fill(small_disk, 64 << 10)
    data = model_path("ad01_int8").read_bytes()  # larger than what is left
    r = c.post("/api/v1/models", data={"file": (io.BytesIO(data), "ad.tflite")}, headers=auth)
    assert r.status_code == 507 and r.mimetype == "application/problem+json", r.get_data(as_text=True)
    assert "no space left on device" in r.get_json()["detail"] and str(small_disk / "data") in r.get_json()["detail"]
    with app.extensions["tinymlaas"].sessions() as s:
        assert s.query(Model).count() == 0
    assert not list((small_disk / "data").rglob(".incoming-*"))  # no partial file left behind
    health = c.get("/api/v1/health")
    assert health.status_code == 503 and "MiB free" in health.get_json()["checks"]["storage"]
    (small_disk / "filler").unlink()  # space again: the same upload goes through
    assert c.post("/api/v1/models", data={"file": (io.BytesIO(data), "ad.tflite")}, headers=auth).status_code == 201


def test_a_folder_gone_read_only_is_a_503(small_disk, make_app):
    app = make_app(Settings(data_dir=small_disk / "data"))
    c, auth = app.test_client(), _user(app)
    app.extensions["tinymlaas"].close()  # its database files closed (a file open for writing keeps a mount rw)
    subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
    data = model_path("ad01_int8").read_bytes()
    r = c.post("/api/v1/models", data={"file": (io.BytesIO(data), "ad.tflite")}, headers=auth)
    assert r.status_code == 503 and "read-only" in r.get_json()["detail"], r.get_data(as_text=True)
    r = c.post("/api/v1/devices", json={"id": "ro-1", "target": "cortex-m4"}, headers=auth)  # a database write
    assert r.status_code == 503 and "read-only" in r.get_json()["detail"], r.get_data(as_text=True)
    assert "cannot be written" in c.get("/api/v1/health").get_json()["checks"]["storage"]


def test_a_read_only_data_folder_stops_serve_with_one_line(tmp_path):
    folder = tmp_path / "ro"
    _mount(folder, "size=1m,ro")
    try:
        r = subprocess.run([sys.executable, "-m", "tinymlaas", "serve", "--data", str(folder / "data"), "--port", "0",
                            "--workers", "0"], check=False, capture_output=True, text=True, cwd=REPO_ROOT,
                           timeout=120)
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip().splitlines() == [
        f"tinymlaas: error: the data folder {folder / 'data'} cannot be written: it is on a read-only file system"]


def test_a_compile_out_of_space_says_so(small_disk, tmp_path):
    """A build that ran out of space reported a harmless linker warning as its error."""
    _fill(small_disk, 256 << 10)
    env = {**os.environ, "TMPDIR": str(small_disk)}
    r = subprocess.run([sys.executable, "-m", "tinymlaas", "compile", str(model_path("kws_ref_model")), "--target",
                        "cortex-m4", "--out", str(small_disk / "out"), "--no-record"], check=False,
                       capture_output=True, text=True, cwd=REPO_ROOT, env=env, timeout=600)
    assert r.returncode == 2, r.stderr
    lines = [line for line in r.stderr.splitlines() if line.startswith("tinymlaas:")]
    assert len(lines) == 1 and "no space left on device" in lines[0].lower(), r.stderr
