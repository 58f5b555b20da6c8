"""The variant space of one model on one target: each candidate is a small serialisable spec (`Variant`) from which
the build is reproducible.

Dimensions: the kernel implementation of every layer that offers more than one (`ops.registry.candidates`), the
schedule applied to every TIR kernel (`ScheduleSpec`), the fusion policy and the memory plan (`ir.memory`). A
Variant is plain data: JSON in search results, the service's build records and the measurement database.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tinymlaas.ir.layer_schedule import LayerSchedule

FUSION = ("default", "none")  # TVM's FuseOps (elementwise tails into their producer), or one kernel per operator
MEMORY = ("tvm", "optimal", "inplace")  # ir.memory.POLICIES
LOW_BIT = ("int4", "palette2", "palette3", "palette4", "palette5", "palette6")  # frontend/lowbit.py's precisions


@dataclass(frozen=True)
class ScheduleSpec:
    """What the schedule does to each fused TIR kernel (ir/schedule.py).

    decompose_init: every reduction's initial value in a loop of its own before the reduction loops (max/min
    reductions always, for repeatable counts); unroll: the innermost reduction loop unrolled when its extent is at
    most this (0: never)."""
    decompose_init: bool = False
    unroll: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


UNROLL = (0, 4, 16)


@dataclass(frozen=True)
class Variant:
    kernels: tuple[tuple[int, str], ...] = ()  # (TFLite operator index, implementation) for layers with a choice
    schedule: ScheduleSpec = field(default_factory=ScheduleSpec)
    fusion: str = "default"
    memory: str = "tvm"
    layers: tuple[tuple[int, LayerSchedule], ...] = ()  # (operator index, its TIR kernel's tuned schedule)
    # (operator index, its weights' precision below eight bits: int4, paletteN; frontend/lowbit.py)
    weights: tuple[tuple[int, str], ...] = ()

    def to_dict(self) -> dict:
        d = {"kernels": {str(i): impl for i, impl in self.kernels}, "schedule": self.schedule.to_dict(),
             "fusion": self.fusion}
        if self.memory != "tvm":  # absent in records made before memory plans were searched: same key
            d["memory"] = self.memory
        if self.layers:  # likewise for layer schedules
            d["layers"] = {str(i): s.to_dict() for i, s in self.layers}
        if self.weights:  # and for weights below eight bits
            d["weights"] = {str(i): p for i, p in self.weights}
        return d

    @classmethod
    def from_dict(cls, d: dict) -> Variant:
        return cls(kernels=tuple(sorted((int(i), str(impl)) for i, impl in (d.get("kernels") or {}).items())),
                   schedule=ScheduleSpec(**(d.get("schedule") or {})), fusion=str(d.get("fusion", "default")),
                   memory=str(d.get("memory", "tvm")),
                   layers=tuple(sorted((int(i), LayerSchedule.from_dict(s))
                                       for i, s in (d.get("layers") or {}).items())),
                   weights=tuple(sorted((int(i), str(p)) for i, p in (d.get("weights") or {}).items())))

    def key(self) -> str:
        """A stable identity (equal variants, equal key)."""
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))

    def short(self) -> str:
        impls = sorted({impl for _, impl in self.kernels})
        return (f"kernels {'/'.join(impls) or 'default'}"
                + (" mixed" if len(impls) > 1 else "")
                + (", init decomposed" if self.schedule.decompose_init else "")
                + (f", unroll<={self.schedule.unroll}" if self.schedule.unroll else "")
                + (", no fusion" if self.fusion == "none" else "")
                + (f", memory {self.memory}" if self.memory != "tvm" else "")
                + (f", {len(self.layers)} layer schedules tuned" if self.layers else "")
                + (f", {len(self.weights)} layers {'/'.join(sorted({p for _, p in self.weights}))}"
                   if self.weights else ""))


@dataclass(frozen=True)
class Layer:
    op_index: int
    opcode: str
    choices: tuple[str, ...]  # the first is what the default build takes


@dataclass(frozen=True)
class Space:
    """The searchable dimensions: one integer per layer with a choice, then decompose_init, unroll, fusion, memory."""
    layers: tuple[Layer, ...]

    @classmethod
    def of(cls, graph, target) -> Space:
        from tinymlaas.frontend.to_relax import choose_implementation
        from tinymlaas.ops import registry

        layers = []
        for op in graph.operators:
            options = registry.candidates(graph, op, target)
            if len(options) > 1:
                default = choose_implementation(graph, target, "auto", op, registry.lookup(graph, op))
                layers.append(Layer(op.index, op.opcode, (default, *[o for o in options if o != default])))
        return cls(tuple(layers))

    @property
    def bounds(self) -> list[int]:
        """The number of values of each dimension."""
        return [len(layer.choices) for layer in self.layers] + [2, len(UNROLL), len(FUSION), len(MEMORY)]

    @property
    def size(self) -> int:
        return math.prod(self.bounds)

    def decode(self, x) -> Variant:
        x = [int(v) for v in x]
        n = len(self.layers)
        kernels = tuple((layer.op_index, layer.choices[min(max(x[k], 0), len(layer.choices) - 1)])
                        for k, layer in enumerate(self.layers))
        pick = lambda values, v: values[min(max(v, 0), len(values) - 1)]
        return Variant(kernels, ScheduleSpec(bool(x[n]), pick(UNROLL, x[n + 1])), pick(FUSION, x[n + 2]),
                       pick(MEMORY, x[n + 3]))

    def encode(self, v: Variant) -> list[int]:
        chosen = dict(v.kernels)
        return ([layer.choices.index(chosen.get(layer.op_index, layer.choices[0])) for layer in self.layers]
                + [int(v.schedule.decompose_init), UNROLL.index(v.schedule.unroll), FUSION.index(v.fusion),
                   MEMORY.index(v.memory)])

    def default(self) -> Variant:
        return self.decode([0] * len(self.bounds))

    def uniform(self, implementation: str, base: Variant | None = None) -> Variant:
        """Every layer that offers `implementation` takes it (the others keep their default)."""
        base = base or self.default()
        x = self.encode(base)
        for k, layer in enumerate(self.layers):
            if implementation in layer.choices:
                x[k] = layer.choices.index(implementation)
        return self.decode(x)

    def profiled(self, schedules: bool = True) -> list[Variant]:
        """What is profiled layer by layer to teach the layer predictor: the default and each implementation on every
        layer; with `schedules`, every TIR kernel under the other schedules, and the default and TIR without
        fusion."""
        impls = sorted({c for layer in self.layers for c in layer.choices})
        out = [self.default()] + [self.uniform(impl) for impl in impls]
        if schedules:
            tir = self.uniform("tir")
            out += [Variant(tir.kernels, ScheduleSpec(d, u)) for d in (False, True) for u in UNROLL if d or u]
            out += [Variant(v.kernels, fusion="none") for v in (self.default(), tir)]
        return list(dict.fromkeys(out))

    def sample(self, rng) -> Variant:
        return self.decode([int(rng.integers(0, b)) for b in self.bounds])


def load_variant(path) -> Variant:
    """The variant a JSON file holds: a variant itself, a search point ({"variant": ...}), a build's report.json
    (the variant it was built as) or a search's front.json (its chosen point)."""
    from tinymlaas.build.request import InvalidRequest

    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise InvalidRequest("variant_file", f"{path}: not a readable JSON file ({type(e).__name__})") from None
    if isinstance(data, dict) and isinstance(data.get("points"), list):  # a search result
        if data.get("chosen") is None:
            raise InvalidRequest("variant_file", f"{path}: the search chose no variant (none fit its constraints)")
        data = data["points"][data["chosen"]]
    if isinstance(data, dict) and "variant" in data:
        data = data["variant"]
    if not isinstance(data, dict) or not data or not set(data) <= {"kernels", "schedule", "fusion", "memory", "layers",
                                                                    "weights"}:
        raise InvalidRequest("variant_file", f"{path}: holds no variant (a JSON object with kernels, schedule, "
                             "fusion, memory; or a search's front.json, or a build's report.json)")
    kernels, schedule = data.get("kernels", {}), data.get("schedule", {})
    if not isinstance(kernels, dict) or not all(str(k).isdigit() and isinstance(v, str) for k, v in kernels.items()):
        raise InvalidRequest("variant_file", f"{path}: `kernels` must map operator indices to implementations")
    if not isinstance(schedule, dict) or not set(schedule) <= set(ScheduleSpec.__dataclass_fields__):
        raise InvalidRequest("variant_file", f"{path}: `schedule` takes {', '.join(ScheduleSpec.__dataclass_fields__)}")
    layers = data.get("layers", {})
    if not isinstance(layers, dict) or not all(str(k).isdigit() and isinstance(v, dict) for k, v in layers.items()):
        raise InvalidRequest("variant_file", f"{path}: `layers` must map operator indices to layer schedules")
    try:
        for v in layers.values():
            LayerSchedule.from_dict(v)
    except (TypeError, ValueError) as e:
        raise InvalidRequest("variant_file", f"{path}: `layers`: {e}") from None
    weights = data.get("weights", {})
    if not isinstance(weights, dict) or not all(str(k).isdigit() and v in LOW_BIT for k, v in weights.items()):
        raise InvalidRequest("variant_file", f"{path}: `weights` must map operator indices to one of "
                             f"{', '.join(LOW_BIT)}")
    if data.get("fusion", "default") not in FUSION or data.get("memory", "tvm") not in MEMORY:
        raise InvalidRequest("variant_file", f"{path}: `fusion` is one of {', '.join(FUSION)}, `memory` one of "
                             f"{', '.join(MEMORY)}")
    return Variant.from_dict(data)

