"""Memory plans: optimal offsets over tensor lifetimes, and streaming kernels that write over their dying input.

The safe distance of each in-place kernel is checked three ways: against a replay of the C loops' access order
(here in Python, byte by byte), against the plan of real models (no two live tensors overlap unless a streaming
kernel allows it), and by building and running in-place plans bit-exact against the TFLite interpreter."""

import json
import re
from pathlib import Path

import numpy as np
import pytest

from tests.helpers.paths import CORPUS
from tinymlaas.build.pipeline import compile_model
from tinymlaas.build.request import BuildRequest
from tinymlaas.cli import main
from tinymlaas.errors import ModelTooLarge
from tinymlaas.ir import memory
from tinymlaas.ir.lower import ARENA_ALIGN, KernelCall
from tinymlaas.ops.conv_params import ConvParams

MANIFEST = json.loads((CORPUS / "manifest.json").read_text())
INT8_ARCHITECTURES = sorted(k for k, v in MANIFEST.items()
                            if "file" in v and v.get("architecture") and v["precision"] == "int8")


def _params(n, h, w, c, oh, ow, oc, k, s, pad):
    return ConvParams(n, h, w, c, oh, ow, oc, k, k, s, s, 1, 1, pad, pad, 0, 0, -128, 127, 0).to_array()


# --- the access order of the C loops (gemm_dsp.c), replayed ------------------------------------------------------

def _window(params, q):
    _, h, w, c, oh, ow, _, kh, kw, sh, sw, dh, dw, pt, pl = (int(v) for v in params[:15])
    b, oy, ox = q // (oh * ow), q // ow % oh, q % ow
    taps = []
    for ky in range(kh):
        for kx in range(kw):
            iy, ix = oy * sh - pt + ky * dh, ox * sw - pl + kx * dw
            if 0 <= iy < h and 0 <= ix < w:
                taps.append(((b * h + iy) * w + ix) * c)
    return taps


def _trace(kernel: str, params) -> list[tuple[str, np.ndarray]]:
    """("r" | "w", byte offsets) in the order the kernel touches them (input and output each from 0)."""
    n, c, oh, ow, oc = int(params[0]), int(params[3]), int(params[4]), int(params[5]), int(params[6])
    pixels, events = n * oh * ow, []
    if kernel == "gemm":  # a pair's patches gathered, then its outputs written
        for p in range(0, pixels, 2):
            pair = [q for q in (p, p + 1) if q < pixels]
            events.append(("r", np.concatenate([np.arange(t, t + c) for q in pair for t in _window(params, q)])))
            events.append(("w", np.concatenate([np.arange(q * oc, (q + 1) * oc) for q in pair])))
    elif kernel == "depthwise":  # per pixel, per group of four channels: nine taps read, four outputs written
        for q in range(pixels):
            taps = _window(params, q)
            for g in range(0, c, 4):
                events.append(("r", np.concatenate([np.arange(t + g, t + g + 4) for t in taps])))
                events.append(("w", np.arange(q * c + g, q * c + g + 4)))
    return events


def _clobbers(events, in_bytes: int, distance: int) -> bool:
    """Does any write (output placed `distance` bytes below the input) hit an input byte read later?"""
    last_read = np.full(in_bytes, -1)
    for t, (kind, at) in enumerate(events):
        if kind == "r":
            last_read[at] = t
    for t, (kind, at) in enumerate(events):
        if kind == "w":
            hit = at - distance
            hit = hit[(hit >= 0) & (hit < in_bytes)]
            if (last_read[hit] > t).any():
                return True
    return False


GEOMETRIES = [  # n h w c, oc, kernel size, stride, padding
    (1, 7, 5, 8, 8, 1, 1, 0), (1, 6, 6, 8, 24, 1, 1, 0), (1, 5, 7, 16, 4, 1, 1, 0), (2, 4, 3, 4, 12, 1, 1, 0),
    (1, 9, 9, 4, 8, 3, 2, 1), (1, 8, 6, 8, 8, 3, 1, 1), (1, 10, 7, 12, 6, 3, 2, 0), (1, 5, 5, 4, 16, 3, 1, 1),
]


@pytest.mark.parametrize("n, h, w, c, oc, k, s, pad", GEOMETRIES)
def test_gemm_distance_is_exactly_what_its_loop_order_needs(n, h, w, c, oc, k, s, pad):
    oh, ow = (h + 2 * pad - k) // s + 1, (w + 2 * pad - k) // s + 1
    params = _params(n, h, w, c, oh, ow, oc, k, s, pad)
    events, in_bytes = _trace("gemm", params), n * h * w * c
    distance = memory.gemm_distance(params)
    assert distance is not None
    assert not _clobbers(events, in_bytes, distance)
    assert _clobbers(events, in_bytes, distance - 1)  # tight: one byte closer and an unread input is lost


