"""Quantized operators: integer kernels with TFLite's exact arithmetic, bit-exact with the interpreter (int8, and
the int16x8 paths that share the int8 formulas: convolutions, fully connected, pools, ADD/SUB/MUL, MEAN, ...;
what only int16 needs is in int16.py).

TVM's frontend expands every quantized operator into dequantize -> float op -> quantize, which needs
an FPU and is not bit-exact. This stage recognises the quantized operators at the TFLite level and
emits one integer kernel per operator into the Relax graph (int8_te.py), with TFLite's
requantization parameters computed here exactly as TFLite computes them (in double, then
QuantizeMultiplier). Weights stay int8, biases and multipliers int32; no float is left.
Softmax is a C kernel (`firmware/kernels/reference/softmax_s8.c`, gemmlowp fixed point) called from the graph.
The arithmetic is in quantization.py, the DSP kernels' operand layouts in dsp_layouts.py.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

import tinymlaas.ops.int8_te as k
from tinymlaas.errors import UnsupportedOperator
from tinymlaas.ops.conv_params import ConvParams, DepthwiseRowsParams
from tinymlaas.ops.dsp_layouts import (
    blocked_weights,
    depthwise3x3_taps,
    depthwise_rows_weights,
    fits_int4,
    gemm4_weights,
    gemm_w4_weights,
    gemv4_weights,
    requant_table,
    requantize_exact,
    sums_fit_at_16x,
)
from tinymlaas.ops.emit import emit_kernel, extern
from tinymlaas.ops.geometry import padding, pixels_in_rows, reduce_axes, transpose_conv_geometry, window_padding
from tinymlaas.ops.interpreter_tables import interpreter_table
from tinymlaas.ops.quantization import (
    activation_range,
    log_softmax_params,
    quantize_from_float,
    quantize_multiplier,
    quantize_multiplier_smaller_than_one,
    reduce_multiplier,
    same_quantization,
    softmax_params,
)
from tinymlaas.ops.registry import register

# Convolutions and fully connected layers offer, per layer: integer TIR ("tir"); DSP micro-kernels
# (firmware/kernels/optimized/gemm_dsp.c) with the int8 weights ("dsp"); or with the weights pre-widened to int16 in
# flash ("dsp16": faster, twice the weight flash; for 3x3 depthwise layers on DSP cores, the kernel over a window of
# widened input rows, whose weights are int16 too).


def accumulator(x_t, weights_by_output: np.ndarray, zp_weight: int = 0) -> str:
    """int32 unless the products of an int16 input could overflow it (then int64, as TFLite accumulates)."""
    if x_t.dtype != "int16":
        return "int32"
    bound = 32768 * int(np.abs(weights_by_output.astype(np.int64) - zp_weight).sum(axis=1).max(initial=0))
    return "int32" if bound < 2**31 else "int64"


# --- converters -------------------------------------------------------------------------------------------------

def _dsp_applies(graph, op, target, impl) -> bool:
    """The DSP micro-kernels take convolutions, depthwise convolutions of depth multiplier 1 and fully connected
    layers with symmetric weights."""
    if impl == "tir":
        return True
    if op.opcode == "DEPTHWISE_CONV_2D":
        return int(op.opt("depthMultiplier", 1) or 1) == 1
    if op.opcode == "FULLY_CONNECTED":
        return graph.tensor(op.inputs[1]).zero_point == 0 and graph.tensor(op.inputs[1]).is_const
    return graph.tensor(op.inputs[1]).is_const and not grouped(graph, op)


def grouped(graph, op) -> bool:
    """A grouped convolution: its filter holds a fraction of the input's channels (the TIR kernel only)."""
    return op.opcode == "CONV_2D" and graph.tensor(op.inputs[1]).shape[3] != graph.tensor(op.inputs[0]).shape[3]


def _requant_consts(ctx, in_idx: int, w_idx: int, out_idx: int, channels: int):
    in_scale, out_scale = ctx.tensor(in_idx).scale, ctx.tensor(out_idx).scale
    w_scales = ctx.tensor(w_idx).quant.scale
    pairs = [quantize_multiplier(in_scale * float(s) / out_scale) for s in w_scales]
    mult = np.array([m for m, _ in pairs], dtype=np.int32)
    shift = np.array([s for _, s in pairs], dtype=np.int32)
    if mult.size == 1 and channels > 1:
        mult, shift = np.repeat(mult, channels), np.repeat(shift, channels)
    return mult, shift


def _bias_of(ctx, op, k: int, channels: int) -> np.ndarray:
    """int32 for int8 kernels; int64 for int16x8 (TFLite's int16 kernels add either bias type to an int64 sum)."""
    dtype = np.int64 if ctx.tensor(op.outputs[0]).dtype == "int16" else np.int32
    if len(op.inputs) <= k or op.inputs[k] < 0:
        return np.zeros(channels, dtype=dtype)
    return np.asarray(ctx.tensor(op.inputs[k]).data, dtype=dtype).reshape(channels)


def _rescale(ctx, op, mult, shift):
    """The multipliers as the kernel of this precision takes them (int16x8: 15-bit, total shift)."""
    if ctx.tensor(op.outputs[0]).dtype == "int16":
        return reduce_multiplier(mult, shift)
    return mult, shift


def _const_weights(ctx, op, k=1) -> np.ndarray:
    t = ctx.tensor(op.inputs[k])
    if not t.is_const:
        raise UnsupportedOperator([f"{op.opcode} #{op.index} with computed weights (int8)"], ctx.graph.name)
    return np.asarray(t.data)


def _act(ctx, op):
    out = ctx.tensor(op.outputs[0])
    return activation_range(int(op.opt("fusedActivationFunction", 0) or 0), out.scale, out.zero_point, out.dtype)


def lane_order(w: np.ndarray) -> np.ndarray:
    """Weights widened to int16, each group of four along the last axis in SMLAD's lane order (0 2 1 3): what the
    tensorized inner product of a layer schedule with wide_weights reads (ir/arm_intrinsics.py)."""
    groups = w.astype(np.int16).reshape(*w.shape[:-1], -1, 4)
    return np.ascontiguousarray(groups[..., [0, 2, 1, 3]].reshape(w.shape))


