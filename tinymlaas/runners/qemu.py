"""Emulate stage: run a firmware ELF in QEMU with exact instruction and memory-access counting.

Counting is a small TCG plugin of our own (firmware/qemu_plugin/icount.c), built on first use.
The harness brackets each inference with marker calls; the plugin reports each bracket's counts.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from tinymlaas import build_dir, data_dir
from tinymlaas.backends.mcu.firmware import Firmware, model_payload
from tinymlaas.errors import EmulatorFailure, EmulatorTimeout, ToolMissing

PLUGIN_SOURCE = data_dir("firmware") / "qemu_plugin" / "icount.c"


@dataclass
class RegionCount:
    instructions: int
    memory_accesses: int | None  # None: the runner does not count them (Renode)
    cycles: int | None = None  # a cycle-accurate runner's true cycles; QEMU has none
    wall_seconds: float | None = None  # host time of the region, where the runner clocks it (Renode's hooks)
    # QEMU with blocks=True: (block address, instructions) -> (executions, taken exits), the marks included
    blocks: dict | None = None


@dataclass
class EmulatorRun:
    exit_code: int
    stdout: str
    regions: list[RegionCount]  # one per inference, the marks' own cost already subtracted
    seconds: float
    harness: dict = field(default_factory=dict)  # key=value pairs the harness printed
    calibration: RegionCount | None = None  # the two marks back to back: what was subtracted from each region


def plugin_path() -> Path:
    """The counting plugin, compiled from source when missing or older than its source."""
    cache = build_dir() / "qemu-plugin"
    lib = cache / "libtinymlaas_icount.so"
    if not lib.exists() or lib.stat().st_mtime < PLUGIN_SOURCE.stat().st_mtime:
        cache.mkdir(parents=True, exist_ok=True)
        cc = shutil.which("gcc") or shutil.which("cc")
        if cc is None:
            raise ToolMissing("a host C compiler (gcc) is needed to build the QEMU counting plugin")
        tmp = lib.with_suffix(f".{os.getpid()}.tmp")
        subprocess.run([cc, "-shared", "-fPIC", "-O2", "-o", str(tmp), str(PLUGIN_SOURCE)], check=True)
        tmp.replace(lib)
    return lib


def _loader(path: Path, address: int) -> list[str]:
    return ["-device", f"loader,file={path},addr={address:#x}"]


class QemuEmulator:
    """QEMU system emulation with -icount shift=0: one instruction per virtual nanosecond, repeatable."""

    name = "qemu"
    layout = None  # the target's own QEMU machine
    default_inputs = 10
    device_images = True  # linked for the target's own memory map: the image a device takes

    @staticmethod
    def problem(target) -> str | None:
        return None  # every microcontroller target names its QEMU machine

    @classmethod
    def for_target(cls, target, timeout: float | None = None) -> QemuEmulator:
        return cls(timeout)

    def __init__(self, timeout: float | None = None, blocks: bool = False):
        self.timeout = timeout or 120.0
        self.blocks = blocks  # also count each translated block's executions per region (for cycle estimates)

    def command(self, target, firmware: Firmware, counts_file: Path) -> list[str]:
        marks = {k: firmware.symbols.get(f"tinymlaas_mark_{k}") for k in ("begin", "end")}
        if None in marks.values():
            raise EmulatorFailure(f"{firmware.elf.name}: harness marker functions not found")
        image_args = ["-kernel", str(firmware.elf)]
        if firmware.model_region is not None:  # the model section is in no load segment: put it in place
            model = model_payload(firmware.elf, target, counts_file.parent / "model.bin")
            image_args += _loader(model, firmware.model_region.base)
        return self._command(target, image_args, marks, counts_file)

    def _command(self, target, image_args: list[str], marks: dict, counts_file: Path) -> list[str]:
        qemu = shutil.which(target.emulator.qemu)
        if qemu is None:
            raise ToolMissing(f"'{target.emulator.qemu}' is not installed (run `make setup`)")
        # Thumb function symbols carry bit 0; the plugin sees the instruction address.
        plugin = f"{plugin_path()},begin={marks['begin'] & ~1:#x},end={marks['end'] & ~1:#x},out={counts_file}"
        if self.blocks:
            plugin += ",blocks=1"
        return [
            qemu,
            "-M",
            target.emulator.machine,
            *target.emulator.extra_args,
            "-nographic",
            "-monitor",
            "none",
            "-serial",
            "none",
            "-semihosting-config",
            "enable=on,target=native",
            "-icount",
            "shift=0",
            "-plugin",
            plugin,
            *image_args,
        ]

    def run_payload(self, target, payload: Path, marks: dict, workdir: Path,
                    model: tuple[int, Path] | None = None) -> EmulatorRun:
        """Boot a raw flash payload (what a bootloader put in place) at the flash base, as a device would; `model`
        (address, file): a model image's payload, put at its region."""
        image_args = _loader(payload, target.emulator.flash.base) + (_loader(model[1], model[0]) if model else [])
        return self._execute(target, self._command(target, image_args, marks, workdir / "counts.txt"), workdir)

    def run(self, target, firmware: Firmware, workdir: Path) -> EmulatorRun:
        return self._execute(target, self.command(target, firmware, workdir / "counts.txt"), workdir)

    def _execute(self, target, cmd: list[str], workdir: Path) -> EmulatorRun:
        counts_file = workdir / "counts.txt"
        counts_file.unlink(missing_ok=True)
        start = time.monotonic()
        try:
            proc = subprocess.run(cmd, cwd=workdir, capture_output=True, text=True, timeout=self.timeout, check=False)
        except subprocess.TimeoutExpired as e:
            raise EmulatorTimeout(
                f"{target.emulator.qemu} -M {target.emulator.machine} did not finish within {self.timeout:g} s; "
                "the firmware hangs or the model is too slow for this timeout"
            ) from e
        seconds = time.monotonic() - start
        if proc.returncode != 0:
            tail = (proc.stdout + proc.stderr).strip().splitlines()
            raise EmulatorFailure(
                f"firmware exited with status {proc.returncode} in {target.emulator.machine}: "
                f"{tail[-1][:200] if tail else 'no output'}"
            )
        regions = []
        if counts_file.exists():
            for line in counts_file.read_text().splitlines():
                parts = line.split()
                if parts and parts[0] == "region":
                    regions.append(RegionCount(*(int(x) for x in parts[1:3]), blocks={} if self.blocks else None))
                elif parts and parts[0] == "block" and regions:
                    regions[-1].blocks[int(parts[1], 16), int(parts[2])] = (int(parts[3]), int(parts[4]))
        if not regions:
            raise EmulatorFailure("the counting plugin recorded no inference")
        calibration, measured = regions[0], regions[1:]
        measured = [
            RegionCount(r.instructions - calibration.instructions, r.memory_accesses - calibration.memory_accesses,
                        blocks=r.blocks)
            for r in measured
        ]
        harness = {}
        # Semihosting console output arrives on QEMU's stdout or stderr depending on the machine.
        for key, value in re.findall(r"(\w+)=(\d+)", proc.stdout + proc.stderr):
            harness[key] = int(value)
        return EmulatorRun(proc.returncode, proc.stdout + proc.stderr, measured, seconds, harness, calibration)
