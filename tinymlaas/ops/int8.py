"""Import of full-integer (int8) TFLite models straight to integer kernels.

TVM's frontend expands every quantized operator into dequantize -> float op -> quantize, which needs
an FPU and is not bit-exact. This stage recognises the quantized operators at the TFLite level and
emits one integer kernel per operator into the Relax graph (`int8_kernels`), with TFLite's
requantization parameters computed here exactly as TFLite computes them (in double, then
QuantizeMultiplier). Weights stay int8, biases and multipliers int32; no float is left.
Softmax is a C kernel (`firmware/kernels/softmax_s8.c`, gemmlowp fixed point) called from the graph.
"""

from __future__ import annotations

import math

import numpy as np

import tinymlaas.ops.int8_te as k
from tinymlaas.errors import UnsupportedOperator
from tinymlaas.frontend.tflite import TFLiteModel

SUPPORTED = {"CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED", "AVERAGE_POOL_2D", "MAX_POOL_2D", "ADD", "RESHAPE", "SOFTMAX"}
KERNEL_KINDS = ("tir", "dsp", "dsp16")
# per layer: integer TIR; DSP micro-kernels (firmware/kernels/gemm_dsp.c) with the int8 weights; or with the
# weights pre-widened to int16 in flash: faster, twice the weight flash

# TFLite enums (schema.fbs)
_SAME, _VALID = 0, 1
_ACT_NONE, _ACT_RELU, _ACT_RELU_N1_TO_1, _ACT_RELU6 = 0, 1, 2, 3


def _round_away(x: float) -> int:
    """std::round: half away from zero."""
    return math.floor(abs(x) + 0.5) * (1 if x >= 0 else -1)


def quantize_multiplier(real: float) -> tuple[int, int]:
    """TFLite QuantizeMultiplier: real = m * 2**(shift - 31), m in [2**30, 2**31)."""
    if real == 0.0:
        return 0, 0
    q, shift = math.frexp(real)
    q_fixed = _round_away(q * (1 << 31))
    if q_fixed == 1 << 31:
        q_fixed //= 2
        shift += 1
    if shift < -31:
        shift, q_fixed = 0, 0
    return q_fixed, shift


def activation_range(act: int, scale: float, zero_point: int) -> tuple[int, int]:
    """TFLite CalculateActivationRangeQuantized for int8 (quantization of the bounds in float32)."""
    lo, hi = -128, 127

    def q(x: float) -> int:
        return zero_point + _round_away(float(np.float32(x) / np.float32(scale)))

    if act == _ACT_RELU:
        return max(lo, q(0.0)), hi
    if act == _ACT_RELU6:
        return max(lo, q(0.0)), min(hi, q(6.0))
    if act == _ACT_RELU_N1_TO_1:
        return max(lo, q(-1.0)), min(hi, q(1.0))
    if act == _ACT_NONE:
        return lo, hi
    raise ValueError(f"fused activation {act}")


def padding(kind: int, in_size: int, k: int, stride: int, dilation: int) -> tuple[int, int]:
    """TFLite ComputePaddingHeightWidth for one dimension: (before, after)."""
    eff = (k - 1) * dilation + 1
    if kind == _VALID:
        return 0, 0
    out = (in_size + stride - 1) // stride
    total = max((out - 1) * stride + eff - in_size, 0)
    return total // 2, total - total // 2


def softmax_params(beta: float, input_scale: float) -> tuple[int, int, int]:
    """TFLite PreprocessSoftmaxScaling + CalculateInputRadius with 5 integer bits for the scaled difference."""
    integer_bits = 5
    real = min(beta * input_scale * (1 << (31 - integer_bits)), float((1 << 31) - 1))
    multiplier, left_shift = quantize_multiplier(real)
    radius = math.floor(1.0 * ((1 << integer_bits) - 1) * (1 << (31 - integer_bits)) / (1 << left_shift))
    return multiplier, left_shift, -radius


