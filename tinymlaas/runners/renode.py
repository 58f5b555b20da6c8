"""Renode runner: the firmware on Renode's model of a real microcontroller (stm32f4, stm32f746, stm32l552,
sifive-fe310, ...), headless, with exact instruction counts.

The image is linked for the machine's own flash and RAM with the board support of firmware/boards/renode.c: no
peripheral touched, no inputs in the image. A generated .resc per run loads the platform (targets/*.yaml
`renode`), the ELF (or a raw flash payload, for a device's self-test), and hooks the board support's functions by
address: the input read (the hook copies the next input from the host's inputs.bin), the two marks (the hook reads
the core's executed-instruction counter and the host's clock: the same two addresses QEMU's plugin counts between,
so the counts agree), the console write (the hook reads the text from the argument registers), the exit and, on
Arm, the C library's fault handler. The hooks append to one log file that the runner parses.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from pathlib import Path

from tinymlaas import PROJECT_ROOT
from tinymlaas.backends.mcu.firmware import Firmware, MemoryLayout
from tinymlaas.errors import EmulatorFailure, EmulatorTimeout, ToolMissing
from tinymlaas.runners.qemu import EmulatorRun, RegionCount

# The core's first three argument registers in Renode's numbering: r0-r2 on Arm, a0-a2 (x10-x12) on RISC-V.
ARG_REGISTERS = {"arm": (0, 1, 2), "riscv": (10, 11, 12)}
HOOKED = ("tinymlaas_mark_begin", "tinymlaas_mark_end", "tinymlaas_renode_read", "tinymlaas_renode_read_ok",
          "tinymlaas_renode_write", "tinymlaas_renode_exit")
# The handler picolibc's Arm vector table points every fault at (a fault ends the run with its cause; on RISC-V
# the board support installs a trap handler of its own that prints the cause and exits).
FAULT_SYMBOLS = ("arm_halt_isr",)


def renode_path() -> Path:
    """$TINYMLAAS_RENODE, else `renode` on PATH, else the build in ../shared/third_party/renode."""
    for candidate in (os.environ.get("TINYMLAAS_RENODE"), shutil.which("renode"),
                      PROJECT_ROOT / ".." / "shared" / "third_party" / "renode" / "renode"):
        if candidate and Path(candidate).is_file():
            return Path(candidate).resolve()
    raise ToolMissing("Renode is not installed: set TINYMLAAS_RENODE or put `renode` on PATH (run `make setup`)")


def _path(p: Path) -> str:
    text = str(p.resolve())
    if any(c in text for c in "'\"\n "):
        raise EmulatorFailure(f"a Renode run cannot use the path {text!r} (quotes or spaces)")
    return text


class RenodeEmulator:
    """Renode 1.15 on the target's machine; one process per run."""

    name = "renode"
    default_inputs = 10
    device_images = True  # linked for the Renode model's memory map: the image a device of that board takes

    @staticmethod
    def problem(target) -> str | None:
        if getattr(target, "renode", None) is None:
            return f"target {getattr(target, 'name', '?')} has no Renode machine (targets/*.yaml `renode`)"
        return None

    @classmethod
    def for_target(cls, target, timeout: float | None = None) -> RenodeEmulator:
        return cls(target, timeout)

    def __init__(self, target, timeout: float | None = None):
        why = self.problem(target)
        if why is not None:
            raise EmulatorFailure(why)
        self.machine = target.renode
        self.layout = MemoryLayout(self.machine.flash, self.machine.ram, board_io="renode")
        self.timeout = timeout or 300.0

    def platform_lines(self) -> list[str]:
        m = self.machine
        lines = [f"machine LoadPlatformDescription @{_path(PROJECT_ROOT / m.platform)}" if m.is_project_file
                 else f"machine LoadPlatformDescription @platforms/cpus/{m.platform}.repl"]
        if m.overlay:
            lines.append(f"machine LoadPlatformDescription @{_path(PROJECT_ROOT / m.overlay)}")
        return lines

    def check(self, firmware: Firmware) -> None:
        if any(s not in firmware.symbols for s in HOOKED):
            raise EmulatorFailure(f"{firmware.elf.name} is not linked with the Renode board support")
        if firmware.layout != self.layout:
            raise EmulatorFailure(f"{firmware.elf.name} is not linked for the {self.machine.model} memory map")

    def script(self, arch: str, image: list[str], symbols: dict, workdir: Path, log: Path) -> str:
        """The .resc of one run: `image` loads the firmware; the hooks read workdir/inputs.bin and append lines
        to `log`."""
        a0, a1, a2 = ARG_REGISTERS[arch]
        out, inputs = _path(log), _path(workdir / "inputs.bin")

        def reg(n: int) -> str:
            return f"self.GetRegisterUnsafe({n}).RawValue"

        def hook(symbol: str, python: str) -> str:
            # Thumb function symbols carry bit 0; the hook is on the instruction's address
            return f'sysbus.cpu AddHook {symbols[symbol] & ~1:#x} "import System; {python}"'

        def append(expr: str) -> str:
            return f"System.IO.File.AppendAllText('{out}', {expr})"

        # host seconds at the mark: the inference's own wall time, without Renode's start-up
        clock = ("str(System.Diagnostics.Stopwatch.GetTimestamp() / float(System.Diagnostics.Stopwatch.Frequency))"
                 " + chr(10)")

        lines = ['mach create "tinymlaas"', *self.platform_lines(), *image,
                 hook("tinymlaas_mark_begin", append(f"'begin ' + str(self.ExecutedInstructions) + ' ' + {clock}")),
                 hook("tinymlaas_mark_end", append(f"'end ' + str(self.ExecutedInstructions) + ' ' + {clock}")),
                 hook("tinymlaas_renode_read",
                      f"data = System.IO.File.ReadAllBytes('{inputs}'); n = int({reg(a1)}); at = int({reg(a2)}); "
                      f"ok = at + n <= data.Length; "
                      f"(machine.SystemBus.WriteBytes(data, {reg(a0)}, at, n) if ok else None); "
                      f"machine.SystemBus.WriteDoubleWord({symbols['tinymlaas_renode_read_ok']:#x}, 1 if ok else 0)"),
                 hook("tinymlaas_renode_write",
                      f"b = machine.SystemBus.ReadBytes({reg(a0)}, int({reg(a1)})); "
                      + append("System.Text.Encoding.ASCII.GetString(b)")),
                 hook("tinymlaas_renode_exit", append(f"'exit ' + str({reg(a0)}) + chr(10)"))]
        for fault in FAULT_SYMBOLS:
            if fault in symbols:
                lines.append(hook(fault, append("'fault pc=' + hex(int(self.PC.RawValue)) + chr(10)")))
        lines.append("start")
        return "\n".join(lines) + "\n"

    def run(self, target, firmware: Firmware, workdir: Path) -> EmulatorRun:
        self.check(firmware)
        return self._execute(target, [f"sysbus LoadELF @{_path(firmware.elf)}"], firmware.symbols, workdir)

    def run_payload(self, target, payload: Path, symbols: dict, workdir: Path,
                    model: tuple[int, Path] | None = None) -> EmulatorRun:
        """Boot a raw flash payload (what a bootloader put in place) at the flash base, as a device would; `model`
        (address, file): a model image's payload, put at its region."""
        base = self.machine.flash.base
        boot = (f"sysbus.cpu VectorTableOffset {base:#x}" if target.arch == "arm" else f"sysbus.cpu PC {base:#x}")
        loads = [f"sysbus LoadBinary @{_path(payload)} {base:#x}"]
        if model is not None:
            loads.append(f"sysbus LoadBinary @{_path(model[1])} {model[0]:#x}")
        return self._execute(target, [*loads, boot], symbols, workdir)

    def _execute(self, target, image: list[str], symbols: dict, workdir: Path) -> EmulatorRun:
        if shutil.which("mono") is None:
            raise ToolMissing("Renode needs Mono: apt-get install mono-complete (run `make setup`)")
        renode = renode_path()
        workdir = workdir.resolve()
        scratch = workdir / ".renode"  # the run's script, logs and Renode's TMPDIR; removed after a good run
        shutil.rmtree(scratch, ignore_errors=True)
        (scratch / "tmp").mkdir(parents=True)  # Renode deletes `renode-*` folders in $TMPDIR at start: its own
        log, resc, console = scratch / "hooks.log", scratch / "run.resc", scratch / "console.log"
        resc.write_text(self.script(target.arch, image, symbols, workdir, log))
        start = time.monotonic()
        with open(console, "w") as console_file:
            # stdin stays open while the machine runs: Renode's console quits at end of input
            proc = subprocess.Popen([str(renode), "--console", "--disable-xwt", "--plain", "-e", f"include @{_path(resc)}"],
                                    cwd=scratch, stdin=subprocess.PIPE, stdout=console_file, stderr=subprocess.STDOUT,
                                    env=dict(os.environ, TMPDIR=str(scratch / "tmp")), start_new_session=True)
            try:
                text = self._wait(proc, log, console, start)
            finally:
                self._stop(proc)
        run = self._parse(text, time.monotonic() - start, console, workdir)
        shutil.rmtree(scratch, ignore_errors=True)
        return run

    def _wait(self, proc, log: Path, console: Path, start: float) -> str:
        started = False
        while True:
            text = log.read_text(errors="replace") if log.exists() else ""
            if re.search(r"^(exit|fault)", text, re.MULTILINE) or proc.poll() is not None:
                return text
            if not started:  # a command of the script failed: Renode is back at its prompt, never started
                shown = console.read_text(errors="replace")
                started = "Starting emulation" in shown
                after = shown.split("Including script", 1)[1] if "Including script" in shown else ""
                if not started and re.search(r"^\((monitor|tinymlaas)\) ", after, re.MULTILINE):
                    said = [line for line in after.splitlines()[1:] if line and not line[:1].isdigit()]
                    raise EmulatorFailure(f"Renode did not start the run: {said[0][:200] if said else 'script failed'}")
            if time.monotonic() - start > self.timeout:
                raise EmulatorTimeout(f"the Renode run on {self.machine.model} did not finish within {self.timeout:g} s; "
                                      "the firmware hangs or the model is too slow for this timeout")
            time.sleep(0.05)

    @staticmethod
    def _stop(proc) -> None:
        if proc.poll() is None:
            try:
                proc.stdin.write(b"quit\n")
                proc.stdin.close()
                proc.wait(timeout=15)
            except (OSError, subprocess.TimeoutExpired):
                os.killpg(proc.pid, 9)
                proc.wait()

    def _parse(self, text: str, seconds: float, console: Path, workdir: Path) -> EmulatorRun:
        fault = re.search(r"^fault (.*)$", text, re.MULTILINE)
        status = re.search(r"^exit (\d+)$", text, re.MULTILINE)
        if fault or status is None:
            tail = [line for line in console.read_text(errors="replace").splitlines() if "ERROR" in line][-1:]
            why = f"the core faulted ({fault.group(1)})" if fault else (tail[0][:200] if tail else "no exit")
            raise EmulatorFailure(f"the Renode run on {self.machine.model} ended without the firmware's exit: {why}")
        if int(status.group(1)) != 0:
            lines = [line for line in text.splitlines() if line.startswith("tinymlaas:")]
            raise EmulatorFailure(f"firmware exited with status {status.group(1)} on {self.machine.model}: "
                                  f"{lines[0][:200] if lines else ''}")
        marks = re.findall(r"^(begin|end) (\d+) ([\d.]+)$", text, re.MULTILINE)
        regions = [RegionCount(int(e) - int(b), None, wall_seconds=float(te) - float(tb))
                   for (kb, b, tb), (ke, e, te) in zip(marks[::2], marks[1::2]) if (kb, ke) == ("begin", "end")]
        if len(regions) < 2:
            raise EmulatorFailure("the Renode hooks recorded no inference")
        calibration = regions[0]
        measured = [RegionCount(r.instructions - calibration.instructions, None, wall_seconds=r.wall_seconds)
                    for r in regions[1:]]
        outputs = b"".join(bytes.fromhex(h) for h in re.findall(r"^output ([0-9a-f]*)$", text, re.MULTILINE))
        (workdir / "outputs.bin").write_bytes(outputs)
        harness = {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", text)}
        return EmulatorRun(0, text, measured, seconds, harness, calibration)
