"""Small ONNX models built with onnx.helper (random weights), for the ONNX import tests and the API's ONNX upload."""

import numpy as np


def small_cnn(path, batch="1", seed=0):
    """Conv 3x3 (8 channels) -> Relu -> MaxPool 2x2 -> Flatten -> Gemm (10) -> Softmax, random weights."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    w = numpy_helper.from_array(rng.standard_normal((8, 3, 3, 3)).astype(np.float32) * 0.3, "w")
    b = numpy_helper.from_array(rng.standard_normal(8).astype(np.float32), "b")
    fc = numpy_helper.from_array(rng.standard_normal((10, 8 * 7 * 7)).astype(np.float32) * 0.05, "fc")
    fcb = numpy_helper.from_array(rng.standard_normal(10).astype(np.float32), "fcb")
    nodes = [
        helper.make_node("Conv", ["x", "w", "b"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("MaxPool", ["r"], ["p"], kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Flatten", ["p"], ["f"]),
        helper.make_node("Gemm", ["f", "fc", "fcb"], ["g"], transB=1),
        helper.make_node("Softmax", ["g"], ["y"], axis=1),
    ]
    dim = int(batch) if batch.isdigit() else batch
    graph = helper.make_graph(nodes, "small_cnn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [dim, 3, 14, 14])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [dim, 10])], [w, b, fc, fcb])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    onnx.save(model, path)
    return path
