"""Layer schedules built for real: random points of each layer's space stay bit-exact in the emulator, the tune
strategy repeats for a seed, reuses its log, and its variant rebuilds to the same count."""

import json

import numpy as np
import pytest

from tests.helpers import quantized_layers as layers
from tests.helpers.cli import cli
from tinymlaas.build.pipeline import compile_model
from tinymlaas.build.request import BuildRequest
from tinymlaas.frontend.cleanup import clean
from tinymlaas.frontend.tflite import load_tflite
from tinymlaas.ir.layer_schedule import LayerSchedule, kernel_shape, space_of
from tinymlaas.search.result import write_result
from tinymlaas.search.search import search
from tinymlaas.search.space import Variant
from tinymlaas.search.tuning import layer_groups
from tinymlaas.targets import get_target

# odd shapes: padding, stride 2, channels that no tile divides, a batch of rows for the dense layer
LAYERS = {
    "conv": lambda: layers.conv2d(3, [1, 9, 7, 5], 6, 3, 1, 0, 1),
    "conv_stride2": lambda: layers.conv2d(4, [1, 10, 11, 3], 7, 3, 2, 0, 3),
    "depthwise": lambda: layers.depthwise(5, [1, 8, 9, 12], 1, 3, 2, 0, 1),
    "dense": lambda: layers.fully_connected(6, [3, 20], 10, 0),
    "pointwise": lambda: layers.conv2d(7, [1, 6, 5, 12], 8, 1, 1, 0, 1),
}


def _model(tmp_path, name):
    path = tmp_path / f"{name}.tflite"
    path.write_bytes(LAYERS[name]())
    return path


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_random_schedules_of_a_layer_build_bit_exact(tmp_path, name):
    path = _model(tmp_path, name)
    graph = clean(load_tflite(path).graph, shapes_from_interpreter=True)
    op = graph.operators[0]
    space = space_of(kernel_shape(graph, op, get_target("rv32imac")))
    rng = np.random.default_rng(11)
    picks = [space[k] for k in rng.choice(len(space), size=3, replace=False)]
    picks.append(next(s for s in space if s.fold_zero_point and s.oc_block > 1))  # the folded bias, tiled
    counts = set()
    for k, schedule in enumerate(picks):
        v = Variant(kernels=((op.index, "tir"),), layers=((op.index, schedule),))
        r = compile_model(path, "rv32imac", tmp_path / f"b{k}", BuildRequest(inputs=3, variant=v))
        assert r.verified and r.fidelity["max_lsb_diff"] == 0, schedule
        assert r.variant["layers"] == {str(op.index): schedule.to_dict()}
        counts.add(r.instructions)
    assert len(counts) > 1  # the schedules are really different code


@pytest.mark.parametrize("name", ["pointwise", "dense"])
def test_tensorized_smlad_schedules_build_bit_exact_on_a_dsp_core(tmp_path, name):
    path = _model(tmp_path, name)
    graph = clean(load_tflite(path).graph, shapes_from_interpreter=True)
    op = graph.operators[0]
    dots = [s for s in space_of(kernel_shape(graph, op, get_target("cortex-m4"))) if s.dsp_dot]
    assert not any(s.dsp_dot for s in space_of(kernel_shape(graph, op, get_target("cortex-m3"))))  # no SMLAD
    picks = [next(s for s in dots if s.wide_weights == wide and s.proven_requant == proven and s.oc_block > 1)
             for wide in (False, True) for proven in (False, True)]
    for k, schedule in enumerate(picks):
        v = Variant(kernels=((op.index, "tir"),), layers=((op.index, schedule),))
        r = compile_model(path, "cortex-m4", tmp_path / f"b{k}", BuildRequest(inputs=3, variant=v))
        assert r.verified and r.fidelity["max_lsb_diff"] == 0, schedule


@pytest.mark.parametrize("target", ["rv32imac", "cortex-m4"])
def test_pointwise_tiles_span_rows_bit_exact(tmp_path, target):
    """A 1x1 stride-1 convolution runs over its 6 rows of 5 pixels as one axis of 30: tiles of 4 and 8 pixels cross
    rows (with a partial last tile), and the proven requantization takes each core's rounding form."""
    path = _model(tmp_path, "pointwise")
    graph = clean(load_tflite(path).graph, shapes_from_interpreter=True)
    op = graph.operators[0]
    space = space_of(kernel_shape(graph, op, get_target(target)))
    assert kernel_shape(graph, op, get_target(target)).pixels == 30
    picks = [next(s for s in space if (s.px_block, s.oc_block, s.proven_requant, s.fold_zero_point, s.unroll_tile,
                                       s.dsp_dot) == (px, oc, True, True, True, False)) for px, oc in ((4, 4), (8, 2))]
    picks += [s for s in space if s.dsp_dot and s.px_block == 3 and s.oc_block == 4 and s.proven_requant][:1]
    assert len(picks) == (3 if target == "cortex-m4" else 2)
    for k, schedule in enumerate(picks):
        v = Variant(kernels=((op.index, "tir"),), layers=((op.index, schedule),))
        r = compile_model(path, target, tmp_path / f"b{k}", BuildRequest(inputs=3, variant=v))
        assert r.verified and r.fidelity["max_lsb_diff"] == 0, schedule


