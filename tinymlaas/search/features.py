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


def layer_features(graph, op) -> dict:
    """Shapes, dtypes, precision, bytes read and written, constant bytes and MACs of one operator."""
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
    }
