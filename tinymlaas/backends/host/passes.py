"""The host backend's Relax passes and lowering settings: from the front end's module to the one `relax.build` takes
(`optimize`: precision, the zero pipeline, tuning's schedules, dlight's rules), the graph rewrites ahead of tuning, the
PassContext settings TIR is lowered with, and the checks and fixes a host library needs (C micro-kernels it cannot
link, one global symbol per kernel, gather indices kept in range).
"""

from __future__ import annotations

from pathlib import Path

from tinymlaas.backends.host.options import HostOptions
from tinymlaas.backends.host.tuning import fast_tvmscript_parsing, is_tuned, tune
from tinymlaas.targets import HostTarget


def extern_layers(mod, graph) -> list[str]:
    """Layers lowered to C micro-kernels (call_dps_packed), which only the firmware links: 'OPCODE #i (kernel)'."""
    from tvm import relax

    from tinymlaas.frontend.to_relax import OP_VAR

    ops, found = {op.index: op for op in graph.operators}, []
    for binding in (b for block in mod["main"].body.blocks for b in block.bindings):
        value = binding.value
        if isinstance(value, relax.Call) and getattr(value.op, "name", "") == "relax.call_dps_packed":
            m = OP_VAR.match(binding.var.name)
            op = ops.get(int(m.group(1))) if m else None
            where = f"{op.opcode} #{op.index} ({graph.precision(op)})" if op else "a layer"
            found.append(f"{where}: C micro-kernel {value.args[0].global_symbol}, not linked on host targets yet")
    return found


def public_functions(mod):
    """Our TE kernels are PrimFuncs all named "main" (te.create_prim_func); the host library exports each one, so
    each gets its own global symbol."""
    import tvm

    for gv, func in list(mod.functions.items()):
        if isinstance(func, tvm.tirx.PrimFunc):
            mod[gv] = func.with_attr("global_symbol", gv.name_hint)
    return mod


def uses_tensor_cores(target: HostTarget, precision: str) -> bool:
    return target.device == "cuda" and precision == "float16"


def lowering_config(target: HostTarget, precision: str) -> dict:
    """PassContext settings for lowering this build's TIR (tuning candidates and the final build alike).

    Tensor-core schedules: TVM 0.27's StorageRewrite shares a float16 shared-memory buffer with the float32 staging
    buffer of a tensor-core accumulator and then fails its own check ("tvm_access_ptr element type must match the
    source buffer") - 7 of 8 sampled resnet-style convolution schedules; without it all of them build."""
    return {"tirx.disable_storage_rewrite": True} if uses_tensor_cores(target, precision) else {}


def clip_gather_indices(mod):
    """Every `take` (gather, embedding lookup) clamps its indices into range: TVM's frontends emit mode "fast", which
    reads outside the table for an index out of range (a token id past the vocabulary) - a library a service loads
    must not. In range, the result is the same."""
    import tvm
    from tvm import relax

    @relax.expr_functor.mutator
    class ClipTake(relax.PyExprMutator):
        def visit_call_(self, call):
            call = super().visit_call_(call)
            if isinstance(call.op, tvm.ir.Op) and call.op.name == "relax.take" and call.attrs.mode == "fast":
                return relax.op.take(call.args[0], call.args[1], call.attrs.axis, mode="clip")
            return call

    mutator = ClipTake(mod)
    for gv, func in mod.functions.items():
        if isinstance(func, relax.Function):
            mutator.builder_.update_func(gv, mutator.visit_expr(func))
    return mutator.builder_.get()


def tuning_preparation(tensor_cores: bool):
    """The graph rewrites ahead of tuning (before mixed precision): batch norm folded into the convolution before it
    (its weights and bias are constants: the epilogue keeps a bias add, not a subtract, divide, multiply and add per
    element), and for tensor cores convolutions in NHWC with OHWI weights (channels innermost, as wmma tiles load
    them: one resnet18 convolution at batch 32 on the H100, 32 trials, 56 us in NHWC vs 122 us after 64 in NCHW).
    Layout-following operators (pooling, adds) follow; a transpose stays only where the model's own layout meets it.
    Not without tuning: dlight's fallback schedules a depthwise convolution with a fused epilogue badly."""
    import tvm
    from tvm import relax

    passes = [relax.transform.FoldBatchnormToConv2D(), relax.transform.FoldConstant()]
    if tensor_cores:
        passes += [relax.transform.ConvertLayout({"relax.nn.conv2d": ["NHWC", "OHWI"]}), elementwise_keeps_layout(),
                   relax.transform.DeadCodeElimination(), relax.transform.FoldConstant()]
    return tvm.transform.Sequential(passes)