@pytest.mark.parametrize("n, h, w, c, oc, k, s, pad", [g for g in GEOMETRIES if g[5] == 3])
def test_depthwise_distance_is_safe_for_its_loop_order(n, h, w, c, oc, k, s, pad):
    oh, ow = (h + 2 * pad - k) // s + 1, (w + 2 * pad - k) // s + 1
    params = _params(n, h, w, c, oh, ow, c, k, s, pad)
    assert not _clobbers(_trace("depthwise", params), n * h * w * c, memory.depthwise_distance(params))
    if s == 1:  # same size: in place with no distance loses inputs (a strided layer shrinks: it may not)
        assert _clobbers(_trace("depthwise", params), n * h * w * c, 0)


def test_distances_of_known_layers():
    dw = _params(1, 25, 5, 64, 25, 5, 64, 3, 1, 1)  # KWS's depthwise: one input row and two pixels behind
    assert memory.depthwise_distance(dw) == 7 * 64
    assert memory.gemm_distance(_params(1, 25, 5, 64, 25, 5, 64, 1, 1, 0)) == 0  # pointwise, same depth
    assert memory.gemm_distance(_params(1, 48, 48, 8, 48, 48, 16, 1, 1, 0)) == (48 * 48 - 2) * 8  # expansion
    fc = ConvParams(*[1, 1, 1, 40, 1, 1, 10] + [1] * 6 + [0, 0, 0, 0, -128, 127, 1]).to_array()
    assert memory.gemv_distance(fc) is None  # one row: read whole before anything is written
    fc[0] = 3
    assert memory.gemv_distance(fc) == 10 - 40  # negative: the output may start above the input


@pytest.mark.parametrize("batch, c, oc", [(3, 40, 10), (4, 8, 24), (2, 16, 16)])
def test_gemv_distance_is_exactly_what_its_loop_order_needs(batch, c, oc):
    params = ConvParams(*[batch, 1, 1, c, 1, 1, oc] + [1] * 6 + [0, 0, 0, 0, -128, 127, 1]).to_array()
    events = [e for b in range(batch) for e in (("r", np.arange(b * c, (b + 1) * c)),
                                                 ("w", np.arange(b * oc, (b + 1) * oc)))]
    distance = memory.gemv_distance(params)
    assert not _clobbers(events, batch * c, distance) and _clobbers(events, batch * c, distance - 1)


# --- plans of real models ----------------------------------------------------------------------------------------

def _program(path: Path, target: str, kernels: str = "auto"):
    from tinymlaas.backends.mcu.build import import_model
    from tinymlaas.frontend.tflite import load_tflite
    from tinymlaas.ir.lower import lower
    from tinymlaas.ir.schedule import schedule_for
    from tinymlaas.targets import get_target

    relax_mod, _, _ = import_model(load_tflite(path), get_target(target), "integer", kernels)
    return lower(relax_mod, schedule=schedule_for(None))


def _check_plan(original, planned):
    """Every pair of arena tensors live at one step is disjoint, or the step between them allows the overlap: a
    streaming C kernel called through its in-place twin (output at least its distance below the input), or an
    elementwise TIR kernel without noalias (output at or below the input)."""
    spans: dict[int, list] = {}
    for k, step in enumerate(planned.steps):
        for r in memory.arena_regions(step):
            spans.setdefault(r.tensor, [k, k, r.offset, r.nbytes])[1] = k
            assert r.offset + r.nbytes <= planned.arena_bytes and r.offset % ARENA_ALIGN == 0
    allowed = {}
    for k, (before, after) in enumerate(zip(original.steps, planned.steps)):
        if not isinstance(after, KernelCall):
            continue
        if after.kernel != before.kernel:
            assert after.kernel == memory.STREAMING[before.kernel][1]
            distance = memory.STREAMING[before.kernel][0](planned.constants[after.args[-2].index])
            allowed[(after.args[-1].tensor, after.args[0].tensor)] = distance
        elif not after.extern and not planned.kernels[after.kernel].attrs["tirx.noalias"]:
            assert original.kernels[after.kernel].attrs["tinymlaas.elementwise"]
            for x in after.args[:-1]:
                if x.kind == "arena":
                    allowed[(after.args[-1].tensor, x.tensor)] = 0
    keys = sorted(spans)
    for i, a in enumerate(keys):
        for b in keys[i + 1:]:
            (fa, la, oa, na), (fb, lb, ob, nb) = spans[a], spans[b]
            if fa <= lb and fb <= la and oa < ob + nb and ob < oa + na:
                (y, oy), (x, ox) = ((a, oa), (b, ob)) if (a, b) in allowed else ((b, ob), (a, oa))
                assert (y, x) in allowed, f"tensors {a} and {b} overlap while both live"
                assert spans[x][1] == spans[y][0]  # the input dies where the output is born
                assert allowed[(y, x)] is None or oy + allowed[(y, x)] <= ox


