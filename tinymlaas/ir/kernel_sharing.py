"""Kernels equal up to their immediates share one code body.

An unrolled recurrent network repeats the same operators at every time step, each with its own quantization: the
fused kernels are the same loops over the same shapes and differ only in the constants baked into their arithmetic
(multipliers, shifts, zero points, clamp bounds). Compiled one by one they multiply the code by the sequence length.
This pass, on the fused kernels before scheduling, groups kernels whose structure is equal once the immediates of
their computed values are blanked (loop extents, indices and buffer shapes must match exactly), and where a group is
large enough rewrites one member so that every immediate that differs within the group is read from a small constant
array, one per dtype, passed as one more argument; each call passes its own values. The arithmetic is the same, so the
results are the same bits; the cost is a load (hoisted out of the loops) where an immediate was.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from tinymlaas.ir.kernel_calls import call_kernel, constant, map_kernel_calls, with_inputs

SHARE_MIN_KERNELS = 8  # an unrolled sequence's length; fewer equal layers keep their immediates (and their speed)
_IMMEDIATES = ("IntImm", "FloatImm")
_HIDDEN = "tinymlaas_hidden_load_"


def _map_values(func, on_immediate):
    """func with on_immediate(node, position) applied to every immediate of the values its stores compute, the
    reads of buffers (and their indices) left alone; positions count in traversal order."""
    import tvm_ffi
    from tvm import tirx

    position = [0]

    def value(expr):
        loads = []

        def hide(node):  # a read keeps its indices: hidden behind a variable while immediates are visited
            if type(node).__name__ == "TensorLoad":
                loads.append(node)
                return tirx.Var(f"{_HIDDEN}{len(loads) - 1}", node.ty)
            return node

        def immediate(node):
            if type(node).__name__ in _IMMEDIATES:
                position[0] += 1
                return on_immediate(node, position[0] - 1)
            return node

        def restore(node):
            if type(node).__name__ == "Var" and node.name.startswith(_HIDDEN):
                return loads[int(node.name[len(_HIDDEN):])]
            return node

        expr = tvm_ffi.structural_map(expr, hide, order="pre")
        expr = tvm_ffi.structural_map(expr, immediate)
        return tvm_ffi.structural_map(expr, restore)

    def store(node):
        if type(node).__name__ == "BufferStore":
            return tirx.BufferStore(node.buffer, value(node.value), node.indices)
        return node

    body = tvm_ffi.structural_map(func.body, store, order="pre")
    return tirx.PrimFunc(func.params, body, func.ret_type, func.attrs)


def immediates(func) -> list[tuple[str, object]]:
    """(dtype, value) of every immediate of func's computed values, in traversal order."""
    found = []

    def record(node, _):
        found.append((str(node.ty), node.value))
        return node

    _map_values(func, record)
    return found


def skeleton(func):
    """func with every immediate of its computed values set to 0: equal skeletons, equal code but for those."""
    from tvm import tirx

    return _map_values(func, lambda node, _: tirx.const(0, str(node.ty)) if type(node).__name__ == "IntImm"
                       else tirx.const(0.0, str(node.ty)))


@dataclass(frozen=True)
class SharingReport:
    groups: int = 0
    kernels: int = 0  # kernels replaced by the groups' shared ones
    calls: int = 0

    def note(self) -> str:
        return (f"{self.kernels} kernels equal up to their constants share {self.groups} code bodies ({self.calls} "
                "calls; each passes its own constants)")


def share_kernels(mod, min_kernels: int | None = None):
    """The fused Relax module with each group of at least min_kernels (default SHARE_MIN_KERNELS) kernels equal up
    to their immediates replaced by one kernel taking the differing immediates as arguments. Returns (module,
    SharingReport)."""
    import tvm_ffi
    from tvm import tirx

    min_kernels = SHARE_MIN_KERNELS if min_kernels is None else min_kernels
    kernels = {gv: f for gv, f in mod.functions.items() if isinstance(f, tirx.PrimFunc)}
    groups: dict = {}  # skeleton hash -> [(skeleton, [members])]: equal hashes checked for equality
    for gv, f in kernels.items():
        blank = skeleton(f)
        same_hash = groups.setdefault(tvm_ffi.structural_hash(blank), [])
        members = next((m for b, m in same_hash if tvm_ffi.structural_equal(b, blank)), None)
        if members is None:
            same_hash.append((blank, [gv]))
        else:
            members.append(gv)
    plans = {}  # member GlobalVar -> (the group's first member, its constants per dtype)
    shared_funcs = {}  # the group's first member -> (its kernel reading the immediates that differ, their buffers)
    report = {"groups": 0, "kernels": 0, "calls": 0}
    for members in (m for same_hash in groups.values() for _, m in same_hash):
        if len(members) < min_kernels:
            continue
        values = [immediates(kernels[gv]) for gv in members]
        differing = [p for p in range(len(values[0])) if len({v[p] for v in values}) > 1]
        # one slot per distinct column of values: an immediate repeated in the kernel (a product computed in
        # three places) stays one value, so LLVM still sees one expression
        columns = {}
        for p in differing:
            columns.setdefault((values[0][p][0], tuple(v[p][1] for v in values)), []).append(p)
        dtypes = sorted({dtype for dtype, _ in columns})
        slots, per_dtype = {}, {d: [] for d in dtypes}
        for (dtype, column), positions in columns.items():
            for p in positions:
                slots[p] = (dtypes.index(dtype), len(per_dtype[dtype]))
            per_dtype[dtype].append(column)
        params = [tirx.decl_buffer((len(per_dtype[d]),), d, name=f"imm_{d}") for d in dtypes]

        def parametrized(node, position, params=params, slots=slots):
            if position not in slots:
                return node
            k, slot = slots[position]
            return tirx.BufferLoad(params[k], [tirx.const(slot, "int32")])

        shared_funcs[members[0]] = (_map_values(kernels[members[0]], parametrized), params)
        for m, gv in enumerate(members):
            plans[gv] = (members[0], [np.array([column[m] for column in per_dtype[d]], dtype=d) for d in dtypes])
        report["groups"] += 1
        report["kernels"] += len(members)
    if not plans:
        return mod, SharingReport()

    new_gvs = {}

    def share(call, add_kernel):
        if call.args[0] not in plans:
            return call
        first, consts = plans[call.args[0]]
        args = list(call.args[1].fields)
        if first not in new_gvs:
            body, params = shared_funcs[first]
            new_gvs[first] = add_kernel(with_inputs(body, params, len(args)), first.name_hint + "_shared")
        report["calls"] += 1
        return call_kernel(new_gvs[first], args + [constant(c) for c in consts], call)

    out = map_kernel_calls(mod, share)
    return out, SharingReport(report["groups"], report["kernels"], report["calls"])
