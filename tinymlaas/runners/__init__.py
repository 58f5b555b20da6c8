"""Runners: build once, run anywhere a firmware ELF can run — QEMU (exact counts), Ibex simulated from its RTL
(true cycles), Renode's models of real microcontrollers (exact instruction counts). Each runner is one file with a
class that has `name`, `layout` (its machine's memory map, None for the target's QEMU machine), `default_inputs`,
`device_images` (whether what it runs is linked as a device's image), `problem(target)` (why it cannot run a
target's code, or None), `for_target(target, timeout)` and `run(target, firmware, workdir)`. A new runner is its
file and one line in RUNNERS; the CLI's and the service's choices come from this table.
"""

import importlib

# name -> "module:class"; imported when used (Renode's and Ibex's modules are only needed where they run)
RUNNERS = {
    "qemu": "tinymlaas.runners.qemu:QemuEmulator",
    "ibex": "tinymlaas.runners.ibex:IbexSimulator",
    "renode": "tinymlaas.runners.renode:RenodeEmulator",
}


def runner_class(name: str):
    if name not in RUNNERS:
        raise ValueError(f"unknown emulator '{name}' (known: {', '.join(RUNNERS)})")
    module, cls = RUNNERS[name].split(":")
    return getattr(importlib.import_module(module), cls)


def emulator_for(name: str = "qemu", timeout: float | None = None, target=None):
    """The runner called `name`, set up for `target` (Ibex: the target's configuration, the small one for plain
    RV32; Renode: the target's machine)."""
    cls = runner_class(name)
    return cls.for_target(target, timeout) if target is not None else cls(timeout)


def run_elf(elf, target, emulator: str, inputs):
    """Run a firmware ELF built elsewhere (a PlatformIO project) for `target` on `inputs`: (run, output bytes).
    The ELF is taken as linked for the runner's machine (the project's environment of the same name)."""
    import shutil
    import subprocess
    import tempfile
    from pathlib import Path

    from tinymlaas.backends import backend_for
    from tinymlaas.backends.mcu.firmware import Firmware, linked_model_region, read_symbols
    from tinymlaas.errors import EmulatorFailure

    if not backend_for(target).firmware:
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
        firmware = Firmware(elf, elf.with_suffix(".map"), symbols, layout=runner.layout,
                            model_region=linked_model_region(elf, target))
        run = runner.run(target, firmware, work)
        return run, (work / "outputs.bin").read_bytes()