@pytest.mark.parametrize("name", ["kws_ref_model", "vww_96_int8", "pretrainedResnet_quant", "ad01_int8"])
def test_plans_of_the_mlperf_tiny_models_keep_live_tensors_apart(models_dir, name):
    # the C kernels: what a build planned in place takes (its depthwise layers stream; the default's TIR ones not)
    program = _program(models_dir / f"{name}.tflite", "cortex-m4", "dsp")
    plans = {p: memory.plan(program, p) for p in memory.POLICIES}
    for plan in plans.values():
        _check_plan(program, plan)
    assert plans["tvm"] is program
    assert plans["inplace"].arena_bytes <= plans["optimal"].arena_bytes <= program.arena_bytes
    again = memory.plan(program, "inplace")  # the same plan every time
    assert again.steps == plans["inplace"].steps and again.arena_bytes == plans["inplace"].arena_bytes
    if name != "ad01_int8":  # depthwise-separable or residual: in place saves about a third
        assert plans["inplace"].arena_bytes <= 0.7 * program.arena_bytes


@pytest.mark.parametrize("model,target", [("kws_ref_model", "rv32imac"), ("vww_96_int8", "rv32imac"),
                                          ("lstm_unrolled_float32", "rv32imafc")])
def test_reshapes_are_views_and_live_as_long_as_their_readers(models_dir, model, target):
    """A reshape (TFLite's, or the flattened rows around a TIR 1x1 convolution) is no kernel: its output is its
    input's bytes, and every plan, TVM's included, keeps those bytes alive until the output's last reader."""
    path = CORPUS / "models" / f"{model}.tflite" if "lstm" in model else models_dir / f"{model}.tflite"
    program = _program(path, target, "tir")
    kernels = [s.kernel for s in program.steps if isinstance(s, KernelCall)]
    assert kernels and not any(re.match(r"^(reshape|squeeze|expand_dims)\d*$", k) for k in kernels), kernels
    for policy in memory.POLICIES:
        _check_plan(program, memory.plan(program, policy))


def test_the_rows_kernel_is_never_overlapped(models_dir):
    """dsp16 depthwise layers on a DSP core take the rows kernel, which walks channel groups over the whole layer."""
    program = _program(models_dir / "kws_ref_model.tflite", "cortex-m4", "dsp16")
    planned = memory.plan(program, "inplace")
    _check_plan(program, planned)
    kernels = [s.kernel for s in planned.steps if isinstance(s, KernelCall)]
    assert "tinymlaas_depthwise3x3_rows" in kernels and "tinymlaas_depthwise3x3_rows_inplace" not in kernels


def test_an_unknown_policy_is_refused(models_dir):
    with pytest.raises(ValueError, match="memory policy 'smallest'"):
        memory.plan(_program(models_dir / "ad01_int8.tflite", "cortex-m4"), "smallest")


def test_a_greedy_plan_at_the_live_bound_needs_no_integer_program(monkeypatch):
    """An unrolled float GRU: the greedy plan already needs no more than the bytes alive at its busiest step, so it
    is optimal as it is (the integer program is not run: it took 52 s on an unrolled LSTM)."""
    def no_ilp(*_a, **_k):
        raise AssertionError("the integer program ran")

    program = _program(CORPUS / "models" / "gru_unrolled_float32.tflite", "rv32imafc")
    monkeypatch.setattr(memory, "_ilp", no_ilp)
    plan = memory.plan_offsets(program, "optimal")
    assert plan.optimal and plan.arena_bytes == memory.live_bound(memory._tensors(program)) * ARENA_ALIGN


# --- built and run -------------------------------------------------------------------------------------------------

