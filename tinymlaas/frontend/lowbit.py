"""Weights below eight bits: an integer model's layer weights rewritten in the TFLite model itself.

int4: a layer's weights become 4-bit values, per output channel symmetric (-7..7 times a new scale per channel:
the channel's largest magnitude / 7), from the values the int8 weights stand for (q * scale), with the biases
re-quantized to input scale x new weight scale. paletteN: a layer's int8 weights are snapped to 2^N values (1-D
k-means), scales and biases unchanged. Either way the result is still a TFLite model (int8 tensors holding the new
values), so the TFLite interpreter runs exactly the arithmetic the firmware runs: the verification's reference is
that model, bit-exact. The firmware keeps those weights packed in flash (ir/weight_storage.py, ir/weight_decode.py,
the 4-bit gemv). What it costs in accuracy is the user's data's to say: Judge measures it on a validation set, and
choose_plan (--weights auto) picks each layer's precision within the allowed drop.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np

# operators whose weights (input 1) may go below eight bits, and the weights' output-channel axis
WEIGHT_AXIS = {"CONV_2D": 0, "DEPTHWISE_CONV_2D": 3, "FULLY_CONNECTED": 0}
INT4_MAX = 7  # symmetric: -7..7 (TFLite's int4 and CMSIS-NN's s4 kernels take the same range)
MIN_WEIGHTS = 64  # a smaller tensor saves less flash than its decoding costs in code
LADDER_STEPS = 2  # plans between int8 and auto's answer that a search also builds (low_bit_weights' ladder)
LOW_BIT = ("int4", "palette", "auto")  # the --weights values below eight bits (palette: --palette-bits)
# sets of them a search explores (BuildRequest.weights' choices: the same order in each)
WEIGHT_SETS = ("int4,palette", "int4,auto", "palette,auto", "int4,palette,auto")


@dataclass(frozen=True)
class LayerWeights:
    """One layer's weights as the rewrite left them: the operator, its precision and the flash its weights need."""

    op: int
    opcode: str
    precision: str  # int8 | int4 | palette<bits>
    elements: int

    @property
    def nbytes(self) -> int:
        if self.precision.startswith("palette"):
            bits = int(self.precision.removeprefix("palette"))
            return -(-self.elements // (32 // bits)) * 4 + 2 ** bits  # indices in whole words, the table
        return self.elements if self.precision == "int8" else (self.elements + 1) // 2

    def to_dict(self) -> dict:
        return {"op": self.op, "opcode": self.opcode, "precision": self.precision, "bytes": self.nbytes}


def eligible_layers(graph) -> list[int]:
    """Operators whose constant int8 weights can go to int4: convolutions, depthwise convolutions and fully
    connected layers of int8 activations, symmetric weights of at least MIN_WEIGHTS values, used by that layer only."""
    readers: dict[int, int] = {}
    for op in graph.operators:
        for i in op.inputs:
            if i >= 0:
                readers[i] = readers.get(i, 0) + 1
    out = []
    for op in graph.operators:
        if op.opcode not in WEIGHT_AXIS or len(op.inputs) < 2:
            continue
        x, w = graph.tensor(op.inputs[0]), graph.tensor(op.inputs[1])
        if (x.dtype == "int8" and w.dtype == "int8" and w.is_const and w.quant is not None
                and not any(w.quant.zero_point) and w.size >= MIN_WEIGHTS and readers[w.index] == 1
                and (len(op.inputs) < 3 or op.inputs[2] < 0 or readers[op.inputs[2]] == 1)):
            out.append(op.index)
    return out


def requantize_int4(q: np.ndarray, scale: np.ndarray, axis: int, per_channel: bool = True
                    ) -> tuple[np.ndarray, np.ndarray]:
    """int8 weights `q` with `scale` per index of `axis` (or one) -> (4-bit values as int8, their scale: one per
    channel, or one for the tensor). A channel of zeros keeps its scale (its values stay 0)."""
    channels = q.shape[axis]
    shape = [1] * q.ndim
    shape[axis] = channels
    s8 = np.broadcast_to(np.asarray(scale, np.float64).reshape(-1), (channels,))
    real = q.astype(np.float64) * s8.reshape(shape)
    peak = np.abs(np.moveaxis(real, axis, 0).reshape(channels, -1)).max(axis=1)
    if not per_channel:
        peak, s8 = np.array([peak.max()]), s8[:1]
    s4 = np.where(peak > 0, peak / INT4_MAX, s8).astype(np.float32)  # stored as float32: divide by what is stored
    q4 = np.rint(real / np.broadcast_to(s4.astype(np.float64), (channels,)).reshape(shape))
    return np.clip(q4, -INT4_MAX, INT4_MAX).astype(np.int8), s4


def with_int4_weights(data: bytes, layers: list[int]) -> bytes:
    """The TFLite flatbuffer `data` with the weights of operators `layers` (eligible_layers) re-quantized to int4."""
    from tinymlaas.frontend.tflite import model_bytes, model_tree, read_graph

    if not layers:
        return data
    opcodes = {op.index: op.opcode for op in read_graph(data).operators}
    m = model_tree(data)
    sg = m.subgraphs[0]
    for index in layers:
        op, opcode = sg.operators[index], opcodes[index]
        axis = WEIGHT_AXIS[opcode]
        x, w = sg.tensors[op.inputs[0]], sg.tensors[op.inputs[1]]
        buf = m.buffers[w.buffer]
        q = np.frombuffer(bytes(bytearray(buf.data)), np.int8).reshape(w.shape)
        s8 = np.asarray(w.quantization.scale, np.float64)
        per_tensor = s8.size == 1 and opcode == "FULLY_CONNECTED"  # a per-tensor FC stays so (as the model has it)
        q4, s4 = requantize_int4(q, s8, axis, per_channel=not per_tensor)
        buf.data = np.frombuffer(q4.tobytes(), np.uint8)
        w.quantization.scale = [float(v) for v in s4]
        w.quantization.zeroPoint = [0] * s4.size
        w.quantization.quantizedDimension = axis if not per_tensor else 0
        if len(op.inputs) > 2 and op.inputs[2] >= 0:  # the bias: input scale x weight scale
            b = sg.tensors[op.inputs[2]]
            bias = np.frombuffer(bytes(bytearray(m.buffers[b.buffer].data)), np.int32).astype(np.float64)
            x_scale = float(x.quantization.scale[0])
            new = (x_scale * s4.astype(np.float64)).astype(np.float32)  # one per weight scale, as TFLite checks
            ratio = np.broadcast_to(s8, bias.shape) / np.broadcast_to(s4.astype(np.float64), bias.shape)
            b32 = np.clip(np.rint(bias * ratio), -(2**31), 2**31 - 1).astype(np.int32)
            m.buffers[b.buffer].data = np.frombuffer(b32.tobytes(), np.uint8)
            b.quantization.scale = [float(v) for v in new]
            b.quantization.zeroPoint = [0] * new.size
    return model_bytes(m, len(data) + 1024)


PALETTE_BITS = (2, 3, 4, 5, 6)


def palette_of(q: np.ndarray, bits: int, seed: int = 0) -> np.ndarray:
    """The 2^bits int8 values (0 among them: the kernels' padding reads it) that the layer's weights are snapped to:
    1-D k-means (scipy) of the weights' values, rounded; fewer where the weights hold fewer distinct values."""
    from scipy.cluster.vq import kmeans2

    values = np.unique(q)
    if values.size + (0 not in values) <= 2 ** bits:
        return np.union1d(values, [0]).astype(np.int8)
    centroids, _ = kmeans2(q.astype(np.float64).reshape(-1, 1), 2 ** bits - 1, seed=seed, minit="++")
    return np.union1d(np.clip(np.rint(centroids.ravel()), -128, 127), [0]).astype(np.int8)


def snapped(q: np.ndarray, palette: np.ndarray) -> np.ndarray:
    """Each value replaced by the nearest palette value (ties: the smaller)."""
    table = palette.astype(np.int16)
    nearest = np.abs(q.astype(np.int16).reshape(-1, 1) - table.reshape(1, -1)).argmin(axis=1)
    return table[nearest].astype(np.int8).reshape(q.shape)


def with_palette_weights(data: bytes, layers: list[int], bits: int) -> bytes:
    """`data` with the weights of operators `layers` snapped to a palette of 2^bits values each (palette_of). Scales
    and biases stay: the model computes with int8 weights that take at most 2^bits values, stored as indices."""
    from tinymlaas.frontend.tflite import model_bytes, model_tree

    if not layers:
        return data
    m = model_tree(data)
    sg = m.subgraphs[0]
    for index in layers:
        w = sg.tensors[sg.operators[index].inputs[1]]
        buf = m.buffers[w.buffer]
        q = np.frombuffer(bytes(bytearray(buf.data)), np.int8).reshape(w.shape)
        buf.data = np.frombuffer(snapped(q, palette_of(q, bits)).tobytes(), np.uint8)
    return model_bytes(m, len(data) + 1024)


def weight_layers(graph) -> list[LayerWeights]:
    """Every layer with constant int8 weights (WEIGHT_AXIS's operators), as int8: low_bit_weights sets the
    precision of those its plan rewrote."""
    out = []
    for op in graph.operators:
        if op.opcode in WEIGHT_AXIS and len(op.inputs) > 1 and graph.tensor(op.inputs[1]).is_const:
            w = graph.tensor(op.inputs[1])
            if w.dtype == "int8":
                out.append(LayerWeights(op.index, op.opcode, "int8", int(w.size)))
    return out


def low_bit_weights(model, request, plan: dict[int, str] | None = None, ladder: list | None = None):
    """(model, its layers' weights, accuracy) for a build's request (BuildRequest.weights, palette_bits, validation,
    metric, max_accuracy_drop): int4 or palette rewrites every eligible layer of an integer model, auto the layers
    and precisions choose_plan finds; other values leave the model as it is and report no layers. accuracy: on the
    validation file when one is given, beside the model as given (None without one).
    ladder: filled with (plan, accuracy) from int8 to the plan given back, through at most LADDER_STEPS plans auto
    kept on its way (each measured within the limit; evenly spaced): what a search builds besides, so that its
    front spans flash against accuracy."""
    from dataclasses import replace

    from tinymlaas.accuracy import load_validation
    from tinymlaas.build.request import InvalidRequest
    from tinymlaas.frontend.tflite import read_graph

    if request.weights in WEIGHT_SETS:  # a search explores a set; what it builds is one of its points' plans
        if plan is None:
            raise InvalidRequest("weights", f"{request.weights} is a set of precisions for `search` to explore; a "
                                 "build takes one (int4, palette, or auto: chosen per layer), or a searched "
                                 "--variant")
        request = replace(request, weights="stored")  # the variant's plan decides (int8 where it has none)
    if request.weights == "auto" and not request.validation:
        raise InvalidRequest("weights", "auto chooses per layer by accuracy: give --validation data.npz (and "
                             "--max-accuracy-drop)")
    if request.max_accuracy_drop is not None and not request.validation:
        raise InvalidRequest("max_accuracy_drop", "needs --validation data.npz to measure the accuracy on")
    validation = load_validation(request.validation, model) if request.validation else None
    judge = Judge(model.data, validation, request.metric) if validation is not None else None
    if plan:  # a variant's (a search point rebuilt): its layers must be this model's eligible ones
        wrong = sorted(set(plan) - set(eligible_layers(model.graph)))
        if wrong:
            raise InvalidRequest("variant_file", f"puts weights below eight bits at operator(s) "
                                 f"{', '.join(map(str, wrong))}, which {model.name} cannot have there (made for "
                                 "another model?)")
    elif request.weights not in ("int4", "auto", "palette"):
        return model, [], judge.report(model.data) if judge else None
    if not model.quantized:
        raise InvalidRequest("weights", f"{request.weights} re-quantizes an integer model's int8 weights: this model "
                             "is float (quantize it first: an int8 .tflite, or --quantize int8 with --calibration)")
    eligible = eligible_layers(model.graph)
    if not eligible:
        raise InvalidRequest("weights", f"{request.weights}: {model.name} has no convolution or fully connected layer "
                             f"with int8 weights of {MIN_WEIGHTS} values or more")
    limit = request.max_accuracy_drop
    steps: list[dict[int, str]] = []
    if not plan and request.weights == "auto":
        plan = choose_plan(model.data, model.graph, eligible, judge, 0.0 if limit is None else limit, steps)
    elif not plan:
        plan = dict.fromkeys(eligible, f"palette{request.palette_bits}" if request.weights == "palette" else "int4")
    data = rewritten(model.data, plan)
    accuracy = judge.report(data) if judge else None
    if ladder is not None and plan:
        between = steps[:-1]
        picks = [between[round(k * (len(between) - 1) / max(LADDER_STEPS - 1, 1))]
                 for k in range(min(LADDER_STEPS, len(between)))] if between else []
        for rung in [{}, *[p for k, p in enumerate(picks) if p not in picks[:k]], plan]:
            ladder.append((rung, judge.report(rewritten(model.data, rung)) if judge else None))
    if accuracy and limit is not None and accuracy["drop"] > limit:
        raise InvalidRequest("max_accuracy_drop", f"{limit:g}: {request.weights} weights in {len(plan)} of "
                             f"{len(eligible)} eligible layers lose {accuracy['drop']:.2f} points of "
                             f"{request.metric} ({accuracy['reference']:.4f} -> {accuracy['value']:.4f}); --weights "
                             "auto keeps int8 where that costs too much")
    graph = read_graph(data, model.name)
    layers = [replace(w, precision=plan.get(w.op, "int8")) for w in weight_layers(graph)]
    counts = ", ".join(f"{n} {p}" for p, n in sorted(Counter(plan.values()).items()))
    notes = [(f"weights below eight bits in {len(plan)} of {len(layers)} layers ({counts or 'none'}; int4: per "
              "channel, symmetric -7..7; paletteN: 2^N k-means values a layer, kept as indices): "
              f"{sum(w.nbytes for w in layers):,} B of layer weights instead of {sum(w.elements for w in layers):,} "
              "B; verified against the interpreter on that model")]
    if not plan:
        notes.append(f"no layer could go below eight bits within {limit:g} points of {request.metric}: all int8")
    return replace(model, data=data, graph=graph, notes=[*model.notes, *notes]), layers, accuracy


def rewritten(data: bytes, plan: dict[int, str]) -> bytes:
    """The model with each planned layer's weights at its precision (int4, paletteN)."""
    data = with_int4_weights(data, sorted(op for op, p in plan.items() if p == "int4"))
    for bits in PALETTE_BITS:
        data = with_palette_weights(data, sorted(op for op, p in plan.items() if p == f"palette{bits}"), bits)
    return data


def candidates(graph, op: int) -> list[str]:
    """The precisions `auto` tries for a layer, smallest first. A one-row fully connected layer's C kernel reads
    4-bit weights in its loop (no RAM); so it does 16-value palettes, which take no less flash (and a pair table),
    while smaller ones would be unpacked into RAM on every inference: int4 only."""
    o = graph.operators[op]
    x, w = graph.tensor(o.inputs[0]), graph.tensor(o.inputs[1])
    if o.opcode == "FULLY_CONNECTED" and x.size == w.shape[1]:
        return ["int4"]
    return ["palette2", "palette3", "int4"]


def choose_plan(data: bytes, graph, eligible: list[int], judge: Judge, limit: float,
                steps: list | None = None) -> dict[int, str]:
    """Per layer the smallest precision within `limit` points of accuracy: each (layer, precision) measured alone
    first; then layers in order of the flash they can save, each given its smallest precision that keeps the set,
    measured, within the limit (int8 if none does). Every plan kept was measured: none beyond the limit.
    steps: each plan kept on the way (a copy) is appended to it, the last one the answer."""
    size = {op: graph.tensor(graph.operators[op].inputs[1]).size for op in eligible}
    nbytes = {(op, p): LayerWeights(op, "", p, size[op]).nbytes for op in eligible for p in candidates(graph, op)}
    alone = {(op, p): judge.drop(rewritten(data, {op: p})) for op, p in nbytes}
    order = sorted(eligible, key=lambda op: (-(size[op] - min(nbytes[op, p] for p in candidates(graph, op))), op))
    plan: dict[int, str] = {}
    for op in order:
        for p in candidates(graph, op):
            if alone[op, p] <= limit and judge.drop(rewritten(data, {**plan, op: p})) <= limit:
                plan[op] = p
                if steps is not None:
                    steps.append(dict(plan))
                break
    return plan


class Judge:
    """The accuracy of variants of one model on one validation set, against the model as given (measured once)."""

    def __init__(self, reference: bytes, validation, metric: str):
        from tinymlaas.accuracy import measure

        self.validation, self.metric = validation, metric
        self.reference = measure(reference, validation, metric)
        self.cache: dict[bytes, float] = {}

    def value(self, data: bytes) -> float:
        from tinymlaas.accuracy import measure

        if data not in self.cache:
            self.cache[data] = measure(data, self.validation, self.metric)
        return self.cache[data]

    def drop(self, data: bytes) -> float:
        from tinymlaas.accuracy import drop

        return drop(self.reference, self.value(data), self.metric)

    def report(self, data: bytes) -> dict:
        return {"metric": self.metric, "value": self.value(data), "reference": self.reference,
                "drop": round(self.drop(data), 4), "samples": len(self.validation)}
