"""Graph -> Relax: every operator through its registered converter, in graph order.

Relax stays the graph IR (fusion, memory planning). Every value an operator binds is named `op<index>` so
that the kernel calls planned from it still say which TFLite operator they came from.
"""

from __future__ import annotations

import re
from collections import Counter

import numpy as np

from tinymlaas.errors import InternalError, InvalidModel, TinyMLaaSError, UnsupportedOperator
from tinymlaas.frontend.graph import Graph, Operator, Tensor
from tinymlaas.ops import registry

OP_VAR = re.compile(r"^op(\d+)(?:_|$)")


class LoweringContext:
    """What a converter sees: the graph, the target, the Relax builder and the values computed so far."""

    def __init__(self, graph: Graph, target, choices: dict[int, str], schedules: dict | None = None):
        from tvm import relax

        self.graph, self.target, self.choices = graph, target, choices
        self.schedules = schedules or {}  # operator index -> ir.layer_schedule.LayerSchedule of its TIR kernel
        self.bb = relax.BlockBuilder()
        self.values: dict[int, object] = {}
        self.params = [relax.Var(f"input{k}", relax.TensorType(graph.tensor(i).shape, graph.tensor(i).dtype))
                       for k, i in enumerate(graph.inputs)]
        # variable tensors come in after the inputs and their new values go out after the outputs (the driver
        # keeps them in static buffers between inferences)
        self.params += [relax.Var(f"state{k}", relax.TensorType(graph.tensor(i).shape, graph.tensor(i).dtype))
                        for k, i in enumerate(graph.state)]
        self.values.update(zip((*graph.inputs, *graph.state), self.params))
        self.new_state: dict[int, object] = {}
        self.op: Operator | None = None
        self._signatures = None  # operator signature -> how many operators have it (repeats)

    def tensor(self, index: int) -> Tensor:
        return self.graph.tensor(index)

    def input(self, op: Operator, k: int):
        """The k-th input of `op` as a Relax expression (constants become Relax constants)."""
        return self.value(op.inputs[k])

    def value(self, i: int):
        from tvm import relax

        if i in self.values:
            return self.values[i]
        t = self.graph.tensor(i)
        if t.is_const:
            return relax.const(np.ascontiguousarray(t.data), t.dtype)
        raise InvalidModel(f"'{t.name}' is read before it is computed")

    def const(self, value, dtype: str | None = None):
        from tvm import relax

        value = np.asarray(value, dtype=dtype)
        return relax.const(value, str(value.dtype))

    def emit(self, expr):
        return self.bb.emit(expr, name_hint=f"op{self.op.index}_")  # "_": TVM appends digits to repeated names

    def set_output(self, op: Operator, k: int, expr) -> None:
        """Bind `expr` as output k of `op`, reshaped to the tensor's static shape if needed."""
        from tvm import relax

        t = self.graph.tensor(op.outputs[k])
        if not isinstance(expr, relax.Var):
            expr = self.emit(expr)  # normalised: its shape is known
        shape = getattr(expr.ty, "shape", None)
        have = tuple(int(s) for s in shape.values) if isinstance(shape, relax.ShapeExpr) else None
        if have is not None and have != t.shape:
            if int(np.prod(have)) != t.size:
                raise InvalidModel(f"operator #{op.index} ({op.opcode}) computes shape {list(have)} "
                                   f"but the model declares {list(t.shape)} for '{t.name}'")
            expr = relax.op.reshape(expr, t.shape)
        if not isinstance(expr, relax.Var) or expr in self.values.values():
            expr = self.emit(expr)
        self.values[op.outputs[k]] = expr

    def set_state(self, index: int, expr) -> None:
        """The value variable tensor `index` holds after this inference."""
        if index not in self.graph.state:
            raise InvalidModel(f"operator #{self.op.index} ({self.op.opcode}) needs '{self.tensor(index).name}' "
                               "to be a variable tensor")
        self.new_state[index] = self.emit(expr)

    def implementation(self, op: Operator, conv: registry.Converter) -> str:
        return choose_implementation(self.graph, self.target, self.choices, op, conv)

    def layer_schedule(self, op: Operator):
        """The schedule of this layer's TIR kernel: the one given (a tuned variant), else its family's default on
        this core (ir/layer_schedule.py DEFAULT_SCHEDULES; None: TIR's own loops)."""
        from tinymlaas.ir.layer_schedule import default_for

        given = self.schedules.get(op.index)
        return given if given is not None else default_for(self.graph, op, self.target)

    def repeats(self, op: Operator) -> int:
        """How many operators of the graph have this one's opcode and tensor shapes and types (an unrolled sequence
        repeats each of its operators once per step)."""
        if self._signatures is None:
            self._signatures = Counter(self._signature(o) for o in self.graph.operators)
        return self._signatures[self._signature(op)]

    def _signature(self, op: Operator) -> tuple:
        tensors = [self.graph.tensor(i) for i in (*op.inputs, *op.outputs) if i >= 0]
        return op.opcode, tuple((t.shape, t.dtype) for t in tensors)


