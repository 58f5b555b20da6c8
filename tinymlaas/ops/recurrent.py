"""Recurrent operators with state kept across inferences (variable tensors): UNIDIRECTIONAL_SEQUENCE_LSTM.

The state comes in as an extra input of the Relax function and its new value goes out as an extra output
(`LoweringContext.set_state`); the driver keeps it in static RAM between inferences, as TFLite's interpreter
and TFLite Micro do. The time loop is unrolled: the steps are structurally equal, so they share kernels.
"""

from __future__ import annotations

import numpy as np

from tinymlaas.errors import UnsupportedOperator
from tinymlaas.ops.registry import register

# UNIDIRECTIONAL_SEQUENCE_LSTM inputs (TFLite's lstm_shared.h)
_INPUT = 0
_INPUT_WEIGHTS = {"i": 1, "f": 2, "c": 3, "o": 4}
_RECURRENT_WEIGHTS = {"i": 5, "f": 6, "c": 7, "o": 8}
_PEEPHOLE = {"i": 9, "f": 10, "o": 11}
_BIAS = {"i": 12, "f": 13, "c": 14, "o": 15}
_PROJECTION_WEIGHTS, _PROJECTION_BIAS = 16, 17
_OUTPUT_STATE, _CELL_STATE = 18, 19
_LAYER_NORM = {"i": 20, "f": 21, "c": 22, "o": 23}


def _apply(act: int, x, opcode: str, index: int):
    from tvm import relax

    fns = {0: lambda v: v, 1: relax.op.nn.relu, 3: lambda v: relax.op.clip(v, 0.0, 6.0), 4: relax.op.tanh,
           6: relax.op.sigmoid}
    if act not in fns:
        raise UnsupportedOperator([f"{opcode} #{index} with activation {act}"])
    return fns[act](x)


def _given(op, k: int) -> bool:
    return len(op.inputs) > k and op.inputs[k] >= 0


@register("UNIDIRECTIONAL_SEQUENCE_LSTM", "float32", note="time loop unrolled; state kept across inferences")
def lstm(ctx, op, impl):
    """Per time step, as TFLite's float LSTM: gates = W x + R h (+ peephole . c) + b, each gate's pre-activation
    mean/stddev-normalised first where layer-norm coefficients are given; c' = f c + i g (CIFG: i = 1 - f),
    clipped; o with the peephole on c'; h = o act(c'), projected and clipped if asked."""
    from tvm import relax

    weights = [op.inputs[k] for k in (*_INPUT_WEIGHTS.values(), *_RECURRENT_WEIGHTS.values()) if _given(op, k)]
    if any(not ctx.tensor(i).is_const for i in weights):
        raise UnsupportedOperator([f"{op.opcode} #{op.index} with computed weights"], ctx.graph.name)
    gates = [g for g in "ifco" if _given(op, _INPUT_WEIGHTS[g])]  # without "i": CIFG
    n_cell = ctx.tensor(op.inputs[_INPUT_WEIGHTS["f"]]).shape[0]
    x_t = ctx.tensor(op.inputs[_INPUT])
    time_major = bool(op.opt("timeMajor", False))
    steps, batch = (x_t.shape[0], x_t.shape[1]) if time_major else (x_t.shape[1], x_t.shape[0])
    n_input = x_t.shape[2]
    act = int(op.opt("fusedActivationFunction", 4) or 0)
    cell_clip, proj_clip = float(op.opt("cellClip", 0.0) or 0.0), float(op.opt("projClip", 0.0) or 0.0)
    layer_norm = _given(op, _LAYER_NORM["f"])

    def data(k):
        return np.asarray(ctx.tensor(op.inputs[k]).data, dtype=np.float32)

    # every gate's input weights in one matrix: one matmul over all time steps at once
    w_in = np.concatenate([data(_INPUT_WEIGHTS[g]) for g in gates]).T  # [n_input, G * n_cell]
    w_rec = np.concatenate([data(_RECURRENT_WEIGHTS[g]) for g in gates]).T  # [n_output, G * n_cell]
    x = ctx.input(op, _INPUT)
    if time_major:
        x = relax.op.permute_dims(x, [1, 0, 2])
    xw = ctx.emit(relax.op.reshape(relax.op.matmul(relax.op.reshape(x, (batch * steps, n_input)), ctx.const(w_in)),
                                   (batch, steps, len(gates) * n_cell)))
    w_rec = ctx.const(w_rec)
    h, c = ctx.input(op, _OUTPUT_STATE), ctx.input(op, _CELL_STATE)

    def gate(g, pre, cell, fn):
        if g in _PEEPHOLE and _given(op, _PEEPHOLE[g]):
            pre = relax.op.add(pre, relax.op.multiply(ctx.input(op, _PEEPHOLE[g]), cell))
        if layer_norm:
            mean = relax.op.mean(pre, axis=[-1], keepdims=True)
            centred = relax.op.subtract(pre, mean)
            var = relax.op.subtract(relax.op.mean(relax.op.multiply(pre, pre), axis=[-1], keepdims=True),
                                    relax.op.multiply(mean, mean))
            pre = relax.op.multiply(centred, relax.op.rsqrt(relax.op.add(var, ctx.const(np.float32(1e-8)))))
            pre = relax.op.multiply(pre, ctx.input(op, _LAYER_NORM[g]))
        if _given(op, _BIAS[g]):
            pre = relax.op.add(pre, ctx.input(op, _BIAS[g]))
        return fn(pre)

    outputs = []
    for t in range(steps):
        pre = relax.op.add(relax.op.reshape(relax.op.strided_slice(xw, [1], [t], [t + 1]), (batch, len(gates) * n_cell)),
                           relax.op.matmul(h, w_rec))
        pre = ctx.emit(pre)
        part = {g: relax.op.strided_slice(pre, [1], [k * n_cell], [(k + 1) * n_cell]) for k, g in enumerate(gates)}
        f = gate("f", part["f"], c, relax.op.sigmoid)
        i = gate("i", part["i"], c, relax.op.sigmoid) if "i" in part else relax.op.subtract(ctx.const(np.float32(1)), f)
        g = gate("c", part["c"], c, lambda v: _apply(act, v, op.opcode, op.index))
        c = relax.op.add(relax.op.multiply(f, c), relax.op.multiply(i, g))
        if cell_clip > 0:
            c = relax.op.clip(c, -cell_clip, cell_clip)
        c = ctx.emit(c)
        o = gate("o", part["o"], c, relax.op.sigmoid)
        h = relax.op.multiply(o, _apply(act, c, op.opcode, op.index))
        if _given(op, _PROJECTION_WEIGHTS):
            h = relax.op.matmul(h, relax.op.permute_dims(ctx.input(op, _PROJECTION_WEIGHTS)))
            if _given(op, _PROJECTION_BIAS):
                h = relax.op.add(h, ctx.input(op, _PROJECTION_BIAS))
            if proj_clip > 0:
                h = relax.op.clip(h, -proj_clip, proj_clip)
        h = ctx.emit(h)
        outputs.append(h)
    seq = relax.op.stack(outputs, axis=0 if time_major else 1)
    ctx.set_output(op, 0, seq)
    ctx.set_state(op.inputs[_OUTPUT_STATE], h)
    ctx.set_state(op.inputs[_CELL_STATE], c)