def test_a_model_over_the_ram_budget_is_planned_in_place(models_dir, tmp_path):
    """The default plan is the optimal one (no larger than TVM's); a RAM budget it exceeds gets the in-place plan,
    bit-exact, before any refusal."""
    path = models_dir / "kws_ref_model.tflite"
    base = compile_model(path, "cortex-m4", tmp_path / "tvm", BuildRequest(inputs=3))
    tvm_plan = compile_model(path, "cortex-m4", tmp_path / "tvm-plan", BuildRequest(inputs=3, memory="tvm"))
    assert any(n.startswith("memory: optimal plan") for n in base.notes)
    assert base.sizes["arena"] <= tvm_plan.sizes["arena"]
    assert abs(base.instructions - tvm_plan.instructions) <= 0.001 * tvm_plan.instructions  # offsets only move
    budget = base.sizes["arena"] * 3 // 4
    small = compile_model(path, "cortex-m4", tmp_path / "inplace", BuildRequest(inputs=3, max_ram=budget))
    assert small.verified and small.fidelity["max_lsb_diff"] == 0 and small.instructions_repeat_exact
    assert small.sizes["ram_model"] <= budget and small.sizes["arena"] <= 0.67 * base.sizes["arena"]
    assert "_inplace(" in (tmp_path / "inplace" / "tinymlaas_model.c").read_text()
    assert any("over the budget" in n for n in small.notes) and any("inplace plan" in n for n in small.notes)
    assert any("with the C kernels" in n for n in small.notes)  # the default's TIR depthwise layers do not stream
    # the C kernels only on the layers the plan overlaps, the default's elsewhere, in an arena as small as on the C
    # kernels everywhere
    all_c = compile_model(path, "cortex-m4", tmp_path / "all-c", BuildRequest(inputs=3, max_ram=budget, kernels="dsp"))
    assert isinstance(small.kernels, dict) and set(small.kernels.values()) == {"dsp"}, small.kernels
    assert small.sizes["arena"] <= all_c.sizes["arena"] and small.instructions <= all_c.instructions
    with pytest.raises(ModelTooLarge, match=r"RAM [\d,]+ B > 4,096 B"):  # in place is not enough: the sizes named
        compile_model(path, "cortex-m4", tmp_path / "no", BuildRequest(inputs=3, max_ram=4096))


def test_an_in_place_build_keeps_the_default_kernels_where_layers_do_not_stream(models_dir, tmp_path):
    """VWW in place: the plan on the C kernels everywhere overlaps a few layers; the build keeps the C kernels there
    and the default's elsewhere (TIR depthwise, 2x faster on Cortex-M4) in an arena no larger, bit-exact."""
    path = models_dir / "vww_96_int8.tflite"
    r = compile_model(path, "cortex-m4", tmp_path / "b", BuildRequest(inputs=1, memory="inplace"))
    assert r.verified and r.fidelity["max_lsb_diff"] == 0
    assert r.sizes["arena"] <= memory.plan(_program(path, "cortex-m4", "dsp"), "inplace").arena_bytes
    driver = (tmp_path / "b" / "tinymlaas_model.c").read_text()
    assert "tinymlaas_depthwise3x3_w8_inplace(" in driver  # a streamed depthwise layer
    assert re.search(r"tinymlaas_k_op\d+_depthwise_conv_2d\w*\(", driver)  # and TIR's where a layer does not stream
    streamed = {i for i, k in r.kernels.items() if k == "dsp"}
    assert streamed and len(streamed) < 10  # a few of VWW's 28 layers


@pytest.mark.slow
def test_a_residual_model_over_the_ram_budget_overlaps_its_additions(models_dir, tmp_path):
    """ResNet-8's peak is at its residual additions: in place there, the kernels rebuilt without noalias."""
    path = models_dir / "pretrainedResnet_quant.tflite"
    r = compile_model(path, "rv32imac", tmp_path / "b", BuildRequest(inputs=3, max_ram=40 * 1024))
    assert r.verified and r.fidelity["max_lsb_diff"] == 0 and r.sizes["ram_model"] <= 40 * 1024
    assert any("over the budget" in n for n in r.notes)


@pytest.mark.parametrize("key", [
    pytest.param(k, marks=[] if k in ("ds_cnn_kws_int8", "mobilenet_v2_int8") else pytest.mark.slow)
    for k in INT8_ARCHITECTURES])
@pytest.mark.parametrize("target", ["cortex-m4", pytest.param("rv32imac", marks=pytest.mark.slow)])
def test_in_place_plans_of_models_not_tuned_for_are_bit_exact(key, target, tmp_path):
    r = compile_model(CORPUS / MANIFEST[key]["file"], target, tmp_path / "b", BuildRequest(inputs=3, memory="inplace"))
    assert r.verified, r.fidelity
    if r.fidelity["kind"] != "float":  # a graph with float parts (a transformer's softmax) is checked within tolerance
        assert r.fidelity["max_lsb_diff"] == 0, r.fidelity


def test_cli_takes_a_memory_plan_and_refuses_an_unknown_one(models_dir, tmp_path, capsys):
    assert main(["compile", str(models_dir / "ad01_int8.tflite"), "-t", "rv32imac", "-n", "2", "--memory", "inplace",
                 "-o", str(tmp_path / "o")]) == 0
    assert "memory: inplace plan" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        main(["compile", str(models_dir / "ad01_int8.tflite"), "-t", "rv32imac", "--memory", "smallest"])
    assert e.value.code == 2
