"""Graph clean-up: small passes, each Graph -> new Graph, composed by `clean`.

- fold_constants: operators whose inputs are all known at compile time are evaluated here (the SHAPE ->
  STRIDED_SLICE -> PACK -> RESHAPE chains of Keras 3 exports, weights that an operator transposes or
  dequantizes). Only exact operations fold: integer arithmetic and data movement; float arithmetic stays on
  the device so that its rounding is the kernel's.
- remove_identities: reshapes to the same shape.
- remove_dead: operators nothing reads.
- fold_dilated_convolutions: SPACE_TO_BATCH_ND -> convolution -> BATCH_TO_SPACE_ND as one dilated convolution
  (frontend/dilation.py).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import numpy as np

from tinymlaas.frontend.dilation import fold_dilated_convolutions
from tinymlaas.frontend.graph import Graph, Operator
from tinymlaas.frontend.pad_fold import fold_pads_into_convolutions
from tinymlaas.ops.semantics import norm_axis, pad_widths, slice_index, strided_slice_index

FOLDERS: dict[str, Callable] = {}  # opcode -> fn(inputs, op, out_tensors) -> list of arrays


def folds(*opcodes: str):
    def register(fn):
        for name in opcodes:
            FOLDERS[name] = fn
        return fn

    return register


def _shape_of(t) -> np.ndarray:
    return np.asarray(t.shape, dtype=np.int32)


@folds("SHAPE")
def _shape(x, op, outs):
    return [np.asarray(x[0].shape, dtype=outs[0].dtype)]


@folds("RANK")
def _rank(x, op, outs):
    return [np.asarray(x[0].ndim, dtype=np.int32)]


@folds("RESHAPE", "SQUEEZE", "EXPAND_DIMS")
def _reshape(x, op, outs):
    return [x[0].reshape(outs[0].shape)]


@folds("STRIDED_SLICE")
def _strided_slice(x, op, outs):
    return [x[0][strided_slice_index(x[0].ndim, x[1], x[2], x[3], op.options)].reshape(outs[0].shape)]


@folds("SLICE")
def _slice(x, op, outs):
    return [x[0][slice_index(x[1], x[2], x[0].shape)]]


@folds("PACK")
def _pack(x, op, outs):
    axis = norm_axis(op.opt("axis", 0), len(outs[0].shape))
    part = [d for a, d in enumerate(outs[0].shape) if a != axis]
    return [np.stack([v.reshape(part) for v in x], axis=axis)]


@folds("UNPACK")
def _unpack(x, op, outs):
    axis = norm_axis(op.opt("axis", 0), x[0].ndim)
    return [np.take(x[0], i, axis=axis) for i in range(x[0].shape[axis])]


@folds("CONCATENATION")
def _concat(x, op, outs):
    if op.opt("fusedActivationFunction", 0):
        raise _NoFold
    return [np.concatenate(x, axis=norm_axis(op.opt("axis", 0), x[0].ndim))]


@folds("CAST")
def _cast(x, op, outs):
    if np.issubdtype(x[0].dtype, np.floating) and not np.issubdtype(np.dtype(outs[0].dtype), np.floating):
        raise _NoFold  # float -> int rounding is the kernel's
    return [x[0].astype(outs[0].dtype)]


@folds("GATHER")
def _gather(x, op, outs):
    axis = norm_axis(op.opt("axis", 0), x[0].ndim)
    if op.opt("batchDims", 0):
        raise _NoFold
    return [np.take(x[0], x[1].astype(np.int64), axis=axis)]


@folds("FILL")
def _fill(x, op, outs):
    return [np.full(x[0].astype(np.int64).ravel().tolist(), x[1].reshape(()), dtype=outs[0].dtype)]


@folds("ZEROS_LIKE")
def _zeros_like(x, op, outs):
    return [np.zeros_like(x[0])]


@folds("RANGE")
def _range(x, op, outs):
    return [np.arange(x[0].reshape(()), x[1].reshape(()), x[2].reshape(())).astype(outs[0].dtype)]


@folds("TRANSPOSE")
def _transpose(x, op, outs):
    return [np.transpose(x[0], [norm_axis(a, x[0].ndim) for a in x[1].ravel().tolist()])]


@folds("TILE")
def _tile(x, op, outs):
    return [np.tile(x[0], x[1].astype(np.int64).ravel().tolist())]


@folds("BROADCAST_TO")
def _broadcast_to(x, op, outs):
    return [np.broadcast_to(x[0], outs[0].shape).copy()]


@folds("BROADCAST_ARGS")
def _broadcast_args(x, op, outs):
    return [np.asarray(np.broadcast_shapes(tuple(x[0].tolist()), tuple(x[1].tolist())), dtype=outs[0].dtype)]


@folds("PAD", "PADV2")
def _pad(x, op, outs):
    if outs[0].quant is not None:
        raise _NoFold
    value = x[2].reshape(()) if len(x) > 2 and x[2] is not None else 0
    return [np.pad(x[0], pad_widths(x[1]), constant_values=value)]


_INT_BINARY = {"ADD": np.add, "SUB": np.subtract, "MUL": np.multiply, "FLOOR_DIV": np.floor_divide,
               "FLOOR_MOD": np.mod, "MAXIMUM": np.maximum, "MINIMUM": np.minimum}


@folds(*_INT_BINARY)
def _int_binary(x, op, outs):
    if not all(np.issubdtype(v.dtype, np.integer) for v in x) or op.opt("fusedActivationFunction", 0):
        raise _NoFold  # float arithmetic is not folded (its rounding is the kernel's)
    return [_INT_BINARY[op.opcode](x[0], x[1]).astype(outs[0].dtype)]


@folds("REDUCE_PROD")
def _reduce_prod(x, op, outs):
    if not np.issubdtype(x[0].dtype, np.integer):
        raise _NoFold
    axes = tuple(norm_axis(a, x[0].ndim) for a in x[1].ravel().tolist())
    return [np.prod(x[0], axis=axes, keepdims=bool(op.opt("keepDims", False))).astype(outs[0].dtype)]


@folds("DEQUANTIZE")
def _dequantize(x, op, outs):
    """float16 weights, or int8 weights dequantized by an explicit operator: exact in float32."""
    if x[0].dtype == np.float16:
        return [x[0].astype(np.float32)]
    raise _NoFold


class _NoFold(Exception):
    """This instance of a foldable operator is left to the device."""


def fold_constants(graph: Graph) -> Graph:
    kept = []
    for op in graph.operators:
        fn = FOLDERS.get(op.opcode)
        ins = [graph.tensor(i) if i >= 0 else None for i in op.inputs]
        known = op.opcode in ("SHAPE", "RANK") or all(t is None or t.is_const for t in ins)
        outs = [graph.tensor(i) for i in op.outputs]
        if fn is None or not known or not ins or any(o.index in graph.outputs for o in outs):
            kept.append(op)
            continue
        if any(t is not None and t.quant is not None and t.dtype != "int8" for t in outs):
            kept.append(op)
            continue
        values = [(t.data if t.is_const else np.zeros(t.shape, t.dtype)) if t is not None else None for t in ins]
        try:
            results = fn(values, op, outs)
        except (_NoFold, ValueError, IndexError, TypeError):
            kept.append(op)
            continue
        if len(results) != len(outs) or any(np.asarray(r).size != o.size for r, o in zip(results, outs)):
            kept.append(op)
            continue
        for out, value in zip(outs, results):
            graph = graph.with_constant(out.index, np.asarray(value).astype(out.dtype).reshape(out.shape))
    return replace(graph, operators=tuple(kept))


def remove_identities(graph: Graph) -> Graph:
    """Reshapes that keep the shape: their consumers read the input instead."""
    alias: dict[int, int] = {}
    kept = []
    for op in graph.operators:
        if op.opcode in ("RESHAPE", "SQUEEZE", "EXPAND_DIMS") and len(op.outputs) == 1:
            src, dst = graph.tensor(op.inputs[0]), graph.tensor(op.outputs[0])
            if src.shape == dst.shape and src.dtype == dst.dtype and src.quant == dst.quant \
                    and dst.index not in graph.outputs:
                alias[dst.index] = alias.get(src.index, src.index)
                continue
        if alias:
            op = replace(op, inputs=tuple(alias.get(i, i) for i in op.inputs))
        kept.append(op)
    return replace(graph, operators=tuple(kept))


def remove_dead(graph: Graph) -> Graph:
    needed = set(graph.outputs)
    kept: list[Operator] = []
    for op in reversed(graph.operators):
        if any(o in needed for o in op.outputs):
            kept.append(op)
            needed.update(i for i in op.inputs if i >= 0)
    return replace(graph, operators=tuple(reversed(kept)))


def resolve_shapes(graph: Graph) -> Graph:
    """Every tensor's shape as the interpreter computes it at preparation.

    Converters write placeholder shapes for tensors behind a shape computation they could not resolve (Keras
    UpSampling and attention layers), and the interpreter recomputes them; so do we, with the reference itself.
    """
    from tinymlaas.oracle import reference_interpreter

    if not graph.source:
        return graph
    it = reference_interpreter(graph.source)
    for detail in it.get_input_details():  # dynamic tensors get their shapes only when the graph runs
        it.set_tensor(detail["index"], np.zeros(detail["shape"], dtype=detail["dtype"]))
    it.invoke()
    tensors = list(graph.tensors)
    for detail in it.get_tensor_details():
        i = int(detail["index"])
        if i < len(tensors) and not tensors[i].is_const:
            shape = tuple(int(d) for d in detail["shape"])
            if shape != tensors[i].shape and int(np.prod(shape, dtype=np.int64)) > 0:
                tensors[i] = replace(tensors[i], shape=shape)
    return replace(graph, tensors=tuple(tensors))


PASSES = (fold_constants, remove_identities, remove_dead, fold_dilated_convolutions, fold_pads_into_convolutions)


def clean(graph: Graph, shapes_from_interpreter: bool = False) -> Graph:
    """The passes in order. shapes_from_interpreter: first take the shapes the reference interpreter computes
    (compiling needs them; checking which operators a model uses does not, and should not run the interpreter)."""
    if shapes_from_interpreter:
        graph = resolve_shapes(graph)
    for p in PASSES:
        graph = p(graph)
    return graph
