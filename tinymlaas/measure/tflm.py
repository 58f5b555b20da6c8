"""TFLite Micro's arena for a model, measured by TFLite Micro itself (PyPI `tflite-micro`, its Python interpreter
with the recording allocator): the yardstick our RAM is held to.

The interpreter is the host build (x86-64, reference kernels): the head (tensors planned by its greedy memory
planner, plus kernel scratch) is what a Cortex-M build plans too; the tail (interpreter structures) holds 64-bit
pointers, about twice a 32-bit MCU's, and CMSIS-NN kernels ask for scratch the reference ones do not. It runs in a
subprocess: TFLite Micro aborts the process on an operator it lacks.
"""

from __future__ import annotations

import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

_SCRIPT = """
import sys
from tflite_micro.python.tflite_micro import runtime
runtime.Interpreter.from_file(sys.argv[1], arena_size=int(sys.argv[2])).print_allocations()
"""
ARENA_LIMIT = 32 << 20  # what the interpreter may take (its default, 10x the file, is too small for some CNNs)
_REASON = re.compile(r"(Didn't find op for builtin opcode '\w+'|\S+\.cc .*|Node \w+ .*failed.*)")
_LINE = re.compile(r"Arena allocation (total|head|tail) (\d+) bytes")


@dataclass(frozen=True)
class TflmArena:
    total: int = 0  # bytes TFLite Micro's arena needs for this model
    head: int = 0  # planned tensors and kernel scratch
    tail: int = 0  # interpreter structures (host pointers)
    refused: str = ""  # why TFLite Micro cannot run the model (then no figures)


def tflm_arena(model: Path, timeout: float = 300.0) -> TflmArena:
    """The arena TFLite Micro allocates for `model`, or why it cannot run it (an operator it lacks)."""
    try:
        done = subprocess.run([sys.executable, "-c", _SCRIPT, str(model), str(ARENA_LIMIT)], capture_output=True,
                              text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return TflmArena(refused=f"no answer in {timeout:.0f} s")
    text = done.stdout + done.stderr
    found = {k: int(v) for k, v in _LINE.findall(text)}
    if done.returncode == 0 and set(found) == {"total", "head", "tail"}:
        return TflmArena(found["total"], found["head"], found["tail"])
    reason = _REASON.search(text)
    if reason is None:
        return TflmArena(refused=f"aborted (signal {-done.returncode})" if done.returncode < 0
                         else f"exit status {done.returncode}")
    return TflmArena(refused=reason.group(1))
