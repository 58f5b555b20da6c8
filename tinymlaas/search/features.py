"""Static features of a layer, known without building it: what the runtime predictor learns from."""

from __future__ import annotations

import numpy as np

# Multiply-accumulates per output element, from the weight tensor's shape (TFLite layouts).
_MACS_PER_OUTPUT = {
    "CONV_2D": lambda w: int(np.prod(w[1:])),  # OHWI: kh * kw * cin
    "DEPTHWISE_CONV_2D": lambda w: int(w[1] * w[2]),  # 1HWC: kh * kw
    "TRANSPOSE_CONV": lambda w: int(np.prod(w[1:])),
    "FULLY_CONNECTED": lambda w: int(w[-1]),
    "BATCH_MATMUL": lambda w: int(w[-2]),
}


# The geometry a kernel's loops follow (what makes two layers of the same MACs cost differently): for convolutions
# OHWI / 1HWC weights and NHWC outputs, for fully connected layers OI weights.
GEOMETRY = ("kernel_h", "kernel_w", "in_channels", "out_channels", "stride", "out_pixels")


def _geometry(op, ins, outs) -> dict:
    if len(ins) < 2 or len(ins[1].shape) < 2 or not outs:
        return {}
    w, out = list(ins[1].shape), list(outs[0].shape)
    if op.opcode in ("CONV_2D", "DEPTHWISE_CONV_2D", "TRANSPOSE_CONV") and len(w) == 4 and len(out) == 4:
        cin = w[3] if op.opcode != "DEPTHWISE_CONV_2D" else int(ins[0].shape[-1])
        return {"kernel_h": w[1], "kernel_w": w[2], "in_channels": cin, "out_channels": out[3],
                "stride": max(int(op.opt("strideH", 1) or 1), int(op.opt("strideW", 1) or 1)),
                "out_pixels": out[1] * out[2]}
    if op.opcode == "FULLY_CONNECTED":
        return {"kernel_h": 1, "kernel_w": 1, "in_channels": w[-1], "out_channels": w[0], "stride": 1,
                "out_pixels": int(np.prod(out[:-1]))}
    return {}


def layer_features(graph, op) -> dict:
    """Shapes, dtypes, precision, bytes read and written, constant bytes, MACs and loop geometry of one
    operator."""
    ins = [graph.tensor(i) for i in op.inputs if i >= 0]
    outs = [graph.tensor(i) for i in op.outputs]
    acts = [t for t in ins if not t.is_const]
    consts = [t for t in ins if t.is_const]
    out_elems = sum(t.size for t in outs)
    macs = 0
    if op.opcode in _MACS_PER_OUTPUT and len(ins) > 1 and len(ins[1].shape) >= 2:
        macs = out_elems * _MACS_PER_OUTPUT[op.opcode](ins[1].shape)
    nbytes = lambda ts: int(sum(t.size * np.dtype(t.dtype).itemsize for t in ts))
    return {
        "opcode": op.opcode,
        "precision": graph.precision(op),
        "input_shapes": [list(t.shape) for t in acts],
        "output_shapes": [list(t.shape) for t in outs],
        "const_shapes": [list(t.shape) for t in consts],
        "bytes_in": nbytes(acts),
        "bytes_out": nbytes(outs),
        "const_bytes": nbytes(consts),
        "output_elements": out_elems,
        "macs": macs,
        **_geometry(op, ins, outs),
    }
