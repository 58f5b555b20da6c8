"""Firmware stage: link the driver, the kernels and the measurement harness with the cross compiler."""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from tinymlaas import build_dir, data_dir
from tinymlaas.backends.mcu.codegen import KernelObject
from tinymlaas.backends.mcu.driver import DriverSources
from tinymlaas.errors import BuildFailure, ToolMissing
from tinymlaas.targets import MemoryRegion

FIRMWARE_DIR = data_dir("firmware")
KERNELS_DIR = FIRMWARE_DIR / "kernels"  # reference/ and optimized/ C kernels, include/ their headers
STACK_RESERVE = 0x10000  # the harness paints and measures up to 64 KiB of stack


@dataclass(frozen=True)
class MemoryLayout:
    """Where a runner's machine has its memories, and how the harness talks to the host there.

    board_io: None for semihosting (QEMU: files on the host, counts from the plugin); else the board support
    file under firmware/boards/ (outputs printed as text; the marks the board's). linked_inputs: the board has
    no way to the host's files (Ibex): the inputs are linked into the image."""
    flash: MemoryRegion
    ram: MemoryRegion
    board_io: str | None = None
    link_flags: tuple[str, ...] = ()
    linked_inputs: bool = False
    model_region: MemoryRegion | None = None  # where the model's constants are linked (None: after the code)


@dataclass
class Firmware:
    elf: Path
    map_file: Path
    symbols: dict[str, int]
    kernel_library: list[Path] = field(default_factory=list)  # objects of firmware/kernels/*/*.c: model code
    layout: MemoryLayout | None = None
    model_region: MemoryRegion | None = None  # the model's constants are linked there (None: after the code)


_MAP_SECTION = re.compile(r"^ (\.\S+)(?:\s+0x[0-9a-f]+\s+0x([0-9a-f]+)\s+(\S+))?$")
_MAP_PLACEMENT = re.compile(r"^\s+0x[0-9a-f]+\s+0x([0-9a-f]+)\s+(\S+)$")  # of a long section name's line above


def linked_bytes(map_file: Path, objects: list[Path]) -> int:
    """Flash bytes (code and read-only data) the linker kept from `objects`, read from its map file."""
    names = {str(o) for o in objects}
    text = map_file.read_text(errors="replace")
    text = text[text.find("Linker script and memory map"):]  # before it: discarded sections
    total, section = 0, ""
    for line in text.splitlines():
        placed = None
        if m := _MAP_SECTION.match(line):
            section = m.group(1)
            placed = m.group(2, 3) if m.group(2) else None
        elif m := _MAP_PLACEMENT.match(line):
            placed = m.group(1, 2)
        if placed and placed[1] in names and section.startswith((".text", ".rodata", ".srodata")):
            total += int(placed[0], 16)
    return total


def _run(cmd: list[str], cwd: Path, what: str) -> None:
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        lines = (proc.stderr or proc.stdout).strip().splitlines()
        full = [line for line in lines if "no space left on device" in line.lower()]
        if full:  # said after warnings the first line would show
            raise BuildFailure(f"{what} failed: no space left on device ({full[0][:200]})")
        errors = [line for line in lines if "error" in line.lower() and "collect2" not in line] or lines
        raise BuildFailure(f"{what} failed: {errors[0][:300] if errors else 'exit ' + str(proc.returncode)}")


def require_tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise ToolMissing(f"'{name}' is not installed (run `make setup`)")
    return path


def read_symbols(elf: Path, target) -> dict[str, int]:
    out = subprocess.run([target.tool("nm"), str(elf)], capture_output=True, text=True, check=True).stdout
    symbols = {}
    for line in out.splitlines():
        parts = line.split()
        if len(parts) == 3:
            symbols[parts[2]] = int(parts[0], 16)
    return symbols


