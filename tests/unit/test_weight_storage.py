"""Weights kept at their stored width (ir/weight_storage.py): which float32 constants go back to float16 or int8, and
the kernels' widening of a half, run on every half there is."""

import numpy as np
import pytest

from tinymlaas.ir.weight_storage import HALF_WIDENINGS, StoredWeights, narrowed, widen_half

RNG = np.random.default_rng(5)


def test_float16_weights_go_back_to_their_bits():
    h = RNG.standard_normal((3, 3, 8, 4)).astype(np.float16)
    form = narrowed(h.astype(np.float32), StoredWeights(half=True))
    assert form.kind == "float16" and form.values.dtype == np.int16
    assert np.array_equal(form.values.view(np.float16), h)
    # one value off the float16 grid: the tensor stays float32
    off = h.astype(np.float32)
    off[1, 2, 3, 0] += 1e-6
    assert narrowed(off, StoredWeights(half=True)) is None
    # a model that stores no float16 weights keeps float32 ones, exact in float16 or not
    assert narrowed(h.astype(np.float32), StoredWeights()) is None


def test_int8_weights_found_along_their_moved_channel_axis():
    """The importer permutes weights (OHWI -> HWIO): the scales follow their channel to whichever axis it moved."""
    q = RNG.integers(-127, 128, (6, 3, 3, 5)).astype(np.int8)
    s = (RNG.random(6) * 0.01 + 1e-3).astype(np.float32)
    w = (q.astype(np.float64) * s.astype(np.float64)[:, None, None, None]).astype(np.float32)
    hwio = np.ascontiguousarray(w.transpose(1, 2, 3, 0))
    form = narrowed(hwio, StoredWeights(scales=(np.float32([0.5, 0.25]), s)))
    assert form.kind == "int8" and form.axis == 3
    assert np.array_equal(form.values, q.transpose(1, 2, 3, 0)) and np.array_equal(form.scale, s)
    # the kernel's float32 multiply gives the importer's value back, bit for bit
    widened = form.values.astype(np.float32) * form.scale.reshape(1, 1, 1, 6)
    assert np.array_equal(widened.view(np.uint32), hwio.view(np.uint32))
    # other scales do not fit these values
    assert narrowed(hwio, StoredWeights(scales=(s[::-1].copy(),))) is None


def test_small_or_not_exact_constants_stay_float32():
    zeros = np.zeros(64, np.float32)  # a bias of zeros is exactly q * s, but a scale per element costs more
    assert narrowed(zeros, StoredWeights(scales=(np.ones(64, np.float32),))) is None
    assert narrowed(np.ones(8, np.float32), StoredWeights(half=True)) is None  # below MIN_ELEMENTS
    inf = np.ones(64, np.float32)
    inf[3] = np.inf
    assert narrowed(inf, StoredWeights(half=True)) is None


@pytest.mark.parametrize("half", HALF_WIDENINGS)
def test_every_half_widens_exactly(half):
    """All 63,488 finite halves (normals, subnormals, both zeros) through the kernel's expression, compiled by LLVM
    for this machine: float32 bit patterns equal numpy's conversion."""
    import tvm
    from tvm import te

    bits = np.arange(-32768, 32768, dtype=np.int32).astype(np.int16)
    bits = bits[np.isfinite(bits.view(np.float16))]
    h = te.placeholder(bits.shape, "int16", name="h")
    out = te.compute(bits.shape, lambda i: widen_half(h[i], half), name="out")
    lib = tvm.tirx.build(te.create_prim_func([h, out]), target="llvm")
    dev = tvm.cpu()
    got = tvm.runtime.tensor(np.zeros(bits.shape, np.float32), dev)
    lib(tvm.runtime.tensor(bits, dev), got)
    want = bits.view(np.float16).astype(np.float32)
    assert np.array_equal(got.numpy().view(np.uint32), want.view(np.uint32))