def test_a_c_kernel_writing_the_model_output_is_attributed_to_its_operator(tmp_path):
    from tinymlaas.backends.mcu.profile import profile_model

    # (unattributed, the tuner never measured the C kernels of a model's last layer and could not choose them)
    for kernels in ("dsp", "dsp16", "tir"):
        prof = profile_model(_model(tmp_path, "dense"), "cortex-m4", tmp_path / kernels, kernels=kernels)
        assert [s.op_index for s in prof.steps if s.kernel != "copy"] == [0], kernels


def test_a_schedule_for_the_wrong_layer_or_kernel_is_refused(tmp_path):
    path = _model(tmp_path, "dense")
    wrong = tmp_path / "wrong.json"
    wrong.write_text(json.dumps(Variant(kernels=((0, "tir"),), layers=((0, LayerSchedule(oc_block=16)),)).to_dict()))
    r = cli("compile", path, "--target", "rv32imac", "--variant", wrong, "--out", tmp_path / "o")
    assert r.returncode == 2 and "--variant" in r.stderr and "not in the space" in r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    c_kernel = tmp_path / "c.json"
    c_kernel.write_text(json.dumps(Variant(kernels=((0, "dsp"),), layers=((0, LayerSchedule(oc_block=2)),)).to_dict()))
    r = cli("compile", path, "--target", "rv32imac", "--variant", c_kernel, "--out", tmp_path / "o")
    assert r.returncode == 2 and "for the tir implementation" in r.stderr
    missing = tmp_path / "missing.json"
    missing.write_text(json.dumps({"kernels": {"0": "tir"}, "layers": {"7": {}}}))
    r = cli("compile", path, "--target", "rv32imac", "--variant", missing, "--out", tmp_path / "o")
    assert r.returncode == 2 and "operator #7" in r.stderr and "does not exist" in r.stderr


def test_tune_repeats_for_a_seed_reuses_its_log_and_rebuilds_its_variant(tmp_path, monkeypatch):
    path = _model(tmp_path, "conv")
    graph = clean(load_tflite(path).graph, shapes_from_interpreter=True)
    assert len(layer_groups(graph, get_target("rv32imac"))) == 1

    def tuned(log: str, out: str, budget: int = 7, workers: int = 1):
        monkeypatch.setenv("TINYMLAAS_MEASUREMENTS", str(tmp_path / log))
        return search(path, "rv32imac", tmp_path / out, BuildRequest(budget=budget, strategy="tune", seed=5,
                                                                     workers=workers))

    one, two = tuned("a.db", "one"), tuned("b.db", "two", workers=2)  # the same on a pool of two
    assert [p.variant for p in one.points] == [p.variant for p in two.points]
    assert [p.objectives() for p in one.points] == [p.objectives() for p in two.points]
    history = [json.loads((tmp_path / run / "tuning_history.json").read_text()) for run in ("one", "two")]
    assert history[0] == history[1] and len(history[0]["history"]) == 7 - 2  # every build but the two points
    best, default = one.points[one.chosen], one.points[0]
    assert best.verified and best.fidelity_loss == 0 and best.cost <= default.cost
    assert "1 layer signatures" in one.notes[0] and "0 of 1 signatures had records" in one.notes[1]

    again = tuned("a.db", "again")  # the log knows this layer: the best it holds, no profiled build
    assert "1 of 1 signatures had records" in again.notes[1]
    assert json.loads((tmp_path / "again" / "tuning_history.json").read_text())["history"] == []
    assert again.points[again.chosen].cost == best.cost

    write_result(one, tmp_path / "front")
    front = tmp_path / "front" / "front.json"
    r = compile_model(path, "rv32imac", tmp_path / "rebuilt", BuildRequest(inputs=3, seed=5, variant_file=str(front)))
    assert r.verified and r.instructions == best.instructions


def test_the_tuning_log_keeps_records_of_another_code_generator_apart():
    from dataclasses import replace

    from tinymlaas.search.tuning import log_target

    rv32 = get_target("rv32imac")
    assert log_target(rv32) == log_target(get_target("rv32imac")) and log_target(rv32).startswith("rv32imac#")
    # another LLVM CPU (its scheduling model changes the code) or other C flags: other records
    assert log_target(replace(rv32, llvm={**rv32.llvm, "mcpu": "generic-rv32"})) != log_target(rv32)
    assert log_target(replace(rv32, cc_flags=(*rv32.cc_flags, "-O2"))) != log_target(rv32)
