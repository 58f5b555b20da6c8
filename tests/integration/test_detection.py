"""SSD post-processing (the custom operator TFLite_Detection_PostProcess) against the interpreter: decoded boxes,
classes, scores and counts for fast and regular non-max suppression."""

from pathlib import Path

import flatbuffers
import numpy as np
import pytest
from ai_edge_litert import schema_py_generated as s
from flatbuffers import flexbuffers

from tinymlaas.build.pipeline import compile_model
from tinymlaas.build.request import BuildRequest


def detection_model(n=40, classes=3, max_det=6, per_det=1, regular=False, seed=0) -> bytes:
    rng = np.random.default_rng(seed)
    tensors, buffers = [], [s.BufferT()]

    def tensor(name, shape, ttype=s.TensorType.FLOAT32, data=None):
        t = s.TensorT()
        t.name, t.shape, t.type, t.buffer = name.encode(), np.array(shape, np.int32), ttype, 0
        if data is not None:
            b = s.BufferT()
            b.data = np.frombuffer(np.ascontiguousarray(data).tobytes(), np.uint8)
            buffers.append(b)
            t.buffer = len(buffers) - 1
        tensors.append(t)
        return len(tensors) - 1

    centres, sizes = rng.uniform(0.1, 0.9, (n, 2)), rng.uniform(0.05, 0.4, (n, 2))
    anchors = np.concatenate([centres, sizes], axis=1).astype(np.float32)  # y, x, h, w
    boxes, scores = tensor("boxes", [1, n, 4]), tensor("scores", [1, n, classes + 1])
    anchor = tensor("anchors", [n, 4], data=anchors)
    slots = max_det * per_det
    outs = [tensor("detection_boxes", [1, slots, 4]), tensor("detection_classes", [1, slots]),
            tensor("detection_scores", [1, slots]), tensor("num_detections", [1])]
    code = s.OperatorCodeT()
    code.builtinCode = code.deprecatedBuiltinCode = s.BuiltinOperator.CUSTOM
    code.customCode, code.version = "TFLite_Detection_PostProcess", 1
    op = s.OperatorT()
    op.opcodeIndex, op.inputs, op.outputs = 0, np.array([boxes, scores, anchor], np.int32), np.array(outs, np.int32)
    op.customOptions = np.frombuffer(flexbuffers.Dumps({
        "max_detections": max_det, "max_classes_per_detection": per_det, "detections_per_class": 4,
        "use_regular_nms": regular, "nms_score_threshold": 0.3, "nms_iou_threshold": 0.45, "num_classes": classes,
        "y_scale": 10.0, "x_scale": 10.0, "h_scale": 5.0, "w_scale": 5.0}), np.uint8)
    op.customOptionsFormat = s.CustomOptionsFormat.FLEXBUFFERS
    sg = s.SubGraphT()
    sg.tensors, sg.operators = tensors, [op]
    sg.inputs, sg.outputs = np.array([boxes, scores], np.int32), np.array(outs, np.int32)
    m = s.ModelT()
    m.version, m.operatorCodes, m.subgraphs, m.buffers = 3, [code], [sg], buffers
    b = flatbuffers.Builder(1 << 14)
    b.Finish(m.Pack(b), file_identifier=b"TFL3")
    return bytes(b.Output())


@pytest.mark.parametrize("case, options, target", [
    ("fast", {}, "cortex-m4"),
    ("fast_two_classes_per_box", {"per_det": 2, "classes": 4}, "rv32imafc"),
    ("regular", {"regular": True, "max_det": 5}, "cortex-m4"),
    ("fast_many_anchors", {"n": 300, "classes": 6, "max_det": 10}, "cortex-m3"),
])
def test_detection_postprocess_matches_the_interpreter(tmp_path, case, options, target):
    path = tmp_path / f"{case}.tflite"
    path.write_bytes(detection_model(**options))
    r = compile_model(path, target, tmp_path / "out", BuildRequest(inputs=4))
    assert r.verified, r.fidelity
    found = np.frombuffer(Path(r.artifacts["outputs"]).read_bytes(), np.float32)[-1]
    assert found >= 2  # suppression had something to choose from
