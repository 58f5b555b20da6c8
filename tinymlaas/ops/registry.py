"""The operator registry: one small converter per (TFLite operator, precision).

A converter turns one operator of the Graph into Relax (ops that TVM legalizes to TIR, our integer TIR kernels,
or calls of C micro-kernels) and declares the implementations it offers. `candidates(graph, op, target)` is the
per-layer space of the variant search; `table()` is what `tinymlaas operators` prints.

The converter modules register themselves with `register` when the package `tinymlaas.ops` is imported (its
__init__ imports them), so the registry is complete wherever this module is reachable, and this module imports
none of them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

PRECISIONS = ("float32", "int8", "int16")


@dataclass(frozen=True)
class Converter:
    opcode: str
    precision: str
    convert: Callable  # (ctx: LoweringContext, op: Operator, implementation: str) -> None
    implementations: tuple[str, ...]  # the first is the default
    applies: Callable | None = None  # (graph, op, target, implementation) -> bool: can this one run this layer
    note: str = ""


REGISTRY: dict[tuple[str, str], Converter] = {}


def register(opcodes: str | tuple[str, ...], precisions: str | tuple[str, ...], implementations=("relax",),
             applies=None, note: str = ""):
    opcodes = (opcodes,) if isinstance(opcodes, str) else opcodes
    precisions = (precisions,) if isinstance(precisions, str) else precisions

    def wrap(fn):
        for opcode in opcodes:
            for precision in precisions:
                REGISTRY[(opcode, precision)] = Converter(opcode, precision, fn, tuple(implementations), applies, note)
        return fn

    return wrap


def lookup(graph, op) -> Converter | None:
    return REGISTRY.get((op.opcode, graph.precision(op)))


def candidates(graph, op, target) -> list[str]:
    """The implementations that can run this layer on this target (the variant search's choices per layer)."""
    conv = lookup(graph, op)
    if conv is None:
        return []
    return [impl for impl in conv.implementations
            if conv.applies is None or conv.applies(graph, op, target, impl)]


def unsupported(graph) -> list[str]:
    """'OPCODE (precision)' for each operator of the graph without a converter."""
    missing = set()
    for op in graph.operators:
        if lookup(graph, op) is None:
            precision = graph.precision(op)
            missing.add(op.opcode if precision == "float32" else f"{op.opcode} ({precision})")
    return sorted(missing)


def table() -> dict[str, dict[str, tuple[str, ...]]]:
    """opcode -> precision -> implementations."""
    result: dict[str, dict[str, tuple[str, ...]]] = {}
    for (opcode, precision), conv in sorted(REGISTRY.items()):
        result.setdefault(opcode, {})[precision] = conv.implementations
    return result
