"""A graph rewrite: PAD -> CONV_2D / DEPTHWISE_CONV_2D (VALID) becomes one convolution with explicit padding.

Exporters write a PAD where the framework's padding is not TFLite's SAME: PyTorch's `padding=1` on a stride-2 3x3
convolution over an even size pads one pixel on each side, SAME pads none before and one after. The interpreter
runs the PAD and a VALID convolution; our kernels take any padding (top, bottom, left, right), so the convolution
reads the unpadded input and treats the border as padding: one operator and one copy of the activations fewer,
the same products summed in the same order, bit for bit. Folded where the PAD pads the two spatial axes only, by
non-negative amounts, with the value a convolution's own padding reads (0 in float, the input's zero point when
quantized) and the convolution is the PAD's only reader. The convolution keeps the padding in its options as
`explicitPadding` (ops/geometry.py `window_padding` reads it).
"""

from __future__ import annotations

from dataclasses import replace
from types import MappingProxyType

import numpy as np

from tinymlaas.frontend.graph import Graph, Operator

CONVOLUTIONS = ("CONV_2D", "DEPTHWISE_CONV_2D")
PADDING_VALID = 1  # TFLite's Padding enum


def _pad_value_matches(graph: Graph, pad: Operator) -> bool:
    x = graph.tensor(pad.inputs[0])
    border = x.zero_point if x.quant is not None else 0
    if pad.opcode == "PAD" or len(pad.inputs) < 3 or pad.inputs[2] < 0:
        return x.quant is None or graph.tensor(pad.outputs[0]).zero_point == border
    value = graph.tensor(pad.inputs[2])
    return value.is_const and value.data.size == 1 and float(value.data.ravel()[0]) == border


def spatial_pads(graph: Graph, pad: Operator) -> tuple[int, int, int, int] | None:
    """(top, bottom, left, right) of a PAD that pads only the spatial axes of an NHWC tensor; None otherwise."""
    if len(graph.tensor(pad.inputs[0]).shape) != 4 or not graph.tensor(pad.inputs[1]).is_const:
        return None
    widths = np.asarray(graph.tensor(pad.inputs[1]).data).astype(np.int64).reshape(-1, 2)
    if widths.shape != (4, 2) or widths[0].any() or widths[3].any() or (widths < 0).any():
        return None
    return int(widths[1][0]), int(widths[1][1]), int(widths[2][0]), int(widths[2][1])


def fold_pads_into_convolutions(graph: Graph) -> Graph:
    consumers = graph.consumers()
    removed: set[int] = set()
    rewritten: dict[int, Operator] = {}
    for pad in graph.operators:
        if pad.opcode not in ("PAD", "PADV2") or pad.outputs[0] in graph.outputs:
            continue
        users = consumers.get(pad.outputs[0], [])
        if len(users) != 1 or users[0].opcode not in CONVOLUTIONS or users[0].inputs[0] != pad.outputs[0]:
            continue
        conv = users[0]
        pads = spatial_pads(graph, pad)
        if pads is None or int(conv.opt("padding", 0)) != PADDING_VALID or conv.opt("explicitPadding") \
                or not _pad_value_matches(graph, pad) \
                or graph.tensor(pad.inputs[0]).quant != graph.tensor(pad.outputs[0]).quant:
            continue
        options = dict(conv.options)
        options["explicitPadding"] = pads
        rewritten[conv.index] = replace(conv, inputs=(pad.inputs[0], *conv.inputs[1:]),
                                        options=MappingProxyType(options))
        removed.add(pad.index)
    if not removed:
        return graph
    operators = tuple(rewritten.get(op.index, op) for op in graph.operators if op.index not in removed)
    note = f"{len(removed)} PAD operator{'s' if len(removed) > 1 else ''} folded into the convolution after it"
    return replace(graph, operators=operators, notes=(*graph.notes, note))
