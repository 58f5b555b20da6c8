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
    import tvm
    import tvm_ffi
    from tvm import relax, tirx

    min_kernels = SHARE_MIN_KERNELS if min_kernels is None else min_kernels
    call_tir = tvm.ir.Op.get("relax.call_tir")
    kernels = {gv: f for gv, f in mod.functions.items() if isinstance(f, tirx.PrimFunc)}
    groups: dict = {}
    for gv, f in kernels.items():
        blank = skeleton(f)
        key = tvm_ffi.structural_hash(blank)
        for members in groups.setdefault(key, []):
            if tvm_ffi.structural_equal(skeleton(kernels[members[0]]), blank):
                members.append(gv)
                break
        else:
            groups[key].append([gv])
    plans = {}  # member GlobalVar -> (shared GlobalVar, its constants per dtype)
    shared_funcs = {}
    report = {"groups": 0, "kernels": 0}
    for same in groups.values():
        for members in same:
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
            rep = kernels[members[0]]
            params = [tirx.decl_buffer((len(per_dtype[d]),), d, name=f"imm_{d}") for d in dtypes]

            def parametrized(node, position, params=params, slots=slots):
                if position not in slots:
                    return node
                k, slot = slots[position]
                return tirx.BufferLoad(params[k], [tirx.const(slot, "int32")])

            body = _map_values(rep, parametrized)
            shared_funcs[members[0]] = (body, params)
            for m, gv in enumerate(members):
                plans[gv] = (members[0], [np.array([column[m] for column in per_dtype[d]], dtype=d) for d in dtypes])
            report["groups"] += 1
            report["kernels"] += len(members)
    if not plans:
        return mod, SharingReport()

    new_gvs = {}
    calls = [0]

    @relax.expr_functor.mutator
    class Share(relax.PyExprMutator):
        def visit_call_(self, call):
            call = super().visit_call_(call)
            if not call.op.same_as(call_tir) or call.args[0] not in plans:
                return call
            rep_gv, consts = plans[call.args[0]]
            if rep_gv not in new_gvs:
                body, params = shared_funcs[rep_gv]
                n_in = len(call.args[1].fields)
                func = tirx.PrimFunc(list(body.params[:n_in]) + params + list(body.params[n_in:]), body.body,
                                     body.ret_type, body.attrs)
                new_gvs[rep_gv] = self.builder_.add_func(func, rep_gv.name_hint + "_shared")
            calls[0] += 1
            args = list(call.args[1].fields) + [relax.const(c, str(c.dtype)) for c in consts]
            out = call.ty_args[0] if len(call.ty_args) == 1 else list(call.ty_args)
            return relax.call_tir(new_gvs[rep_gv], relax.Tuple(args), out)

    mutator = Share(mod)
    for gv, func in mod.functions.items():
        if isinstance(func, relax.Function):
            mutator.builder_.update_func(gv, mutator.visit_expr(func))
    out = mutator.builder_.get()  # (the replaced kernels go in lower.drop_unreferenced_kernels)
    return out, SharingReport(report["groups"], report["kernels"], calls[0])
