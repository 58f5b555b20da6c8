"""ONNX LSTM and GRU (PyTorch's nn.LSTM / nn.GRU as its exporters write them) as TFLite float operators, the time loop
unrolled: per step the input's and the state's products (FULLY_CONNECTED, the weights stored once), the gates
(SPLIT, LOGISTIC, TANH) and the state update (MUL, ADD, SUB).

Why unrolled and not TFLite's UNIDIRECTIONAL_SEQUENCE_LSTM: that operator keeps its state across inferences in
variable tensors, while ONNX's starts every run from `initial_h` (zeros by default); unrolled, the firmware computes
what ONNX Runtime computes, each step's operators sharing one code body with the other steps'.
"""

from __future__ import annotations

import numpy as np

from tinymlaas.frontend.onnx_ops import Steps, converts, ints

# gate order in W, R and B: ONNX's
_GATES = {"LSTM": 4, "GRU": 3}
_DEFAULT_ACTIVATIONS = {"LSTM": ["Sigmoid", "Tanh", "Tanh"], "GRU": ["Sigmoid", "Tanh"]}


class _Emit(Steps):
    """Steps with the pieces of a recurrent cell."""

    def fc(self, x, w: np.ndarray, b: np.ndarray, rows: int) -> int:
        return self.op("FULLY_CONNECTED", [x, self.const(w, "w"), self.const(b, "b")], (rows, w.shape[0]),
                       self.cv.options("FullyConnectedOptions"), label="fc")

    def binary(self, opcode: str, a, b, shape) -> int:
        return self.op(opcode, [a, b], shape)

    def split(self, x, parts: int, shape) -> list[int]:
        outs = [self.tensor((shape[0], shape[1] // parts), "gate") for _ in range(parts)]
        self.cv.op("SPLIT", [self.cv.constant(np.asarray(1, np.int32), f"{self.name}/axis{self.count}"), x], outs,
                   self.cv.options("SplitOptions", numSplits=parts))
        return outs

    def rows(self, x, start: int, count: int, width: int) -> int:
        """Rows [start, start + count) of a 2-D tensor."""
        return self.op("STRIDED_SLICE", [x, self.cv.constant(ints([start, 0]), f"{self.name}/begin{self.count}"),
                                         self.cv.constant(ints([start + count, width]), f"{self.name}/end{self.count}"),
                                         self.cv.constant(ints([1, 1]), f"{self.name}/strides{self.count}")],
                       (count, width), self.cv.options("StridedSliceOptions"), label="step")

    def reshape(self, x, shape) -> int:
        return self.op("RESHAPE", [x, self.cv.constant(ints(shape), f"{self.name}/shape{self.count}")], shape)


def _refuse_what_onnx_runtime_would_compute_otherwise(cv, node, kind: str) -> None:
    acts = cv.attr(node, "activations", None)
    if acts is not None and [a.decode() if isinstance(a, bytes) else a for a in acts] \
            != _DEFAULT_ACTIVATIONS[kind] * (len(acts) // len(_DEFAULT_ACTIVATIONS[kind])):
        raise cv.unsupported("with activations other than the default sigmoid and tanh")
    if cv.attr(node, "clip", None) is not None:
        raise cv.unsupported("with a cell clip")
    if int(cv.attr(node, "input_forget", 0)):
        raise cv.unsupported("with input_forget")
    if len(node.input) > 4 and node.input[4]:
        raise cv.unsupported("with sequence lengths")
    if int(cv.attr(node, "layout", 0)):  # PyTorch's batch_first exports transpose around a layout-0 node
        raise cv.unsupported("with layout 1 (batch first)")
    if kind == "LSTM" and len(node.input) > 7 and node.input[7]:
        raise cv.unsupported("with peepholes")
    for k in (1, 2, 3):
        if len(node.input) > k and node.input[k] and not cv.is_const(node.input[k]):
            raise cv.unsupported("with weights computed at run time")


def _initial(cv, e: _Emit, node, k: int, direction: int, batch: int, hidden: int) -> int | None:
    """Initial state `k` (5: h, 6: c) of one direction: None where it is zero (absent or constant zeros)."""
    if len(node.input) <= k or not node.input[k]:
        return None
    name = node.input[k]
    if cv.is_const(name):
        value = np.asarray(cv.const(name), np.float32)[direction]
        return None if not value.any() else e.const(value, "initial")
    whole = cv.value(name, False)  # [directions, batch, hidden]
    part = e.op("STRIDED_SLICE", [whole, cv.constant(ints([direction, 0, 0]), f"{e.name}/h0b{direction}.{k}"),
                                  cv.constant(ints([direction + 1, batch, hidden]), f"{e.name}/h0e{direction}.{k}"),
                                  cv.constant(ints([1, 1, 1]), f"{e.name}/h0s{direction}.{k}")],
                (1, batch, hidden), cv.options("StridedSliceOptions"), label="initial")
    return e.reshape(part, (batch, hidden))


def _lstm_step(e: _Emit, xt, h, c, r, state):
    """One LSTM step, gates [i o f c] (ONNX's order), `xt` holding the input's product and both biases: the new
    (h, c); h, c None for zeros."""
    batch, hidden = state
    pre = xt if h is None else e.binary("ADD", xt, e.fc(h, r, np.zeros(4 * hidden, np.float32), batch),
                                        (batch, 4 * hidden))
    i, o, f, g = e.split(pre, 4, (batch, 4 * hidden))
    i, o, f = (e.op("LOGISTIC", [v], state, label="sigmoid") for v in (i, o, f))
    new = e.binary("MUL", i, e.op("TANH", [g], state, label="tanh"), state)
    c = new if c is None else e.binary("ADD", e.binary("MUL", f, c, state), new, state)
    return e.binary("MUL", o, e.op("TANH", [c], state, label="tanh"), state), c


def _gru_step(e: _Emit, xt, h, r, rb, before_reset: bool, state):
    """One GRU step, gates [z r h] (ONNX's order), `xt` holding the input's product with every bias but the h gate's
    recurrent one (rb, its 3 * hidden recurrent biases): the new h; h None for zeros."""
    batch, hidden = state
    xz, xr, xh = e.split(xt, 3, (batch, 3 * hidden))
    rbh = rb[2 * hidden:]
    if h is None:  # a zero state: z and r see only the input; the reset multiplies zeros, or R_h's bias
        z = e.op("LOGISTIC", [xz], state, label="sigmoid")
        reset = e.op("LOGISTIC", [xr], state, label="sigmoid")
        recurrent = e.binary("MUL", reset, e.const(np.broadcast_to(rbh, state), "rbh"), state) if before_reset \
            else e.const(np.broadcast_to(rbh, state), "rbh")
    else:
        zero = np.zeros(2 * hidden, np.float32)
        if before_reset:  # r * (H R_h^T + Rb_h)
            hz, hr, hh = e.split(e.fc(h, r, np.concatenate([zero, rbh]), batch), 3, (batch, 3 * hidden))
        else:  # (r * H) R_h^T + Rb_h
            hz, hr = e.split(e.fc(h, r[:2 * hidden], zero, batch), 2, (batch, 2 * hidden))
        z = e.op("LOGISTIC", [e.binary("ADD", xz, hz, state)], state, label="sigmoid")
        reset = e.op("LOGISTIC", [e.binary("ADD", xr, hr, state)], state, label="sigmoid")
        recurrent = e.binary("MUL", reset, hh, state) if before_reset \
            else e.fc(e.binary("MUL", reset, h, state), r[2 * hidden:], rbh, batch)
    cand = e.op("TANH", [e.binary("ADD", xh, recurrent, state)], state, label="tanh")
    # (1 - z) * cand + z * H = cand + z * (H - cand)
    h_prev = h if h is not None else e.const(np.zeros(state), "zero")
    return e.binary("ADD", cand, e.binary("MUL", z, e.binary("SUB", h_prev, cand, state), state), state)


@converts("LSTM", "GRU")
def recurrent(cv, node) -> None:
    kind = node.op_type
    _refuse_what_onnx_runtime_would_compute_otherwise(cv, node, kind)
    gates = _GATES[kind]
    steps, batch, features = cv.shape(node.input[0])
    w_all, r_all = np.asarray(cv.const(node.input[1]), np.float32), np.asarray(cv.const(node.input[2]), np.float32)
    hidden = r_all.shape[2]
    b_all = (np.asarray(cv.const(node.input[3]), np.float32) if len(node.input) > 3 and node.input[3]
             else np.zeros((w_all.shape[0], 2 * gates * hidden), np.float32))
    direction = cv.attr(node, "direction", b"forward")
    direction = direction.decode() if isinstance(direction, bytes) else direction
    backwards = {"forward": [False], "reverse": [True], "bidirectional": [False, True]}[direction]
    before_reset = bool(int(cv.attr(node, "linear_before_reset", 0)))
    e = _Emit(cv, node)
    state = (batch, hidden)

    x = e.reshape(cv.value(node.input[0], False), (steps * batch, features))
    outputs = [[None] * len(backwards) for _ in range(steps)]  # H of each step and direction
    last_h, last_c = [], []
    for d, back in enumerate(backwards):
        w, r, b = w_all[d], r_all[d], b_all[d]
        wb, rb = b[:gates * hidden], b[gates * hidden:]
        # the input's product with both biases, but for a GRU the h gate's recurrent one (inside r * (...))
        bias = wb + rb if kind == "LSTM" else np.concatenate([wb[:2 * hidden] + rb[:2 * hidden], wb[2 * hidden:]])
        h = _initial(cv, e, node, 5, d, batch, hidden)
        c = _initial(cv, e, node, 6, d, batch, hidden) if kind == "LSTM" else None
        for t in (range(steps - 1, -1, -1) if back else range(steps)):
            # step by step, not all steps' products at once: RAM of one step's gates (an LSTM of 64 over 49
            # steps: 52.7 KB of arena the other way)
            xt = e.fc(e.rows(x, t * batch, batch, features), w, bias, batch)
            if kind == "LSTM":
                h, c = _lstm_step(e, xt, h, c, r, state)
            else:
                h = _gru_step(e, xt, h, r, rb, before_reset, state)
            outputs[t][d] = h
        last_h.append(h)
        last_c.append(c)

    dirs = len(backwards)

    def write(k: int, parts: list[int], shape) -> None:
        """Output k of the node: its parts, each (batch, hidden), concatenated into `shape`."""
        if len(node.output) <= k or not node.output[k]:
            return
        out = cv.output(node, k, shape, False)
        if len(parts) == 1:
            cv.op("RESHAPE", [parts[0], cv.constant(ints(shape), f"{node.output[k]}/shape")], [out])
        else:
            cv.op("CONCATENATION", [e.reshape(p, (1, batch, hidden)) for p in parts], [out],
                  cv.options("ConcatenationOptions", axis=0))

    if len(node.output) > 0 and node.output[0]:  # Y [steps, directions, batch, hidden]
        y = [h for step in outputs for h in step]
        out = cv.output(node, 0, (steps, dirs, batch, hidden), False)
        pieces = [e.reshape(p, (1, 1, batch, hidden)) for p in y]
        flat = e.op("CONCATENATION", pieces, (steps * dirs, 1, batch, hidden),
                    cv.options("ConcatenationOptions", axis=0), label="sequence") if len(pieces) > 1 else pieces[0]
        cv.op("RESHAPE", [flat, cv.constant(ints((steps, dirs, batch, hidden)), f"{node.output[0]}/shape")], [out])
    write(1, last_h, (dirs, batch, hidden))
    if kind == "LSTM":
        write(2, last_c, (dirs, batch, hidden))
