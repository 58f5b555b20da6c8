"""Lower stage: Relax passes to a flat, fully static program.

The result is plain data: kernel calls over regions of one arena, the caller's input and output
buffers, and constants. No VM, no runtime: the driver generator turns it into straight-line C.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

ARENA_ALIGN = 16


@dataclass(frozen=True)
class Region:
    """Where a kernel argument lives. kind: input | output | arena | const | scratch."""

    kind: str
    index: int = 0  # input/output/const number
    offset: int = 0  # byte offset in the arena or the kernel scratch area
    nbytes: int = 0


@dataclass
class KernelCall:
    kernel: str
    args: list[Region]
    extern: bool = False  # a C kernel linked with the firmware (firmware/kernels/), not a TIR kernel


@dataclass
class Copy:
    src: Region
    dst: Region
    nbytes: int


@dataclass
class Program:
    kernels: object  # tvm.IRModule of PrimFuncs, keyed by kernel name
    steps: list  # KernelCall | Copy, in execution order
    constants: list[np.ndarray]
    arena_bytes: int
    scratch_bytes: int = 0  # kernel-internal buffers hoisted out of the kernels (set by codegen)
    notes: list[str] = field(default_factory=list)

    @property
    def weight_bytes(self) -> int:
        return sum(c.nbytes for c in self.constants)


def relax_passes(fold_constants: bool = True):
    """Relax -> fused TIR kernels (before memory planning). Schedules go on the result."""
    import tvm
    from tvm import relax

    passes = [relax.transform.LegalizeOps(), relax.transform.AnnotateTIROpPattern()]
    if fold_constants:
        passes.append(relax.transform.FoldConstant())
    passes += [relax.transform.FuseOps(), relax.transform.FuseTIR(), relax.transform.DeadCodeElimination()]
    return tvm.transform.Sequential(passes, name="tinymlaas.fuse")


def planning_passes():
    import tvm
    from tvm import relax

    return tvm.transform.Sequential(
        [
            relax.transform.ToNonDataflow(),
            relax.transform.RemovePurityChecking(),
            relax.transform.CallTIRRewrite(),
            relax.transform.StaticPlanBlockMemory(),
        ],
        name="tinymlaas.plan",
    )


def _align(n: int, a: int = ARENA_ALIGN) -> int:
    return (n + a - 1) // a * a


def _ints(shape_expr) -> list[int]:
    return [int(v) for v in shape_expr.values]


def _nbytes(shape: list[int], dtype: str) -> int:
    return int(np.prod(shape, dtype=np.int64)) * np.dtype(str(dtype)).itemsize


def flatten(mod) -> Program:
    """Walk the memory-planned `main` into a Program."""
    import tvm
    from tvm import relax

    main = mod["main"]
    inputs = {p: i for i, p in enumerate(main.params)}
    storage: dict = {}  # storage var -> arena offset
    regions: dict = {}  # tensor var -> Region
    arena = 0
    outputs: list = []  # vars from builtin.alloc_tensor (the returned tensors)
    constants: list[np.ndarray] = []
    steps: list = []

    def region_of(expr) -> Region:
        if isinstance(expr, tvm.ir.expr.Constant) or type(expr).__name__ == "Constant":
            constants.append(expr.value.numpy())
            return Region("const", index=len(constants) - 1, nbytes=constants[-1].nbytes)
        if expr in inputs:
            shape = [int(s) for s in expr.ty.shape]
            return Region("input", index=inputs[expr], nbytes=_nbytes(shape, expr.ty.dtype))
        if expr in regions:
            return regions[expr]
        raise NotImplementedError(f"kernel argument of unexpected form: {expr}")

    body = main.body
    for block in body.blocks:
        for binding in block.bindings:
            var, value = binding.var, binding.value
            if isinstance(value, relax.Call) and isinstance(value.op, tvm.ir.Op):
                name = value.op.name
                if name == "relax.memory.alloc_storage":
                    size = _ints(value.args[0])[0]
                    storage[var] = arena
                    arena += _align(size)
                elif name == "relax.memory.alloc_tensor":
                    base = storage[value.args[0]]
                    off = int(value.args[1].value)
                    shape = _ints(value.args[2])
                    regions[var] = Region("arena", offset=base + off, nbytes=_nbytes(shape, value.args[3].value))
                elif name == "relax.builtin.alloc_tensor":
                    shape = _ints(value.args[0])
                    regions[var] = Region("output", index=len(outputs), nbytes=_nbytes(shape, value.args[1].value))
                    outputs.append(var)
                else:
                    raise NotImplementedError(f"operation '{name}' is not supported in a static program")
            elif isinstance(value, relax.Call) and isinstance(value.op, tvm.ir.GlobalVar):
                steps.append(KernelCall(value.op.name_hint, [region_of(a) for a in value.args]))
            elif isinstance(value, relax.Call) and isinstance(value.op, relax.ExternFunc):
                steps.append(KernelCall(str(value.op.global_symbol), [region_of(a) for a in value.args], extern=True))
            elif isinstance(value, relax.Var) and value in regions:
                regions[var] = regions[value]
            elif isinstance(value, relax.Var) and value in inputs:
                regions[var] = region_of(value)
            elif isinstance(value, relax.Tuple):
                regions[var] = tuple(region_of(f) for f in value.fields)
            else:
                raise NotImplementedError(f"binding of unexpected form: {value}")

    # The returned value: tensors already in output buffers stay; anything else is copied out.
    result = body.body
    results = list(result.fields) if isinstance(result, relax.Tuple) else [result]
    out_regions = []
    for r in results:
        reg = regions.get(r)
        if isinstance(reg, tuple):
            out_regions.extend(reg)
        else:
            out_regions.append(reg if reg is not None else region_of(r))
    # Output buffers are numbered as `main` returns them, whatever order they were allocated in.
    renumber = {reg.index: i for i, reg in enumerate(out_regions) if reg.kind == "output"}

    def fix(r: Region) -> Region:
        return Region("output", index=renumber[r.index], nbytes=r.nbytes) if r.kind == "output" else r

    for step in steps:
        if isinstance(step, KernelCall):
            step.args = [fix(a) for a in step.args]
    for i, reg in enumerate(out_regions):
        if reg.kind != "output":  # a result left in the arena (or an input returned as is) is copied out
            steps.append(Copy(reg, Region("output", index=i, nbytes=reg.nbytes), reg.nbytes))
    kernels = tvm.IRModule({gv: f for gv, f in mod.functions.items() if isinstance(f, tvm.tirx.PrimFunc)})
    return Program(kernels=kernels, steps=steps, constants=constants, arena_bytes=arena)


def lower(relax_mod, schedule=None, fold_constants: bool = True) -> Program:
    """Relax module -> Program. `schedule(func) -> func` is applied to every fused kernel."""
    import tvm

    mod = relax_passes(fold_constants)(relax_mod)
    if schedule is not None:
        for gv, func in list(mod.functions.items()):
            if isinstance(func, tvm.tirx.PrimFunc):
                mod[gv] = schedule(func)
    mod = planning_passes()(mod)
    return flatten(mod)
