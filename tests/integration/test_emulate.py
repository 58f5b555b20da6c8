"""The emulator and its counting plugin on programs whose instruction counts are known by construction."""

import subprocess

import pytest

from tinymlaas.backends.mcu.firmware import Firmware, read_symbols
from tinymlaas.errors import EmulatorTimeout
from tinymlaas.runners.qemu import QemuEmulator
from tinymlaas.targets import get_target

PROGRAM = r"""
void __attribute__((noinline)) tinymlaas_mark_begin(void) { __asm__ volatile("" ::: "memory"); }
void __attribute__((noinline)) tinymlaas_mark_end(void) { __asm__ volatile("" ::: "memory"); }
__attribute__((naked, noinline)) void work(void) { __asm__ volatile(".rept 100\n nop\n .endr\n" RET); }
int main(void)
{
    tinymlaas_mark_begin();
    tinymlaas_mark_end();
    for (int i = 0; i < 3; i++) {
        tinymlaas_mark_begin();
        work();
        tinymlaas_mark_end();
    }
#ifdef HANG
    for (;;) __asm__ volatile("");
#endif
    return 0;
}
"""


def build(target_name, tmp_path, *defines):
    target = get_target(target_name)
    ret = '"bx lr"' if target.arch == "arm" else '"ret"'
    src = tmp_path / "prog.c"
    src.write_text(PROGRAM)
    elf = tmp_path / "prog.elf"
    e = target.emulator
    subprocess.run(
        [target.gcc, *target.cc_flags, "-O2", "--specs=picolibc.specs", "--oslib=semihost", "--crt0=hosted",
         f"-DRET={ret}", *defines, "-mno-relax" if target.arch == "riscv" else "-mthumb", str(src), "-o", str(elf),
         f"-Wl,--defsym=__flash={e.flash.base:#x}", f"-Wl,--defsym=__flash_size={e.flash.size:#x}",
         f"-Wl,--defsym=__ram={e.ram.base:#x}", f"-Wl,--defsym=__ram_size={e.ram.size:#x}"],
        check=True,
    )
    return target, Firmware(elf, tmp_path / "none.map", read_symbols(elf, target))


@pytest.mark.parametrize(
    "target_name, expected",
    [
        # bl work; 100 nops; bx lr
        ("cortex-m4", 102),
        ("cortex-m33", 102),
        # call work = auipc + jalr without linker relaxation; 100 nops; ret
        ("rv32imafc", 103),
    ],
)
def test_counts_are_exact(target_name, expected, tmp_path):
    target, fw = build(target_name, tmp_path)
    run = QemuEmulator(timeout=30).run(target, fw, tmp_path)
    assert [r.instructions for r in run.regions] == [expected] * 3
    assert all(r.memory_accesses == 0 for r in run.regions)  # nops touch no memory


def test_hanging_firmware_times_out(tmp_path):
    target, fw = build("cortex-m4", tmp_path, "-DHANG")
    with pytest.raises(EmulatorTimeout, match="did not finish within 2 s"):
        QemuEmulator(timeout=2).run(target, fw, tmp_path)
