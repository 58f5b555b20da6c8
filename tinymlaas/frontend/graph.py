"""The model as the compiler sees it: tensors and operators as plain frozen data.

Parsed once from the flatbuffer (`tflite.read_graph`), cleaned by `cleanup` passes (each returns a new
Graph), then lowered operator by operator through the registry (`tinymlaas.ops`).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from types import MappingProxyType

import numpy as np


@dataclass(frozen=True)
class Quantization:
    scale: tuple[float, ...]
    zero_point: tuple[int, ...]
    axis: int = 0

    @property
    def per_channel(self) -> bool:
        return len(self.scale) > 1


@dataclass(frozen=True, eq=False)
class Tensor:
    index: int
    name: str
    shape: tuple[int, ...]
    dtype: str
    quant: Quantization | None = None
    data: np.ndarray | None = field(default=None, repr=False)  # constant value (read-only), None for activations
    variable: bool = False  # state kept across inferences (an LSTM's or SVDF's), its zero point before the first

    @property
    def is_const(self) -> bool:
        return self.data is not None

    @property
    def size(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def scale(self) -> float:
        return float(self.quant.scale[0]) if self.quant else 0.0

    @property
    def zero_point(self) -> int:
        return int(self.quant.zero_point[0]) if self.quant else 0


@dataclass(frozen=True)
class Operator:
    index: int  # position in the model file: kept through clean-up, carried to every kernel call
    opcode: str
    inputs: tuple[int, ...]  # tensor indices; -1 for an optional input left out
    outputs: tuple[int, ...]
    options: MappingProxyType = field(default_factory=lambda: MappingProxyType({}))
    options_type: int = 0  # the flatbuffer's BuiltinOptions type (to write the operator out again)
    version: int = 1
    intermediates: tuple[int, ...] = ()  # tensors that only carry quantization (an integer LSTM's gate scales)

    def opt(self, name: str, default=None):
        return self.options.get(name, default)


@dataclass(frozen=True)
class Graph:
    name: str
    tensors: tuple[Tensor, ...]
    operators: tuple[Operator, ...]
    inputs: tuple[int, ...]
    outputs: tuple[int, ...]
    notes: tuple[str, ...] = ()
    source: bytes = field(default=b"", repr=False, compare=False)  # the flatbuffer it was read from

    def tensor(self, index: int) -> Tensor:
        return self.tensors[index]

    def with_constant(self, index: int, value: np.ndarray) -> Graph:
        """A new graph where tensor `index` is the constant `value`."""
        value = np.ascontiguousarray(value)
        value.setflags(write=False)
        tensors = list(self.tensors)
        tensors[index] = replace(tensors[index], data=value, shape=tuple(int(s) for s in value.shape),
                                 dtype=str(value.dtype))
        return replace(self, tensors=tuple(tensors))

    @property
    def state(self) -> tuple[int, ...]:
        """Indices of the variable tensors: state the model reads and rewrites on every inference."""
        return tuple(t.index for t in self.tensors if t.variable and not t.is_const)

    def consumers(self) -> dict[int, list[Operator]]:
        result: dict[int, list[Operator]] = {}
        for op in self.operators:
            for i in op.inputs:
                if i >= 0:
                    result.setdefault(i, []).append(op)
        return result

    def precision(self, op: Operator) -> str:
        """float32, int8 or int16 (int16 activations, int8 weights): which kernels this operator needs."""
        # state tensors do not decide it: the int8 LSTM keeps its cell state in int16
        acts = [self.tensors[i] for i in (*op.inputs, *op.outputs)
                if i >= 0 and not self.tensors[i].is_const and not self.tensors[i].variable]
        if any(t.dtype == "int16" and t.quant is not None for t in acts):
            return "int16"
        quantized = any(t.quant is not None and t.dtype in ("int8", "uint8") for t in acts)
        return "int8" if quantized else "float32"

    def integer_only(self, op: Operator) -> bool:
        """Neither float nor quantized tensors: index and shape arithmetic (int32, bool), exact in any lowering."""
        return self.precision(op) == "float32" and all(self.tensors[i].dtype != "float32"
                                                        for i in (*op.inputs, *op.outputs) if i >= 0)

    def lowering(self) -> str:
        """"float" (float operators only), "integer" (quantized ones) or "mixed" (float operators among quantized
        ones); index and shape arithmetic counts as neither."""
        precisions = {self.precision(op) for op in self.operators if not self.integer_only(op)}
        return "float" if precisions <= {"float32"} else "integer" if "float32" not in precisions else "mixed"
