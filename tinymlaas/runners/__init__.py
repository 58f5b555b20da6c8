"""Runners: build once, run anywhere a firmware ELF can run — QEMU (exact counts), Ibex simulated from its RTL
(true cycles), Renode's models of real microcontrollers (exact instruction counts). Each runner is a small class
with `name`, `layout` (its machine's memory map, None for the target's QEMU machine), `default_inputs` and
`run(target, firmware, workdir)`; `emulator_for` picks one by name.
"""

RUNNERS = ("qemu", "ibex", "renode")


def emulator_for(name: str = "qemu", timeout: float | None = None, target=None):
    """The runner called `name`; "ibex" runs the target's Ibex configuration (the small one for plain RV32)."""
    if name == "qemu":
        from tinymlaas.runners.qemu import QemuEmulator

        return QemuEmulator(timeout)
    if name == "ibex":
        from tinymlaas.runners.ibex import IbexSimulator

        config = target.rtl.config if target is not None and target.rtl else "small"
        if target is not None:
            IbexSimulator.check_target(target)
        return IbexSimulator(config, timeout)
    if name == "renode":
        from tinymlaas.runners.renode import RenodeEmulator

        return RenodeEmulator(target, timeout)
    raise ValueError(f"unknown emulator '{name}' (known: {', '.join(RUNNERS)})")


def run_elf(elf, target, emulator: str, inputs):
    """Run a firmware ELF built elsewhere (a PlatformIO project) for `target` on `inputs`: (run, output bytes).
    The ELF is taken as linked for the runner's machine (the project's environment of the same name)."""
    import shutil
    import subprocess
    import tempfile
    from pathlib import Path

    from tinymlaas.backends.mcu.firmware import Firmware, read_symbols
    from tinymlaas.errors import EmulatorFailure

    if getattr(target, "kind", "mcu") != "mcu":
        raise EmulatorFailure(f"{target.name} is a host target: it runs libraries, not firmware")
    for path, what in ((elf, "firmware"), (inputs, "inputs")):
        if not Path(path).is_file():
            raise EmulatorFailure(f"{what} {path}: no such file")
    runner = emulator_for(emulator, None, target)
    elf = Path(elf).resolve()
    try:
        symbols = read_symbols(elf, target)
    except subprocess.CalledProcessError:
        raise EmulatorFailure(f"{elf}: not an ELF file for {target.name}") from None
    with tempfile.TemporaryDirectory(prefix="tinymlaas-run-") as tmp:
        work = Path(tmp)
        shutil.copyfile(inputs, work / "inputs.bin")
        firmware = Firmware(elf, elf.with_suffix(".map"), symbols, layout=runner.layout)
        run = runner.run(target, firmware, work)
        return run, (work / "outputs.bin").read_bytes()
