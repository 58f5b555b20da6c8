"""A non-editable install carries everything the compiler needs: its packages, targets/ and firmware/."""

import os
import subprocess
import sys
import tomllib

from tests.helpers.paths import CORPUS
from tinymlaas import PROJECT_ROOT


def test_every_package_is_listed():
    listed = set(tomllib.loads((PROJECT_ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(PROJECT_ROOT).parts) for top in ("tinymlaas", "server")
             for p in (PROJECT_ROOT / top).rglob("__init__.py")}
    assert listed - {"tinymlaas._targets", "tinymlaas._firmware"} == found


def test_wheel_install_compiles(tmp_path):
    """Built as a wheel and installed into a bare folder, the CLI compiles and verifies a model from elsewhere."""
    wheels, site = tmp_path / "wheels", tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(PROJECT_ROOT), "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(wheels)], check=True, capture_output=True)
    wheel = next(wheels.glob("tinymlaas-*.whl"))
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site), str(wheel)],
                   check=True, capture_output=True)
    env = {**os.environ, "PYTHONPATH": str(site), "TINYMLAAS_BUILD_DIR": str(tmp_path / "cache")}
    probe = subprocess.run([sys.executable, "-c", "import tinymlaas; print(tinymlaas.__file__, tinymlaas.data_dir('targets'))"],
                           cwd=tmp_path, env=env, capture_output=True, text=True, check=True)
    assert probe.stdout.startswith(str(site)), probe.stdout
    run = subprocess.run([sys.executable, "-m", "tinymlaas", "compile", str(CORPUS / "ops" / "conv_2d_int8.tflite"),
                          "--target", "cortex-m4", "-o", str(tmp_path / "out")], cwd=tmp_path, env=env,
                         capture_output=True, text=True, check=False)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "bit-exact" in run.stdout
