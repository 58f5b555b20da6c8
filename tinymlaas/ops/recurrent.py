"""Recurrent operators with state kept across inferences (variable tensors): UNIDIRECTIONAL_SEQUENCE_LSTM, SVDF.

The state comes in as an extra input of the Relax function and its new value goes out as an extra output
(`LoweringContext.set_state`); the driver keeps it in static RAM between inferences, as TFLite's interpreter
and TFLite Micro do. The time loop is unrolled: the steps are structurally equal, so they share kernels.
"""

from __future__ import annotations

import math

import numpy as np

from tinymlaas.errors import InvalidModel, UnsupportedOperator
from tinymlaas.ops.emit import activation
from tinymlaas.ops.quantization import quantize_multiplier
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


def _f32(x) -> np.float32:
    return np.float32(x)


def _scale(ctx, op, k: int) -> np.float32:
    return _f32(ctx.tensor(op.inputs[k]).scale) if _given(op, k) else _f32(1.0)


@register("UNIDIRECTIONAL_SEQUENCE_LSTM", "int8", implementations=("c",),
          note="8x8->16 integer LSTM as the interpreter's; C kernel; state kept across inferences")
def lstm_int8(ctx, op, impl):
    """TFLite's integer LSTM (C kernel firmware/kernels/reference/lstm_s8.c): gates in Q3.12 from int8 matmuls,
    int16 cell state. The effective scales are computed as the interpreter's Prepare does (float32 products, then
    QuantizeMultiplier). Two quirks of the interpreter are reproduced, not fixed: the peephole products cover
    n_output cells, and a cell state scale below 2^-15 skips tanh(c) (lstm_s8.c says how).
    Quantized state starts at its zero point (the driver), as the interpreter resets variable tensors."""
    from tvm import relax

    name = ctx.graph.name
    if _given(op, _LAYER_NORM["f"]):
        raise UnsupportedOperator([f"{op.opcode} #{op.index} int8 with layer normalisation"], name)
    if len(op.intermediates) != 5:
        raise UnsupportedOperator([(f"{op.opcode} #{op.index} int8 without the five intermediate tensors the "
                                   "integer kernel needs (hybrid or 8x8->8 LSTMs are not supported)")], name)
    for k in (*_INPUT_WEIGHTS.values(), *_RECURRENT_WEIGHTS.values(), *_PEEPHOLE.values(), *_BIAS.values(),
              _PROJECTION_WEIGHTS, _PROJECTION_BIAS):
        if _given(op, k) and not ctx.tensor(op.inputs[k]).is_const:
            raise UnsupportedOperator([f"{op.opcode} #{op.index} with computed weights"], name)
    x_t, out_t = ctx.tensor(op.inputs[_INPUT]), ctx.tensor(op.outputs[0])
    h_t, c_t = ctx.tensor(op.inputs[_OUTPUT_STATE]), ctx.tensor(op.inputs[_CELL_STATE])
    if x_t.dtype != "int8" or h_t.dtype != "int8" or c_t.dtype != "int16":
        raise UnsupportedOperator([(f"{op.opcode} #{op.index} with {x_t.dtype} input, {h_t.dtype} hidden and "
                                   f"{c_t.dtype} cell state (int8, int8, int16 supported)")], name)
    act = int(op.opt("fusedActivationFunction", 4) or 0)
    if act != 4:
        raise UnsupportedOperator([f"{op.opcode} #{op.index} int8 with activation {act} (tanh only)"], name)
    cifg = not _given(op, _INPUT_WEIGHTS["i"])
    peephole = _given(op, _PEEPHOLE["o"])
    projection = _given(op, _PROJECTION_WEIGHTS)
    time_major = bool(op.opt("timeMajor", False))
    steps, batch = (x_t.shape[0], x_t.shape[1]) if time_major else (x_t.shape[1], x_t.shape[0])
    n_input = x_t.shape[2]
    n_cell = ctx.tensor(op.inputs[_INPUT_WEIGHTS["f"]]).shape[0]
    n_output = ctx.tensor(op.inputs[_RECURRENT_WEIGHTS["f"]]).shape[1]
    log2 = math.log2(c_t.scale) if c_t.scale > 0 else 0.5
    cell_scale = round(log2)
    if abs(log2 - cell_scale) > 1e-3 or cell_scale > -9:
        raise UnsupportedOperator([(f"{op.opcode} #{op.index} int8 with a cell state scale {c_t.scale} that is not "
                                   "a power of two <= 2^-9")], name)
    if cifg and 15 + cell_scale < 0:
        # the interpreter then reads a scratch buffer nothing wrote: no defined result to match
        raise UnsupportedOperator([f"{op.opcode} #{op.index} int8 CIFG with a cell state scale below 2^-15"], name)
    hidden = ctx.tensor(op.intermediates[4])
    gate_scale = _f32(2.0 ** -12)  # Q3.12 without layer normalisation
    x_scale, h_scale = _f32(x_t.scale), _f32(h_t.scale)

    def data(k, dtype, shape):
        return np.asarray(ctx.tensor(op.inputs[k]).data, dtype=dtype) if _given(op, k) else np.zeros(shape, dtype)

    w_in = np.stack([data(_INPUT_WEIGHTS[g], np.int8, (n_cell, n_input)) for g in "ifco"])
    w_rec = np.stack([data(_RECURRENT_WEIGHTS[g], np.int8, (n_cell, n_output)) for g in "ifco"])
    # effective biases (the interpreter's Prepare): bias - zero point * row sums
    bias = np.stack([np.stack([data(_BIAS[g], np.int64, (n_cell,)) - x_t.zero_point * w_in[k].sum(1, dtype=np.int64),
                               -h_t.zero_point * w_rec[k].sum(1, dtype=np.int64)]) for k, g in enumerate("ifco")])
    peep = np.stack([data(_PEEPHOLE[g], np.int16, (n_cell,)) for g in "ifo"])
    w_proj = data(_PROJECTION_WEIGHTS, np.int8, (n_output, n_cell)) if projection else np.zeros((1,), np.int8)
    proj_bias = (data(_PROJECTION_BIAS, np.int64, (n_output,)) - hidden.zero_point * w_proj.sum(1, dtype=np.int64)
                 if projection else np.zeros((1,), np.int64))

    def qm(real) -> list[int]:
        return list(quantize_multiplier(float(_f32(real))))

    gates = []
    for g in "ifco":
        if g == "i" and cifg:
            gates += [0] * 6
            continue
        gates += qm(_scale(ctx, op, _INPUT_WEIGHTS[g]) * x_scale / gate_scale)
        gates += qm(_scale(ctx, op, _RECURRENT_WEIGHTS[g]) * h_scale / gate_scale)
        cell_w = _scale(ctx, op, _PEEPHOLE[g]) if g in _PEEPHOLE and peephole else None
        gates += qm(_f32(2.0 ** cell_scale) * cell_w / gate_scale) if cell_w is not None else [0, 0]
    cell_clip, proj_clip = float(op.opt("cellClip", 0.0) or 0.0), float(op.opt("projClip", 0.0) or 0.0)
    q_cell_clip = int(min(max(_f32(cell_clip) / _f32(c_t.scale), -32768.0), 32767.0)) if cell_clip > 0 else 0
    q_proj_clip = int(min(max(_f32(proj_clip) / _f32(out_t.scale), -128.0), 127.0)) if proj_clip > 0 else 0
    hidden_scale = _f32(2.0 ** -15) / _f32(hidden.scale) * _f32(2.0 ** -15)
    proj_scale = _scale(ctx, op, _PROJECTION_WEIGHTS) * _f32(hidden.scale) / h_scale
    params = [batch, steps, n_input, n_cell, n_output, int(time_major), int(cifg), int(peephole), int(projection),
              cell_scale, q_cell_clip, q_proj_clip, hidden.zero_point, h_t.zero_point, *qm(hidden_scale),
              *qm(proj_scale), *gates]
    args = [ctx.input(op, _INPUT), ctx.const(w_in), ctx.const(w_rec), ctx.const(bias.astype(np.int32)),
            ctx.const(peep), ctx.const(w_proj), ctx.const(proj_bias.astype(np.int32)),
            ctx.input(op, _OUTPUT_STATE), ctx.input(op, _CELL_STATE), ctx.const(np.array(params, np.int32))]
    # the operator's output last: the kernel call's last argument is what per-layer verification reads
    out_sinfo = [relax.TensorType(list(h_t.shape), "int8"), relax.TensorType(list(c_t.shape), "int16"),
                 relax.TensorType([5 * batch * n_cell], "int16"), relax.TensorType(list(out_t.shape), "int8")]
    result = ctx.emit(relax.call_dps_packed("tinymlaas_lstm_s8", args, out_sinfo))
    ctx.set_output(op, 0, relax.TupleGetItem(result, 3))
    ctx.set_state(op.inputs[_OUTPUT_STATE], relax.TupleGetItem(result, 0))
    ctx.set_state(op.inputs[_CELL_STATE], relax.TupleGetItem(result, 1))


