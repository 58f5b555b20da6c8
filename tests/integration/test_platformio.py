"""PlatformIO project per build: generated from a compiled build, built offline by `pio run` in a fresh PlatformIO
home with tinymlaas's local platform, run in QEMU and Renode through its targets; the outputs and the instruction
count are the direct build's."""

import re
import zipfile

import pytest

from tests.helpers.cli import cli
from tests.helpers.paths import model_path
from tinymlaas.backends.platformio import build_project, write_project
from tinymlaas.targets import get_target


@pytest.fixture(scope="module")
def pio_home(tmp_path_factory):
    return tmp_path_factory.mktemp("pio") / "core"  # fresh: setup_core installs the SCons package into it


def _instructions(output: str) -> tuple[int, int, int]:
    m = re.search(r"instructions/inference ([\d,]+) \(range ([\d,]+)\.\.([\d,]+)\)", output)
    assert m, output[-2000:]
    return tuple(int(g.replace(",", "")) for g in m.groups())


@pytest.mark.parametrize("target", ["cortex-m4", pytest.param("rv32imac", marks=pytest.mark.slow)])
def test_kws_platformio_project_builds_offline_and_runs_in_qemu_and_renode(target, pio_home, tmp_path):
    build = tmp_path / "build"
    r = cli("compile", model_path("kws_ref_model"), "--target", target, "--inputs", "2", "-o", build, "--json",
            "--no-record", "--platformio", tmp_path / "project")
    assert r.returncode == 0, r.stderr
    import json

    direct = json.loads(r.stdout)
    project = tmp_path / "project"
    ini = (project / "platformio.ini").read_text()
    board = get_target(target).platformio_board
    assert "[env:qemu]" in ini and "[env:renode]" in ini
    if target == "cortex-m4":  # an STM32 board: an environment for it (PlatformIO's ststm32, not built here)
        assert f"[env:{board}]" in ini and f"board = {board}" in ini and "framework = stm32cube" in ini
    for env in ("qemu", "renode"):
        elf, output = build_project(project, env, pio_home, run=True)
        assert elf.exists() and "SUCCESS" in output
        assert f"outputs: all {(build / 'expected_outputs.bin').stat().st_size} bytes equal" in output, output[-1500:]
        assert _instructions(output) == (direct["instructions"], direct["instructions_min"], direct["instructions_max"])


def test_a_folder_that_is_not_a_build_is_refused(tmp_path):
    from tinymlaas.errors import BuildFailure

    with pytest.raises(BuildFailure, match="not a compiled build folder"):
        write_project(tmp_path, get_target("cortex-m4"), tmp_path / "p")


def test_run_command_says_when_outputs_differ(tmp_path):
    build = tmp_path / "b"
    assert cli("compile", model_path("ad01_int8"), "--target", "cortex-m4", "--inputs", "1", "-o", build,
               "--no-record").returncode == 0
    wrong = tmp_path / "wrong.bin"
    data = bytearray((build / "expected_outputs.bin").read_bytes())
    data[0] ^= 0xFF
    wrong.write_bytes(bytes(data))
    r = cli("run", build / "firmware.elf", "--target", "cortex-m4", "--inputs", build / "inputs.bin",
            "--expected", wrong)
    assert r.returncode == 1 and "1 of" in r.stdout and "differ" in r.stdout
    r = cli("run", build / "firmware.elf", "--target", "cortex-m4", "--inputs", build / "inputs.bin",
            "--expected", build / "expected_outputs.bin")
    assert r.returncode == 0 and "bytes equal" in r.stdout


@pytest.mark.parametrize("args, said", [
    (["/nonexistent.elf", "--target", "cortex-m4", "--inputs", "README.md"], "no such file"),
    (["README.md", "--target", "cortex-m4", "--inputs", "README.md"], "not an ELF file for cortex-m4"),
    (["README.md", "--target", "cpu-host", "--inputs", "README.md"], "host target"),
])
def test_run_command_refuses_bad_input_in_one_line(args, said):
    from tinymlaas import PROJECT_ROOT

    r = cli("run", *args, cwd=PROJECT_ROOT)
    assert r.returncode == 2 and said in r.stderr and "internal error" not in r.stderr and "Traceback" not in r.stderr


def test_the_service_offers_the_project_as_an_artifact(tmp_path):
    """What the build job zips (server/jobs.py) is the project: the model library, harness and environments."""
    from server.jobs import platformio_zip

    build = tmp_path / "b"
    assert cli("compile", model_path("ad01_int8"), "--target", "cortex-m33", "--inputs", "1", "-o", build,
               "--no-record").returncode == 0
    names = set(zipfile.ZipFile(platformio_zip(build, get_target("cortex-m33"))).namelist())
    assert {"platformio.ini", "src/main.c", "lib/tinymlaas_model/kernels.o", "lib/tinymlaas_model/weights.bin",
            "expected_outputs.bin", "inputs.bin"} <= names
