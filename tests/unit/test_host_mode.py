"""The host backend's record of how a build runs (CUDA graphs read off the lowered module) and the graph rewrite
ahead of float16 tuning (clip as bounds), checked without a GPU: the Relax passes need a CUDA target, not a device."""

import numpy as np
import pytest

from tinymlaas.backends.host.options import HostOptions
from tinymlaas.backends.host.passes import build_mode, lowering_config, lowering_pipeline, optimize, tuning_preparation
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
