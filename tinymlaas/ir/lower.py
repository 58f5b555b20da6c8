"""Lower stage: Relax passes to a flat, fully static program.

The result is plain data: kernel calls over regions of one arena, the caller's input and output
buffers, and constants. No VM, no runtime: the driver generator turns it into straight-line C.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

import numpy as np

ARENA_ALIGN = 16
_OP_VAR = re.compile(r"^op(\d+)_")  # values bound by the importer are named op<TFLite operator index>_


@dataclass(frozen=True)
class Region:
    """Where a kernel argument lives. kind: input | output | arena | const | scratch | state | state_next.

    state: a variable tensor's static buffer, kept between inferences; state_next: where its new value is
    written during the inference, copied into `state` at the end (an old value may still be read until then)."""

    kind: str
    index: int = 0  # input/output/const number
    offset: int = 0  # byte offset in the arena or the kernel scratch area
    nbytes: int = 0
    tensor: int = -1  # arena: which intermediate tensor (tensors with disjoint lifetimes may share bytes)
    within: int = 0  # arena: bytes from the tensor's start (a layer writing its slice of a concatenation)


@dataclass(frozen=True)
class KernelCall:
    kernel: str
    args: tuple[Region, ...]
    extern: bool = False  # a C kernel linked with the firmware (firmware/kernels/), not a TIR kernel
    op_index: int | None = None  # the TFLite operator it computes (the last one, when several were fused)


@dataclass(frozen=True)
class Copy:
    """`rows` runs of `nbytes` bytes, each `src_stride` / `dst_stride` bytes after the last (one run: a plain copy;
    more: a tensor copied into its slice of a concatenation's output)."""
    src: Region
    dst: Region
    nbytes: int
    op_index: int | None = None
    rows: int = 1
    src_stride: int = 0
    dst_stride: int = 0


@dataclass(frozen=True)
class Program:
    kernels: object  # tvm.IRModule of PrimFuncs, keyed by kernel name
    steps: tuple  # KernelCall | Copy, in execution order
    constants: tuple[np.ndarray, ...]
    arena_bytes: int
    scratch_bytes: int = 0  # kernel-internal buffers hoisted out of the kernels (set by codegen)
    state_sizes: tuple[int, ...] = ()  # bytes of each variable tensor (index = Region.index of state regions)
    notes: tuple[str, ...] = ()

    @property
    def weight_bytes(self) -> int:
        """Flash of the constants as the driver packs them: identical ones once (an unrolled sequence's weights,
        one copy per step here), alignment aside."""
        unique = {(str(c.dtype), np.ascontiguousarray(c).tobytes()): c.nbytes for c in self.constants}
        return sum(unique.values())

    @property
    def state_offsets(self) -> list[int]:
        """Where each variable tensor starts in the state buffer (aligned), and the buffer's size last."""
        offsets = [0]
        for n in self.state_sizes:
            offsets.append(offsets[-1] + _align(n))
        return offsets

    @property
    def state_bytes(self) -> int:
        """RAM of the variable tensors: their buffers and where their next values are written."""
        return 2 * self.state_offsets[-1]


def relax_passes(fold_constants: bool = True, fuse: bool = True):
    """Relax -> fused TIR kernels (before memory planning). Schedules go on the result. fuse=False: one kernel per
    Relax operation (a fusion policy of the variant search)."""
    import tvm
    from tvm import relax

    passes = [relax.transform.LegalizeOps(), relax.transform.AnnotateTIROpPattern(), _splits_apart()]
    if fold_constants:
        passes.append(relax.transform.FoldConstant())
    if fuse:
        passes += [relax.transform.FuseOps(), relax.transform.FuseTIR()]
    passes.append(relax.transform.DeadCodeElimination())
    # reshapes as views: the output shares its input's storage (flatten gives it the input's region); here, before
    # the kernel calls are counted and attributed to operators, so that the k-th call is the k-th real kernel
    passes.append(relax.transform.RewriteDataflowReshape())
    return tvm.transform.Sequential(passes, name="tinymlaas.fuse")


SPLIT_KERNEL = re.compile(r"^split\d*$")  # TVM's legalized split


def _splits_apart():
    """A split into many parts (an unrolled sequence's steps) kept out of fusion (opaque): fused, its producer's
    code is repeated once per output (the input quantized in 16 copies of the loop: 10-20 KB of code); apart, the
    producer runs once and the split is a few copies. A split into a few parts (a recurrent cell's gates) stays
    fused: there the copy would cost more than the code saved (a float GRU: +18% instructions)."""
    import tvm

    from tinymlaas.ir.kernel_sharing import SHARE_MIN_KERNELS

    @tvm.transform.module_pass(opt_level=0, name="tinymlaas.SplitsApart")
    def apart(mod, _ctx):
        for gv, func in list(mod.functions.items()):
            if isinstance(func, tvm.tirx.PrimFunc) and SPLIT_KERNEL.match(gv.name_hint) \
                    and len(func.params) - 1 >= SHARE_MIN_KERNELS:
                mod[gv] = func.with_attr("op_pattern", 8)  # kOpaque
        return mod

    return apart


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


def _leaves(expr):
    from tvm import relax

    if isinstance(expr, relax.Tuple):
        for field_ in expr.fields:
            yield from _leaves(field_)
    else:
        yield expr


def _operators_taking(relax_mod) -> dict:
    """What the importer's bindings take -> the TFLite operators taking it: constants by identity (the passes keep
    the objects), variables by name. The importer emits one operator after another and names each one's result
    op<i>_: the unnamed bindings before it are its own."""
    import tvm
    from tvm import relax

    out: dict = {}
    pending: list = []
    for block in relax_mod["main"].body.blocks:
        for b in block.bindings:
            pending.append(b)
            m = _OP_VAR.match(b.var.name)
            if not m:
                continue
            for x in (leaf for p in pending if isinstance(p.value, relax.Call) for arg in p.value.args
                      for leaf in _leaves(arg)):
                key = x if isinstance(x, tvm.ir.expr.Constant) else x.name if isinstance(x, relax.Var) else None
                if key is not None:
                    out.setdefault(key, set()).add(int(m.group(1)))
            pending = []
    return out


def _kernel_operators(mod, taking: dict, call: str = "relax.call_tir") -> list[int | None]:
    """For each TIR kernel call (or `call`: relax.call_dps_packed, the C kernels) of the fused `main`, in order,
    the TFLite operator it computes: FuseOps binds a group's call to a fresh variable, so the importer's op<i>_
    name is lost. From what the call takes: the last operator whose own constants (weights, bias) it reads, else
    the first operator that reads its named inputs."""
    import tvm
    from tvm import relax

    main = mod["main"]
    stable = {p.name for p in main.params}  # and op<i>_: the passes' fresh variables reuse the importer's lv<n>
    call_tir, found = tvm.ir.Op.get(call), []
    for block in main.body.blocks:
        for b in block.bindings:
            if isinstance(b.value, relax.Call) and b.value.op.same_as(call_tir):
                args = list(_leaves(b.value.args[1]))
                # a constant several operators share (a cached scalar) says nothing
                weights = set().union(*(ops for x in args if isinstance(x, tvm.ir.expr.Constant)
                                        and len(ops := taking.get(x, ())) == 1))
                named = set().union(*(taking.get(x.name, set()) for x in args if isinstance(x, relax.Var)
                                      and (x.name in stable or _OP_VAR.match(x.name))))
                if weights:  # or a later operator that takes one of its named inputs too (fused onto it)
                    found.append(max(weights | {i for i in named if i > min(weights)}))
                else:
                    found.append(min(named) if named else None)
    return found


def flatten(mod, kernel_operators: list[int | None] = (), extern_operators: list[int | None] = ()) -> Program:
    """Walk the memory-planned `main` into a Program. kernel_operators, extern_operators: the TFLite operator of
    each TIR kernel call and each C kernel call in order (`_kernel_operators`), for calls whose variable does not
    name one (a C kernel writing a model output, say)."""
    import tvm
    from tvm import relax

    main = mod["main"]
    state_params = [p for p in main.params if p.name.startswith("state")]  # after the inputs (to_relax)
    inputs = {p: i for i, p in enumerate(main.params) if p not in state_params}
    states = {p: i for i, p in enumerate(state_params)}
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
        if expr in states:
            shape = [int(s) for s in expr.ty.shape]
            return Region("state", index=states[expr], nbytes=_nbytes(shape, expr.ty.dtype))
        if expr in regions:
            return regions[expr]
        raise NotImplementedError(f"kernel argument of unexpected form: {expr}")

    def op_index(var) -> int | None:
        m = _OP_VAR.match(var.name)
        return int(m.group(1)) if m else None

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
                    regions[var] = Region("arena", offset=base + off, nbytes=_nbytes(shape, value.args[3].value),
                                          tensor=len(regions))
                elif name == "relax.reshape":  # a view (RewriteDataflowReshape): the same bytes, no copy
                    regions[var] = region_of(value.args[0])
                elif name == "relax.builtin.alloc_tensor":
                    shape = _ints(value.args[0])
                    regions[var] = Region("output", index=len(outputs), nbytes=_nbytes(shape, value.args[1].value))
                    outputs.append(var)
                else:
                    raise NotImplementedError(f"operation '{name}' is not supported in a static program")
            elif isinstance(value, relax.Call) and isinstance(value.op, tvm.ir.GlobalVar):
                steps.append(KernelCall(value.op.name_hint, tuple(region_of(a) for a in value.args),
                                        op_index=op_index(var)))
            elif isinstance(value, relax.Call) and isinstance(value.op, relax.ExternFunc):
                steps.append(KernelCall(str(value.op.global_symbol), tuple(region_of(a) for a in value.args),
                                        extern=True, op_index=op_index(var)))
            elif isinstance(value, relax.Var) and value in regions:
                regions[var] = regions[value]
                # CallTIRRewrite binds the call to `_` and the importer's `op<i>` to its output: name the step
                index = op_index(var)
                for k in range(len(steps) - 1, -1, -1):
                    if isinstance(steps[k], KernelCall) and steps[k].args and steps[k].args[-1] == regions[value]:
                        if steps[k].op_index is None and index is not None:
                            steps[k] = replace(steps[k], op_index=index)
                        break
            elif isinstance(value, relax.Var) and (value in inputs or value in states):
                regions[var] = region_of(value)
            elif isinstance(value, relax.Tuple):
                regions[var] = tuple(region_of(f) for f in value.fields)
            elif isinstance(value, relax.TupleGetItem) and isinstance(regions.get(value.tuple_value), tuple):
                regions[var] = regions[value.tuple_value][value.index]
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
    # Output buffers are numbered as `main` returns them, whatever order they were allocated in; the last ones
    # are the variable tensors' new values.
    n_out = len(out_regions) - len(states)
    renumber = {reg.index: i for i, reg in enumerate(out_regions) if reg.kind == "output"}

    def fix(r: Region) -> Region:
        if r.kind != "output":
            return r
        i = renumber[r.index]
        return Region("output", index=i, nbytes=r.nbytes) if i < n_out else Region("state_next", i - n_out, nbytes=r.nbytes)

    steps = [replace(s, args=tuple(fix(a) for a in s.args)) if isinstance(s, KernelCall) else s for s in steps]
    calls = [s.kernel for s in steps if isinstance(s, KernelCall)]
    shared = {k for k in calls if calls.count(k) > 1}
    # Last resort, the kernel's own name (op<i>_dequantize writing a model output). Not before: one kernel
    # serves every structurally equal operator, so its name is the first one's.
    steps = [replace(s, op_index=int(m.group(1))) if isinstance(s, KernelCall) and s.op_index is None
             and (m := _OP_VAR.match(s.kernel)) and s.kernel not in shared else s for s in steps]
    # Then what the fused kernel takes says (the k-th TIR kernel call is the k-th call_tir of the fused `main`)
    tir_calls = [i for i, s in enumerate(steps) if isinstance(s, KernelCall) and not s.extern]
    for i, found in zip(tir_calls, kernel_operators if len(kernel_operators) == len(tir_calls) else ()):
        if steps[i].op_index is None and found is not None:
            steps[i] = replace(steps[i], op_index=found)
    extern_calls = [i for i, s in enumerate(steps) if isinstance(s, KernelCall) and s.extern]
    for i, found in zip(extern_calls, extern_operators if len(extern_operators) == len(extern_calls) else ()):
        if steps[i].op_index is None and found is not None:
            steps[i] = replace(steps[i], op_index=found)
    for i, reg in enumerate(out_regions[:n_out]):
        if reg.kind != "output":  # a result left in the arena (or an input returned as is) is copied out
            steps.append(Copy(reg, Region("output", index=i, nbytes=reg.nbytes), reg.nbytes))
    for k, reg in enumerate(fix(r) for r in out_regions[n_out:]):
        if reg != Region("state", index=k, nbytes=reg.nbytes):  # the new value replaces the old one
            steps.append(Copy(reg, Region("state", index=k, nbytes=reg.nbytes), reg.nbytes))
    kernels = tvm.IRModule({gv: f for gv, f in mod.functions.items() if isinstance(f, tvm.tirx.PrimFunc)})
    return Program(kernels=kernels, steps=tuple(steps), constants=tuple(constants), arena_bytes=arena,
                   state_sizes=tuple(_nbytes([int(s) for s in p.ty.shape], p.ty.dtype) for p in state_params))


def lower(relax_mod, schedule=None, fold_constants: bool = True, fuse: bool = True, stored=None,
          half: str = "scale") -> Program:
    """Relax module -> Program. `schedule(func) -> func` is applied to every fused kernel. stored
    (weight_storage.StoredWeights): weights the model keeps narrow stay so in flash; half: how the core widens a
    half (weight_storage.HALF_WIDENINGS)."""
    import tvm

    from tinymlaas.ir.kernel_calls import drop_unreferenced_kernels
    from tinymlaas.ir.kernel_sharing import share_kernels
    from tinymlaas.ir.weight_decode import (
        GEMV_BLOCKS,
        decode_weights,
        int4_unpacking,
        palette_gemm,
        palette_gemv,
        palette_unpacking,
    )
    from tinymlaas.ir.weight_storage import narrow_weights

    mod = relax_passes(fold_constants, fuse)(relax_mod)
    taking = _operators_taking(relax_mod)
    unpacked = []
    if stored and stored.int4:  # the C kernels' 4-bit weights: packed in flash, unpacked right before their layer
        mod, unpacked = decode_weights(mod, taking, int4_unpacking, tir_readers=False)
    read_packed, blocks = [], []
    if stored and stored.palette:  # indices into a table, for every kernel (4-bit values: the int4 forms)
        unpacking = palette_unpacking(stored.palette, skip_int4=stored.int4)
        # the matrix kernels decode a block of channels at a time into a scratch
        mod, blocks = palette_gemm(mod, taking, unpacking)
        if stored.palette >= 4:  # one-row C layers of at most 16 values read their 4-bit indices themselves
            mod, read_packed = palette_gemv(mod, taking, unpacking)
        mod, more = palette_gemm(mod, taking, unpacking, GEMV_BLOCKS)  # the other one-row layers: in blocks too
        blocks += more
        mod, more = decode_weights(mod, taking, unpacking, tir_readers=True)
        unpacked += more
    kernel_operators = _kernel_operators(mod, taking)
    extern_operators = _kernel_operators(mod, taking, "relax.call_dps_packed")
    mod, sharing = share_kernels(mod)  # (the k-th kernel call stays the k-th: kernel_operators still hold)
    notes = (sharing.note(),) if sharing.groups else ()
    if unpacked:
        notes += ((f"{len(unpacked)} weight tensors kept packed in flash "
                   f"({sum(a for _, a, _ in unpacked):,} B instead of {sum(b for b, _, _ in unpacked):,} B) and "
                   f"unpacked into RAM right before their layer (the largest: {max(r for _, _, r in unpacked):,} B)"),)
    if blocks:
        compact = sum(c for *_, c in blocks)
        notes += ((f"{len(blocks)} convolution or matrix layers decode palette indices a block of output channels at "
                   f"a time ({sum(b[1] for b in blocks):,} B of indices and tables instead of "
                   f"{sum(b[0] for b in blocks):,} B) into a scratch of one block in the arena (the largest block "
                   f"{max(b[2] for b in blocks):,} B)"
                   + (f"; {compact} of them keep their requantization rows in 9 B a channel instead of 16, expanded "
                      "a block at a time into the scratch" if compact else "")),)
    if read_packed:
        notes += ((f"{len(read_packed)} one-row fully connected layers read 4-bit palette indices in the loop "
                   f"({sum(a for _, a, _ in read_packed):,} B of indices and pair tables instead of "
                   f"{sum(b for b, _, _ in read_packed):,} B, no RAM)"),)
    if schedule is not None:
        for gv, func in list(mod.functions.items()):
            if isinstance(func, tvm.tirx.PrimFunc):
                mod[gv] = schedule(func)
    if stored:
        mod, narrowing = narrow_weights(mod, stored, half)
        notes += (narrowing.note(),) if narrowing.tensors else ()
    mod = planning_passes()(drop_unreferenced_kernels(mod))
    program = flatten(mod, kernel_operators, extern_operators)
    return replace(program, notes=program.notes + notes + _reuse_note(program))


def _reuse_note(program: Program) -> tuple[str, ...]:
    """How many operators run through kernels that serve many (an unrolled sequence's steps: one code body)."""
    from collections import Counter

    from tinymlaas.ir.kernel_sharing import SHARE_MIN_KERNELS

    calls = Counter(s.kernel for s in program.steps if isinstance(s, KernelCall) and not s.extern)
    reused = {k: n for k, n in calls.items() if n >= SHARE_MIN_KERNELS}
    if not reused:
        return ()
    note = (f"{sum(reused.values())} operator calls run through {len(reused)} kernels called at least "
            f"{SHARE_MIN_KERNELS} times each (repeated operators share one code body)")
    return (note,)
