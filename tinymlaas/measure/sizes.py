"""Measure stage: flash and RAM of a firmware image, split into what the model owns and the rest."""

from __future__ import annotations

import subprocess
from dataclasses import asdict, dataclass
from pathlib import Path

FLASH_SECTIONS = (".text", ".rodata", ".data", ".init", ".fini", ".ARM.exidx", ".srodata", ".sdata", ".tdata")
RAM_SECTIONS = (".data", ".bss", ".sdata", ".sbss", ".tdata", ".tbss", ".tbss_space", ".noinit")


@dataclass
class Sizes:
    model_code: int  # kernels (generated and C micro-kernels) + driver
    weights: int
    firmware_flash: int  # whole image, harness and C library included
    arena: int
    kernel_scratch: int
    stack_peak: int | None  # measured by stack painting during inference
    data_bss_other: int  # harness buffers and C library state
    state: int = 0  # variable tensors kept between inferences (and their next values)
    flash_model: int = 0
    ram_model: int = 0

    def __post_init__(self):
        self.flash_model = self.model_code + self.weights
        self.ram_model = self.arena + self.kernel_scratch + self.state + (self.stack_peak or 0)

    def to_dict(self) -> dict:
        return asdict(self)


def section_sizes(elf: Path, target) -> dict[str, int]:
    out = subprocess.run([target.tool("size"), "-A", str(elf)], capture_output=True, text=True, check=True).stdout
    sizes = {}
    for line in out.splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[0].startswith(".") and parts[1].isdigit():
            sizes[parts[0]] = int(parts[1])
    return sizes


def symbol_sizes(elf: Path, target) -> dict[str, int]:
    out = subprocess.run([target.tool("nm"), "-S", str(elf)], capture_output=True, text=True, check=True).stdout
    sizes = {}
    for line in out.splitlines():
        parts = line.split()
        if len(parts) == 4:
            sizes[parts[3]] = int(parts[1], 16)
    return sizes


def measure_firmware(elf: Path, target, program, stack_peak: int | None, library_bytes: int = 0) -> Sizes:
    """library_bytes: flash of the C micro-kernels linked in (firmware.linked_bytes)."""
    sections = section_sizes(elf, target)
    symbols = symbol_sizes(elf, target)
    flash = sum(v for k, v in sections.items() if k.startswith(FLASH_SECTIONS))  # .data counts: its initializers
    ram = sum(v for k, v in sections.items() if k.startswith(RAM_SECTIONS))
    model_code = library_bytes + sum(
        v for k, v in symbols.items() if k.startswith("tinymlaas_k_") or k == "tinymlaas_model_run")
    arena, scratch = program.arena_bytes, program.scratch_bytes
    state = symbols.get("tinymlaas_state", 0) + symbols.get("tinymlaas_state_next", 0)
    placeholders = symbols.get("tinymlaas_arena", 0) + symbols.get("tinymlaas_scratch", 0) + state
    return Sizes(
        model_code=model_code,
        weights=symbols.get("tinymlaas_weights", 0),
        firmware_flash=flash,
        arena=arena,
        kernel_scratch=scratch,
        stack_peak=stack_peak,
        data_bss_other=max(ram - placeholders, 0),
        state=state,
    )
