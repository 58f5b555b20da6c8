"""A graph rewrite: dilated convolutions as converters export them, SPACE_TO_BATCH_ND -> CONV_2D (or
DEPTHWISE_CONV_2D) -> BATCH_TO_SPACE_ND, become one dilated convolution.

TensorFlow lowers a dilated convolution to a plain one on d x d sub-images: SPACE_TO_BATCH_ND pads the input and
splits it into the d^2 phases of the dilation, the convolution runs on each (VALID, stride 1), BATCH_TO_SPACE_ND
interleaves the results and crops. Output element i of one spatial axis is then

    sum_k x[i + crop + k d - pad] w[k]

(pad: SPACE_TO_BATCH_ND's leading padding, crop: BATCH_TO_SPACE_ND's leading crop), which is the dilated
convolution with leading padding pad - crop. Where that padding (and the trailing one it implies) is TFLite's VALID
or SAME, the three operators become one convolution with dilation d: two operators and two copies of the
activations fewer, and the output is the same bit for bit (the same products summed in the same order per output,
the same requantization). Keras's 1-D convolutions carry an EXPAND_DIMS before and a RESHAPE after the
convolution (over a batch of phases); they are kept, over the un-split tensor.
"""

from __future__ import annotations

from dataclasses import replace
from types import MappingProxyType

import numpy as np

from tinymlaas.frontend.graph import Graph, Operator, Tensor

CONVOLUTIONS = ("CONV_2D", "DEPTHWISE_CONV_2D")
PADDING_SAME, PADDING_VALID = 0, 1  # TFLite's Padding enum


def _single_consumer(graph: Graph, consumers: dict, tensor: int) -> Operator | None:
    users = consumers.get(tensor, [])
    return users[0] if len(users) == 1 and tensor not in graph.outputs else None


def _padding_mode(size_in: int, size_out: int, kernel: int, dilation: int, lead: int) -> int | None:
    """VALID or SAME if a dilated convolution over `size_in` with leading padding `lead` gives `size_out` outputs
    as that mode does; else None."""
    span = (kernel - 1) * dilation + 1
    trail = size_out - 1 + span - size_in - lead
    if lead == trail == 0:
        return PADDING_VALID
    if size_out == size_in and lead == (span - 1) // 2 and trail == span - 1 - lead:
        return PADDING_SAME
    return None


def fold_dilated_convolutions(graph: Graph) -> Graph:
    consumers = graph.consumers()
    tensors = list(graph.tensors)
    replaced: dict[int, list[Operator]] = {}  # index of the SPACE_TO_BATCH_ND -> the operators taking its place
    removed: set[int] = set()
    for s2b in graph.operators:
        if s2b.opcode != "SPACE_TO_BATCH_ND":
            continue
        block, pads = graph.tensor(s2b.inputs[1]), graph.tensor(s2b.inputs[2])
        x = graph.tensor(s2b.inputs[0])
        if not (block.is_const and pads.is_const) or x.shape[0] != 1:
            continue
        chain = [s2b]
        op = _single_consumer(graph, consumers, s2b.outputs[0])
        expand = op if op is not None and op.opcode == "EXPAND_DIMS" and len(x.shape) == 3 else None
        if expand is not None:
            chain.append(expand)
            op = _single_consumer(graph, consumers, expand.outputs[0])
        conv = op
        if conv is None or conv.opcode not in CONVOLUTIONS or conv.opt("padding") != PADDING_VALID \
                or (conv.opt("strideH", 1), conv.opt("strideW", 1)) != (1, 1) \
                or (conv.opt("dilationHFactor", 1), conv.opt("dilationWFactor", 1)) != (1, 1):
            continue
        chain.append(conv)
        op = _single_consumer(graph, consumers, conv.outputs[0])
        reshape = op if expand is not None and op is not None and op.opcode == "RESHAPE" else None
        if reshape is not None:
            chain.append(reshape)
            op = _single_consumer(graph, consumers, reshape.outputs[0])
        b2s = op
        if b2s is None or b2s.opcode != "BATCH_TO_SPACE_ND" or (expand is None) != (reshape is None):
            continue
        crops, block2 = graph.tensor(b2s.inputs[2]), graph.tensor(b2s.inputs[1])
        if not (crops.is_const and block2.is_const) or list(block2.data) != list(block.data):
            continue
        out = graph.tensor(b2s.outputs[0])
        w = graph.tensor(conv.inputs[1])
        # spatial axes of x (rank 4: H, W; rank 3, the 1-D case: the length, which is the convolution's W)
        kernels = (int(w.shape[1]), int(w.shape[2]))
        axes = [(1, 0), (2, 1)] if expand is None else [(1, 1)]  # (axis of x and out, axis of the kernel)
        modes = {}
        for (axis, k), d, (lead, _), (crop, _) in zip(axes, block.data, pads.data, crops.data):
            modes[k] = _padding_mode(int(x.shape[axis]), int(out.shape[axis]), kernels[k], int(d), int(lead - crop))
        dilation = {k: int(d) for (_, k), d in zip(axes, block.data)}
        if None in modes.values() or len(set(modes.values())) != 1:
            continue
        if expand is not None and kernels[0] != 1:
            continue
        mode = next(iter(modes.values()))
        # the convolution over the un-split input; new tensors for what now has the un-split shape
        ops = []
        src = x.index
        if expand is not None:
            t = tensors[expand.outputs[0]]
            tensors.append(replace(t, index=len(tensors), shape=(1, 1, *x.shape[1:])))
            ops.append(replace(expand, inputs=(x.index, *expand.inputs[1:]), outputs=(len(tensors) - 1,)))
            src = len(tensors) - 1
        c = tensors[conv.outputs[0]]
        conv_shape = (1, *out.shape[1:]) if expand is None else (1, 1, *out.shape[1:])
        conv_out = out.index if expand is None else len(tensors)
        if expand is not None:
            tensors.append(replace(c, index=len(tensors), shape=conv_shape))
        options = dict(conv.options, padding=mode, dilationHFactor=dilation.get(0, 1),
                       dilationWFactor=dilation.get(1, 1))
        ops.append(replace(conv, inputs=(src, *conv.inputs[1:]), outputs=(conv_out,),
                           options=MappingProxyType(options)))
        if reshape is not None:
            shape_t = len(tensors)
            value = np.array(out.shape, dtype=np.int32)
            value.setflags(write=False)
            tensors.append(Tensor(shape_t, f"{out.name}/shape", (len(out.shape),), "int32", data=value))
            reshape_options = dict(reshape.options)
            if "newShape" in reshape_options:
                reshape_options["newShape"] = list(out.shape)
            ops.append(replace(reshape, inputs=(conv_out, shape_t), outputs=(out.index,),
                               options=MappingProxyType(reshape_options)))
        replaced[s2b.index] = ops
        removed.update(o.index for o in (*chain, b2s))
    if not replaced:
        return graph
    operators = []
    for op in graph.operators:
        if op.index in replaced:
            operators += replaced[op.index]
        elif op.index not in removed:
            operators.append(op)
    note = (f"graph rewrite: {len(replaced)} dilated convolution(s) exported as SPACE_TO_BATCH_ND -> convolution "
            f"-> BATCH_TO_SPACE_ND folded into one each ({2 * len(replaced)} operators removed)")
    return replace(graph, tensors=tuple(tensors), operators=tuple(operators), notes=(*graph.notes, note))
