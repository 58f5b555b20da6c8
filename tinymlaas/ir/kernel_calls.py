"""Rewriting the fused module's kernel calls and a kernel's buffers: what the passes that give a kernel more
constant arguments or another buffer share (ir/kernel_sharing.py, ir/weight_storage.py, ir/concat_in_place.py)."""

from __future__ import annotations


def map_kernel_calls(mod, rewrite):
    """mod with every `call_tir` of its Relax functions replaced by rewrite(call, add_kernel): the call itself, or a
    new one. add_kernel(func, name) adds a PrimFunc to the module and returns its GlobalVar. The kernels a rewrite
    stops calling stay in the module until drop_unreferenced_kernels."""
    import tvm
    from tvm import relax

    call_tir = tvm.ir.Op.get("relax.call_tir")

    @relax.expr_functor.mutator
    class Rewrite(relax.PyExprMutator):
        def visit_call_(self, call):
            call = super().visit_call_(call)
            if not call.op.same_as(call_tir) or not isinstance(call.args[1], relax.Tuple):
                return call
            return rewrite(call, self.builder_.add_func)

    mutator = Rewrite(mod)
    for gv, func in mod.functions.items():
        if isinstance(func, relax.Function):
            mutator.builder_.update_func(gv, mutator.visit_expr(func))
    return mutator.builder_.get()


def call_kernel(gv, args: list, like):
    """A call of kernel `gv` on `args` with the outputs of the call `like`."""
    from tvm import relax

    out = like.ty_args[0] if len(like.ty_args) == 1 else list(like.ty_args)
    return relax.call_tir(gv, relax.Tuple(args), out)


def constant(array):
    """A Relax constant of the array's own dtype (relax.const would make int64 values int32)."""
    from tvm import relax

    return relax.const(array, str(array.dtype))


def with_inputs(func, params: list, n_inputs: int, body=None):
    """func (or `body`, a rewritten one) taking `params` after its n_inputs inputs, before its outputs: as a call
    passes extra input arguments after the others (destination-passing style puts the outputs last)."""
    from tvm import tirx

    body = body if body is not None else func
    return tirx.PrimFunc(list(body.params[:n_inputs]) + list(params) + list(body.params[n_inputs:]), body.body,
                         func.ret_type, func.attrs)


def drop_unreferenced_kernels(mod):
    """mod without the TIR kernels no Relax function calls (a pass that replaced a kernel leaves the old one)."""
    import tvm
    from tvm import relax

    called = set()

    def visit(expr):
        if isinstance(expr, relax.Call) and isinstance(expr.op, tvm.ir.Op) and expr.op.name == "relax.call_tir":
            called.add(expr.args[0].name_hint)

    for func in mod.functions.values():
        if isinstance(func, relax.Function):
            relax.analysis.post_order_visit(func, visit)
    return tvm.IRModule({gv: f for gv, f in mod.functions.items()
                         if not isinstance(f, tvm.tirx.PrimFunc) or gv.name_hint in called}, attrs=mod.attrs)


def rewrite_buffer(body, old, rewrite):
    """A kernel body with `rewrite` applied to every node (tvm_ffi.structural_map), or None when buffer `old` is
    still used after it: the kernel takes it other than by the accesses the rewrite replaces (a pointer taken, a
    matched sub-buffer), so it cannot be swapped."""
    import tvm_ffi

    leftover = []

    def still_used(node):
        if node.same_as(old):
            leftover.append(node)
        return node

    body = tvm_ffi.structural_map(body, rewrite)
    tvm_ffi.structural_map(body, [(type(old), still_used)])
    return None if leftover else body