class _Graph:
    """The model's tensors as seen by the importer: constants, quantization, producers."""

    def __init__(self, model: TFLiteModel):
        from ai_edge_litert import schema_py_generated as schema

        self.schema = schema
        self.fb = schema.ModelT.InitFromObj(schema.Model.GetRootAsModel(model.data, 0))
        self.sg = self.fb.subgraphs[0]
        names = {v: key for key, v in schema.BuiltinOperator.__dict__.items() if not key.startswith("_")}
        self.op_names = []
        for op in self.sg.operators:
            code = self.fb.operatorCodes[op.opcodeIndex]
            self.op_names.append(names.get(max(code.builtinCode, code.deprecatedBuiltinCode), "CUSTOM"))

    def tensor(self, i: int):
        return self.sg.tensors[i]

    def shape(self, i: int) -> tuple[int, ...]:
        return tuple(int(s) for s in self.tensor(i).shape)

    def const(self, i: int, dtype: str) -> np.ndarray | None:
        t = self.tensor(i)
        data = self.fb.buffers[t.buffer].data
        if data is None or len(data) == 0:
            return None
        return np.frombuffer(bytes(bytearray(data)), dtype=dtype).reshape(self.shape(i))

    def scale(self, i: int) -> np.ndarray:
        q = self.tensor(i).quantization
        return np.asarray(q.scale if q is not None and q.scale is not None else [0.0], dtype=np.float32)

    def zero_point(self, i: int) -> int:
        q = self.tensor(i).quantization
        return int(q.zeroPoint[0]) if q is not None and q.zeroPoint is not None and len(q.zeroPoint) else 0


def integer_import_blockers(model: TFLiteModel) -> list[str]:
    """Why this model cannot take the integer path (empty list: it can)."""
    if not model.quantized:
        return ["not a full-integer model"]
    g = _Graph(model)
    problems = sorted({name for name in g.op_names if name not in SUPPORTED})
    types = {g.tensor(i).type for op in g.sg.operators for i in list(op.inputs) + list(op.outputs) if i >= 0}
    allowed = {g.schema.TensorType.INT8, g.schema.TensorType.INT32}
    if types - allowed:
        problems.append("tensor types other than int8/int32")
    return problems


def _emit_kernel(bb, fn, args, name: str, **attrs):
    """Emit `fn` (a TE integer kernel) as one opaque call_tir.

    Not `bb.emit_te`: that builds PrimFuncs with int64 index types, which turns every integer
    expression into 64-bit arithmetic, slow on 32-bit cores.
    """
    from tvm import relax, te

    holders = []
    for i, a in enumerate(args):
        shape = [int(v) for v in (a.ty.shape.values if hasattr(a.ty.shape, "values") else a.ty.shape)]
        holders.append(te.placeholder(shape, str(a.ty.dtype), f"in{i}"))
    out = fn(*holders, **attrs)
    func = te.create_prim_func(holders + [out]).with_attr("op_pattern", 8)  # kOpaque: one kernel per operator
    gv = bb.add_func(func, name)
    return bb.emit(relax.call_tir(gv, list(args), relax.TensorType([int(v) for v in out.shape], out.dtype)))


_LANES = (0, 2, 1, 3)  # SXTAB16 widens a word's bytes 0, 2 and 1, 3: int16 weights follow that order


