"""Concatenation in place: each input of a concatenation is written straight into its slice of the output.

A concatenation copies its inputs into one tensor, so at that step the inputs and the output are alive together:
twice the output's bytes. Here the copy goes away where it can:
  - along the outermost axis (one run per input) every input simply lives in its slice: any producer, any reader;
  - along an inner axis (NHWC channels: a run per pixel) the producer writes with the output's pixel stride: the
    gemm C kernels through their parameter block's `out_stride`, a TIR kernel through its output buffer reshaped to
    the concatenation's and its stores shifted along the axis;
  - anything else (a model input, a constant, a tensor other layers also read) is copied into its slice by a
    strided Copy step where the concatenation was.
The TIR concatenation kernel is dropped. Runs on the flat Program before memory planning (ir/memory.py places a
slice at its tensor's offset + Region.within); TVM's own plan keeps the program as it was.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

import numpy as np

from tinymlaas.ir.kernel_calls import rewrite_buffer
from tinymlaas.ir.lower import ARENA_ALIGN, Copy, KernelCall, Program, Region
from tinymlaas.ops.conv_params import CONV_FIELDS

CONCAT_KERNEL = re.compile(r"^concatenate\d*$")  # TVM's legalized concat, not fused with anything
# C kernels that honour conv_params.h's out_stride (gemm_dsp.c gemm_layer, gemm4_layer): (input, weights, rq,
# params, output)
STRIDED_OUTPUT = {"tinymlaas_gemm_w8", "tinymlaas_gemm_w16", "tinymlaas_gemm_w4", "tinymlaas_gemm_w4l",
                  "tinymlaas_gemm4_w16", "tinymlaas_gemm_p8", "tinymlaas_gemm_p16", "tinymlaas_gemm4_p16"}
OUT_STRIDE = CONV_FIELDS.index("out_stride")


@dataclass(frozen=True)
class ConcatLayout:
    """A concatenation of tensors along `axis` (each input `extents[i]` long on it): `rows` runs, each input
    contributing `runs[i]` bytes per row. last_axis: nothing but ones after the axis (NHWC channels)."""
    axis: int
    last_axis: bool
    rows: int
    extents: tuple[int, ...]
    runs: tuple[int, ...]
    itemsize: int

    @property
    def row(self) -> int:
        return sum(self.runs)

    def start(self, i: int) -> int:
        return sum(self.runs[:i])

    def span(self, i: int) -> int:
        """Bytes from the first to the last byte of input i's slice."""
        return (self.rows - 1) * self.row + self.runs[i]


@dataclass(frozen=True)
class InPlaceConcatReport:
    concatenations: int = 0
    written_in_place: int = 0  # inputs whose producer writes its slice
    copied: int = 0  # inputs copied into their slice

    def note(self) -> str:
        return (f"concatenation in place: {self.concatenations} concatenation(s), {self.written_in_place} input(s) "
                f"written straight into their slice, {self.copied} copied")


def concat_layout(func) -> ConcatLayout | None:
    """The layout of a TIR concatenation kernel from its buffers (inputs..., output), or None when it is not one."""
    shapes = [tuple(int(d) for d in p.shape) for p in func.params]
    dtypes = {str(p.dtype) for p in func.params}
    *ins, out = shapes
    if len(ins) < 1 or len(dtypes) != 1 or any(len(s) != len(out) for s in ins):
        return None
    differing = {a for s in ins for a in range(len(out)) if s[a] != out[a]}
    axis = differing.pop() if len(differing) == 1 else len(out) - 1
    if differing or sum(s[axis] for s in ins) != out[axis]:
        return None
    itemsize = np.dtype(dtypes.pop()).itemsize
    inner = int(np.prod(out[axis + 1:], dtype=np.int64))
    rows = int(np.prod(out[:axis], dtype=np.int64))
    return ConcatLayout(axis, all(d == 1 for d in out[axis + 1:]), rows, tuple(s[axis] for s in ins),
                        tuple(s[axis] * inner * itemsize for s in ins), itemsize)


def _output(step) -> Region | None:
    if isinstance(step, Copy):
        return step.dst
    return [a for a in step.args if a.kind != "scratch"][-1]


def _same(a: Region, b: Region) -> bool:
    """The same tensor (arena: by tensor, whatever the view), or the same region."""
    return a.tensor == b.tensor if a.kind == b.kind == "arena" else a == b


def _reads(step) -> list[Region]:
    if isinstance(step, Copy):
        return [step.src]
    return [a for a in step.args if a.kind != "scratch"][:-1]


def _strided_tir(func, layout: ConcatLayout, start_elements: int, in_shape, out_shape):
    """`func` writing its output (the last parameter) into the concatenation's buffer, shifted by `start_elements`
    along the axis. None when the kernel uses its output other than by element stores, loads and regions."""
    import tvm
    from tvm import tirx

    old = func.params[-1]
    axis = layout.axis
    if [int(v) for v in old.shape] != [int(v) for v in in_shape]:  # the producer writes it in another view (rows
        if not layout.last_axis:  # flattened, ir/reshape_views.py): only its last axis is the concatenation's
            return None
        out_shape, axis = [*old.shape[:-1], out_shape[-1]], len(old.shape) - 1
    new = tirx.decl_buffer(out_shape, str(old.dtype), name=old.name + "_slice")

    def shifted(indices):
        return [i + tirx.const(start_elements, str(i.ty)) if a == axis else i for a, i in enumerate(indices)]

    def rewrite(node):
        kind = type(node).__name__
        if kind == "BufferStore" and node.buffer.same_as(old):
            return tirx.BufferStore(new, node.value, shifted(node.indices))
        if kind == "TensorLoad" and node.source.same_as(old):
            return tirx.BufferLoad(new, shifted(node.indices))
        if kind == "TensorRegion" and node.source.same_as(old):
            region = [tvm.ir.Range.from_min_extent(r.min + tirx.const(start_elements, str(r.min.ty)), r.extent)
                      if a == axis else r for a, r in enumerate(node.region)]
            return tirx.BufferRegion(new, region)
        return node

    body = rewrite_buffer(func.body, old, rewrite)
    return None if body is None else tirx.PrimFunc([*func.params[:-1], new], body, func.ret_type, func.attrs)


