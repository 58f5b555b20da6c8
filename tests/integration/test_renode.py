"""Renode runner: builds run on Renode's models of real microcontrollers, outputs bit-exact with the TFLite
interpreter, and the inference's instruction count equal to QEMU's for the same model and target."""

import re

import pytest

from tests.helpers.cli import cli
from tests.helpers.paths import model_path
from tinymlaas.build.pipeline import compile_model
from tinymlaas.build.request import BuildRequest
from tinymlaas.errors import EmulatorFailure
from tinymlaas.runners import emulator_for
from tinymlaas.runners.renode import renode_path
from tinymlaas.targets import get_target, mcu_targets

# Renode's own models of real parts, one per core class the issue names
REAL_PARTS = {"cortex-m4": "stm32f4", "cortex-m7": "stm32f746", "cortex-m33": "stm32l552", "rv32imac": "sifive-fe310"}


def _both(model: str, target: str, tmp_path, inputs: int = 2):
    renode = compile_model(model_path(model), target, tmp_path / "renode", BuildRequest(inputs=inputs, emulator="renode"))
    qemu = compile_model(model_path(model), target, tmp_path / "qemu", BuildRequest(inputs=inputs))
    return renode, qemu


@pytest.mark.parametrize("target", sorted(REAL_PARTS))
def test_renode_real_part_agrees_with_qemu_and_the_interpreter(target, tmp_path):
    renode, qemu = _both("ad01_int8", target, tmp_path)
    assert renode.runner == "renode" and qemu.runner == "qemu"
    assert renode.verified and renode.fidelity["exact_fraction"] == 1.0
    # the same code between the same two marks: the same count, each input, and the repeat exact
    assert (renode.instructions, renode.instructions_min, renode.instructions_max) == \
        (qemu.instructions, qemu.instructions_min, qemu.instructions_max)
    assert renode.instructions_repeat_exact
    assert renode.memory_accesses is None  # Renode does not count them; the report says so, not 0
    assert (tmp_path / "renode" / "outputs.bin").read_bytes() == (tmp_path / "qemu" / "outputs.bin").read_bytes()


def test_renode_float_build_uses_the_parts_fpu(tmp_path):
    renode, qemu = _both("ad01_fp32", "cortex-m4", tmp_path)
    assert renode.verified and renode.fidelity["max_abs_error"] == 0.0
    assert renode.instructions == qemu.instructions


def test_the_run_script_loads_the_real_part_and_hooks_the_marks(tmp_path):
    compile_model(model_path("ad01_int8"), "rv32imac", tmp_path / "b", BuildRequest(inputs=1, emulator="renode"))
    assert not (tmp_path / "b" / ".renode").exists()  # the run's script and logs stay out of the published build
    target = get_target("rv32imac")
    runner = emulator_for("renode", target=target)
    symbols = {s: 0x20000100 + 4 * i for i, s in enumerate(
        ("tinymlaas_mark_begin", "tinymlaas_mark_end", "tinymlaas_renode_read", "tinymlaas_renode_read_ok",
         "tinymlaas_renode_write", "tinymlaas_renode_exit"))}
    text = runner.script(target.arch, ["sysbus LoadELF @/x.elf"], symbols, tmp_path, tmp_path / "hooks.log")
    assert "LoadPlatformDescription @platforms/cpus/sifive-fe310.repl" in text
    assert re.search(r"LoadPlatformDescription @\S+/renode/fe310-512k-dtim.repl", text)
    assert "AddHook 0x20000100 " in text and "ExecutedInstructions" in text
    assert "GetRegisterUnsafe(10)" in text  # a0 on RISC-V
    assert text.rstrip().endswith("start")


def test_targets_without_a_renode_machine_say_so(tmp_path):
    with pytest.raises(EmulatorFailure, match="cortex-m55 has no Renode machine"):
        emulator_for("renode", target=get_target("cortex-m55"))
    r = cli("compile", model_path("ad01_int8"), "--target", "cortex-m55", "--emulator", "renode", "-o", tmp_path / "o")
    assert r.returncode == 2 and "no Renode machine" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "o").exists()


def _memories(text: str) -> list[tuple[int, int]]:
    """(base, size) of each memory a .repl declares."""
    found = re.findall(r"^\w+: Memory\.MappedMemory @ \{?\s*sysbus (0x[0-9a-fA-F]+)[^\n]*\n\s+size: (0x[0-9a-fA-F]+)",
                       text, re.MULTILINE)
    return [(int(b, 16), int(s, 16)) for b, s in found]


