"""True cycles: the Ibex core simulated from its RTL (Verilator), built by `make setup` from ../shared.

The same build as rv32imac, linked for Ibex's simple system: outputs bit-exact, instruction and memory-access
counts equal to QEMU's, cycles exact and repeatable.
"""

import json

import pytest

from tests.helpers.paths import CORPUS
from tinymlaas.build.pipeline import compile_model
from tinymlaas.build.request import BuildRequest, InvalidRequest
from tinymlaas.errors import EmulatorFailure
from tinymlaas.runners import emulator_for
from tinymlaas.targets import get_target

MANIFEST = json.loads((CORPUS / "manifest.json").read_text())

# integer and float kernels, a C micro-kernel (softmax), multiplies (conv) and soft-float (the float graph)
MODELS = ["conv_2d_int8", "softmax_int16x8", "depthwise_conv_2d_int8", "fully_connected_float32"]


def _compile(key, target, tmp_path, **options):
    return compile_model(CORPUS / MANIFEST[key]["file"], target, tmp_path / f"{key}-{target}",
                         BuildRequest(inputs=2, **options))


@pytest.mark.parametrize("key", MODELS)
def test_ibex_agrees_with_qemu_and_the_interpreter(key, tmp_path):
    ibex = _compile(key, "ibex-small", tmp_path)
    qemu = _compile(key, "rv32imac", tmp_path)
    assert ibex.runner == "ibex" and ibex.verified, ibex.fidelity
    if ibex.lowering == "integer":
        assert ibex.fidelity["max_lsb_diff"] == 0
    assert (ibex.instructions, ibex.memory_accesses) == (qemu.instructions, qemu.memory_accesses)
    assert ibex.instructions_repeat_exact and ibex.cycles_repeat_exact
    # an in-order core with multi-cycle loads, branches and multiplies: more cycles than instructions
    assert ibex.cycles > ibex.instructions


def test_maxperf_is_faster_on_multiplies(tmp_path):
    """The single-cycle multiplier and branch target ALU show in the cycles, not in the instructions."""
    small = _compile("conv_2d_int8", "ibex-small", tmp_path)
    maxperf = _compile("conv_2d_int8", "ibex-maxperf", tmp_path)
    assert small.instructions == maxperf.instructions
    assert maxperf.cycles < small.cycles


def test_ibex_runs_any_rv32_build_without_fpu(tmp_path):
    r = _compile("conv_2d_int8", "rv32imac", tmp_path, emulator="ibex")
    assert r.runner == "ibex" and r.verified and r.cycles > r.instructions


def test_ibex_refuses_code_for_an_fpu(tmp_path):
    with pytest.raises(InvalidRequest, match="--emulator cannot be ibex for rv32imafc: Ibex runs RV32IMC code"):
        _compile("fully_connected_float32", "rv32imafc", tmp_path, emulator="ibex")
    with pytest.raises(EmulatorFailure, match="not for it"):  # the runner itself refuses it too
        emulator_for("ibex", None, get_target("rv32imafc"))