def kernel_library(gcc: str, cflags: list[str], workdir: Path) -> list[Path]:
    """firmware/kernels/{reference,optimized}/*.c compiled for these flags, once: cached by the hash of the sources,
    headers (firmware/kernels/include) and flags."""
    import hashlib
    import os
    import tempfile

    # by file name, whatever the folder: the link order (and so the code's addresses) does not depend on the layout
    sources = sorted(KERNELS_DIR.glob("*/*.c"), key=lambda f: f.name)
    digest = hashlib.sha256(" ".join([gcc, *cflags]).encode())
    for f in sorted(KERNELS_DIR.glob("*/*.[ch]")):
        digest.update(str(f.relative_to(KERNELS_DIR)).encode() + f.read_bytes())
    cache = build_dir() / "kernel-lib" / digest.hexdigest()[:16]
    objects = [cache / f"lib_{s.stem}.o" for s in sources]
    if all(o.exists() for o in objects):
        return objects
    cache.mkdir(parents=True, exist_ok=True)
    for source, obj in zip(sources, objects):
        fd, tmp = tempfile.mkstemp(suffix=".o", dir=cache)
        os.close(fd)
        _run([gcc, *cflags, f"-I{KERNELS_DIR / 'include'}", "-c", str(source), "-o", tmp], workdir,
             f"compiling {source.name}")
        os.replace(tmp, obj)  # atomic: concurrent builds see a whole object or none
    return objects


def qemu_layout(target) -> MemoryLayout:
    from tinymlaas.ota.layout import model_region

    return MemoryLayout(target.emulator.flash, target.emulator.ram,
                        model_region=model_region(target, target.emulator.flash))


MODEL_SECTION = ".rodata.tinymlaas_model"  # an output section of read-only data: the size measures count it


def model_region_script(region: MemoryRegion, workdir: Path) -> Path:
    """A linker script that augments picolibc's: the weights section (driver.py) at the region's base. Listed
    before `.text`, it takes the weights before `.text`'s `.rodata.*` would; with an address of its own it leaves
    the flash region's other sections (the .data initializers too) where they were. It is in no load segment
    (ld warns so): the model is an image of its own, which runners load from the section as a bootloader puts a
    model image in place (`model_payload`)."""
    script = workdir / "model_region.ld"
    script.write_text(
        "/* Generated by tinymlaas: the model's constants at a fixed flash address (a model image replaces them). */\n"
        f"SECTIONS\n{{\n  {MODEL_SECTION} {region.base:#x} : {{ KEEP(*(.rodata.tinymlaas_weights)) }} :NONE\n}}\n"
        "INSERT AFTER .init;\n")
    return script


def linked_model_region(elf: Path, target) -> MemoryRegion | None:
    """The model section of a firmware ELF (address, bytes), None when its constants are linked after the code."""
    out = subprocess.run([target.tool("objdump"), "-h", str(elf)], capture_output=True, text=True, check=True).stdout
    for line in out.splitlines():
        parts = line.split()
        if len(parts) >= 4 and parts[1] == MODEL_SECTION:
            return MemoryRegion(int(parts[3], 16), int(parts[2], 16))
    return None


def model_payload(elf: Path, target, out: Path) -> Path:
    """The model section's bytes (what a model image carries; loaded at the region's base)."""
    subprocess.run([require_tool(target.tool("objcopy")), "-O", "binary", "-j", MODEL_SECTION, str(elf), str(out)],
                   check=True)
    return out


def code_payload(elf: Path, target, out: Path) -> Path:
    """The flash contents from the flash base up, the model section left out (what a bootloader puts at the base)."""
    subprocess.run([require_tool(target.tool("objcopy")), "-O", "binary", "-R", MODEL_SECTION, str(elf), str(out)],
                   check=True)
    return out


def _inputs_blob_asm(inputs: Path, workdir: Path) -> Path:
    asm = workdir / "inputs_blob.S"
    asm.write_text(
        '    .section .rodata.tinymlaas_inputs_blob, "a"\n    .balign 16\n    .global tinymlaas_inputs_blob\n'
        f'tinymlaas_inputs_blob:\n    .incbin "{inputs.resolve()}"\n'
        "    .balign 4\n    .global tinymlaas_inputs_blob_bytes\n"
        f"tinymlaas_inputs_blob_bytes:\n    .word {inputs.stat().st_size}\n"
    )
    return asm


@dataclass(frozen=True)
class LinkRecipe:
    """How a firmware for one machine is compiled and linked, apart from the model's own files: what the direct link
    and a PlatformIO project (backends/platformio.py) both use, so that both give the same code."""
    cflags: tuple[str, ...]  # compile and link (the core, -O2, picolibc)
    defines: tuple[str, ...]  # -D flags of the harness
    board_sources: tuple[Path, ...]  # the board support files (none with semihosting)
    ldflags: tuple[str, ...]  # crt0, C library, sections, the machine's memory map


