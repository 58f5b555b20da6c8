"""How converters put computation into the Relax graph besides plain Relax operators: one integer TE kernel as an
opaque call (`emit_kernel`), a call of a C micro-kernel linked with the firmware (`extern`, firmware/kernels/), and
TFLite's fused activation on a float result (`activation`)."""

from __future__ import annotations

from tinymlaas.errors import UnsupportedOperator


def emit_kernel(ctx, fn, args, *, elementwise: bool = False, schedule=None, **attrs):
    """Emit `fn` (a TE integer kernel) as one opaque call_tir.

    Not `bb.emit_te`: that builds PrimFuncs with int64 index types, which turns every integer
    expression into 64-bit arithmetic, slow on 32-bit cores.
    elementwise: each output element depends only on the input elements of its own index (after broadcasting):
    the memory planner may write the output over an input of its size (ir/memory.py).
    schedule: the layer's ir.layer_schedule.LayerSchedule, carried to the schedule stage as an attribute.
    """
    from tvm import relax, te

    from tinymlaas.ir.layer_schedule import ATTR

    holders = []
    for i, a in enumerate(args):
        shape = [int(v) for v in (a.ty.shape.values if hasattr(a.ty.shape, "values") else a.ty.shape)]
        holders.append(te.placeholder(shape, str(a.ty.dtype), f"in{i}"))
    out = fn(*holders, **attrs)
    func = te.create_prim_func(holders + [out]).with_attrs({
        "op_pattern": 8,  # kOpaque: one kernel per operator
        "tinymlaas.int32_indices": True,  # int32 indices already; its int64 arithmetic is meant (64-bit products)
        **({"tinymlaas.elementwise": True} if elementwise else {}),
        **({ATTR: schedule.key()} if schedule is not None else {}),
    })
    gv = ctx.bb.add_func(func, f"op{ctx.op.index}_{ctx.op.opcode.lower()}")
    return ctx.emit(relax.call_tir(gv, list(args), relax.TensorType([int(v) for v in out.shape], out.dtype)))


def extern(ctx, symbol, args, shape, dtype="int8"):
    """A call of the C kernel `symbol` (firmware/kernels/) writing one output of `shape`."""
    from tvm import relax

    return ctx.emit(relax.call_dps_packed(symbol, list(args), relax.TensorType(list(shape), dtype)))


def activation(ctx, op, y):
    """The operator's fused activation function (TFLite ActivationFunctionType) on a float result."""
    from tvm import relax

    act = int(op.opt("fusedActivationFunction", 0) or 0)
    if act == 0:
        return y
    if act == 1:
        return relax.op.nn.relu(y)
    if act == 2:
        return relax.op.clip(y, -1.0, 1.0)
    if act == 3:
        return relax.op.clip(y, 0.0, 6.0)
    if act == 4:
        return relax.op.tanh(y)
    raise UnsupportedOperator([f"{op.opcode} #{op.index} with fused activation {act}"], ctx.graph.name)
