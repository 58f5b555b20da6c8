import pytest

from tinymlaas.errors import UnknownTarget
from tinymlaas.targets import all_targets, get_target, mcu_targets

REQUIRED = {"cortex-m3", "cortex-m4", "cortex-m7", "cortex-m33", "cortex-m55", "rv32imac", "rv32imafc"}


def test_required_targets_are_described():
    targets = mcu_targets()
    assert REQUIRED <= set(targets)
    for t in targets.values():
        assert t.board.flash_bytes > 0 and t.board.ram_bytes > 0
        assert t.llvm["kind"] == "llvm" and t.llvm["mtriple"]
        assert t.emulator.qemu in ("qemu-system-arm", "qemu-system-riscv32")
        # the LLVM float ABI and the C compiler's must agree, or the link fails
        hard = t.llvm.get("mfloat-abi") == "hard" or t.llvm.get("mabi", "").endswith("f")
        assert hard == t.fpu, t.name


def test_fpu_and_dsp_flags():
    assert not get_target("cortex-m3").fpu
    assert get_target("cortex-m4").dsp and get_target("cortex-m4").fpu
    assert get_target("cortex-m55").mve
    assert not get_target("rv32imac").fpu and get_target("rv32imafc").fpu


def test_unknown_target_lists_known_ones():
    with pytest.raises(UnknownTarget, match="cortex-m4"):
        get_target("cortex-m99")


def test_host_targets_are_not_microcontrollers():
    hosts = {n: t for n, t in all_targets().items() if t.kind == "host"}
    assert set(hosts) == {"cpu-host", "cuda-host"}
    assert hosts["cuda-host"].device == "cuda" and "float16" in hosts["cuda-host"].precisions
    assert hosts["cpu-host"].tvm_target == "llvm"
    assert not set(hosts) & set(mcu_targets())