def concat_in_place(program: Program) -> tuple[Program, InPlaceConcatReport]:
    """The program with every concatenation of arena tensors written in place (see the module's docstring)."""
    import tvm

    steps = list(program.steps)
    constants = list(program.constants)
    kernels = {gv.name_hint: f for gv, f in program.kernels.functions.items()}
    counts = {"concatenations": 0, "written_in_place": 0, "copied": 0}
    moved: dict[int, tuple[int, int]] = {}  # tensor -> (tensor it now lives in, bytes from that one's start)
    for k in range(len(steps)):
        step = steps[k]
        if not (isinstance(step, KernelCall) and not step.extern and CONCAT_KERNEL.match(step.kernel)):
            continue
        layout = concat_layout(kernels[step.kernel])
        *xs, y = step.args
        if layout is None or y.kind != "arena" or len(xs) != len(layout.runs):
            continue
        out_shape = kernels[step.kernel].params[-1].shape
        replacement: list = []
        for i, x in enumerate(xs):
            writers = [j for j, s in enumerate(steps) if not isinstance(s, list) and _same(_output(s), x)]
            readers = [j for j, s in enumerate(steps) if not isinstance(s, list) and any(_same(r, x) for r in _reads(s))]
            slice_of_y = replace(y, within=y.within + layout.start(i), nbytes=layout.span(i))
            alone = (x.kind == "arena" and x.tensor not in moved and len(writers) == 1 and writers[0] < k
                     and readers == [k] and xs.count(x) == 1 and x.tensor != y.tensor)
            # TIR kernels take their buffers aligned (TVM's codegen may assume it); C kernels take any byte
            aligned = layout.start(i) % ARENA_ALIGN == 0 or all(
                steps[j].extern for j in writers + readers if j != k and isinstance(steps[j], KernelCall))
            if x.kind == "arena" and layout.rows == 1 and x.tensor not in moved and xs.count(x) == 1 \
                    and len(writers) == 1 and writers[0] < k and aligned:  # one run: it simply lives in its slice
                moved[x.tensor] = (y.tensor, slice_of_y.within)
                counts["written_in_place"] += 1
                continue
            producer = steps[writers[0]] if alone else None
            if alone and isinstance(producer, KernelCall) and producer.extern and producer.kernel in STRIDED_OUTPUT \
                    and layout.last_axis:
                held = producer.args[-2]
                params = constants[held.index].copy()
                params[OUT_STRIDE] = layout.row // layout.itemsize
                shared = sum(held in (s.args if isinstance(s, KernelCall) else (s.src,))
                             for s in steps if not isinstance(s, list)) > 1
                if shared:  # another call reads the same block: this one gets its own
                    constants.append(params)
                    held = Region("const", index=len(constants) - 1, nbytes=params.nbytes)
                else:
                    constants[held.index] = params
                args = list(producer.args)
                args[-2] = held
                args[-1] = slice_of_y
                steps[writers[0]] = replace(producer, args=tuple(args))
                counts["written_in_place"] += 1
                continue
            if alone and isinstance(producer, KernelCall) and not producer.extern \
                    and producer.args[-1] == x and producer.args.count(x) == 1:
                func = _strided_tir(kernels[producer.kernel], layout, sum(layout.extents[:i]),
                                    kernels[step.kernel].params[i].shape, out_shape)
                if func is not None:
                    name = f"{producer.kernel}_into_{step.kernel}_{i}"
                    kernels[name] = func
                    steps[writers[0]] = replace(producer, kernel=name, args=(*producer.args[:-1], y))
                    counts["written_in_place"] += 1
                    continue
            replacement.append(Copy(x, slice_of_y, layout.runs[i], step.op_index, rows=layout.rows,
                                    src_stride=layout.runs[i], dst_stride=layout.row))
            counts["copied"] += 1
        counts["concatenations"] += 1
        steps[k] = replacement  # spliced in below (indices stay valid while the loop runs)

    if not counts["concatenations"]:
        return program, InPlaceConcatReport()

    def home(r: Region) -> Region:
        if r.kind != "arena" or r.tensor not in moved:
            return r
        tensor, within = moved[r.tensor]
        return home(replace(r, tensor=tensor, within=within + r.within))

    flat = []
    for s in steps:
        for t in (s if isinstance(s, list) else [s]):
            flat.append(replace(t, src=home(t.src), dst=home(t.dst)) if isinstance(t, Copy)
                        else replace(t, args=tuple(home(a) for a in t.args)))
    used = {s.kernel for s in flat if isinstance(s, KernelCall) and not s.extern}
    module = tvm.IRModule({tvm.ir.GlobalVar(name): f for name, f in kernels.items() if name in used})
    report = InPlaceConcatReport(**counts)
    return replace(program, kernels=module, steps=tuple(flat), constants=tuple(constants),
                   notes=program.notes + (report.note(),)), report
