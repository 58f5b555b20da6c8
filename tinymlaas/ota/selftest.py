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


def selftest_spec(target: str, firmware: Firmware, inputs: bytes, outputs: bytes) -> dict:
    return {
        "target": target,
        "marks": {k: firmware.symbols[f"tinymlaas_mark_{k}"] for k in ("begin", "end")},
        "inputs": base64.b64encode(inputs).decode(),
        "expected_outputs": base64.b64encode(outputs).decode(),
    }


def run_selftest(payload: bytes, spec: dict, timeout: float = 60.0) -> SelfTestResult:
    """Boot `payload` in the target's emulator, feed it the spec's inputs, compare every output byte."""
    target = get_target(spec["target"])
    expected = base64.b64decode(spec["expected_outputs"])
    with tempfile.TemporaryDirectory(prefix="tinymlaas-selftest-") as tmp:
        work = Path(tmp)
        (work / "payload.bin").write_bytes(payload)
        (work / "inputs.bin").write_bytes(base64.b64decode(spec["inputs"]))
        try:
            run = emulator_for("qemu", timeout).run_payload(target, work / "payload.bin", spec["marks"], work)
        except TinyMLaaSError as e:
            return SelfTestResult(False, None, f"the image did not run: {e}")
        got = (work / "outputs.bin").read_bytes() if (work / "outputs.bin").exists() else b""
    if got != expected:
        diff = sum(a != b for a, b in zip(got, expected)) + abs(len(got) - len(expected))
        return SelfTestResult(False, run.regions[0].instructions if run.regions else None,
                              f"{diff} of {len(expected)} output bytes differ from the build's verified outputs")
    return SelfTestResult(True, run.regions[0].instructions, f"{len(run.regions)} inferences bit-exact")
