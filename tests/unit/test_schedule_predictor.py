"""The schedule predictor ranks the schedules of a layer it never saw: trained on other layers whose costs differ
by orders of magnitude, it must order one layer's schedules by what they cost relative to each other."""

import numpy as np

from tinymlaas.ir.layer_schedule import KernelShape, space_of
from tinymlaas.search.tuning import SchedulePredictor


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


def test_ranks_a_layer_it_never_saw_from_layers_of_other_sizes():
    rng = np.random.default_rng(0)
    train = []
    for shape in SHAPES:  # 40 random schedules a layer, costs from 10^4 to 10^8
        space = space_of(shape)
        for k in rng.choice(len(space), size=min(40, len(space)), replace=False):
            train.append((shape, space[k], _cost(shape, space[k])))
    predictor = SchedulePredictor(0).fit(train)
    space = space_of(HELD_OUT)
    sample = [space[k] for k in rng.choice(len(space), size=120, replace=False)]
    truth = np.array([_cost(HELD_OUT, s) for s in sample])
    predicted = predictor.predict(HELD_OUT, sample)
    assert _pairwise(predicted, truth) >= 0.85
    best = int(np.argmin(truth))
    assert int(np.where(np.argsort(predicted, kind="stable") == best)[0][0]) < len(sample) * 0.05  # top 5%


def test_too_few_samples_are_refused():
    import pytest

    with pytest.raises(ValueError, match="too few"):
        SchedulePredictor(0).fit([(HELD_OUT, space_of(HELD_OUT)[0], 1.0)] * 3)