def _proven_rescale(by_channel, bias, folded_bias, mult, shift, zp_in, zp_out, act, single: bool) -> list | None:
    """The operands of int8_te.requantize_proven (bias, multiplier, [round, shift]) where requant_table proves the
    cheap requantization exact for these weights; None where it does not (the layer keeps TFLite's form)."""
    table = requant_table(by_channel, bias, mult, shift, zp_in, zp_out, act, single=single)
    if table is None:
        return None
    live = table[:, 1] != 0  # dead channels (a constant output) keep their zero bias
    scaled = folded_bias.astype(np.int64) * (1 if single else 2)
    wrapped = ((scaled + 2**31) % 2**32 - 2**31).astype(np.int32)  # the total is proved to fit; parts may wrap
    return [np.where(live, wrapped, table[:, 0]).astype(np.int32), np.ascontiguousarray(table[:, 1]),
            np.ascontiguousarray(table[:, 2:4])]


# --- the C kernel of a convolution on the DSP path ---------------------------------------------------------------

@dataclass(frozen=True)
class ConvLayer:
    """A convolution or depthwise convolution (depth multiplier 1) as the choice of its C kernel sees it."""
    depthwise: bool
    c: int  # input channels
    kh: int
    kw: int
    sh: int
    sw: int
    dh: int
    dw: int
    pt: int
    pl: int
    oh: int
    ow: int
    wide: bool  # "dsp16": the weights widened to int16 in flash
    dsp: bool  # the core has the DSP extension
    batch: int = 1
    int4: bool = False  # weights of 4-bit values (--weights int4) whose 16x sums fit 32 bits: gemm_w4 reads them

    @property
    def gemm_w4(self) -> bool:
        """The 2x2 product reading 4-bit weights in its loop, for a convolution of 4-bit values: no unpacked copy in
        RAM (dsp16 too: widened to int16 they would take four times their flash)."""
        return self.int4 and not self.depthwise and not self.wide

    @property
    def pointwise(self) -> bool:
        return not self.depthwise and self.kh == self.kw == 1 and self.sh == self.sw == 1 and self.pt == self.pl == 0

    @property
    def gemm4(self) -> bool:
        """Four output pixels per pass (DSP cores, int16 weights). A last group of one or two pixels repeats them
        (the 2x2 loop, at about 1.09x the cost per pixel, wastes at most one): four pixels per pass wins on layers
        of 3 or 0 mod 4 pixels, and from 24 on (VWW's 3x3 = 9-pixel layers: 1.10x the 2x2 loop's cycles)."""
        pixels = self.batch * self.oh * self.ow
        return not self.depthwise and self.wide and self.dsp and (pixels % 4 in (0, 3) or pixels >= 24)

    @property
    def dw3x3(self) -> bool:
        """Depthwise 3x3 in blocks of four channels."""
        return self.depthwise and self.kh == self.kw == 3 and self.c % 4 == 0 and self.dh == self.dw == 1

    @property
    def rows3x3(self) -> bool:
        """Depthwise 3x3 over a window of widened input rows: its pairs of taps are SMLAD operands (DSP cores, int16
        weights only)."""
        return (self.depthwise and self.kh == self.kw == 3 and self.dh == self.dw == 1 and self.sh in (1, 2)
                and self.sw in (1, 2) and self.wide and self.dsp)


@dataclass(frozen=True)
class ConvConstants:
    weights: np.ndarray  # as in the model: OHWI, or 1HWC for depthwise
    bias: np.ndarray
    rescale: tuple  # multipliers and shifts, as conv_s8.c takes them
    table: np.ndarray | None  # requant_table's, where it proved the layer
    params: ConvParams


def _gemm_matrix(layer: ConvLayer, consts: ConvConstants) -> np.ndarray:
    oc = consts.weights.shape[0]
    w2d = consts.weights.reshape(oc, -1)
    if layer.dsp and layer.c < 4 and layer.dw == 1 and layer.kw * layer.c % 4:
        # gemm_dsp.c's split_rows: each tap row's whole words first, then the rows' leftover bytes together
        rows = consts.weights.reshape(oc, layer.kh, layer.kw * layer.c)
        whole = layer.kw * layer.c // 4 * 4
        return np.concatenate([rows[:, :, :whole].reshape(oc, -1), rows[:, :, whole:].reshape(oc, -1)], axis=1)
    if layer.c % 4 == 3 and layer.c > 3 and layer.dsp:  # gemm_dsp.c's tap_depth: each tap padded to whole words
        w2d = np.pad(consts.weights.reshape(oc, layer.kh * layer.kw, layer.c), ((0, 0), (0, 0), (0, 1))).reshape(oc, -1)
    return w2d


def _gemm_operands(layer: ConvLayer, consts: ConvConstants) -> list:
    return [blocked_weights(_gemm_matrix(layer, consts), 2, layer.wide), consts.table, consts.params.to_array()]


def _gemm_w4_operands(layer: ConvLayer, consts: ConvConstants) -> list:
    return [gemm_w4_weights(_gemm_matrix(layer, consts)), consts.table, consts.params.to_array()]


def _gemm4_operands(layer: ConvLayer, consts: ConvConstants) -> list:
    table = consts.table  # an odd count's partner channel reads a row of its own (zeros), never past the table
    table = np.concatenate([table, np.zeros((1, table.shape[1]), table.dtype)]) if len(table) % 2 else table
    return [gemm4_weights(_gemm_matrix(layer, consts)), table, consts.params.to_array()]


def _rows_operands(layer: ConvLayer, consts: ConvConstants) -> list:
    transposed = layer.ow < layer.oh  # rows along the longer output side: each row costs a fixed overhead
    return [depthwise_rows_weights(consts.weights, transposed), consts.table,
            DepthwiseRowsParams(consts.params, int(transposed)).to_array()]


def _depthwise3x3_operands(layer: ConvLayer, consts: ConvConstants) -> list:
    return [depthwise3x3_taps(consts.weights, layer.wide), consts.table, consts.params.to_array()]


def _general_operands(layer: ConvLayer, consts: ConvConstants) -> list:
    return [consts.weights, consts.bias, *consts.rescale, consts.params.to_array()]


