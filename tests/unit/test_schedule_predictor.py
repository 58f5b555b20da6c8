"""The schedule predictor ranks the schedules of a layer it never saw: trained on other layers whose costs differ
by orders of magnitude, it must order one layer's schedules by what they cost relative to each other. And the
features it learns from say what a schedule does to the code (per MAC; where the padding's tests run)."""

import json

import numpy as np
import pytest

from tinymlaas.ir.layer_schedule import KernelShape, LayerSchedule, space_of
from tinymlaas.search.features import schedule_features
from tinymlaas.search.predictor import SchedulePredictor, TunedLayer


def _cost(shape: KernelShape, s) -> float:
    """A cost with the structure of measured ones (a stand-in for the emulator's counts: a fast test): MACs, the
    padded tiles' extra work, operand loads, a reduction-loop trip overhead, spills past the register file."""
    red = int(np.prod(shape.reduction))
    px_tiles, oc_tiles = -(-shape.pixels // s.px_block), -(-shape.channels // s.oc_block)
    tiles = px_tiles * oc_tiles
    live = s.oc_block * s.px_block + s.oc_block + s.px_block
    trips = tiles * red / min(s.reduction_unroll, shape.reduction[-1])
    work = tiles * s.oc_block * s.px_block * red * 2 + tiles * red * (s.oc_block + s.px_block) + 3 * trips
    return work * (1 + 0.15 * max(0, live - 24)) * (0.9 if s.unroll_tile else 1.0)


SHAPES = [KernelShape("conv", pixels=p, channels=c, reduction=(k, k, cin), zero_point=True)
          for p, c, k, cin in [(48, 16, 1, 8), (24, 32, 1, 16), (12, 64, 1, 32), (6, 128, 1, 128), (32, 16, 3, 3),
                               (16, 32, 3, 16), (8, 64, 3, 32)]]
HELD_OUT = KernelShape("conv", pixels=25, channels=64, reduction=(1, 1, 64), zero_point=True)


def _pairwise(predicted: np.ndarray, truth: np.ndarray) -> float:
    i, j = np.triu_indices(len(truth), 1)
    differ = truth[i] != truth[j]
    return float(np.mean(np.sign(predicted[i] - predicted[j])[differ] == np.sign(truth[i] - truth[j])[differ]))


def _held_out_quality(shuffle: bool) -> tuple[float, int, int]:
    """Pairwise accuracy and the truly best's place on a held-out layer's 120 random schedules (and their count),
    for a predictor trained on 40 random schedules of each other layer; shuffle: the costs permuted within each
    layer before training (a predictor that learned nothing about schedules)."""
    rng = np.random.default_rng(0)
    train = []
    for shape in SHAPES:  # costs from 10^4 to 10^8
        space = space_of(shape)
        picks = [space[k] for k in rng.choice(len(space), size=min(40, len(space)), replace=False)]
        costs = [_cost(shape, s) for s in picks]
        if shuffle:
            costs = list(rng.permutation(costs))
        train += [(shape, s, c) for s, c in zip(picks, costs)]
    predictor = SchedulePredictor(0, members=4).fit(train, rounds=200)
    space = space_of(HELD_OUT)
    sample = [space[k] for k in rng.choice(len(space), size=120, replace=False)]
    truth = np.array([_cost(HELD_OUT, s) for s in sample])
    predicted = predictor.predict(HELD_OUT, sample)
    place = int(np.where(np.argsort(predicted, kind="stable") == int(np.argmin(truth)))[0][0])
    return _pairwise(predicted, truth), place, len(sample)


def test_ranks_a_layer_it_never_saw_from_layers_of_other_sizes():
    pairwise, place, n = _held_out_quality(shuffle=False)
    assert pairwise >= 0.9
    assert place < n * 0.03  # the truly best in the predicted top 3%


def test_a_predictor_that_learned_nothing_fails_the_same_check():
    """The check above can fail: trained on costs shuffled within each layer, the same predictor ranks at chance."""
    pairwise, _, _ = _held_out_quality(shuffle=True)
    assert pairwise < 0.7


def test_too_few_samples_are_refused():
    with pytest.raises(ValueError, match="too few"):
        SchedulePredictor(0).fit([(HELD_OUT, space_of(HELD_OUT)[0], 1.0)] * 3)


KWS_DEPTHWISE = {"opcode": "DEPTHWISE_CONV_2D", "input": [1, 25, 5, 64], "weights": [1, 3, 3, 64],
                 "output": [1, 25, 5, 64], "options": {"padding": 0, "strideH": 1, "strideW": 1}}
DW_SHAPE = KernelShape("depthwise", pixels=5, channels=64, reduction=(3, 3), zero_point=True)


@pytest.mark.parametrize(("px_block", "split", "tested"), [
    (1, False, 1.0),  # unsplit: every read tests the padding
    (1, True, 1 - (23 / 25) * (3 / 5)),  # split: the first and last rows, the first and last columns
    (5, True, 1.0),  # one pixel tile spans the row: it meets the padding, so every read of it tests
])
def test_the_padding_tests_run_where_the_borders_are(px_block, split, tested):
    s = LayerSchedule(px_block=px_block, split_borders=split)
    f = schedule_features(DW_SHAPE, s, KWS_DEPTHWISE)
    assert f["border_share"] == pytest.approx(1 - (23 / 25) * (3 / 5))
    assert f["tested_share"] == pytest.approx(tested)


def test_the_code_a_schedule_implies_per_mac():
    shape = KernelShape("conv", pixels=125, channels=64, reduction=(1, 1, 64), zero_point=True, padded=False)
    plain = schedule_features(shape, LayerSchedule())
    tiled = schedule_features(shape, LayerSchedule(oc_block=2, px_block=2, fold_zero_point=True))
    assert plain["loads_pm"] == 2.0 and tiled["loads_pm"] == pytest.approx(4 / 4)  # 2 inputs + 2 weights, 4 MACs
    assert plain["zp_sub_pm"] == 1.0 and tiled["zp_sub_pm"] == 0.0  # the zero point folded into the bias
    assert plain["tests_pm"] == 0.0 and plain["tested_share"] == 0.0  # an unpadded layer tests nothing
    assert tiled["trips_pm"] == pytest.approx(1 / 4) and tiled["spill_arm_pm"] == 0.0
    wide = schedule_features(shape, LayerSchedule(oc_block=16, px_block=5))  # 80 accumulators: spilled on Arm
    assert wide["spill_arm_pm"] > 0 and wide["spill_riscv_pm"] > 0


def test_layers_of_one_kernel_shape_and_different_geometry_are_told_apart():
    other = {**KWS_DEPTHWISE, "options": {"padding": 1, "strideH": 1, "strideW": 1}}  # VALID: no padding
    a = TunedLayer(DW_SHAPE, json.dumps(KWS_DEPTHWISE, sort_keys=True))
    b = TunedLayer(DW_SHAPE, json.dumps(other, sort_keys=True))
    assert a != b and a.layer["options"]["padding"] == 0
    assert schedule_features(DW_SHAPE, LayerSchedule(), b.layer)["tested_share"] == 0.0
