"""SSD detection post-processing: TFLite's custom operator TFLite_Detection_PostProcess (box decoding and non-max
suppression), as the C kernel firmware/kernels/reference/detection_postprocess.c, on float inputs (as TFLite Micro's
kernel; the interpreter refuses int8 inputs and returns zero boxes for uint8 ones, so neither can be verified)."""

from __future__ import annotations

import numpy as np

from tinymlaas.errors import InvalidModel, UnsupportedOperator
from tinymlaas.ops.registry import register

OPCODE = "CUSTOM:TFLite_Detection_PostProcess"
_REQUIRED = ("max_detections", "max_classes_per_detection", "nms_score_threshold", "nms_iou_threshold",
             "num_classes", "y_scale", "x_scale", "h_scale", "w_scale")


@register(OPCODE, "float32", implementations=("c",), note="fast and regular NMS; C kernel")
def detection_postprocess(ctx, op, impl):
    from tvm import relax

    name = ctx.graph.name
    missing = [k for k in _REQUIRED if k not in op.options]
    if missing:
        raise InvalidModel(f"{OPCODE} #{op.index}: custom options lack {', '.join(missing)}")
    if len(op.inputs) != 3 or len(op.outputs) != 4:
        raise InvalidModel(f"{OPCODE} #{op.index}: needs 3 inputs and 4 outputs, has {len(op.inputs)} and "
                           f"{len(op.outputs)}")
    enc_t, cls_t, anc_t = (ctx.tensor(i) for i in op.inputs)
    if len(enc_t.shape) != 3 or enc_t.shape[0] != 1 or enc_t.shape[2] < 4 or len(cls_t.shape) != 3:
        raise InvalidModel(f"{OPCODE} #{op.index}: box encodings {list(enc_t.shape)} are not [1, boxes, >= 4]")
    n, code = enc_t.shape[1], enc_t.shape[2]
    classes_bg, classes = cls_t.shape[2], int(op.opt("num_classes"))
    if cls_t.shape[1] != n or anc_t.shape != (n, 4) or not 0 <= classes_bg - classes <= 1:
        raise InvalidModel(f"{OPCODE} #{op.index}: {n} boxes, class scores {list(cls_t.shape)}, anchors "
                           f"{list(anc_t.shape)} and {classes} classes do not fit together")
    max_det, per_det = int(op.opt("max_detections")), int(op.opt("max_classes_per_detection"))
    per_class = int(op.opt("detections_per_class", 100) or 100)
    regular = bool(op.opt("use_regular_nms", False))
    iou = float(op.opt("nms_iou_threshold"))
    if max_det < 0 or per_det <= 0 or per_class <= 0 or not 0.0 < iou <= 1.0:
        raise InvalidModel(f"{OPCODE} #{op.index}: max_detections {max_det}, max_classes_per_detection {per_det}, "
                           f"detections_per_class {per_class}, nms_iou_threshold {iou} out of range")
    sort = max(n, classes, max_det + per_class)
    scratch_words = 4 * n + 2 * sort + 5 * n + n * classes + 4 * (max_det + per_class)
    params = np.array([n, code, classes_bg, classes, max_det, per_det, per_class, int(regular), sort], np.int32)
    fparams = np.array([op.opt(k) for k in ("y_scale", "x_scale", "h_scale", "w_scale", "nms_score_threshold")]
                       + [iou], np.float32)
    args = [ctx.input(op, 0), ctx.input(op, 1), ctx.input(op, 2), ctx.const(params), ctx.const(fparams)]
    outs = [ctx.tensor(i) for i in op.outputs]
    if any(t.dtype != "float32" for t in (enc_t, cls_t, anc_t, *outs)):
        raise UnsupportedOperator([f"{OPCODE} #{op.index} with quantized inputs or outputs (float only)"], name)
    out_sinfo = [relax.TensorType([scratch_words], "float32")] + [relax.TensorType(list(t.shape), "float32")
                                                                  for t in outs]
    result = ctx.emit(relax.call_dps_packed("tinymlaas_detection_postprocess", args, out_sinfo))
    for k in range(4):
        ctx.set_output(op, k, relax.TupleGetItem(result, k + 1))
