"""A PlatformIO project per build: the generated model as a library, the measurement harness as the program.

Environments:
- `qemu` and `renode` build offline with tinymlaas's local platform (firmware/platformio/platform) and the
  cross compilers on PATH, with the same flags as the direct build (`link_recipe`), and run in QEMU or on
  Renode's model of the part (`pio run -e qemu -t qemu`), checking the outputs against the interpreter's.
- the target's real board where it is an STM32 one (`platformio.board` in targets/*.yaml, e.g. nucleo_l4r5zi)
  with PlatformIO's own platform: for a user with internet, the board and its probe (`pio debug -e nucleo_l4r5zi`:
  semihosting). Not built here: PlatformIO's registry is out of reach.

Offline, PlatformIO needs its SCons package, which is not on PyPI as such: `setup_core` makes a local package of
the SCons from PyPI and installs it into a PlatformIO home (recipe in ../shared/DESIGN.md).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from tinymlaas import build_dir, data_dir
from tinymlaas.backends.mcu.firmware import FIRMWARE_DIR, KERNELS_DIR, link_recipe, qemu_layout
from tinymlaas.errors import BuildFailure, ToolMissing

PLATFORM_DIR = data_dir("firmware") / "platformio" / "platform"
SCONS_PACKAGE_VERSION = "4.41101.0"  # what PlatformIO 6.2 asks for as tool-scons
# The real boards a project gets an environment for: PlatformIO's STM32 platform with its STM32Cube framework
# (start-up code and linker script of the part); the harness reads the inputs and writes the outputs over
# semihosting (newlib's rdimon), which a debug probe serves (`pio debug`, OpenOCD's `arm semihosting enable`).
# Boards whose SDK wants its own entry point (ESP-IDF's app_main) get none.
STM32_BOARDS = ("nucleo_l4r5zi", "disco_f746ng", "nucleo_h743zi", "nucleo_l552ze_q")
MODEL_FILES = ("tinymlaas_model.c", "tinymlaas_model.h", "weights.S", "weights.bin", "kernels.o")


def core_dir() -> Path:
    """The PlatformIO home the offline builds use: $PLATFORMIO_CORE_DIR, else one of the project's own."""
    return Path(os.environ.get("PLATFORMIO_CORE_DIR") or build_dir() / "platformio" / "core")


def pio() -> str:
    exe = Path(sys.executable).parent / "pio"
    if exe.exists():
        return str(exe)
    found = shutil.which("pio")
    if found is None:
        raise ToolMissing("PlatformIO is not installed (run `make setup`)")
    return found


def setup_core(core: Path | None = None) -> Path:
    """Install the SCons package into a PlatformIO home, offline; idempotent."""
    core = core or core_dir()
    installed = core / "packages" / "tool-scons"
    if (installed / "scons.py").exists():
        return core
    try:
        import SCons
    except ImportError:
        raise ToolMissing("SCons is not installed (run `make setup`)") from None
    package = core.parent / "tool-scons-src"
    shutil.rmtree(package, ignore_errors=True)
    package.mkdir(parents=True)
    (package / "package.json").write_text(json.dumps(
        {"name": "tool-scons", "version": SCONS_PACKAGE_VERSION, "description": "SCons from PyPI (local package)"}))
    # the engine beside the launcher, as PlatformIO's own package has it
    shutil.copytree(Path(SCons.__file__).parent, package / "scons-local" / "SCons")
    (package / "scons.py").write_text("import os, sys\nsys.path.insert(0, os.path.join(os.path.dirname("
                                      "os.path.abspath(__file__)), 'scons-local'))\nimport SCons.Script\n"
                                      "SCons.Script.main()\n")
    _pio(["pkg", "install", "-g", "-t", f"file://{package}"], core, "installing the local SCons package")
    piopm = installed / ".piopm"
    meta = json.loads(piopm.read_text())
    meta.setdefault("spec", {})["owner"] = "platformio"  # PlatformIO looks for platformio/tool-scons
    piopm.write_text(json.dumps(meta))
    return core


def _pio(args: list[str], core: Path, what: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, PLATFORMIO_CORE_DIR=str(core), PLATFORMIO_NO_ANSI="true",
               PLATFORMIO_SETTING_ENABLE_TELEMETRY="No", PLATFORMIO_SETTING_CHECK_PLATFORMIO_INTERVAL="3650")
    proc = subprocess.run([pio(), *args], cwd=cwd, capture_output=True, text=True, env=env, check=False)
    if proc.returncode != 0:
        tail = [line for line in (proc.stdout + proc.stderr).splitlines() if line.strip()][-3:]
        raise BuildFailure(f"{what} failed: {' | '.join(tail)[:400]}")
    return proc