def _covered(region, memories) -> bool:
    at, end = region.base, region.base + region.size
    while at < end:
        nxt = next((b + s for b, s in memories if b <= at < b + s), None)
        if nxt is None:
            return False
        at = nxt
    return True


def test_renode_machines_match_their_platform_files():
    """targets/*.yaml `renode` flash and RAM are memories of the platform (and its overlay), and the real parts
    are Renode's own files, unchanged."""
    from tinymlaas import PROJECT_ROOT

    platforms = renode_path().parent / "platforms" / "cpus"
    with_machine = {n: t for n, t in mcu_targets().items() if t.renode is not None}
    assert set(REAL_PARTS) <= set(with_machine)
    for name, t in with_machine.items():
        m = t.renode
        text = (PROJECT_ROOT / m.platform if m.is_project_file else platforms / f"{m.platform}.repl").read_text()
        if m.overlay:
            text += "\n" + (PROJECT_ROOT / m.overlay).read_text()
        memories = _memories(text)
        assert _covered(m.flash, memories), (name, m.flash)
        assert _covered(m.ram, memories), (name, m.ram)
        if name in REAL_PARTS:
            assert m.platform == REAL_PARTS[name] and not m.is_project_file
        else:  # a project platform mirrors the QEMU machine's map: the same image layout
            assert (m.flash, m.ram) == (t.emulator.flash, t.emulator.ram), name


@pytest.mark.slow
@pytest.mark.parametrize("model", ["kws_ref_model", "pretrainedResnet_quant"])
@pytest.mark.parametrize("target", sorted(REAL_PARTS))
def test_mlperf_tiny_on_renode_real_parts(model, target, tmp_path):
    renode, qemu = _both(model, target, tmp_path)
    assert renode.verified and renode.fidelity["exact_fraction"] == 1.0
    assert (renode.instructions, renode.instructions_min, renode.instructions_max) == \
        (qemu.instructions, qemu.instructions_min, qemu.instructions_max)


def test_a_target_can_make_renode_its_default_runner(tmp_path):
    from tinymlaas.targets import load_target_file

    text = (get_target("cortex-m4").source).read_text() + "runner: renode\n"
    (tmp_path / "m4-renode.yaml").write_text(text)
    t = load_target_file(tmp_path / "m4-renode.yaml")
    assert t.default_runner == "renode" and get_target("cortex-m4").default_runner == "qemu"
    assert emulator_for(t.default_runner, target=t).layout.flash.base == 0x08000000


@pytest.mark.parametrize("target,illegal", [("rv32imac", ".word 0"), ("cortex-m4", "udf #0")])
def test_a_core_exception_ends_the_run_with_its_cause(target, illegal, tmp_path):
    """A firmware that executes an undefined instruction: a one-line failure naming the trap, not a timeout."""
    import subprocess

    from tinymlaas.backends.mcu.firmware import FIRMWARE_DIR, Firmware, link_recipe, read_symbols

    t = get_target(target)
    runner = emulator_for("renode", 60, t)
    recipe = link_recipe(t, runner.layout)
    (tmp_path / "main.c").write_text(
        "#include <stdio.h>\n#include <stdint.h>\nint io_open(void);\nint io_read_input(void *, uint32_t);\n"
        "void tinymlaas_mark_begin(void);\nvoid tinymlaas_mark_end(void);\n"
        "int main(void) { char b[4]; io_open(); io_read_input(b, 0); tinymlaas_mark_begin(); tinymlaas_mark_end();\n"
        f'  printf("about to trap\\n"); __asm__ volatile("{illegal}"); return 0; }}\n')
    (tmp_path / "inputs.bin").write_bytes(b"")
    elf = tmp_path / "trap.elf"
    subprocess.run([t.gcc, *recipe.cflags, *recipe.defines, *map(str, recipe.board_sources), str(tmp_path / "main.c"),
                    *recipe.ldflags, "-o", str(elf)], check=True, cwd=FIRMWARE_DIR)
    firmware = Firmware(elf, elf.with_suffix(".map"), read_symbols(elf, t), layout=runner.layout)
    with pytest.raises(EmulatorFailure, match="trap mcause=2|core faulted"):
        runner.run(t, firmware, tmp_path)