def link_recipe(target, layout: MemoryLayout | None = None) -> LinkRecipe:
    layout = layout or qemu_layout(target)
    flash, ram = layout.flash, layout.ram
    board = () if layout.board_io is None else (FIRMWARE_DIR / "boards" / "text_io.c",
                                                FIRMWARE_DIR / "boards" / f"{layout.board_io}.c")
    return LinkRecipe(
        cflags=(*target.cc_flags, "-O2", "-g", "-ffunction-sections", "-fdata-sections", "--specs=picolibc.specs"),
        defines=("-DTINYMLAAS_BOARD_IO",) if layout.board_io else (),
        board_sources=board,
        ldflags=(*(("--oslib=semihost",) if layout.board_io is None else ()), "--crt0=hosted", "-lm",
                 "-Wl,--gc-sections", *layout.link_flags,
                 f"-Wl,--defsym=__flash={flash.base:#x}", f"-Wl,--defsym=__flash_size={flash.size:#x}",
                 f"-Wl,--defsym=__ram={ram.base:#x}", f"-Wl,--defsym=__ram_size={ram.size:#x}",
                 f"-Wl,--defsym=__stack_size={STACK_RESERVE:#x}"),
    )


def link_firmware(
    target, kernels: KernelObject, driver: DriverSources, workdir: Path, profile: bool = False, trace: bool = False,
    name: str = "firmware", layout: MemoryLayout | None = None, inputs: Path | None = None,
) -> Firmware:
    """profile: count each step separately (TINYMLAAS_STEP); trace: write each step's output to trace.bin.
    layout: the runner's memory map (default: the target's QEMU machine); a board with no way to the host's files
    needs the `inputs` file, which is linked into the image."""
    gcc = require_tool(target.gcc)
    workdir = workdir.resolve()  # gcc runs inside it
    layout = layout or qemu_layout(target)
    if layout.board_io and (trace or (layout.linked_inputs and inputs is None)):
        raise BuildFailure(f"the {layout.board_io} board has no host files: it needs linked-in inputs and no trace")
    recipe = link_recipe(target, layout)
    elf = workdir / f"{name}.elf"
    map_file = workdir / f"{name}.map"
    library = kernel_library(gcc, list(recipe.cflags), workdir)
    cmd = [
        gcc,
        *recipe.cflags,
        *recipe.defines,
        *map(str, recipe.board_sources),
        *([str(_inputs_blob_asm(inputs, workdir))] if layout.linked_inputs else []),
        f"-I{workdir}",
        *(["-DTINYMLAAS_PROFILE"] if profile else []),
        *(["-DTINYMLAAS_TRACE"] if trace else []),
        str(FIRMWARE_DIR / "harness.c"),
        *[str(o) for o in library],
        str(driver.source),
        str(driver.weights_asm),
        str(kernels.path),
        *recipe.ldflags,
        f"-Wl,-Map={map_file}",
        "-o",
        str(elf),
    ]
    region = layout.model_region if layout.model_region and driver.weight_bytes <= layout.model_region.size else None
    if region is not None:
        # an empty gcc -T keeps picolibc.specs from adding picolibc.ld; the region's script augments it (ld takes an
        # INSERT script ahead of the script it inserts into), both ahead of the --defsym flags, where the specs put
        # picolibc.ld: its DEFINED() tests see the same symbols as without a region
        scripts = ["-T/dev/null", f"-Wl,-T,{model_region_script(region, workdir)}", "-Wl,-T,picolibc.ld"]
        at = cmd.index(recipe.ldflags[0])
        try:
            _run([*cmd[:at], *scripts, *cmd[at:]], workdir, f"linking firmware for {target.name}")
        except BuildFailure:  # the code reaches into the region: the constants go after the code, as without one
            region = None
        else:
            region = linked_model_region(elf, target)
    if region is None:
        _run(cmd, workdir, f"linking firmware for {target.name}")
    return Firmware(elf, map_file, read_symbols(elf, target), library, layout, region)
