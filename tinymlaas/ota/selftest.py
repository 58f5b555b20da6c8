"""The on-device self-test: a build's verified inputs and outputs, replayed on the image a device booted.

A build records the inputs it was verified with and the outputs its firmware produced (already
checked against the TFLite interpreter). A device that boots a new image runs it on those inputs and
must reproduce those outputs byte for byte before it confirms the image; it also reports the exact
instructions per inference it measured.
"""

from __future__ import annotations

import base64
import tempfile
from dataclasses import dataclass
from pathlib import Path

from tinymlaas.backends.mcu.firmware import Firmware
from tinymlaas.errors import TinyMLaaSError
from tinymlaas.runners import emulator_for
from tinymlaas.targets import get_target


@dataclass
class SelfTestResult:
    passed: bool
    instructions: int | None
    detail: str


def selftest_spec(target: str, firmware: Firmware, inputs: bytes, outputs: bytes, runner: str = "qemu") -> dict:
    """runner: the machine the image is linked for and was verified on (qemu, or renode: a model of a real part,
    whose run also hooks the board support's functions)."""
    spec = {
        "target": target,
        "runner": runner,
        "marks": {k: firmware.symbols[f"tinymlaas_mark_{k}"] for k in ("begin", "end")},
        "inputs": base64.b64encode(inputs).decode(),
        "expected_outputs": base64.b64encode(outputs).decode(),
    }
    if runner == "renode":
        from tinymlaas.runners.renode import HOOKED

        spec["symbols"] = {s: firmware.symbols[s] for s in HOOKED if s in firmware.symbols}
    return spec


def run_selftest(payload: bytes, spec: dict, timeout: float = 60.0, board: str = "qemu",
                 model: tuple[int, bytes] | None = None) -> SelfTestResult:
    """Boot `payload` on the device's emulated board (`board`: qemu, or renode: Renode's model of the target's
    part) with `model` (address, bytes: the model the bootloader put in its region, for firmware with one), feed
    it the spec's inputs, compare every output byte."""
    target = get_target(spec["target"])
    built_for = spec.get("runner", "qemu")
    if built_for != board:
        return SelfTestResult(False, None, f"the image is linked for the {built_for} machine; this device's board is "
                              f"the {board} one (build it with emulator '{board}')")
    expected = base64.b64decode(spec["expected_outputs"])
    with tempfile.TemporaryDirectory(prefix="tinymlaas-selftest-") as tmp:
        work = Path(tmp)
        (work / "payload.bin").write_bytes(payload)
        (work / "inputs.bin").write_bytes(base64.b64decode(spec["inputs"]))
        if model is not None:
            (work / "model.bin").write_bytes(model[1])
        try:
            runner = emulator_for(board, timeout, target)
            run = runner.run_payload(target, work / "payload.bin", spec.get("symbols") or spec["marks"], work,
                                     (model[0], work / "model.bin") if model is not None else None)
        except TinyMLaaSError as e:
            return SelfTestResult(False, None, f"the image did not run: {e}")
        got = (work / "outputs.bin").read_bytes() if (work / "outputs.bin").exists() else b""
    if got != expected:
        diff = sum(a != b for a, b in zip(got, expected)) + abs(len(got) - len(expected))
        return SelfTestResult(False, run.regions[0].instructions if run.regions else None,
                              f"{diff} of {len(expected)} output bytes differ from the build's verified outputs")
    return SelfTestResult(True, run.regions[0].instructions, f"{len(run.regions)} inferences bit-exact")