def _general_depthwise3x3_operands(layer: ConvLayer, consts: ConvConstants) -> list:
    taps = depthwise3x3_taps(consts.weights, wide=False).reshape(consts.weights.shape)
    return [taps, consts.bias, *consts.rescale, consts.params.to_array()]


class ConvKernel(NamedTuple):
    symbol: str
    widths: bool  # "_w8" and "_w16" variants: int8 weights (dsp) or int16 (dsp16)
    proven: bool  # gemm_dsp.c's cheap requantization, taken only where requant_table proves it exact for the layer
    applies: Callable[[ConvLayer], bool]
    operands: Callable[[ConvLayer, ConvConstants], list]  # the constants after the input


# The first row that applies to the layer wins; a layer whose requantization requant_table cannot prove falls
# through to conv_s8.c's kernels, which requantize in TFLite's general form.
CONV_KERNELS = (
    #          symbol                         _w8/16 proven layers                             operands
    ConvKernel("tinymlaas_gemm4_w16",         False, True,  lambda layer: layer.gemm4,         _gemm4_operands),
    ConvKernel("tinymlaas_gemm_w4",           False, True,  lambda layer: layer.gemm_w4,       _gemm_w4_operands),
    ConvKernel("tinymlaas_gemm",              True,  True,  lambda layer: not layer.depthwise, _gemm_operands),
    ConvKernel("tinymlaas_depthwise3x3_rows", False, True,  lambda layer: layer.rows3x3,       _rows_operands),
    ConvKernel("tinymlaas_depthwise3x3",      True,  True,  lambda layer: layer.dw3x3,         _depthwise3x3_operands),
    ConvKernel("tinymlaas_conv1x1_s8",        False, False, lambda layer: layer.pointwise,     _general_operands),
    ConvKernel("tinymlaas_conv_s8",           False, False, lambda layer: not layer.depthwise, _general_operands),
    ConvKernel("tinymlaas_depthwise3x3_s8",   False, False, lambda layer: layer.dw3x3,         _general_depthwise3x3_operands),
    ConvKernel("tinymlaas_depthwise_s8",      False, False, lambda layer: layer.depthwise,     _general_operands),
)