# SVDF inputs (TFLite's svdf.cc)
_SVDF_INPUT, _SVDF_FEATURE, _SVDF_TIME, _SVDF_BIAS, _SVDF_STATE = 0, 1, 2, 3, 4


def _svdf_shapes(ctx, op):
    x_t = ctx.tensor(op.inputs[_SVDF_INPUT])
    n_filter, n_memory = ctx.tensor(op.inputs[_SVDF_TIME]).shape
    rank = int(op.opt("rank", 1) or 1)
    batch = x_t.shape[0]
    if len(x_t.shape) != 2 or n_filter % rank or ctx.tensor(op.inputs[_SVDF_STATE]).size != batch * n_filter * n_memory:
        raise InvalidModel(f"SVDF #{op.index}: input {list(x_t.shape)}, {n_filter} filters of memory {n_memory}, rank "
                           f"{rank} and state {list(ctx.tensor(op.inputs[_SVDF_STATE]).shape)} do not fit together")
    return batch, x_t.shape[1], n_filter, n_memory, rank


@register("SVDF", "float32", note="memory kept across inferences")
def svdf(ctx, op, impl):
    """As TFLite's: the state (each filter's last `memory` activations) shifts left by one, the new feature
    activation W_f x goes last, each filter's memory is dotted with its time weights, ranks summed, bias, activation."""
    from tvm import relax

    batch, _, n_filter, n_memory, rank = _svdf_shapes(ctx, op)
    state = relax.op.reshape(ctx.input(op, _SVDF_STATE), (batch, n_filter, n_memory))
    feature = relax.op.matmul(ctx.input(op, _SVDF_INPUT), relax.op.permute_dims(ctx.input(op, _SVDF_FEATURE)))
    newest = relax.op.reshape(feature, (batch, n_filter, 1))
    memory = newest if n_memory == 1 else relax.op.concat(
        [relax.op.strided_slice(state, [2], [1], [n_memory]), newest], axis=2)
    memory = ctx.emit(memory)
    scratch = relax.op.sum(relax.op.multiply(memory, ctx.input(op, _SVDF_TIME)), axis=[2])
    out = relax.op.sum(relax.op.reshape(scratch, (batch, n_filter // rank, rank)), axis=[2])
    if _given(op, _SVDF_BIAS):
        out = relax.op.add(out, ctx.input(op, _SVDF_BIAS))
    ctx.set_output(op, 0, activation(ctx, op, out))
    ctx.set_state(op.inputs[_SVDF_STATE], relax.op.reshape(memory, ctx.tensor(op.inputs[_SVDF_STATE]).shape))


@register("SVDF", "int8", implementations=("c",), note="C kernel; memory kept across inferences")
def svdf_int8(ctx, op, impl):
    """TFLite's integer SVDF (C kernel firmware/kernels/reference/svdf_s8.c): int16 state with zero point 0, int16
    time weights; its effective scales are float32 products as in the interpreter's Prepare. The interpreter takes
    an integer SVDF only with RELU and then applies none (only the int8 clamp): so do we."""
    from tvm import relax

    batch, n_input, n_filter, n_memory, rank = _svdf_shapes(ctx, op)
    x_t, out_t = ctx.tensor(op.inputs[_SVDF_INPUT]), ctx.tensor(op.outputs[0])
    wf_t, wt_t, s_t = (ctx.tensor(op.inputs[k]) for k in (_SVDF_FEATURE, _SVDF_TIME, _SVDF_STATE))
    if (wf_t.dtype, wt_t.dtype, s_t.dtype) != ("int8", "int16", "int16") or s_t.zero_point:
        raise UnsupportedOperator([(f"SVDF #{op.index} int8 with {wf_t.dtype} feature weights, {wt_t.dtype} time "
                                   f"weights and {s_t.dtype} state of zero point {s_t.zero_point} (int8, int16, int16 "
                                   "with zero point 0 supported)")], ctx.graph.name)
    for k in (_SVDF_FEATURE, _SVDF_TIME, _SVDF_BIAS):
        if _given(op, k) and not ctx.tensor(op.inputs[k]).is_const:
            raise UnsupportedOperator([f"SVDF #{op.index} with computed weights"], ctx.graph.name)
    scale_1 = _f32(x_t.scale) * _f32(wf_t.scale) / _f32(s_t.scale)
    scale_2 = _f32(s_t.scale) * _f32(wt_t.scale) / _f32(out_t.scale)
    n_unit = n_filter // rank
    bias = (np.asarray(ctx.tensor(op.inputs[_SVDF_BIAS]).data, np.int32) if _given(op, _SVDF_BIAS)
            else np.zeros(n_unit, np.int32))
    params = np.array([batch, n_input, n_filter, n_memory, rank, x_t.zero_point, out_t.zero_point,
                       *quantize_multiplier(float(scale_1)), *quantize_multiplier(float(scale_2))], np.int32)
    args = [ctx.input(op, _SVDF_INPUT), ctx.input(op, _SVDF_FEATURE), ctx.input(op, _SVDF_TIME), ctx.const(bias),
            ctx.input(op, _SVDF_STATE), ctx.const(params)]
    out_sinfo = [relax.TensorType(list(s_t.shape), "int16"), relax.TensorType([batch * n_filter], "int32"),
                 relax.TensorType(list(out_t.shape), "int8")]  # the operator's output last
    result = ctx.emit(relax.call_dps_packed("tinymlaas_svdf_s8", args, out_sinfo))
    ctx.set_output(op, 0, relax.TupleGetItem(result, 2))
    ctx.set_state(op.inputs[_SVDF_STATE], relax.TupleGetItem(result, 0))
