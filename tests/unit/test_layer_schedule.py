"""Per-layer schedule spaces: their size, validity in TIR, the checks that refuse a point of another layer, and the
variants that carry them."""

import json

import numpy as np
import pytest

from tinymlaas.build.request import InvalidRequest
from tinymlaas.ir import schedule as default_schedules
from tinymlaas.ir.layer_schedule import KernelShape, LayerSchedule, apply, check, features, space_of
from tinymlaas.search.space import Variant, load_variant

POINTWISE = KernelShape("conv", pixels=5, channels=64, reduction=(1, 1, 64), zero_point=True)
CONV_PADDED = KernelShape("conv", pixels=7, channels=6, reduction=(3, 3, 5), zero_point=True)
DEPTHWISE = KernelShape("depthwise", pixels=5, channels=64, reduction=(3, 3), zero_point=True)
DENSE = KernelShape("dense", pixels=1, channels=12, reduction=(64,), zero_point=False)
# on a core with SMLAD, unpadded: the tensorized inner products (int8 and widened weights) join the space
POINTWISE_DSP = KernelShape("conv", pixels=5, channels=64, reduction=(1, 1, 64), zero_point=True, dsp=True,
                            padded=False)
DENSE_DSP = KernelShape("dense", pixels=1, channels=12, reduction=(64,), zero_point=True, dsp=True, padded=False)


def test_a_typical_convolution_has_over_a_thousand_distinct_schedules_and_the_default_first():
    space = space_of(POINTWISE)
    assert len(space) >= 1000 and len(set(space)) == len(space) and space[0] == LayerSchedule()
    assert len(space_of(DEPTHWISE)) >= 500
    # what a layer cannot take is not in its space: tiles wider than it, zero-point folding without a zero point
    assert all(s.oc_block <= 12 and not s.fold_zero_point for s in space_of(DENSE))
    assert all(s.px_block <= 5 and 64 % s.reduction_unroll == 0 for s in space)
    assert not any(s.dsp_dot for s in space)  # no SMLAD on this core
    dots = [s for s in space_of(POINTWISE_DSP) if s.dsp_dot]
    assert dots and all(s.fold_zero_point and 5 % s.px_block == 0 and 64 % s.oc_block == 0 for s in dots)
    assert any(s.wide_weights for s in dots) and not any(s.wide_weights and not s.dsp_dot for s in space)


def test_check_refuses_a_schedule_of_another_layer():
    assert check(POINTWISE, LayerSchedule(oc_block=16, px_block=5)) is None
    assert "not in the space" in check(DENSE, LayerSchedule(oc_block=16))  # 16 channels of 12
    assert "not in the space" in check(DENSE, LayerSchedule(fold_zero_point=True))  # no zero point to fold


def test_features_are_numbers_for_every_point():
    for s in space_of(CONV_PADDED)[:50]:
        f = features(CONV_PADDED, s)
        assert all(isinstance(v, (int, float)) for v in f.values()) and f["tile"] == s.oc_block * s.px_block