def choose_implementation(graph: Graph, target, choices, op: Operator, conv: registry.Converter) -> str:
    """The caller's choice for this layer (or for every layer) where it applies, else TIR where its family has a
    default schedule (ir/layer_schedule.py DEFAULT_SCHEDULES: depthwise layers, measured faster than the C kernels
    on every core), else the C micro-kernels ("dsp") where the layer offers them, else the converter's first
    implementation.

    The C kernels are the default for the other families on every core, not only on cores with DSP instructions:
    their scalar fallbacks measured 1.1-2.1x fewer instructions than TIR's own loops on Cortex-M3 and RV32
    (benchmarks/results/search.json)."""
    from tinymlaas.ir.layer_schedule import default_for

    choice = choices.get(op.index) if isinstance(choices, dict) else choices
    options = registry.candidates(graph, op, target)
    if choice in options:
        return choice
    if choice in (None, "auto") and "tir" in options and default_for(graph, op, target):
        return "tir"
    if "dsp" in options and choice in (None, "auto"):
        return "dsp"
    return options[0] if options else conv.implementations[0]


def implementations(graph: Graph, target, choices=None) -> dict[int, str]:
    """Operator index -> the kernel variant the lowering picks for it (what to_relax does, without building)."""
    out = {}
    for op in graph.operators:
        conv = registry.lookup(graph, op)
        if conv is not None:
            out[op.index] = choose_implementation(graph, target, choices or {}, op, conv)
    return out


def to_relax(graph: Graph, target, choices: dict[int, str] | str | None = None, schedules: dict | None = None):
    """Relax IRModule computing `graph`'s outputs from its inputs.

    choices: operator index -> implementation, or one implementation for every layer that offers it ("auto": the C
    micro-kernels where a layer offers them)."""
    from tvm import relax

    missing = registry.unsupported(graph)
    if missing:
        raise UnsupportedOperator(missing, graph.name)
    ctx = LoweringContext(graph, target, choices or {}, schedules)
    with ctx.bb.function("main", ctx.params):
        with ctx.bb.dataflow():
            for op in graph.operators:
                conv = registry.lookup(graph, op)
                ctx.op = op
                try:
                    conv.convert(ctx, op, ctx.implementation(op, conv))
                except TinyMLaaSError:
                    raise
                except Exception as e:  # noqa: BLE001 - any failure of a converter is judged by the interpreter
                    _judge(graph, op, e)
                for i in op.outputs:
                    if i not in ctx.values and any(i in o.inputs for o in graph.operators) | (i in graph.outputs):
                        raise InvalidModel(f"operator #{op.index} ({op.opcode}) left output '{graph.tensor(i).name}' unset")
            outs = [ctx.value(i) for i in graph.outputs] + [ctx.new_state.get(i, ctx.value(i)) for i in graph.state]
            result = ctx.bb.emit_output(outs[0] if len(outs) == 1 else relax.Tuple(outs))
        ctx.bb.emit_func_output(result)
    return relax.transform.Normalize()(ctx.bb.get())


def _judge(graph: Graph, op: Operator, error: Exception):
    """A converter failed. If the interpreter refuses the model too, the model is at fault (InvalidModel, raised by
    the probe); if the interpreter runs it, the bug is ours (InternalError naming the operator)."""
    if graph.source:
        from tinymlaas.oracle import reference_resolver

        reference_resolver(graph.source)
    raise InternalError("import", f"{op.opcode} #{op.index}", error) from error


def unsupported_operators(model) -> list[str]:
    """Operators of the model (after clean-up) that no converter takes, as 'OPCODE' or 'OPCODE (int8)'."""
    from tinymlaas.frontend.cleanup import clean

    return registry.unsupported(clean(model.graph))