def _env(name: str, target, runner: str, layout) -> str:
    recipe = link_recipe(target, layout)
    sources = "+<main.c> " + " ".join(f"+<boards/{p.name}>" for p in recipe.board_sources)
    return (f"[env:{name}]\nplatform = symlink://{PLATFORM_DIR}\n"
            f"custom_target = {target.name}\ncustom_runner = {runner}\n"
            f"custom_toolchain_prefix = {target.cc_prefix}\ncustom_cflags = {' '.join(recipe.cflags)}\n"
            f"custom_ldflags = {' '.join(recipe.ldflags)}\n"
            f"build_flags = {' '.join(recipe.defines)}\nbuild_src_filter = {sources.strip()}\n"
            "lib_deps = tinymlaas_model, tinymlaas_kernels\nlib_archive = no\n"
            "extra_scripts = pre:link_model_kernels.py\n")


def write_project(build: Path, target, out: Path) -> Path:
    """A PlatformIO project of the compiled build folder `build` (what `compile_model` wrote) in `out`."""
    from tinymlaas.runners.renode import RenodeEmulator

    build, out = Path(build), Path(out)
    missing = [f for f in (*MODEL_FILES, "inputs.bin", "expected_outputs.bin") if not (build / f).exists()]
    if missing:
        raise BuildFailure(f"{build} is not a compiled build folder (missing {', '.join(missing)})")
    if out.exists():
        shutil.rmtree(out)
    lib = out / "lib" / "tinymlaas_model"
    lib.mkdir(parents=True)
    for f in MODEL_FILES:
        shutil.copyfile(build / f, lib / f)
    # the assembler runs in the project folder
    weights = (lib / "weights.S").read_text().replace('.incbin "weights.bin"', '.incbin "lib/tinymlaas_model/weights.bin"')
    (lib / "weights.S").write_text(weights)
    # the C kernels flat (reference/, optimized/ and include/ side by side): a library PlatformIO builds as is
    kernels = out / "lib" / "tinymlaas_kernels"
    kernels.mkdir()
    for f in sorted(KERNELS_DIR.glob("*/*.[ch]")):
        shutil.copyfile(f, kernels / f.name)
    (out / "src").mkdir()
    shutil.copyfile(FIRMWARE_DIR / "harness.c", out / "src" / "main.c")
    shutil.copytree(FIRMWARE_DIR / "boards", out / "src" / "boards")
    for f in ("inputs.bin", "expected_outputs.bin"):
        shutil.copyfile(build / f, out / f)
    (out / "link_model_kernels.py").write_text(
        '"""The model\'s TVM kernels are one object (kernels.o): linked into every environment\'s program; and an\n'
        'environment\'s custom_link_flags (a real board\'s semihosting library)."""\n'
        'Import("env")  # noqa: F821 - SCons provides it\n'
        'env.Append(LINKFLAGS=[env.subst("$PROJECT_DIR/lib/tinymlaas_model/kernels.o")])  # noqa: F821\n'
        'env.Append(LINKFLAGS=env.GetProjectOption("custom_link_flags", "").split())  # noqa: F821\n')
    envs = [_env("qemu", target, "qemu", qemu_layout(target))]
    if target.renode is not None:
        envs.append(_env("renode", target, "renode", RenodeEmulator(target).layout))
    board = target.platformio_board
    if board in STM32_BOARDS:
        fpu = " ".join(f for f in link_recipe(target).cflags if f.startswith(("-mfpu", "-mfloat-abi")))
        envs.append(f"; the real board: PlatformIO's ststm32 platform (internet); inputs and outputs over semihosting\n"
                    f"[env:{board}]\nplatform = ststm32\nframework = stm32cube\nboard = {board}\n"
                    f"build_flags = {fpu} -O2\nbuild_unflags = -Os\n"
                    "custom_link_flags = --specs=rdimon.specs -lrdimon\n"
                    "debug_extra_cmds = monitor arm semihosting enable\n"
                    "lib_deps = tinymlaas_model, tinymlaas_kernels\nlib_archive = no\n"
                    "build_src_filter = +<main.c>\nextra_scripts = pre:link_model_kernels.py\n")
    (out / "platformio.ini").write_text(
        f"; tinymlaas: {target.name} ({target.description}); model in lib/tinymlaas_model, harness in src/main.c.\n"
        "; `pio run -e qemu -t qemu` and `pio run -e renode -t renode` build offline and run it, checking the\n"
        "; outputs against the TFLite interpreter's (expected_outputs.bin).\n"
        "[platformio]\ndefault_envs = qemu\n\n" + "\n".join(envs))
    return out


def build_project(project: Path, env: str, core: Path | None = None, run: bool = False) -> tuple[Path, str]:
    """`pio run -e ENV` offline (and its run target with run=True): the ELF and PlatformIO's output."""
    core = setup_core(core)
    args = ["run", "-d", str(project), "-e", env] + (["-t", env] if run else [])
    proc = _pio(args, core, f"pio run -e {env}")
    return project / ".pio" / "build" / env / "firmware.elf", proc.stdout + proc.stderr


def main(argv: list[str] | None = None) -> int:
    """`python -m tinymlaas.backends.platformio setup`: the offline PlatformIO home (make setup)."""
    try:
        print(f"PlatformIO home: {setup_core()}")
    except (ToolMissing, BuildFailure) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