def blocked_weights(w2d: np.ndarray, block: int, wide: bool) -> np.ndarray:
    """(OC, K) int8 -> [OC/block][K/4][block][4], zero-padded: gemm_dsp.c's layouts.

    int8 keeps k0 k1 k2 k3 (SXTB16 splits a word into k0 k2 | k1 k3 in the loop); int16 is stored split.
    """
    oc, k = w2d.shape
    oc_pad, k_pad = -(-oc // block) * block, -(-k // 4) * 4
    padded = np.zeros((oc_pad, k_pad), dtype=np.int16 if wide else np.int8)
    padded[:oc, :k] = w2d
    quads = padded.reshape(oc_pad // block, block, k_pad // 4, 4)
    if wide:
        quads = quads[..., _LANES]
    return np.ascontiguousarray(quads.transpose(0, 2, 1, 3))


def _requantize_exact(acc: int, mult: int, shift: int, single: bool) -> int | None:
    """TFLite's requantization of one accumulator in Python integers (None: int32 overflow in TFLite)."""
    if single:
        total = 31 - shift
        return (acc * mult + (1 << (total - 1))) >> total
    scaled = acc << max(shift, 0)
    if not -(2**31) <= scaled < 2**31:
        return None
    x, e = (scaled * mult + (1 << 30)) >> 31, max(-shift, 0)
    if e == 0:
        return x
    mask = (1 << e) - 1
    return (x >> e) + int((x & mask) > (mask >> 1) + int(x < 0))


def requant_table(w2d: np.ndarray, bias: np.ndarray, mult: np.ndarray, shift: np.ndarray, zp_in: int, zp_out: int,
                  act: tuple[int, int], single: bool) -> np.ndarray | None:
    """Per output channel {bias, multiplier, round, shift} for gemm_dsp.c's requantization, or None.

    The C code skips 64-bit arithmetic, saturation and the sign tests of TFLite's formulas; that is exact
    only while no intermediate can overflow, which is proved here from the weights: |accumulator| is at
    most |bias| + max|x - zp_in| * sum|w|. The output zero point is folded into the rounding constant.
    A channel the proof fails for is still taken when its output cannot depend on the input
    (requantization is monotonic, so equal outputs at both accumulator bounds): trained models carry such
    dead channels (a huge bias, a zero multiplier); it becomes a constant (multiplier 0).
    """
    x_max = max(abs(-128 - zp_in), abs(127 - zp_in))
    spread = x_max * np.abs(w2d.astype(np.int64)).sum(axis=1)
    rows = []
    for b, m, s, d in zip(bias.tolist(), mult.tolist(), shift.tolist(), spread.tolist()):
        a = abs(b) + d
        if single:  # smmul(acc + bias, m) then >> (31 - s - 32)
            e, scaled = -s - 1, a // 2 + 1
            ok = 1 <= e <= 30 and a < 2**31
        else:  # smmulr(2 * (acc + bias), m) then rounding >> -s
            e, scaled = -s, a + 1
            ok = 1 <= e <= 30 and 2 * a < 2**31
        rnd = (1 << (e - 1)) + (zp_out << e) if ok else 0
        if ok and m > 0 and scaled + abs(rnd) + 1 < 2**31:
            rows.append((b if single else 2 * b, m, rnd, e))
            continue
        ends = [_requantize_exact(b + sign * d, m, s, single) for sign in (-1, 1)]
        if a >= 2**31 or None in ends:
            return None
        lo, hi = (min(max(v + zp_out, act[0]), act[1]) for v in ends)
        if lo != hi:
            return None
        rows.append((0, 0, 2 * lo, 1))  # (0 + 2 * lo) >> 1
    return np.array(rows, dtype=np.int32)


def _conv_params(n, h, w, c, oh, ow, oc, kh, kw, sh, sw, dh, dw, pt, pl, zp_in, zp_out, lo, hi, single=0):
    return np.array([n, h, w, c, oh, ow, oc, kh, kw, sh, sw, dh, dw, pt, pl, zp_in, zp_out, lo, hi, single], dtype=np.int32)


def import_integer(model: TFLiteModel, kernels: str | dict[int, str] = "tir"):
    """Full-integer TFLite model -> Relax IRModule of integer kernels.

    kernels: "tir", "dsp" or "dsp16" for every layer, or {operator index: kind}; the DSP kinds apply to convolutions,
    depthwise convolutions (depth multiplier 1) and fully connected layers, others stay TIR.
    """
    from tvm import relax

    blockers = integer_import_blockers(model)
    if blockers:
        raise UnsupportedOperator(blockers, model.path.name)
    g = _Graph(model)
    bb = relax.BlockBuilder()
    params = [relax.Var(f"input{i}", relax.TensorType(model.inputs[i].shape, model.inputs[i].dtype))
              for i in range(len(model.inputs))]
    values: dict[int, object] = {int(t): p for t, p in zip(g.sg.inputs, params)}

    def requant_consts(in_idx: int, w_idx: int, out_idx: int):
        in_scale = float(g.scale(in_idx)[0])
        out_scale = float(g.scale(out_idx)[0])
        w_scales = g.scale(w_idx)
        pairs = [quantize_multiplier(in_scale * float(s) / out_scale) for s in w_scales]
        mult = np.array([m for m, _ in pairs], dtype=np.int32)
        shift = np.array([s for _, s in pairs], dtype=np.int32)
        return mult, shift

    def bias_of(idx: int, channels: int) -> np.ndarray:
        if idx < 0:
            return np.zeros(channels, dtype=np.int32)
        return g.const(idx, "int32").reshape(channels)

    def kind_of(index: int) -> str:
        kind = kernels.get(index, "tir") if isinstance(kernels, dict) else kernels
        if kind not in KERNEL_KINDS:
            raise ValueError(f"unknown kernel kind '{kind}'")
        return kind

    def extern(symbol, args, shape):
        return bb.emit(relax.call_dps_packed(symbol, list(args), relax.TensorType(list(shape), "int8")))

    with bb.function("main", params):
        with bb.dataflow():
            for index, (op, name) in enumerate(zip(g.sg.operators, g.op_names)):
                ins, out = [int(i) for i in op.inputs], int(op.outputs[0])
                opt = op.builtinOptions
                hint = f"t{out}_{name.lower()}"
                x = values[ins[0]]
                zp_out, out_scale = g.zero_point(out), float(g.scale(out)[0])
                if name in ("CONV_2D", "DEPTHWISE_CONV_2D"):
                    w = g.const(ins[1], "int8")
                    _, h, wd, _ = g.shape(ins[0])
                    kh, kw = (w.shape[1], w.shape[2])
                    channels = w.shape[0] if name == "CONV_2D" else w.shape[3]
                    pt, pb = padding(opt.padding, h, kh, opt.strideH, opt.dilationHFactor)
                    pl, pr = padding(opt.padding, wd, kw, opt.strideW, opt.dilationWFactor)
                    mult, shift = requant_consts(ins[0], ins[1], out)
                    if mult.size == 1:
                        mult, shift = np.repeat(mult, channels), np.repeat(shift, channels)
                    lo, hi = activation_range(opt.fusedActivationFunction, out_scale, zp_out)
                    common = {
                        "stride": (opt.strideH, opt.strideW), "dilation": (opt.dilationHFactor, opt.dilationWFactor),
                        "padding": (pt, pl, pb, pr), "zp_in": g.zero_point(ins[0]), "zp_out": zp_out,
                        "act_min": lo, "act_max": hi,
                    }
                    bias = bias_of(ins[2] if len(ins) > 2 else -1, channels)
                    args = [x, relax.const(w), relax.const(bias), relax.const(mult), relax.const(shift)]
                    kind = kind_of(index)
                    dsp = kind != "tir" and (name == "CONV_2D" or opt.depthMultiplier == 1)
                    if dsp:
                        n, _, _, c = g.shape(ins[0])
                        _, oh, ow, _ = g.shape(out)
                        cp = relax.const(_conv_params(
                            n, h, wd, c, oh, ow, channels, kh, kw, opt.strideH, opt.strideW, opt.dilationHFactor,
                            opt.dilationWFactor, pt, pl, common["zp_in"], zp_out, lo, hi))
                        dw3x3 = (name == "DEPTHWISE_CONV_2D" and kh == kw == 3 and c % 4 == 0
                                 and opt.dilationHFactor == opt.dilationWFactor == 1)
                        w2d = w.reshape(channels, -1) if name == "CONV_2D" else w.reshape(kh * kw, channels).T
                        table = None
                        if name == "CONV_2D" or dw3x3:
                            table = requant_table(w2d, bias, mult, shift, common["zp_in"], zp_out, (lo, hi), single=False)
                        wide = kind == "dsp16"
                        suffix = "_w16" if wide else "_w8"
                        if table is not None and name == "CONV_2D":
                            y = extern("tinymlaas_gemm" + suffix, [x, relax.const(blocked_weights(w2d, 2, wide)),
                                                                   relax.const(table), cp], g.shape(out))
                        elif table is not None:  # [C/4][9 taps][4 lanes]
                            taps = w.reshape(9, channels // 4, 4).transpose(1, 0, 2)
                            taps = taps[..., _LANES].astype(np.int16) if wide else taps
                            y = extern("tinymlaas_depthwise3x3" + suffix, [x, relax.const(np.ascontiguousarray(taps)),
                                                                           relax.const(table), cp], g.shape(out))
                        else:  # requantization that needs the general form (conv_s8.c)
                            pointwise = (name == "CONV_2D" and kh == kw == 1 and opt.strideH == opt.strideW == 1
                                         and pt == pl == 0)
                            symbol = ("tinymlaas_conv1x1_s8" if pointwise else "tinymlaas_conv_s8"
                                      if name == "CONV_2D" else "tinymlaas_depthwise3x3_s8" if dw3x3
                                      else "tinymlaas_depthwise_s8")
                            if dw3x3:  # [C/4][9 taps][4 lanes]: a channel block's tap words adjacent
                                args[1] = relax.const(np.ascontiguousarray(
                                    w.reshape(9, channels // 4, 4).transpose(1, 0, 2)).reshape(w.shape))
                            y = extern(symbol, args + [cp], g.shape(out))
                    elif name == "CONV_2D":
                        y = _emit_kernel(bb, k.conv2d_s8, args, hint, **common)
                    else:
                        y = _emit_kernel(bb, k.depthwise_conv2d_s8, args, hint, **common,
                                         depth_multiplier=opt.depthMultiplier)
                elif name == "FULLY_CONNECTED":
                    w = g.const(ins[1], "int8")
                    out_features, depth = w.shape
                    in_shape = g.shape(ins[0])
                    if len(in_shape) != 2 or in_shape[1] != depth:
                        x = bb.emit(relax.op.reshape(x, (int(np.prod(in_shape)) // depth, depth)))
                    mult, shift = requant_consts(ins[0], ins[1], out)
                    lo, hi = activation_range(opt.fusedActivationFunction, out_scale, zp_out)
                    bias_values = bias_of(ins[2] if len(ins) > 2 else -1, out_features)
                    bias = relax.const(bias_values)
                    kind = kind_of(index)
                    if kind != "tir" and g.zero_point(ins[1]) == 0:
                        batch = int(np.prod(g.shape(ins[0]))) // depth
                        cp = relax.const(_conv_params(batch, 1, 1, depth, 1, 1, out_features, 1, 1, 1, 1, 1, 1, 0, 0,
                                                      g.zero_point(ins[0]), zp_out, lo, hi, single=1))
                        reps = out_features if mult.size == 1 else 1
                        mult, shift = np.repeat(mult, reps), np.repeat(shift, reps)
                        table = requant_table(w, bias_values, mult, shift, g.zero_point(ins[0]), zp_out, (lo, hi),
                                              single=True)
                        if table is not None:  # one row: four channels per step; a batch: the 2x2 product
                            kernel, block = ("tinymlaas_gemv", 4) if batch == 1 else ("tinymlaas_gemm", 2)
                            wide = kind == "dsp16"
                            y = extern(kernel + ("_w16" if wide else "_w8"),
                                       [x, relax.const(blocked_weights(w, block, wide)), relax.const(table), cp],
                                       (batch, out_features))
                        else:
                            y = extern("tinymlaas_conv1x1_s8", [x, relax.const(w), bias, relax.const(mult),
                                                                relax.const(shift), cp], (batch, out_features))
                    else:
                        args = [x, relax.const(w), bias, relax.const(mult), relax.const(shift)]
                        y = _emit_kernel(bb, k.fully_connected_s8, args, hint, zp_in=g.zero_point(ins[0]),
                                         zp_weight=g.zero_point(ins[1]), zp_out=zp_out, act_min=lo, act_max=hi)
                    if tuple(int(s) for s in y.ty.shape) != g.shape(out):
                        y = bb.emit(relax.op.reshape(y, g.shape(out)))
                elif name in ("AVERAGE_POOL_2D", "MAX_POOL_2D"):
                    _, h, wd, _ = g.shape(ins[0])
                    pt, pb = padding(opt.padding, h, opt.filterHeight, opt.strideH, 1)
                    pl, pr = padding(opt.padding, wd, opt.filterWidth, opt.strideW, 1)
                    lo, hi = activation_range(opt.fusedActivationFunction, out_scale, zp_out)
                    fn = k.avg_pool2d_s8 if name == "AVERAGE_POOL_2D" else k.max_pool2d_s8
                    y = _emit_kernel(bb, fn, [x], hint, pool=(opt.filterHeight, opt.filterWidth),
                                     stride=(opt.strideH, opt.strideW), padding=(pt, pl, pb, pr), act_min=lo, act_max=hi)
                elif name == "ADD":
                    a_idx, b_idx = ins
                    if g.shape(a_idx) != g.shape(b_idx):
                        raise UnsupportedOperator(["ADD with broadcasting"], model.path.name)
                    sa, sb = float(g.scale(a_idx)[0]), float(g.scale(b_idx)[0])
                    left_shift = 20
                    twice_max = 2.0 * float(max(np.float32(sa), np.float32(sb)))
                    ma, sha = quantize_multiplier(sa / twice_max)
                    mb, shb = quantize_multiplier(sb / twice_max)
                    mo, sho = quantize_multiplier(twice_max / ((1 << left_shift) * out_scale))
                    lo, hi = activation_range(opt.fusedActivationFunction, out_scale, zp_out)
                    y = _emit_kernel(
                        bb, k.add_s8, [x, values[b_idx]], hint, left_shift=left_shift, zp_a=g.zero_point(a_idx),
                        zp_b=g.zero_point(b_idx), zp_out=zp_out, mult_a=ma, shift_a=sha, mult_b=mb, shift_b=shb,
                        mult_out=mo, shift_out=sho, act_min=lo, act_max=hi,
                    )
                elif name == "RESHAPE":
                    y = bb.emit(relax.op.reshape(x, g.shape(out)))
                elif name == "SOFTMAX":
                    shape = g.shape(out)
                    m, shift, diff_min = softmax_params(float(opt.beta), float(g.scale(ins[0])[0]))
                    consts = np.array([m, shift, diff_min, shape[-1], int(np.prod(shape))], dtype=np.int32)
                    y = bb.emit(relax.call_dps_packed(
                        "tinymlaas_softmax_s8", [x, relax.const(consts)], relax.TensorType(shape, "int8")
                    ))
                else:  # pragma: no cover - excluded by integer_import_blockers
                    raise UnsupportedOperator([name], model.path.name)
                values[out] = y
            outs = [values[int(i)] for i in g.sg.outputs]
            result = bb.emit_output(outs[0] if len(outs) == 1 else relax.Tuple(outs))
        bb.emit_func_output(result)
    # Kernels are opaque to fusion, one per TFLite operator: fusing two requantizing kernels nests
    # their fixed-point arithmetic into one expression, and separate kernels keep every TFLite
    # tensor observable for per-layer verification.
    return relax.transform.Normalize()(bb.get())