@register(("CONV_2D", "DEPTHWISE_CONV_2D"), "int16", implementations=("tir",))
@register(("CONV_2D", "DEPTHWISE_CONV_2D"), "int8", implementations=("tir", "dsp", "dsp16"), applies=_dsp_applies)
def conv2d(ctx, op, impl):
    from tvm import relax

    name = op.opcode
    w = _const_weights(ctx, op)
    x_t, out_t = ctx.tensor(op.inputs[0]), ctx.tensor(op.outputs[0])
    n, h, wd, c = x_t.shape
    kh, kw = w.shape[1], w.shape[2]
    channels = w.shape[0] if name == "CONV_2D" else w.shape[3]
    sh, sw = op.opt("strideH", 1), op.opt("strideW", 1)
    dh, dw = op.opt("dilationHFactor", 1) or 1, op.opt("dilationWFactor", 1) or 1
    pt, pb, pl, pr = window_padding(op, h, wd, kh, kw)
    if name == "CONV_2D" and (c % w.shape[3] or w.shape[0] % (c // w.shape[3])):
        raise UnsupportedOperator([(f"CONV_2D #{op.index}: {c} input channels in groups of {w.shape[3]} for "
                                   f"{w.shape[0]} filters")], ctx.graph.name)
    mult, shift = _requant_consts(ctx, op.inputs[0], op.inputs[1], op.outputs[0], channels)
    zp_in, zp_out = x_t.zero_point, out_t.zero_point
    lo, hi = _act(ctx, op)
    common = {"stride": (sh, sw), "dilation": (dh, dw), "padding": (pt, pl, pb, pr), "zp_in": zp_in, "zp_out": zp_out,
              "act_min": lo, "act_max": hi}
    bias = _bias_of(ctx, op, 2, channels)
    x = ctx.input(op, 0)
    shape = out_t.shape
    if impl in ("dsp", "dsp16"):
        _, oh, ow, _ = shape
        int4 = name == "CONV_2D" and fits_int4(w) and sums_fit_at_16x(w.reshape(channels, -1), zp_in)
        # 4-bit weights stay 4-bit under dsp16 too: widened to int16 they would take four times their flash
        layer = ConvLayer(name == "DEPTHWISE_CONV_2D", c, kh, kw, sh, sw, dh, dw, pt, pl, oh, ow,
                          wide=impl == "dsp16" and not int4, dsp=ctx.target.dsp, batch=n, int4=int4)
        table = None  # the proof reads all the weights: only where a proven kernel could take the layer
        if any(kernel.proven and kernel.applies(layer) for kernel in CONV_KERNELS):
            w2d = w.reshape(kh * kw, channels).T if layer.depthwise else w.reshape(channels, -1)
            table = requant_table(w2d, bias, mult, shift, zp_in, zp_out, (lo, hi), single=False)
            if table is None and layer.gemm_w4:  # 4-bit scales: multipliers of 1/2 or more, which gemm_w4 takes
                table = requant_table(w2d, bias, mult, shift, zp_in, zp_out, (lo, hi), single=False, left=True)
        kernel = next(kernel for kernel in CONV_KERNELS
                      if kernel.applies(layer) and (table is not None or not kernel.proven))
        params = ConvParams(n, h, wd, c, oh, ow, channels, kh, kw, sh, sw, dh, dw, pt, pl, zp_in, zp_out, lo, hi)
        constants = ConvConstants(w, bias, tuple(_rescale(ctx, op, mult, shift)), table, params)
        symbol = kernel.symbol + (("_w16" if layer.wide else "_w8") if kernel.widths else "")
        if kernel.symbol == "tinymlaas_gemm_w4" and (table[:, 3] < 0).any():
            symbol += "l"  # rows of a left shift: the variant that requantizes them (a model links what it calls)
        y = extern(ctx, symbol, [x, *map(relax.const, kernel.operands(layer, constants))], shape)
    else:
        schedule = ctx.layer_schedule(op)
        fold = schedule is not None and schedule.fold_zero_point
        by_channel = w.reshape(channels, -1) if name == "CONV_2D" else w.reshape(-1, channels).T
        folded = (bias - zp_in * by_channel.astype(np.int64).sum(axis=1)).astype(bias.dtype) if fold else bias
        proven = None  # the cheap requantization, where the schedule asks and the weights prove it exact
        if schedule is not None and schedule.proven_requant and x_t.dtype == "int8":
            proven = _proven_rescale(by_channel, bias, folded, mult, shift, zp_in, zp_out, (lo, hi), single=False)
        rescale = proven or [folded, *_rescale(ctx, op, mult, shift)]
        lanes = schedule is not None and schedule.wide_weights
        args = [x, relax.const(lane_order(w) if lanes else w), *map(relax.const, rescale)]
        tuned = {"schedule": schedule, "fold_zero_point": fold, "acc_dtype": accumulator(x_t, by_channel),
                 "proven": proven is not None, **({"lanes": True} if lanes else {}),
                 **({"split_rounding": True} if proven is not None and ctx.target.arch != "arm" else {})}
        if name == "CONV_2D" and pixels_in_rows(op, h, wd, kh, kw):  # rows flattened: tiles span them (the
            # reshapes are views: ir/reshape_views.py)
            args[0] = ctx.emit(relax.op.reshape(x, (n, 1, h * wd, c)))
            y = emit_kernel(ctx, k.conv2d_s8, args, **common, **tuned)
            y = ctx.emit(relax.op.reshape(y, shape))
        elif name == "CONV_2D":
            y = emit_kernel(ctx, k.conv2d_s8, args, **common, **tuned)
        else:
            y = emit_kernel(ctx, k.depthwise_conv2d_s8, args, **common,
                            depth_multiplier=int(op.opt("depthMultiplier", 1) or 1), **tuned)
    ctx.set_output(op, 0, y)


@register("FULLY_CONNECTED", "int16", implementations=("tir",))
@register("FULLY_CONNECTED", "int8", implementations=("tir", "dsp", "dsp16"), applies=_dsp_applies)
def fully_connected(ctx, op, impl):
    from tvm import relax

    w = _const_weights(ctx, op)
    out_features, depth = w.shape
    x_t, w_t, out_t = ctx.tensor(op.inputs[0]), ctx.tensor(op.inputs[1]), ctx.tensor(op.outputs[0])
    x = ctx.input(op, 0)
    batch = x_t.size // depth
    if x_t.shape != (batch, depth):
        x = ctx.emit(relax.op.reshape(x, (batch, depth)))
    mult, shift = _requant_consts(ctx, op.inputs[0], op.inputs[1], op.outputs[0], 1)
    lo, hi = _act(ctx, op)
    bias_values = _bias_of(ctx, op, 2, out_features)
    bias = relax.const(bias_values)
    zp_in, zp_out = x_t.zero_point, out_t.zero_point
    if impl in ("dsp", "dsp16"):
        cp = relax.const(ConvParams(batch, 1, 1, depth, 1, 1, out_features, 1, 1, 1, 1, 1, 1, 0, 0, zp_in, zp_out,
                                    lo, hi, single=1).to_array())
        reps = out_features if mult.size == 1 else 1
        mult, shift = np.repeat(mult, reps), np.repeat(shift, reps)
        # 4-bit weights (an int4 layer) stay 4-bit, dsp16 or not: read in the loop (a row: gemv_w4; a batch:
        # gemm_w4), no unpacked copy in RAM; both also take multipliers of 1/2 or more
        int4 = fits_int4(w) and (batch == 1 or sums_fit_at_16x(w, zp_in))
        wide = impl == "dsp16" and not int4
        table = requant_table(w, bias_values, mult, shift, zp_in, zp_out, (lo, hi), single=True)
        if table is None and int4:
            table = requant_table(w, bias_values, mult, shift, zp_in, zp_out, (lo, hi), single=True, left=True)
        if table is not None:  # one row: four channels per step; a batch: the 2x2 product
            kernel, block = ("tinymlaas_gemv", 4) if batch == 1 else ("tinymlaas_gemm", 2)
            per_tensor = batch == 1 and (table[:, 1:] == table[0, 1:]).all()
            if per_tensor:  # the biases, then one {mult, round, shift}: 4 B a channel instead of 16
                table = np.concatenate([table[:, 0], table[0, 1:]]).astype(np.int32)
            if int4 and batch == 1:
                width, layout = "_w4", gemv4_weights(w)
            elif int4:  # gemm_w4l: rows of a left shift
                width, layout = "_w4l" if (table[:, 3] < 0).any() else "_w4", gemm_w4_weights(w)
            else:
                width, layout = "_w16" if wide else "_w8", blocked_weights(w, block, wide)
            y = extern(ctx, kernel + width + ("_pt" if per_tensor else ""),
                       [x, relax.const(layout), relax.const(table), cp], (batch, out_features))
        else:
            y = extern(ctx, "tinymlaas_conv1x1_s8", [x, relax.const(w), bias, relax.const(mult), relax.const(shift), cp],
                       (batch, out_features))
    else:
        schedule = ctx.layer_schedule(op)
        fold = schedule is not None and schedule.fold_zero_point
        folded = bias_values
        if fold:  # the input zero point's share of every product, summed at build time (ir/layer_schedule.py)
            sums = (w.astype(np.int64) - w_t.zero_point).sum(axis=1)
            folded = (bias_values - zp_in * sums).astype(bias_values.dtype)
        proven = None  # the cheap requantization, where the schedule asks and the weights prove it exact
        if schedule is not None and schedule.proven_requant and x_t.dtype == "int8" and w_t.zero_point == 0:
            reps = out_features if mult.size == 1 else 1
            proven = _proven_rescale(w, bias_values, folded, np.repeat(mult, reps), np.repeat(shift, reps), zp_in,
                                     zp_out, (lo, hi), single=True)
        rescale = proven or [folded, mult, shift]
        lanes = schedule is not None and schedule.wide_weights
        args = [x, relax.const(lane_order(w) if lanes else w), *map(relax.const, rescale)]
        y = emit_kernel(ctx, k.fully_connected_s8, args, zp_in=zp_in, zp_weight=w_t.zero_point, zp_out=zp_out,
                        act_min=lo, act_max=hi, acc_dtype=accumulator(x_t, w, w_t.zero_point), schedule=schedule,
                        fold_zero_point=fold, proven=proven is not None, **({"lanes": True} if lanes else {}))
    ctx.set_output(op, 0, y)


@register(("AVERAGE_POOL_2D", "MAX_POOL_2D"), ("int8", "int16"), implementations=("tir",))
def pool(ctx, op, impl):
    _, h, wd, _ = ctx.tensor(op.inputs[0]).shape
    kh, kw = op.opt("filterHeight", 1), op.opt("filterWidth", 1)
    sh, sw = op.opt("strideH", 1), op.opt("strideW", 1)
    pt, pb = padding(op.opt("padding", 0), h, kh, sh, 1)
    pl, pr = padding(op.opt("padding", 0), wd, kw, sw, 1)
    lo, hi = _act(ctx, op)
    fn = k.avg_pool2d_s8 if op.opcode == "AVERAGE_POOL_2D" else k.max_pool2d_s8
    y = emit_kernel(ctx, fn, [ctx.input(op, 0)], pool=(kh, kw), stride=(sh, sw), padding=(pt, pl, pb, pr),
                    act_min=lo, act_max=hi)
    ctx.set_output(op, 0, y)


# The table form of an int8 ADD spends 2 KB of flash on two int32[256] tables to save ~10 instructions an element: on
# a residual add of thousands of elements, not on an LSTM gate's few dozen (an unrolled sequence has hundreds of those)
ADD_TABLES_MIN_ELEMENTS = 512


@register(("ADD", "SUB"), ("int8", "int16"), implementations=("tir",))
def add(ctx, op, impl):
    """TFLite int8 ADD/SUB: both inputs rescaled to twice the larger scale with 20 bits of headroom (int16: 15)."""
    a_t, b_t, out_t = ctx.tensor(op.inputs[0]), ctx.tensor(op.inputs[1]), ctx.tensor(op.outputs[0])
    left_shift = 15 if out_t.dtype == "int16" else 20
    twice_max = 2.0 * float(max(np.float32(a_t.scale), np.float32(b_t.scale)))
    ma, sha = quantize_multiplier(a_t.scale / twice_max)
    mb, shb = quantize_multiplier(b_t.scale / twice_max)
    mo, sho = quantize_multiplier(twice_max / ((1 << left_shift) * out_t.scale))
    lo, hi = _act(ctx, op)
    tables = (_add_tables(ctx, op, left_shift, (ma, sha), (mb, shb), (mo, sho))
              if int(np.prod(out_t.shape)) >= ADD_TABLES_MIN_ELEMENTS else None)
    if tables is not None:
        from tvm import relax

        table_a, table_b, exponent, round_zp = tables
        y = emit_kernel(ctx, k.add_s8_tables, [ctx.input(op, 0), ctx.input(op, 1), relax.const(table_a),
                                               relax.const(table_b), relax.const(np.array([mo], dtype=np.int32))],
                        elementwise=True, out_shape=out_t.shape, exponent=exponent, round_zp=round_zp, act_min=lo,
                        act_max=hi)
        ctx.set_output(op, 0, y)
        return
    quantization = {"zp_a": a_t.zero_point, "zp_b": b_t.zero_point, "zp_out": out_t.zero_point, "mult_a": ma,
                    "mult_b": mb, "mult_out": mo}
    params = repeated_params(ctx, op, k.ADD_PARAMETERS, quantization)
    y = emit_kernel(ctx, k.add_s8, [ctx.input(op, 0), ctx.input(op, 1), *params],
                    elementwise=True, out_shape=out_t.shape, subtract=op.opcode == "SUB", left_shift=left_shift,
                    **quantization, shift_a=sha, shift_b=shb, shift_out=sho, act_min=lo, act_max=hi)
    ctx.set_output(op, 0, y)


def repeated_params(ctx, op, names: tuple[str, ...], quantization: dict) -> list:
    """An operator repeated at least SHARE_MIN_KERNELS times with the same shapes (the steps of an unrolled
    sequence) takes its zero points and multipliers (`names`, in order) from a constant: its kernels are then
    equal wherever the shifts agree, one body for all of them (TVM's builder keeps one of equal functions; shifts
    that differ, constants too, are left to ir/kernel_sharing.py). Immediates elsewhere: the compiler folds them
    into faster code."""
    from tvm import relax

    from tinymlaas.ir.kernel_sharing import SHARE_MIN_KERNELS

    if ctx.repeats(op) < SHARE_MIN_KERNELS:
        return []
    return [relax.const(np.array([quantization[n] for n in names], dtype=np.int32))]


def _add_tables(ctx, op, left_shift: int, rescale_a, rescale_b, rescale_out):
    """int8 ADD/SUB: each input's rescaled value for all 256 inputs (TFLite's arithmetic, exact), doubled, the second
    one negated for SUB, and the output's rounding exponent and constant; None where add_s8_tables's shortcut is not
    proved exact (int16, an output multiplier above one, a sum that could overflow when doubled)."""
    a_t, b_t, out_t = ctx.tensor(op.inputs[0]), ctx.tensor(op.inputs[1]), ctx.tensor(op.outputs[0])
    if out_t.dtype != "int8" or a_t.dtype != "int8" or b_t.dtype != "int8" or rescale_out[1] > -1:
        return None
    tables = []
    for t, (mult, shift) in ((a_t, rescale_a), (b_t, rescale_b)):
        values = [requantize_exact((x - t.zero_point) << left_shift, mult, shift, single=False)
                  for x in range(-128, 128)]
        if any(v is None for v in values):
            return None
        tables.append(np.array(values, dtype=np.int64))
    if op.opcode == "SUB":
        tables[1] = -tables[1]
    if 2 * (np.abs(tables[0]).max() + np.abs(tables[1]).max()) >= 2**31:
        return None
    exponent = -rescale_out[1]
    round_zp = (1 << (exponent - 1)) + (out_t.zero_point << exponent)
    if abs(round_zp) + np.abs(tables[0]).max() + np.abs(tables[1]).max() >= 2**31:
        return None
    return (2 * tables[0]).astype(np.int32), (2 * tables[1]).astype(np.int32), exponent, round_zp


@register("MUL", ("int8", "int16"), implementations=("tir",))
def mul(ctx, op, impl):
    """TFLite int8/int16 MUL: (a - zp_a) * (b - zp_b) rescaled by scale_a * scale_b / scale_out (double rounding)."""
    a_t, b_t, out_t = ctx.tensor(op.inputs[0]), ctx.tensor(op.inputs[1]), ctx.tensor(op.outputs[0])
    # in float32, as the interpreter computes it (its scales are floats; only the quotient is widened to double)
    m, s = quantize_multiplier(float(np.float32(a_t.scale) * np.float32(b_t.scale) / np.float32(out_t.scale)))
    lo, hi = _act(ctx, op)
    quantization = {"zp_a": a_t.zero_point, "zp_b": b_t.zero_point, "zp_out": out_t.zero_point, "mult": m}
    params = repeated_params(ctx, op, k.MUL_PARAMETERS, quantization)
    y = emit_kernel(ctx, k.mul_s8, [ctx.input(op, 0), ctx.input(op, 1), *params],
                    elementwise=True, out_shape=out_t.shape, **quantization, shift=s, act_min=lo, act_max=hi,
                    out_dtype=out_t.dtype)
    ctx.set_output(op, 0, y)


@register(("MAXIMUM", "MINIMUM"), ("int8", "int16"), implementations=("tir",))
def maximum(ctx, op, impl):
    from tvm import relax

    same_quantization(ctx, op, (0, 1))
    fn = relax.op.maximum if op.opcode == "MAXIMUM" else relax.op.minimum
    ctx.set_output(op, 0, fn(ctx.input(op, 0), ctx.input(op, 1)))


@register("SOFTMAX", "int8", implementations=("c",))
def softmax(ctx, op, impl):
    from tvm import relax

    out_t = ctx.tensor(op.outputs[0])
    shape = out_t.shape
    m, shift, diff_min = softmax_params(float(op.opt("beta", 1.0)), ctx.tensor(op.inputs[0]).scale)
    consts = np.array([m, shift, diff_min, shape[-1], int(np.prod(shape))], dtype=np.int32)
    ctx.set_output(op, 0, extern(ctx, "tinymlaas_softmax_s8", [ctx.input(op, 0), relax.const(consts)], shape))


@register("LOG_SOFTMAX", "int8", implementations=("c",))
def log_softmax(ctx, op, impl):
    """C kernel (firmware/kernels/reference/log_softmax_s8.c); the interpreter requires output scale 16/256, zero
    point 127."""
    from tvm import relax

    shape = ctx.tensor(op.outputs[0]).shape
    consts = np.array([*log_softmax_params(ctx.tensor(op.inputs[0]).scale), shape[-1], int(np.prod(shape))],
                      dtype=np.int32)
    ctx.set_output(op, 0, extern(ctx, "tinymlaas_log_softmax_s8", [ctx.input(op, 0), relax.const(consts)], shape))


@register("REDUCE_PROD", ("int8", "int16"), implementations=("c",))
def reduce_prod(ctx, op, impl):
    """C kernel (firmware/kernels/reference/reduce_prod_q.c) over rows of the reduced elements: the reduced axes are
    moved last. TFLite rescales the product at every step by input_scale / output_scale^(1/n), in double."""
    from tvm import relax

    x_t, out_t = ctx.tensor(op.inputs[0]), ctx.tensor(op.outputs[0])
    axes = reduce_axes(ctx, op)
    kept = [a for a in range(len(x_t.shape)) if a not in axes]
    n = int(np.prod([x_t.shape[a] for a in axes], dtype=np.int64))
    rows = int(np.prod([x_t.shape[a] for a in kept], dtype=np.int64))
    x = ctx.input(op, 0)
    if kept + axes != list(range(len(x_t.shape))):
        x = ctx.emit(relax.op.permute_dims(x, kept + axes))
    x = ctx.emit(relax.op.reshape(x, (rows, n)))
    m, shift = quantize_multiplier(float(x_t.scale) / math.pow(float(out_t.scale), 1.0 / n))
    reduced, total = reduce_multiplier(np.array([m]), np.array([shift]))
    consts = np.array([rows, n, x_t.zero_point, out_t.zero_point, int(reduced[0]), int(total[0])], dtype=np.int32)
    symbol = "tinymlaas_reduce_prod_s16" if x_t.dtype == "int16" else "tinymlaas_reduce_prod_s8"
    y = extern(ctx, symbol, [x, relax.const(consts)], (rows,), x_t.dtype)
    ctx.set_output(op, 0, relax.op.reshape(y, out_t.shape))


# Elementwise operators of one int8 input: the output depends on the input value only, so the interpreter's own
# reference kernel is tabulated at compile time over all 256 inputs (same quantization, same options) and the
# device does a table lookup. Bit-exact by construction, integer-only on the device, and one load per element.
LUT_OPS = ("LOGISTIC", "TANH", "HARD_SWISH", "ELU", "EXP", "LOG", "SQRT", "RSQRT", "ABS", "NEG", "LEAKY_RELU", "RELU",
           "RELU6", "RELU_N1_TO_1", "RELU_0_TO_1", "GELU", "SQUARE", "SIN", "COS", "QUANTIZE", "DEQUANTIZE", "FLOOR",
           "CEIL", "ROUND", "SIGN")


@register(LUT_OPS, "int8", implementations=("lut",))
def table_lookup(ctx, op, impl):
    from tvm import relax

    src = ctx.tensor(op.inputs[0])
    if op.opcode == "QUANTIZE" and src.dtype == "float32":  # arithmetic, not a table
        return quantize_from_float(ctx, op)
    if src.dtype == "uint8" and op.opcode == "QUANTIZE":  # a model taking uint8 (its first operator): 256 entries too
        table = interpreter_table(ctx, op, np.arange(256, dtype=np.uint8))
        ctx.set_output(op, 0, emit_kernel(ctx, k.lookup_u8, [ctx.input(op, 0), relax.const(table)], elementwise=True))
        return
    if src.dtype != "int8":
        raise UnsupportedOperator([f"{op.opcode} #{op.index} on {src.dtype} input"], ctx.graph.name)
    table = interpreter_table(ctx, op)  # int8 -> int8, or -> uint8 (a model giving uint8: its last operator)
    y = emit_kernel(ctx, k.lookup_s8, [ctx.input(op, 0), relax.const(table)], elementwise=True)
    ctx.set_output(op, 0, y)


@register("DEQUANTIZE", "int16", implementations=("relax",))
def dequantize_int16(ctx, op, impl):
    """int16 -> float32 at a model's edge: (x - zp) * scale in float32 (the product of a float32 and an int16 is
    exact in double, so rounding it once to float32 is what TFLite's double arithmetic gives)."""
    from tvm import relax

    src = ctx.tensor(op.inputs[0])
    v = relax.op.astype(relax.op.subtract(relax.op.astype(ctx.input(op, 0), "int32"), ctx.const(src.zero_point, "int32")),
                        "float32")
    ctx.set_output(op, 0, relax.op.multiply(v, ctx.const(np.float32(src.scale), "float32")))


_COMPARE = {"EQUAL": "==", "NOT_EQUAL": "!=", "LESS": "<", "LESS_EQUAL": "<=", "GREATER": ">", "GREATER_EQUAL": ">="}


@register(tuple(_COMPARE), "int8", implementations=("tir",))
def compare(ctx, op, impl):
    """TFLite int8 comparisons: both inputs offset, shifted left by 8 and scaled by their own scale, then compared."""
    a_t, b_t = ctx.tensor(op.inputs[0]), ctx.tensor(op.inputs[1])
    ma, sa = quantize_multiplier_smaller_than_one(a_t.scale)
    mb, sb = quantize_multiplier_smaller_than_one(b_t.scale)
    y = emit_kernel(ctx, k.compare_s8, [ctx.input(op, 0), ctx.input(op, 1)], out_shape=ctx.tensor(op.outputs[0]).shape,
                    relation=_COMPARE[op.opcode], zp_a=a_t.zero_point, zp_b=b_t.zero_point, mult_a=ma, shift_a=sa,
                    mult_b=mb, shift_b=sb)
    ctx.set_output(op, 0, y)


@register("PRELU", "int8", implementations=("tir",))
def prelu(ctx, op, impl):
    """TFLite int8 PRELU: x >= zero point: rescaled by in/out scale; else (x - zp) * (alpha - zp_alpha) rescaled by
    in * alpha / out scale."""
    x_t, a_t, out_t = ctx.tensor(op.inputs[0]), ctx.tensor(op.inputs[1]), ctx.tensor(op.outputs[0])
    m1, s1 = quantize_multiplier(x_t.scale / out_t.scale)
    m2, s2 = quantize_multiplier(x_t.scale * a_t.scale / out_t.scale)
    y = emit_kernel(ctx, k.prelu_s8, [ctx.input(op, 0), ctx.input(op, 1)], out_shape=out_t.shape, zp_in=x_t.zero_point,
                    zp_alpha=a_t.zero_point, zp_out=out_t.zero_point, mult_pos=m1, shift_pos=s1, mult_neg=m2, shift_neg=s2)
    ctx.set_output(op, 0, y)


@register("TRANSPOSE_CONV", ("int8", "int16"), implementations=("tir",))
def transpose_conv(ctx, op, impl):
    """A gather over the taps on the stride's grid (int8_te.transpose_conv2d_s8); TFLite requantizes per channel
    like a convolution."""
    from tvm import relax

    x_t, w_t, out_t = ctx.tensor(op.inputs[2]), ctx.tensor(op.inputs[1]), ctx.tensor(op.outputs[0])
    w = _const_weights(ctx, op)
    channels = w.shape[0]
    stride, pads = transpose_conv_geometry(op, x_t.shape, w_t.shape, out_t.shape)
    mult, shift = _requant_consts(ctx, op.inputs[2], op.inputs[1], op.outputs[0], channels)
    lo, hi = _act(ctx, op)
    bias = _bias_of(ctx, op, 3, channels)
    args = [ctx.input(op, 2), relax.const(w), relax.const(bias), *map(relax.const, _rescale(ctx, op, mult, shift))]
    y = emit_kernel(ctx, k.transpose_conv2d_s8, args, stride=stride, before=(pads[0][0], pads[1][0]),
                    out_hw=tuple(out_t.shape[1:3]), zp_in=x_t.zero_point, zp_out=out_t.zero_point, act_min=lo,
                    act_max=hi, acc_dtype=accumulator(x_t, w.reshape(channels, -1)))
    ctx.set_output(op, 0, y)


@register("MEAN", ("int8", "int16"), implementations=("tir",))
def mean(ctx, op, impl):
    """The interpreter's integer MEAN: the int32 sum of (x - zp_in), one rescale by in/out scale with 1/n folded into
    the multiplier (its shift bounded as the interpreter bounds it), plus zp_out. Measured against the interpreter
    for 4-D spatial means with kept dims and for other axes; both take this path."""
    x_t, out_t = ctx.tensor(op.inputs[0]), ctx.tensor(op.outputs[0])
    axes = reduce_axes(ctx, op)
    keep = bool(op.opt("keepDims", False))
    n = int(np.prod([x_t.shape[a] for a in axes]))
    mult, shift = quantize_multiplier(x_t.scale / out_t.scale)
    bits = min(n.bit_length() - 1, 32, 31 + shift)
    mult, shift = (mult << bits) // n, shift - bits
    info = np.iinfo(out_t.dtype)
    y = emit_kernel(ctx, k.mean_s8, [ctx.input(op, 0)], axes=axes, keepdims=keep, n=n, zp_in=x_t.zero_point,
                    zp_out=out_t.zero_point, mult=mult, shift=shift, lo=int(info.min), hi=int(info.max),
                    out_dtype=out_t.dtype)
    ctx.set_output(op, 0, y)


@register("BATCH_MATMUL", ("int8", "int16"), implementations=("tir",))
def batch_matmul(ctx, op, impl):
    a_t, b_t, out_t = ctx.tensor(op.inputs[0]), ctx.tensor(op.inputs[1]), ctx.tensor(op.outputs[0])
    mult, shift = quantize_multiplier(a_t.scale * b_t.scale / out_t.scale)
    rounding, acc = "double", "int32"
    if out_t.dtype == "int16":  # int64 sums where int32 could overflow, the 64-bit rescale
        reduced, total = reduce_multiplier(np.array([mult]), np.array([shift]))
        mult, shift, rounding = int(reduced[0]), int(total[0]), "reduced"
        depth = a_t.shape[-2] if op.opt("adjX", False) else a_t.shape[-1]
        acc = "int64" if depth * 65536 * 65536 >= 2**31 else "int32"
    info = np.iinfo(out_t.dtype)
    y = emit_kernel(ctx, k.batch_matmul_q, [ctx.input(op, 0), ctx.input(op, 1)], out_shape=out_t.shape,
                    adj_x=bool(op.opt("adjX", False)), adj_y=bool(op.opt("adjY", False)), zp_a=a_t.zero_point,
                    zp_b=b_t.zero_point, zp_out=out_t.zero_point, mult=mult, shift=shift, lo=int(info.min),
                    hi=int(info.max), rounding=rounding, acc_dtype=acc)
    ctx.set_output(op, 0, y)


@register("SQUARED_DIFFERENCE", "int8", implementations=("tir",))
def squared_difference(ctx, op, impl):
    """TFLite int8 SQUARED_DIFFERENCE: inputs rescaled to twice the larger scale with 7 bits of headroom."""
    a_t, b_t, out_t = ctx.tensor(op.inputs[0]), ctx.tensor(op.inputs[1]), ctx.tensor(op.outputs[0])
    left_shift = 7
    twice_max = 2.0 * max(a_t.scale, b_t.scale)
    ma, sa = quantize_multiplier(a_t.scale / twice_max)
    mb, sb = quantize_multiplier(b_t.scale / twice_max)
    mo, so = quantize_multiplier(twice_max * twice_max / ((1 << (2 * left_shift)) * out_t.scale))
    y = emit_kernel(ctx, k.squared_difference_s8, [ctx.input(op, 0), ctx.input(op, 1)], out_shape=out_t.shape,
                    left_shift=left_shift, zp_a=a_t.zero_point, zp_b=b_t.zero_point, zp_out=out_t.zero_point,
                    mult_a=ma, shift_a=sa, mult_b=mb, shift_b=sb, mult_out=mo, shift_out=so, lo=-128, hi=127)
    ctx.set_output(op, 0, y)


@register("RESIZE_BILINEAR", ("int8", "int16"), implementations=("tir",))
def resize_bilinear(ctx, op, impl):
    same_quantization(ctx, op)
    _, oh, ow, _ = ctx.tensor(op.outputs[0]).shape
    y = emit_kernel(ctx, k.resize_bilinear_q, [ctx.input(op, 0)], out_hw=(oh, ow),
                    align_corners=bool(op.opt("alignCorners", False)), half_pixel=bool(op.opt("halfPixelCenters", False)))
    ctx.set_output(op, 0, y)


@register("DIV", ("int8", "int16"), implementations=("c",))
def div(ctx, op, impl):
    """TFLite's quantized DIV (C kernel firmware/kernels/reference/div_s8.c); the inputs broadcast in the graph
    first."""
    from tvm import relax

    a_t, b_t, out_t = ctx.tensor(op.inputs[0]), ctx.tensor(op.inputs[1]), ctx.tensor(op.outputs[0])
    # in float32, as the interpreter's expression of float scales evaluates it
    mult, shift = quantize_multiplier(float(np.float32(a_t.scale) / (np.float32(b_t.scale) * np.float32(out_t.scale))))
    lo, hi = _act(ctx, op)
    params = np.array([mult, shift, a_t.zero_point, b_t.zero_point, out_t.zero_point, lo, hi, out_t.size], np.int32)
    args = [ctx.input(op, i) if ctx.tensor(op.inputs[i]).shape == out_t.shape
            else ctx.emit(relax.op.broadcast_to(ctx.input(op, i), out_t.shape)) for i in (0, 1)]
    symbol = "tinymlaas_div_s16" if out_t.dtype == "int16" else "tinymlaas_div_s8"
    ctx.set_output(op, 0, extern(ctx, symbol, [*args, relax.const(params)], out_t.shape, out_t.dtype))


@register("SUM", ("int8", "int16"), implementations=("tir",))
def reduce_sum(ctx, op, impl):
    """TFLite's quantized SUM computes in float32 (scale and bias as its Prepare makes them); we do the same, so it
    needs float arithmetic on the device (soft-float without an FPU)."""
    x_t, out_t = ctx.tensor(op.inputs[0]), ctx.tensor(op.outputs[0])
    axes = reduce_axes(ctx, op)
    n = int(np.prod([x_t.shape[a] for a in axes]))
    scale = np.float32(x_t.scale) / np.float32(out_t.scale)
    bias = np.float32(-x_t.zero_point) * scale * np.float32(n)
    info = np.iinfo(out_t.dtype)
    y = emit_kernel(ctx, k.sum_q, [ctx.input(op, 0)], axes=axes, keepdims=bool(op.opt("keepDims", False)),
                    scale=float(scale), bias=float(bias), zp_out=out_t.zero_point, lo=int(info.min), hi=int(info.max),
                    out_dtype=out_t.dtype)
    ctx.set_output(op, 0, y)


@register("L2_NORMALIZATION", "int8", implementations=("c",))
def l2_normalization(ctx, op, impl):
    """TFLite's int8 L2_NORMALIZATION (C kernel firmware/kernels/reference/l2norm_s8.c): output scale 1/128, zero
    point 0."""
    from tvm import relax

    x_t, out_t = ctx.tensor(op.inputs[0]), ctx.tensor(op.outputs[0])
    if out_t.zero_point != 0 or abs(out_t.scale - 1 / 128) > 1e-9:
        raise UnsupportedOperator([f"L2_NORMALIZATION #{op.index} int8 with output quantization other than 1/128, 0"],
                                  ctx.graph.name)
    params = np.array([x_t.zero_point, x_t.shape[-1], x_t.size], dtype=np.int32)
    ctx.set_output(op, 0, extern(ctx, "tinymlaas_l2norm_s8", [ctx.input(op, 0), relax.const(params)], out_t.shape))