def _kernel(shape: KernelShape, fold: bool, lanes: bool = False, proven: bool = False):
    """The TE kernel of a layer of this shape, as the converters emit it (ops/int8_te.py)."""
    from tvm import te

    from tinymlaas.ops import int8_te

    oc = shape.channels
    vectors = [te.placeholder((oc,), "int32", "bias"), te.placeholder((oc,), "int32", "mult"),
               te.placeholder((oc, 2) if proven else (oc,), "int32", "shift")]
    common = {"zp_out": 2, "act_min": -128, "act_max": 127, "fold_zero_point": fold, "lanes": lanes,
              "proven": proven}
    wdtype = "int16" if lanes else "int8"
    if shape.family == "dense":
        x = te.placeholder((shape.pixels, shape.reduction[0]), "int8", "x")
        w = te.placeholder((oc, shape.reduction[0]), wdtype, "w")
        out = int8_te.fully_connected_s8(x, w, *vectors, zp_in=-3, zp_weight=0, **common)
    elif shape.family == "conv":
        kh, kw, c = shape.reduction
        x = te.placeholder((1, 9, shape.pixels, c), "int8", "x")
        w = te.placeholder((oc, kh, kw, c), wdtype, "w")
        pad = (kh // 2, kw // 2, kh // 2, kw // 2) if shape.padded else (0, 0, 0, 0)
        out = int8_te.conv2d_s8(x, w, *vectors, stride=(1, 1), dilation=(1, 1), padding=pad, zp_in=-3, **common)
    else:
        kh, kw = shape.reduction
        x = te.placeholder((1, 9, shape.pixels, oc), "int8", "x")
        w = te.placeholder((1, kh, kw, oc), "int8", "w")
        common.pop("lanes")
        out = int8_te.depthwise_conv2d_s8(x, w, *vectors, stride=(1, 1), dilation=(1, 1), depth_multiplier=1,
                                          padding=(kh // 2, kw // 2, kh // 2, kw // 2), zp_in=-3, **common)
    return te.create_prim_func([x, w, *vectors, out])


@pytest.mark.parametrize("shape", [POINTWISE, CONV_PADDED, DEPTHWISE, DENSE, POINTWISE_DSP, DENSE_DSP],
                         ids=["conv", "conv_padded", "depthwise", "dense", "conv_dsp", "dense_dsp"])
def test_random_points_of_each_space_schedule_in_tir(shape):
    from tvm import s_tir

    space = space_of(shape)
    rng = np.random.default_rng(7)
    funcs = {(fold, lanes, proven): _kernel(shape, fold, lanes, proven)
             for fold in (False, True) for lanes in (False, True) for proven in (False, True)}
    picks = list(rng.choice(len(space), size=min(25, len(space)), replace=False))
    picks += [k for k, s in enumerate(space) if s.dsp_dot][:3]  # the tensorized points, where there are
    for k in picks:
        s = space[k]
        sch = s_tir.Schedule(funcs[s.fold_zero_point, s.wide_weights, s.proven_requant])
        default_schedules.inline_injective(sch)
        assert apply(sch, s), s
        default_schedules.keep_stages_at_consumer(sch)


def test_variants_carry_layer_schedules_and_old_records_read_the_same(tmp_path):
    v = Variant(kernels=((2, "tir"),), layers=((2, LayerSchedule(oc_block=4, px_block=2, fold_zero_point=True)),))
    assert Variant.from_dict(json.loads(json.dumps(v.to_dict()))) == v
    assert "layers" not in Variant().to_dict()  # a variant without layer schedules keeps its old key
    path = tmp_path / "v.json"
    path.write_text(json.dumps(v.to_dict()))
    assert load_variant(path) == v
    path.write_text(json.dumps({**v.to_dict(), "layers": {"2": {"oc_blocks": 4}}}))
    with pytest.raises(InvalidRequest, match="oc_blocks"):
        load_variant(path)
    path.write_text(json.dumps({**v.to_dict(), "layers": {"two": {}}}))
    with pytest.raises(InvalidRequest, match="operator indices"):
        load_variant(path)


def _lowered_script(shape: KernelShape, schedule: LayerSchedule) -> str:
    """The kernel scheduled as `schedule`, through TVM's lowering (LoopPartition included), as TVMScript."""
    import tvm
    from tvm import s_tir, tirx

    sch = s_tir.Schedule(_kernel(shape, schedule.fold_zero_point, proven=schedule.proven_requant))
    assert apply(sch, schedule)
    t = s_tir.transform
    passes = [t.CanonicalizeLoop(), t.LowerInitBlock(), t.PlanAndUpdateBufferAllocationLocation(),
              t.ConvertBlocksToOpaque(), t.CompactBufferAllocation(), t.LowerMatchBuffer(), t.StmtSimplify(),
              t.LowerOpaqueBlock(), tirx.transform.FlattenBuffer(), tirx.transform.NarrowDataType(32),
              t.LoopPartition(), tirx.transform.UnrollLoop(), tirx.transform.StmtSimplify()]  # as tvm.tirx.build
    with tvm.transform.PassContext(opt_level=3):
        return tvm.transform.Sequential(passes)(sch.mod)["main"].script()


def test_a_tile_that_does_not_divide_its_axis_tests_bounds_only_in_the_last_tile():
    # 5 pixels in tiles of 4: the full tile runs without a bounds test per element (its accumulators stay in
    # registers); only the last, one-pixel tile is separate code
    tiled = LayerSchedule(oc_block=4, px_block=4, fold_zero_point=True)
    script = _lowered_script(POINTWISE, tiled)
    assert " if " not in script and "if x" not in script
    assert script.count("acc[15] = 0") == 1  # one full 4x4 tile's code, the tail a tile of its own


def test_split_borders_leaves_no_padding_test_in_the_interior():
    plain = LayerSchedule(oc_block=1, px_block=5, unroll_taps=True, fold_zero_point=True, proven_requant=True)
    split = LayerSchedule(**{**plain.to_dict(), "split_borders": True})
    assert split in space_of(DEPTHWISE) and plain in space_of(DEPTHWISE)
    assert _lowered_script(DEPTHWISE, plain).count("if_then_else") > 0
    assert _lowered_script(DEPTHWISE, split).count("if_then_else") == 0
    # an unpadded layer has no borders: no such point in its space
    assert not any(s.split_borders for s in space_of(POINTWISE_DSP))


@pytest.mark.parametrize("shape", [POINTWISE, CONV_PADDED, DEPTHWISE, DENSE, POINTWISE_DSP, DENSE_DSP])
@pytest.mark.parametrize("accumulators", [8, 16])
def test_register_blocked_seeds_are_points_of_the_space_within_the_register_file(shape, accumulators):
    from tinymlaas.ir.layer_schedule import register_blocked

    space = space_of(shape)
    seeds = register_blocked(shape, space, accumulators)
    assert 1 <= len(seeds) <= 2 and all(s in space for s in seeds)
    assert len({(s.oc_block, s.px_block) for s in seeds}) == len(seeds)  # two different tile shapes
    assert all(s.oc_block * s.px_block <= accumulators and s.unroll_tile for s in seeds)
    biggest = max(s.oc_block * s.px_block for s in space if s.oc_block * s.px_block <= accumulators
                  and s.dsp_dot == shape.dsp)  # on a DSP core the largest tile the SMLAD product takes
    assert seeds[0].oc_block * seeds[0].px_block == (biggest if shape.family != "depthwise" else seeds[0].px_block)
    if shape.family == "depthwise":
        assert all(s.oc_block == 1 and s.unroll_taps for s in seeds)
    if shape.dsp:
        assert all(s.dsp_dot and s.wide_weights for s in seeds)
    assert all(s.fold_zero_point == shape.zero_point for s in seeds)