# elementwise operators TVM 0.27's ConvertLayout has no layout rule for: it wraps each in a transpose back and forth
# (mobilenet_v2's ReLU6 is a clip: two transposes per activation)
LAYOUT_FREE = ("relax.clip", "relax.nn.leakyrelu")


def elementwise_keeps_layout():
    """A pass: permute_dims(f(permute_dims(x, p)), q) with q undoing p, f elementwise, becomes f(x)."""
    import tvm
    from tvm import relax
    from tvm.relax.dpl import is_op, rewrite_call, wildcard

    x = wildcard()
    inner = is_op("relax.permute_dims")(x)
    elementwise = None
    for name in LAYOUT_FREE:
        one = is_op(name)(inner) | is_op(name)(inner, wildcard(), wildcard())
        elementwise = one if elementwise is None else elementwise | one
    outer = is_op("relax.permute_dims")(elementwise)

    def undoes(p, q) -> bool:
        return p is not None and q is not None and [int(p[int(i)]) for i in q] == list(range(len(p)))

    def rewrite(expr, matched):
        call = matched[elementwise]
        if not undoes(matched[inner].attrs.axes, matched[outer].attrs.axes):
            return expr
        return relax.Call(call.op, [matched[x], *call.args[1:]], call.attrs)

    @tvm.transform.module_pass(opt_level=0, name="ElementwiseKeepsLayout")
    def apply(mod, _ctx):
        return tvm.IRModule({gv: rewrite_call(outer, rewrite, f) if isinstance(f, relax.Function) else f
                             for gv, f in mod.functions.items()}, attrs=mod.attrs)

    return apply


def optimize(mod, target: HostTarget, tvm_target, options: HostOptions, work_dir: Path | None) -> tuple:
    """Relax module -> (the module relax.build takes, tuning statistics): precision, the zero pipeline, tuning when
    asked and no database for this model exists yet, the database's schedules, dlight's rules for the rest (GPU)."""
    import tvm
    from tvm import relax

    tensor_cores = uses_tensor_cores(target, options.precision)
    mod = clip_gather_indices(mod)
    if options.tune_trials:
        mod = tuning_preparation(tensor_cores)(mod)
    if options.precision == "float16":
        mod = relax.transform.ToMixedPrecision(out_dtype="float32")(mod)
    stats = {}
    with tvm_target:
        if options.tune_trials:
            # what batch norm is left, decomposed, fuses with its neighbours; CanonicalizeBindings removes the tuple
            # the decomposition leaves, which otherwise keeps the activation after it out of the fused function
            mod = tvm.transform.Sequential([relax.transform.DecomposeOpsForInference(),
                                            relax.transform.CanonicalizeBindings()])(mod)
        mod = relax.get_pipeline("zero")(mod)
        if options.tune_trials:
            with fast_tvmscript_parsing():  # meta_schedule parses TVM's tensor intrinsics on first use
                if tensor_cores:
                    # a database of tensor-core schedules names wmma intrinsics: a rebuild in a new process, which
                    # tunes nothing, must register them before the database loads
                    import tvm.s_tir.tensor_intrin.cuda
                if not is_tuned(work_dir):
                    stats = tune(mod, tvm_target, work_dir, options.tune_trials, options.tune_trials_per_task,
                                 options.tune_minutes, options.seed, tensor_cores,
                                 lowering_config(target, options.precision))
                mod = relax.transform.MetaScheduleApplyDatabase(str(work_dir))(mod)
        if target.device == "cuda":  # whatever tuning left unscheduled gets dlight's rules
            import tvm.s_tir.dlight as dl

            mod = dl.ApplyDefaultSchedule(dl.gpu.Matmul(), dl.gpu.GEMV(), dl.gpu.Reduction(),
                                          dl.gpu.GeneralReduction(), dl.gpu.Fallback())(mod)
    return mod, stats

