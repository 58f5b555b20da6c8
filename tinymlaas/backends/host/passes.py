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


def lowering_pipeline(tvm_target):
    """The Relax passes `relax.build` runs by default for this target (for CUDA: legalization, dlight's rules for what
    is still unscheduled, memory planning and, when `relax.backend.use_cuda_graph` is set, RewriteCUDAGraph), run by
    the build itself so that what they made can be read before code generation (`build_mode`)."""
    from tvm import relax

    if "gpu" in tvm_target.keys:
        return relax.get_default_pipeline(tvm_target)
    return relax.get_pipeline("default")


def _kernel_calls(mod, func, named: str = "") -> int:
    """How many calls of the module's TIR kernels (those whose name holds `named`) a lowered Relax function makes."""
    import tvm
    from tvm import relax

    kernels = {gv for gv, f in mod.functions.items() if isinstance(f, tvm.tirx.PrimFunc) and named in gv.name_hint}
    count = 0

    def visit(expr):
        nonlocal count
        if isinstance(expr, relax.Call) and isinstance(expr.op, tvm.ir.GlobalVar) and expr.op in kernels:
            count += 1

    relax.analysis.post_order_visit(func.body, visit)
    return count


def build_mode(lowered, target: HostTarget, precision: str, tuned: bool, cuda_graph: bool) -> dict:
    """How a build runs, read off the module `lowering_pipeline` made: precision, tuned or not, the convolutions'
    layout, and on CUDA whether kernel launches are captured as CUDA graphs: RewriteCUDAGraph moves each static
    stretch of launches into a `*_cuda_graph_capture` function that the VM captures on the first call and replays
    after; `kernels_in_graphs` of `kernels` launches are replayed, the rest are launched one by one (a stretch that
    allocates or has a dynamic shape stays outside)."""
    from tvm import relax

    functions = {gv.name_hint: f for gv, f in lowered.functions.items() if isinstance(f, relax.Function)}
    captured = {name for name in functions if name.endswith("_cuda_graph_capture")}
    in_graphs = sum(_kernel_calls(lowered, functions[name]) for name in captured)
    total = sum(_kernel_calls(lowered, f) for f in functions.values())
    nhwc = target.device == "cuda" and tuned and uses_tensor_cores(target, precision)
    mode = {"precision": precision, "tuned": tuned, "layout": "NHWC" if nhwc else "as the model's",
            "kernels": total}
    if target.device == "cuda":
        mode["cuda_graph"] = {"asked": cuda_graph, "captured": bool(captured), "regions": len(captured),
                              "kernels_in_graphs": in_graphs}
    if nhwc:  # convolutions split along K: one im2col each, in a kernel of its own or fused with its producers
        mode["split_k_convolutions"] = sum(_kernel_calls(lowered, f, "split_k_im2col") for f in functions.values())
    return mode


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


# split-K: a convolution whose output covers few 64x64 tiles (resnet18's layer3 and layer4 at batch 1: 8-16 tiles for
# the H100's 132 multiprocessors, each tile looping over K = 9 x channels) becomes a batched matrix product over
# chunks of K followed by their sum, so that chunks run side by side. The split doubles while the output tiles times
# the split stay under SPLIT_K_TILES and each chunk keeps at least SPLIT_K_MIN_CHUNK of K (a multiple of 16, the
# tensor-core tile); a convolution with SPLIT_K_MAX_TILES output tiles or more is left alone.
SPLIT_K_TILES = 128
SPLIT_K_MIN_CHUNK = 256
SPLIT_K_MAX_TILES = 32
# the im2col function is injective: FuseOps fuses the previous layer's epilogue (the chunks' sum, bias, ReLU) into it,
# each im2col element summing its input's partial products again (a 3x3 convolution reads each input 9 times, from
# L2) instead of a kernel writing the activation and another reading it. False: im2col stays a kernel of its own
# (benchmarks/gpu.py measures both: variants tuned16_splitk and tuned16_splitk_apart)
SPLIT_K_IM2COL_FUSES = True
OPAQUE = 8  # TVM's OpPatternKind kOpaque: AnnotateTIROpPattern keeps a function's own op_pattern


