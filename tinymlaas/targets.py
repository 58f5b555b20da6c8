"""Boards as data: one YAML file per target in `targets/`."""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from tinymlaas import data_dir
from tinymlaas.errors import UnknownTarget

TARGETS_DIR = data_dir("targets")


@dataclass(frozen=True)
class MemoryRegion:
    base: int
    size: int


@dataclass(frozen=True)
class Board:
    name: str
    flash_bytes: int
    ram_bytes: int
    clock_hz: int


@dataclass(frozen=True)
class Emulator:
    qemu: str
    machine: str
    flash: MemoryRegion
    ram: MemoryRegion
    counter: str
    extra_args: tuple[str, ...] = ()


@dataclass(frozen=True)
class Rtl:
    """A core simulated cycle-accurately from its RTL (the target's ground truth for cycles)."""
    simulator: str  # "ibex"
    config: str  # the simulator's configuration name (Ibex: util/ibex_config.py)


@dataclass(frozen=True)
class RenodeMachine:
    """The Renode machine a target's builds run on: Renode's own model of a real MCU where it has one
    (`platform: stm32f4` is its platforms/cpus/stm32f4.repl), else a project platform (`renode/<name>.repl`).
    overlay: a project .repl applied on top, for what the run needs beyond the real part (said in the file)."""
    platform: str
    model: str
    flash: MemoryRegion
    ram: MemoryRegion
    overlay: str | None = None

    @property
    def is_project_file(self) -> bool:
        return self.platform.endswith(".repl")


@dataclass(frozen=True)
class Target:
    name: str
    description: str
    core: str
    arch: str  # "arm" or "riscv"
    fpu: bool
    dsp: bool
    mve: bool
    board: Board
    llvm: dict
    cc_prefix: str
    cc_flags: tuple[str, ...]
    emulator: Emulator
    platformio_board: str | None = None
    renode: RenodeMachine | None = None
    rtl: Rtl | None = None
    estimate: dict | None = None  # cycle estimate: llvm-mca `mcpu` (default the LLVM CPU), `taken_branch_penalty`
    runner: str | None = None  # where its builds run unless asked otherwise (`runner:`; default qemu, or the RTL)
    source: Path | None = field(default=None, compare=False)

    kind = "mcu"  # its backend (tinymlaas.backends.BACKENDS)

    def describe(self) -> dict:
        """What `tinymlaas targets --json` shows."""
        return {"kind": self.kind, "description": self.description, "board": self.board.__dict__,
                "emulator": self.emulator.machine, "runner": self.default_runner,
                "renode": self.renode.model if self.renode else None}

    @property
    def default_runner(self) -> str:
        return self.runner or (self.rtl.simulator if self.rtl else "qemu")

    @property
    def gcc(self) -> str:
        return self.cc_prefix + "gcc"

    def tool(self, name: str) -> str:
        return self.cc_prefix + name


@dataclass(frozen=True)
class HostTarget:
    """A host that runs the model under TVM's runtime (CPU or GPU): for models too large for a microcontroller,
    or a gateway-class variant next to the MCU builds. Built by tinymlaas.backends.host, not as firmware."""
    name: str
    description: str
    device: str  # "cpu" or "cuda"
    tvm_target: str  # TVM's target kind; a CUDA target is refined from the GPU at build time
    precisions: tuple[str, ...] = ("float32",)
    source: Path | None = field(default=None, compare=False)
    kind = "host"  # its backend (tinymlaas.backends.BACKENDS)
    # what the operator registry asks of a target: no DSP micro-kernels, integer layers as TIR
    dsp = False
    fpu = True
    mve = False
    rtl = None

    @property
    def core(self) -> str:
        return "NVIDIA GPU" if self.device == "cuda" else "host CPU"

    def describe(self) -> dict:
        return {"kind": self.kind, "description": self.description, "device": self.device,
                "tvm_target": self.tvm_target, "precisions": list(self.precisions)}


def _region(d: dict) -> MemoryRegion:
    return MemoryRegion(base=int(d["base"]), size=int(d["size"]))


def _renode(d: dict) -> RenodeMachine:
    return RenodeMachine(platform=d["platform"], model=d["model"], flash=_region(d["flash"]), ram=_region(d["ram"]),
                         overlay=d.get("overlay"))


def load_target_file(path: Path) -> Target | HostTarget:
    stat = path.stat()
    return _parse_target_file(path, stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=256)
def _parse_target_file(path: Path, _mtime_ns: int, _size: int) -> Target | HostTarget:
    """Parsed once per version of the file: the API validates a target on every device registration."""
    d = yaml.safe_load(path.read_text())
    return PARSERS[d.get("kind", "mcu")](d, path)


def _host_target(d: dict, path: Path) -> HostTarget:
    return HostTarget(name=d["name"], description=d["description"], device=d["device"],
                      tvm_target=d["tvm_target"], precisions=tuple(d.get("precisions", ("float32",))), source=path)


def _mcu_target(d: dict, path: Path) -> Target:
    emu = d["emulator"]
    return Target(
        name=d["name"],
        description=d["description"],
        core=d["core"],
        arch=d["arch"],
        fpu=bool(d["features"]["fpu"]),
        dsp=bool(d["features"]["dsp"]),
        mve=bool(d["features"]["mve"]),
        board=Board(**d["board"]),
        llvm=dict(d["llvm"]),
        cc_prefix=d["cc"]["prefix"],
        cc_flags=tuple(d["cc"]["flags"]),
        emulator=Emulator(
            qemu=emu["qemu"],
            machine=emu["machine"],
            flash=_region(emu["flash"]),
            ram=_region(emu["ram"]),
            counter=emu["counter"],
            extra_args=tuple(emu.get("extra_args", ())),
        ),
        platformio_board=(d.get("platformio") or {}).get("board"),
        renode=_renode(d["renode"]) if d.get("renode") else None,
        rtl=Rtl(**d["rtl"]) if d.get("rtl") else None,
        estimate=dict(d["estimate"]) if d.get("estimate") else None,
        runner=d.get("runner"),
        source=path,
    )


PARSERS = {"mcu": _mcu_target, "host": _host_target}  # a target file's `kind` -> how to read the rest


def all_targets(directory: Path = TARGETS_DIR) -> dict[str, Target | HostTarget]:
    targets = {}
    for path in sorted(directory.glob("*.yaml")):
        t = load_target_file(path)
        targets[t.name] = t
    return targets


def mcu_targets(directory: Path = TARGETS_DIR) -> dict[str, Target]:
    """The microcontroller targets (firmware, emulators, devices in the fleet)."""
    return {n: t for n, t in all_targets(directory).items() if isinstance(t, Target)}


def get_target(name: str, directory: Path = TARGETS_DIR) -> Target | HostTarget:
    targets = all_targets(directory)
    if name not in targets:
        raise UnknownTarget(f"unknown target '{name}'; known targets: {', '.join(targets)}")
    return targets[name]
