"""Cycle-accurate runner: lowRISC Ibex simulated from its RTL (Verilator model of examples/simple_system).

The simulator is built once per core configuration (`make setup`, or `tinymlaas ibex-build`) from the Ibex
sources in ../shared/third_party/ibex into build/ibex/<config>/. The firmware is the same build as for any
rv32imac target, linked for the simple system's memory map; the harness reads the core's own counters
(mcycle, minstret, load and store events) around each inference, so cycles are exact, not estimated.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

from tinymlaas import build_dir
from tinymlaas.backends.mcu.firmware import Firmware, MemoryLayout
from tinymlaas.errors import EmulatorFailure, EmulatorTimeout, ToolMissing
from tinymlaas.runners.qemu import EmulatorRun, RegionCount
from tinymlaas.targets import MemoryRegion

# The simple system: one 1 MB RAM at 0x100000; the core boots at 0x100080. We split it like a board's
# flash and RAM so that the same link script applies (768 KiB - 128 B for code and weights, 256 KiB of RAM).
LAYOUT = MemoryLayout(flash=MemoryRegion(0x100080, 0xBFF80), ram=MemoryRegion(0x1C0000, 0x40000),
                      board_io="ibex_simple_system",
                      # the trap vector table below the boot address (firmware/boards/ibex_simple_system.c)
                      link_flags=("-Wl,--section-start=.ibex_vectors=0x100000", "-Wl,-u,tinymlaas_ibex_vectors"),
                      linked_inputs=True)
CONFIGS = ("small", "maxperf")  # util/ibex_config.py names the targets use
SIMULATOR = "Vibex_simple_system"
HPM_COUNTERS = 10  # mhpmcounter3..12: the load and store counters (5, 6) are among them


def source_dir() -> Path:
    """The Ibex sources: $TINYMLAAS_IBEX_SRC, else ../shared/third_party/ibex beside the checkout."""
    env = os.environ.get("TINYMLAAS_IBEX_SRC")
    if env:
        return Path(env)
    return (Path(__file__).resolve().parents[2] / ".." / "shared" / "third_party" / "ibex").resolve()


def simulator_path(config: str) -> Path:
    return build_dir() / "ibex" / config / "lowrisc_ibex_ibex_simple_system_0" / "sim-verilator" / SIMULATOR


def _patched_copy(source: Path, dest: Path) -> None:
    """A writable copy of the sources whose simple-system core file declares BASE_ISA: the RTL reads that
    define and otherwise builds its CHERIoT-capable default; and without waveform tracing (compiles faster)."""
    if dest.exists():
        shutil.rmtree(dest)
    shutil.copytree(source, dest)
    for path in dest.rglob("*"):
        if path.is_file():
            path.chmod(0o644 | (path.stat().st_mode & 0o111))
    core = dest / "examples" / "simple_system" / "ibex_simple_system.core"
    text = core.read_text()
    text = text.replace("parameters:\n  RV32E:", "parameters:\n  BASE_ISA:\n    datatype: str\n"
                        "    default: ibex_pkg::BaseIsaRV32I\n    paramtype: vlogdefine\n"
                        "    description: base ISA\n\n  RV32E:", 1)
    text = text.replace("    parameters:\n      - RV32E", "    parameters:\n      - BASE_ISA\n      - RV32E", 1)
    text = re.sub(r"\n\s+- '--trace[^\n]*", "", text).replace("-DVM_TRACE_FMT_FST ", "")
    if "BASE_ISA" not in text:
        raise ToolMissing(f"{core}: unexpected layout, cannot declare BASE_ISA")
    core.write_text(text)


def build_simulator(config: str, source: Path | None = None, log=print) -> Path:
    """Verilate and compile the simple system for one configuration (1-5 minutes); returns the binary."""
    if config not in CONFIGS:
        raise ValueError(f"unknown Ibex configuration '{config}' (known: {', '.join(CONFIGS)})")
    source = source or source_dir()
    if not (source / "examples" / "simple_system").is_dir():
        raise ToolMissing(f"Ibex sources not found at {source} (set TINYMLAAS_IBEX_SRC)")
    for tool in ("verilator", "make", "g++"):
        if shutil.which(tool) is None:
            raise ToolMissing(f"'{tool}' is needed to build the Ibex simulator (run `make setup`)")
    root = build_dir() / "ibex"
    src = root / "src"
    stamp = root / "src.stamp"
    if not stamp.exists() or stamp.read_text() != str(source):
        _patched_copy(source, src)
        stamp.write_text(str(source))
    opts = subprocess.run([sys.executable, "util/ibex_config.py", config, "fusesoc_opts"], cwd=src,
                          capture_output=True, text=True, check=True).stdout.split()
    opts = [o.replace("--BaseIsa=", "--BASE_ISA=") for o in opts if not o.startswith("--MHPMCounterNum=")]
    fusesoc = Path(sys.executable).parent / "fusesoc"
    cmd = [str(fusesoc) if fusesoc.exists() else "fusesoc", "--cores-root=.", "run", "--target=sim", "--setup",
           "--build", f"--build-root={root / config}", "lowrisc:ibex:ibex_simple_system", *opts,
           f"--MHPMCounterNum={HPM_COUNTERS}"]
    log(f"building the Ibex '{config}' simulator (Verilator; a few minutes)")
    started = time.monotonic()
    # FuseSoC's pre-build hooks run `python3` (they import edalize): this interpreter's environment first
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    proc = subprocess.run(cmd, cwd=src, capture_output=True, text=True, check=False, env=env)
    binary = simulator_path(config)
    if proc.returncode != 0 or not binary.exists():
        tail = (proc.stdout + proc.stderr).strip().splitlines()[-5:]
        raise ToolMissing(f"building the Ibex '{config}' simulator failed: {' | '.join(tail)[:500]}")
    log(f"built {binary} in {time.monotonic() - started:.0f} s")
    return binary


class IbexSimulator:
    """Runs a firmware on the Verilator model of Ibex's simple system; exact cycles and instructions."""

    name = "ibex"
    layout = LAYOUT
    default_inputs = 1  # about 0.5 M cycles per second: one input (and its repeat) by default

    def __init__(self, config: str = "small", timeout: float | None = None):
        if config not in CONFIGS:
            raise ValueError(f"unknown Ibex configuration '{config}' (known: {', '.join(CONFIGS)})")
        self.config = config
        self.timeout = timeout or 1800.0

    def binary(self) -> Path:
        path = simulator_path(self.config)
        if not path.exists():
            raise ToolMissing(f"the Ibex '{self.config}' simulator is not built (run `make setup`)")
        return path

    device_images = False  # linked for the simple system's memory map, which no device has

    @staticmethod
    def problem(target) -> str | None:
        if target.arch != "riscv" or target.fpu:
            return f"Ibex runs RV32IMC code; target {target.name} ({target.core}) is not for it"
        return None

    @classmethod
    def for_target(cls, target, timeout: float | None = None) -> IbexSimulator:
        """The target's Ibex configuration (the small one for plain RV32)."""
        cls.check_target(target)
        return cls(target.rtl.config if target.rtl else "small", timeout)

    @classmethod
    def check_target(cls, target) -> None:
        why = cls.problem(target)
        if why is not None:
            raise EmulatorFailure(why)

    def run(self, target, firmware: Firmware, workdir: Path) -> EmulatorRun:
        self.check_target(target)
        if firmware.layout != LAYOUT:
            raise EmulatorFailure(f"{firmware.elf.name} is not linked for the Ibex simple system's memory map")
        log = workdir / "ibex_simple_system.log"
        log.unlink(missing_ok=True)
        # The last cycle bound is a safety net behind the wall-clock limit (about 0.5 M cycles per second).
        cmd = [str(self.binary()), f"--meminit=ram,{firmware.elf}", "+ibex_tracer_enable=0",
               f"--term-after-cycles={int(self.timeout * 2_000_000)}"]
        start = time.monotonic()
        try:
            proc = subprocess.run(cmd, cwd=workdir, capture_output=True, text=True, timeout=self.timeout, check=False)
        except subprocess.TimeoutExpired as e:
            raise EmulatorTimeout(f"the Ibex '{self.config}' simulation did not finish within {self.timeout:g} s "
                                  "(about 0.5 M cycles per second: the model is too slow for this timeout)") from e
        seconds = time.monotonic() - start
        text = log.read_text(errors="replace") if log.exists() else ""
        exit_code = re.search(r"tinymlaas: exit=(-?\d+)", text)
        if proc.returncode != 0 or exit_code is None:
            tail = [line for line in (text + proc.stdout + proc.stderr).strip().splitlines() if line][-1:]
            raise EmulatorFailure(f"the Ibex simulation ended without the firmware's exit: {tail[0][:200] if tail else 'no output'}")
        if int(exit_code.group(1)) != 0:
            tail = [line for line in text.splitlines() if line.startswith("tinymlaas:")]
            raise EmulatorFailure(f"firmware exited with status {exit_code.group(1)} on Ibex: {tail[0][:200] if tail else ''}")
        regions = [RegionCount(int(i), int(m), cycles=int(c))
                   for i, c, m in re.findall(r"^region (\d+) (\d+) (\d+)$", text, re.MULTILINE)]
        if not regions:
            raise EmulatorFailure("the Ibex harness printed no counts")
        outputs = b"".join(bytes.fromhex(h) for h in re.findall(r"^output ([0-9a-f]*)$", text, re.MULTILINE))
        (workdir / "outputs.bin").write_bytes(outputs)
        calibration = regions[0]
        measured = [RegionCount(r.instructions - calibration.instructions,
                                r.memory_accesses - calibration.memory_accesses,
                                cycles=r.cycles - calibration.cycles) for r in regions[1:]]
        harness = {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", text)}
        return EmulatorRun(0, text, measured, seconds, harness, calibration)


def main(argv: list[str] | None = None) -> int:
    """`python -m tinymlaas.runners.ibex [CONFIG...]`: build the simulators that are missing (make setup)."""
    configs = (argv if argv is not None else sys.argv[1:]) or list(CONFIGS)
    for config in configs:
        if simulator_path(config).exists():
            print(f"Ibex '{config}' simulator: {simulator_path(config)}")
            continue
        try:
            build_simulator(config)
        except (ToolMissing, ValueError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