def split_k_factor(m: int, n: int, k: int) -> int:
    """How many chunks of its reduction (K) an M x N x K product is split into; 1: not split."""
    tiles = -(-m // 64) * -(-n // 64)
    split = 1
    if tiles >= SPLIT_K_MAX_TILES:
        return 1
    while tiles * split * 2 <= SPLIT_K_TILES and k % (32 * split) == 0 and k // (2 * split) >= SPLIT_K_MIN_CHUNK:
        split *= 2
    return split


def split_k_im2col(x, kernel: tuple, strides: tuple, dilation: tuple, padding: tuple, out_hw: tuple, split: int,
                   rows: int):
    """TE: the NHWC input's patches as S chunks of K (S x rows x K/S; K ordered as an OHWI weight's H, W, I), rows
    past the B x OH x OW output pixels and taps in the padding zero. One gather per element, so that a single kernel
    (with whatever elementwise producers fuse into it) writes the matrix product's operand: written with pad, a
    strided slice per tap, concat, reshape and transpose it took 4-5 us a convolution at batch 1 on an H100."""
    from tvm import te, tirx

    batch, height, width, channels = (int(d) for d in x.shape)
    (kh, kw), (sh, sw), (dh, dw), (top, left), (oh, ow) = kernel, strides, dilation, padding[:2], out_hw
    chunk = kh * kw * channels // split

    def patch(s, r, c):
        k = s * chunk + c
        tap, ch = k // channels, k % channels
        p = r % (oh * ow)
        iy = p // ow * sh + tap // kw * dh - top
        ix = p % ow * sw + tap % kw * dw - left
        inside = tirx.all(r < batch * oh * ow, iy >= 0, iy < height, ix >= 0, ix < width)
        return tirx.if_then_else(inside, x[r // (oh * ow), iy, ix, ch], tirx.const(0, x.dtype))

    return te.compute((split, rows, chunk), patch, name="split_k_im2col")


def split_k_sum(y, m: int):
    """TE: the S partial products (S x rows x N) summed chunk by chunk, rows past `m` dropped (m x N). Written out
    as S - 1 adds per element, not as a reduction: an injective kernel, one output element a thread reading its S
    partials (coalesced along N), which fuses with the bias and activation after it. dlight's reduction rule gave
    relax.op.sum(axis=0) a cross-thread reduction per output element: 11 us a convolution on an H100 for 2 MB."""
    from tvm import te

    split, _, n = (int(d) for d in y.shape)

    def total(i, j):
        acc = y[0, i, j]
        for s in range(1, split):
            acc = acc + y[s, i, j]
        return acc

    return te.compute((m, n), total, name="split_k_sum")


def split_k_convolutions():
    """A pass over NHWC convolutions with OHWI constant weights (after ConvertLayout, and for float16 after mixed
    precision and constant folding: float16 data and weights, a float32 output): where `split_k_factor` splits one,
    the convolution becomes im2col (`split_k_im2col`: an M x K matrix, rows padded to a multiple of 16, as S chunks
    of K, S x M' x K/S), a batched matmul with the weight as S x K/S x N, the chunks' sum (`split_k_sum`, padding rows
    dropped) and a reshape back to NHWC. The weight is rearranged once, here. The same function of the input: the sum
    only groups the products differently. After mixed precision because its TE functions are no Relax operators
    (ToMixedPrecision stops at a call_tir)."""
    import numpy as np
    import tvm
    from tvm import relax

    def rewrite(bb, call):
        attrs = call.attrs
        data, weight = call.args
        if (attrs.data_layout != "NHWC" or attrs.kernel_layout != "OHWI" or attrs.out_layout != "NHWC"
                or int(attrs.groups) != 1 or not isinstance(weight, tvm.ir.expr.Constant)):
            return None
        try:
            batch, _, _, channels = (int(d) for d in data.ty.shape)
            _, out_h, out_w, out_c = (int(d) for d in call.ty.shape)
        except (TypeError, ValueError, AttributeError):  # a dynamic shape
            return None
        w = weight.value.numpy()  # O, H, W, I
        _, kh, kw, _ = w.shape
        m, k = batch * out_h * out_w, kh * kw * channels
        split = split_k_factor(m, out_c, k)
        if split == 1:
            return None
        rows = -(-m // 16) * 16
        cols = bb.emit_te(split_k_im2col, data, (kh, kw), tuple(int(v) for v in attrs.strides),
                          tuple(int(v) for v in attrs.dilation), tuple(int(v) for v in attrs.padding),
                          (out_h, out_w), split, rows, primfunc_name_hint="split_k_im2col")
        if not SPLIT_K_IM2COL_FUSES:  # an opaque function: FuseOps leaves it a kernel of its own
            gvar = bb.lookup_binding(cols).args[0]
            bb.update_func(gvar, bb.get()[gvar].with_attr("op_pattern", OPAQUE))
        w_chunks = np.ascontiguousarray(w.reshape(out_c, k).T.reshape(split, k // split, out_c))
        in_dtype, out_dtype = str(data.ty.dtype), str(call.ty.dtype)
        partial = relax.op.matmul(cols, relax.const(w_chunks), out_dtype=out_dtype)
        if in_dtype != out_dtype:  # float16 in, float32 out (after mixed precision): each partial product stored in
            # float16, as mixed precision stores any matmul's output, then summed in float32 (the matrix product's
            # function is the one the tuning databases since 2026-12-07 hold)
            partial = relax.op.astype(relax.op.astype(partial, in_dtype), out_dtype)
        out = bb.emit_te(split_k_sum, bb.emit(partial), m, primfunc_name_hint="split_k_sum")
        return relax.op.reshape(out, [batch, out_h, out_w, out_c])

    @relax.expr_functor.mutator
    class SplitK(relax.PyExprMutator):
        def visit_call_(self, call):
            call = super().visit_call_(call)
            if isinstance(call.op, tvm.ir.Op) and call.op.name == "relax.nn.conv2d":
                split = rewrite(self.builder_, call)
                return call if split is None else split
            return call

    @tvm.transform.module_pass(opt_level=0, name="SplitKConvolutions")
    def apply(mod, _ctx):
        mutator = SplitK(mod)
        for gv, func in mod.functions.items():
            if isinstance(func, relax.Function):
                mutator.builder_.update_func(gv, mutator.visit_expr(func))
        return mutator.builder_.get()

    return apply


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
        passes += [clip_as_bounds(), relax.transform.ConvertLayout({"relax.nn.conv2d": ["NHWC", "OHWI"]}),
                   elementwise_keeps_layout(), relax.transform.DeadCodeElimination(), relax.transform.FoldConstant()]
    return tvm.transform.Sequential(passes)


def split_k_preparation():
    """After `tuning_preparation` and mixed precision (tensor cores): the weights' casts folded, then convolutions
    with few output tiles and a long reduction split it (`split_k_convolutions`)."""
    import tvm
    from tvm import relax

    return tvm.transform.Sequential([relax.transform.FoldConstant(), split_k_convolutions(),
                                     relax.transform.DeadCodeElimination()])


def clip_as_bounds():
    """A pass: clip(x, lo, hi) with constant bounds becomes minimum(maximum(x, lo), hi), bounds as constants of x's
    type. TVM 0.27's ToMixedPrecision fails on a clip that ConvertLayout has visited ("Expected TensorType, but got
    T.float64": the bounds are scalars, not tensors; mobilenet_v2's ReLU6 in NHWC), and maximum and minimum follow
    the layout of their input where clip would be wrapped in transposes. Fused into the convolution's function all
    the same."""
    import tvm
    from tvm import relax
    from tvm.relax.dpl import is_op, rewrite_call, wildcard

    x = wildcard()
    clip = is_op("relax.clip")(x, wildcard(), wildcard())

    def bound(arg):  # a FloatImm/IntImm, or a PrimValue holding one
        value = getattr(arg, "value", None)
        value = getattr(value, "value", value)
        return value if isinstance(value, (int, float)) else None

    def rewrite(expr, matched):
        call = matched[clip]
        bounds = [bound(a) for a in call.args[1:]]
        dtype = getattr(getattr(expr, "ty", None), "dtype", None)
        if None in bounds or not dtype:
            return expr
        low, high = (relax.const(float(b), dtype) for b in bounds)
        return relax.op.minimum(relax.op.maximum(matched[x], low), high)

    @tvm.transform.module_pass(opt_level=0, name="ClipAsBounds")
    def apply(mod, _ctx):
        return tvm.IRModule({gv: rewrite_call(clip, rewrite, f) if isinstance(f, relax.Function) else f
                             for gv, f in mod.functions.items()}, attrs=mod.attrs)

    return apply


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
    if options.tune_trials and tensor_cores and options.split_k:
        mod = split_k_preparation()(mod)
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

