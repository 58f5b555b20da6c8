"""The host backend's record of how a build runs (CUDA graphs read off the lowered module) and the graph rewrite
ahead of float16 tuning (clip as bounds), checked without a GPU: the Relax passes need a CUDA target, not a device."""

import numpy as np
import pytest

from tinymlaas.backends.host.options import HostOptions
from tinymlaas.backends.host.passes import (
    build_mode,
    lowering_config,
    lowering_pipeline,
    optimize,
    split_k_preparation,
    tuning_preparation,
)
from tinymlaas.targets import get_target


def _cuda_target():
    import tvm

    return tvm.target.Target({"kind": "cuda", "arch": "sm_90", "max_threads_per_block": 1024,
                              "max_shared_memory_per_block": 49152, "thread_warp_size": 32})


def _conv_net(depth: int = 3, relu6: bool = False):
    """conv -> activation, `depth` times, float32 NCHW, constant weights."""
    from tvm import relax
    from tvm.script import relax as R

    rng = np.random.default_rng(0)
    bb = relax.BlockBuilder()
    x = relax.Var("x", R.Tensor((1, 8, 16, 16), "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            y = x
            for _ in range(depth):
                w = relax.const(rng.standard_normal((8, 8, 3, 3)).astype("float32") * 0.2)
                y = bb.emit(relax.op.nn.conv2d(y, w, padding=1))
                y = bb.emit(relax.op.clip(y, 0.0, 6.0) if relu6 else relax.op.nn.relu(y))
            out = bb.emit_output(y)
        bb.emit_func_output(out)
    return bb.get()


def _lowered(precision: str, graphs: bool):
    import tvm

    host, target = get_target("cuda-host"), _cuda_target()
    mod, _ = optimize(_conv_net(), host, target, HostOptions(precision=precision), None)
    config = {"relax.backend.use_cuda_graph": graphs, **lowering_config(host, precision)}
    with tvm.transform.PassContext(config=config), target:
        return lowering_pipeline(target)(mod)


@pytest.mark.parametrize("precision", ["float32", "float16"])
def test_a_cuda_build_records_which_launches_its_cuda_graphs_replay(precision):
    host = get_target("cuda-host")
    mode = build_mode(_lowered(precision, True), host, precision, False, True)
    graph = mode["cuda_graph"]
    assert mode["precision"] == precision and not mode["tuned"] and mode["layout"] == "as the model's"
    assert graph["asked"] and graph["captured"] and graph["regions"] >= 1
    # the kernels reading the call's input and writing its output stay outside: their tensors change per call
    assert 0 < graph["kernels_in_graphs"] < mode["kernels"]
    off = build_mode(_lowered(precision, False), host, precision, False, False)
    assert off["cuda_graph"] == {"asked": False, "captured": False, "regions": 0, "kernels_in_graphs": 0}
    assert off["kernels"] == mode["kernels"]


def test_a_cpu_build_records_no_cuda_graphs():
    import tvm

    host = get_target("cpu-host")
    target = tvm.target.Target("llvm")
    mod, _ = optimize(_conv_net(), host, target, HostOptions(), None)
    with tvm.transform.PassContext(), target:
        lowered = lowering_pipeline(target)(mod)
    mode = build_mode(lowered, host, "float32", False, False)
    assert "cuda_graph" not in mode and mode["kernels"] >= 1


def test_relu6_in_nhwc_takes_mixed_precision_and_keeps_its_values():
    """clip (ReLU6) after ConvertLayout broke TVM's ToMixedPrecision (mobilenet_v2 in float16): the preparation
    for tensor cores writes it as maximum/minimum, which follow the NHWC layout without transposes, and computes the
    same."""
    import tvm
    from tvm import relax

    mod = _conv_net(depth=2, relu6=True)
    prepared = tuning_preparation(tensor_cores=True)(mod)
    script = prepared["main"].script()
    assert "R.clip" not in script and script.count("R.permute_dims") == 2  # the model's input and output only
    relax.transform.ToMixedPrecision(out_dtype="float32")(prepared)  # raised before

    x = np.random.default_rng(1).standard_normal((1, 8, 16, 16)).astype("float32") * 4

    def run(m):
        target = tvm.target.Target("llvm")
        with target:
            m = relax.get_pipeline("zero")(m)
        vm = relax.VirtualMachine(relax.build(m, target=target), tvm.cpu())
        return vm["main"](tvm.runtime.tensor(x)).numpy()

    want, got = run(mod), run(prepared)
    assert want.max() > 6 - 1e-6 or want.min() < 1e-6  # the bounds are reached
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_split_k_takes_the_convolutions_with_few_output_tiles_and_a_long_reduction():
    from tinymlaas.backends.host.passes import split_k_factor

    # resnet18 at batch 1 (M = output pixels, N = output channels, K = 9 x input channels)
    assert split_k_factor(49, 512, 9 * 512) == 16  # layer4: 8 tiles of 64x64 -> 128, chunks of 288
    assert split_k_factor(49, 512, 9 * 256) == 8  # layer4's first, stride 2
    assert split_k_factor(196, 256, 9 * 256) == 8  # layer3
    assert split_k_factor(784, 128, 9 * 128) == 4  # layer2
    assert split_k_factor(3136, 64, 9 * 64) == 1  # layer1: 49 tiles already
    assert split_k_factor(49, 512, 256) == 1  # layer4's 1x1 downsample: K too short to split
    assert split_k_factor(32 * 49, 512, 9 * 512) == 1  # batch 32: 200 tiles


def _long_reduction_net():
    """NCHW float32: a 3x3 convolution over 256 channels to a 7x7 output (split), one with stride 2 and uneven
    padding-free taps (split), a 1x1 one with a short reduction (kept), each with bias and ReLU."""
    from tvm import relax
    from tvm.script import relax as R

    rng = np.random.default_rng(2)
    bb = relax.BlockBuilder()
    x = relax.Var("x", R.Tensor((1, 256, 15, 15), "float32"))

    def conv(y, cin, cout, k, **kw):
        w = relax.const((rng.standard_normal((cout, cin, k, k)) / np.sqrt(cin * k * k)).astype("float32"))
        b = relax.const(rng.standard_normal((1, cout, 1, 1)).astype("float32"))
        return bb.emit(relax.op.nn.relu(relax.op.add(bb.emit(relax.op.nn.conv2d(y, w, **kw)), b)))

    with bb.function("main", [x]):
        with bb.dataflow():
            y = conv(x, 256, 64, 3, strides=2)  # 15 -> 7, no padding: M = 49, K = 2304
            y = conv(y, 64, 96, 3, padding=1)  # 7 -> 7: M = 49, K = 576
            y = conv(y, 96, 32, 1)  # K = 96: kept
            out = bb.emit_output(y)
        bb.emit_func_output(out)
    return bb.get()


def _run_cpu(mod, x):
    import tvm
    from tvm import relax

    target = tvm.target.Target("llvm")
    with target:
        mod = relax.get_pipeline("zero")(mod)
    vm = relax.VirtualMachine(relax.build(mod, target=target), tvm.cpu())
    return vm["main"](tvm.runtime.tensor(x)).numpy()


def test_split_k_rewrite_computes_the_convolutions_it_replaces():
    """The rewrite (im2col, a batched matmul over chunks of K, their sum) against the same model without it, on the
    CPU: the same outputs up to float32 rounding, on random inputs; the convolutions it splits are gone, the short one
    stays. In float16 (after mixed precision, as the build runs it) the same outputs as the mixed-precision model
    without it, up to float16 rounding."""
    from tvm import relax

    mod = _long_reduction_net()
    plain = tuning_preparation(tensor_cores=True)(mod)
    split = split_k_preparation()(plain)
    script = split["main"].script()
    assert script.count("R.nn.conv2d") == 1 and script.count("R.matmul") == 2
    assert script.count("R.call_tir(split_k_im2col") == 2 and script.count("R.call_tir(split_k_sum") == 2
    assert plain["main"].script().count("R.nn.conv2d") == 3
    half = relax.transform.ToMixedPrecision(out_dtype="float32")(plain)
    half_split = split_k_preparation()(half)
    assert half_split["main"].script().count("R.matmul") == 2
    rng = np.random.default_rng(3)
    for _ in range(2):
        x = rng.standard_normal((1, 256, 15, 15)).astype("float32")
        want, got = _run_cpu(mod, x), _run_cpu(split, x)
        assert want.shape == got.shape == (1, 32, 7, 7) and np.abs(want).max() > 0.1
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
        want16, got16 = _run_cpu(half, x), _run_cpu(half_split, x)
        assert np.linalg.norm(want16 - want) / np.linalg.norm(want) < 5e-3
        assert np.linalg.norm(got16 - want16) / np.linalg.norm(want16) < 5e-3


def test_split_k_im2col_reads_every_tap_with_padding_stride_and_dilation():
    """The TE im2col alone against numpy: padded (uneven), strided and dilated taps, rows past the output pixels
    zero, K in the OHWI weight's order (H, W, I) and cut into chunks."""
    import tvm
    from tvm import te

    from tinymlaas.backends.host.passes import split_k_im2col

    rng = np.random.default_rng(5)
    x_np = rng.standard_normal((2, 9, 8, 4)).astype("float32")
    kh, kw, sh, sw, dh, dw, top, left, bottom, right = 3, 2, 2, 1, 1, 2, 1, 0, 2, 1
    oh = (9 + top + bottom - dh * (kh - 1) - 1) // sh + 1
    ow = (8 + left + right - dw * (kw - 1) - 1) // sw + 1
    m, k, split = 2 * oh * ow, kh * kw * 4, 4
    rows = -(-m // 16) * 16
    x = te.placeholder(x_np.shape, "float32", name="x")
    cols = split_k_im2col(x, (kh, kw), (sh, sw), (dh, dw), (top, left, bottom, right), (oh, ow), split, rows)
    func = tvm.compile(te.create_prim_func([x, cols]), target="llvm")
    got = tvm.runtime.empty((split, rows, k // split), "float32")
    func(tvm.runtime.tensor(x_np), got)
    padded = np.pad(x_np, [(0, 0), (top, bottom), (left, right), (0, 0)])
    want = np.zeros((rows, k), "float32")
    for b in range(2):
        for oy in range(oh):
            for ox in range(ow):
                taps = [padded[b, oy * sh + i * dh, ox * sw + j * dw] for i in range(kh) for j in range(kw)]
                want[(b * oh + oy) * ow + ox] = np.concatenate(taps)
    np.testing.assert_array_equal(got.numpy(), want.reshape(rows, split, k // split).transpose(1, 0, 2))


def test_split_k_matrix_products_get_tensor_core_schedules():
    """The batched matmuls the rewrite makes (float16 after mixed precision, rows padded to 16) are in the design
    space meta_schedule tunes with wmma tiling: each has a tensor-core candidate."""
    from tvm import relax
    from tvm.s_tir import meta_schedule as ms

    from tinymlaas.backends.host.tuning import fast_tvmscript_parsing, tensor_core_space

    mod = tuning_preparation(tensor_cores=True)(_long_reduction_net())
    mod = split_k_preparation()(relax.transform.ToMixedPrecision(out_dtype="float32")(mod))
    target = _cuda_target()
    with target:
        mod = relax.get_pipeline("zero")(mod)
    with fast_tvmscript_parsing():
        tasks = [t for t in ms.relax_integration.extract_tasks(mod, target) if "matmul" in t.task_name]
        assert len(tasks) == 2
        for task in tasks:
            context = ms.TuneContext(mod=task.dispatched[0], target=target, space_generator=tensor_core_space(),
                                     task_name=task.task_name)
            assert any("wmma" in str(space.trace) for space in context.generate_design_space()), task.task_name
    # the build records how many convolutions it split (one im2col each)
    with target:
        import tvm.s_tir.dlight as dl

        lowered = lowering_pipeline(target)(dl.ApplyDefaultSchedule(dl.gpu.Matmul(), dl.gpu.Fallback())(mod))
    assert build_mode(lowered, get_target("cuda-host"), "float16", True, True)["split_k_convolutions"] == 2
