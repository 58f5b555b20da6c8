"""TFLite's integer quantization arithmetic, computed at compile time exactly as TFLite computes it (in double,
then QuantizeMultiplier), shared by the int8, int16 and recurrent converters; and the two graph-level helpers all
quantized converters need: the same-quantization check and float -> integer QUANTIZE.
"""

from __future__ import annotations

import math

import numpy as np

from tinymlaas.errors import UnsupportedOperator

# TFLite ActivationFunctionType (schema.fbs)
ACT_NONE, ACT_RELU, ACT_RELU_N1_TO_1, ACT_RELU6 = 0, 1, 2, 3


def round_away(x: float) -> int:
    """std::round: half away from zero."""
    return math.floor(abs(x) + 0.5) * (1 if x >= 0 else -1)


def quantize_multiplier(real: float) -> tuple[int, int]:
    """TFLite QuantizeMultiplier: real = m * 2**(shift - 31), m in [2**30, 2**31)."""
    if real == 0.0:
        return 0, 0
    q, shift = math.frexp(real)
    q_fixed = round_away(q * (1 << 31))
    if q_fixed == 1 << 31:
        q_fixed //= 2
        shift += 1
    if shift < -31:
        shift, q_fixed = 0, 0
    return q_fixed, shift


def quantize_multiplier_smaller_than_one(real: float) -> tuple[int, int]:
    """TFLite QuantizeMultiplierSmallerThanOneExp: as QuantizeMultiplier, for 0 < real < 1 (shift <= 0)."""
    m, shift = quantize_multiplier(real)
    if shift > 0:
        raise UnsupportedOperator([f"comparison of int8 tensors with a scale >= 1 ({real})"], "model")
    return m, shift


def reduce_multiplier(mult: np.ndarray, shift: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The 15-bit multiplier and total right shift of TFLite's rescale of int64 accumulators (int16x8 kernels)."""
    mult = np.asarray(mult, dtype=np.int64)
    reduced = np.where(mult < 0x7FFF0000, (mult + (1 << 15)) >> 16, 0x7FFF).astype(np.int32)
    return reduced, (15 - np.asarray(shift, dtype=np.int32)).astype(np.int32)


def activation_range(act: int, scale: float, zero_point: int, dtype: str = "int8") -> tuple[int, int]:
    """TFLite CalculateActivationRangeQuantized (quantization of the bounds in float32)."""
    lo, hi = int(np.iinfo(dtype).min), int(np.iinfo(dtype).max)

    def q(x: float) -> int:
        return zero_point + round_away(float(np.float32(x) / np.float32(scale)))

    if act == ACT_RELU:
        return max(lo, q(0.0)), hi
    if act == ACT_RELU6:
        return max(lo, q(0.0)), min(hi, q(6.0))
    if act == ACT_RELU_N1_TO_1:
        return max(lo, q(-1.0)), min(hi, q(1.0))
    if act == ACT_NONE:
        return lo, hi
    raise ValueError(f"fused activation {act}")


def softmax_params(beta: float, input_scale: float) -> tuple[int, int, int]:
    """TFLite PreprocessSoftmaxScaling + CalculateInputRadius with 5 integer bits for the scaled difference."""
    integer_bits = 5
    real = min(beta * input_scale * (1 << (31 - integer_bits)), float((1 << 31) - 1))
    multiplier, left_shift = quantize_multiplier(real)
    radius = math.floor(1.0 * ((1 << integer_bits) - 1) * (1 << (31 - integer_bits)) / (1 << left_shift))
    return multiplier, left_shift, -radius


def log_softmax_params(input_scale: float) -> tuple[int, int, int, int, int]:
    """TFLite PreprocessLogSoftmaxScalingExp (beta 1) + CalculateInputRadius: the input's multiplier and left shift,
    the reverse scaling's multiplier and exponent (<= 0), and the smallest difference to the row maximum."""
    multiplier, left_shift, diff_min = softmax_params(1.0, input_scale)
    reverse_multiplier, reverse_exponent = quantize_multiplier((1 << (31 - left_shift)) / float(multiplier))
    return multiplier, left_shift, reverse_multiplier, reverse_exponent, diff_min


def same_quantization(ctx, op, inputs=(0,)) -> None:
    """Refuse an operator that would rescale: operators that only move or select values need their quantized
    inputs and output to share scale and zero point (TFLite's converter guarantees it; the tensor is named)."""
    out = ctx.tensor(op.outputs[0])
    for k in inputs:
        t = ctx.tensor(op.inputs[k])
        if (t.quant is None) != (out.quant is None) or (t.quant and (t.scale, t.zero_point) != (out.scale, out.zero_point)):
            what = f"{op.opcode} #{op.index} rescaling '{t.name}' to '{out.name}' (input and output quantization differ)"
            raise UnsupportedOperator([what], ctx.graph.name)


def quantize_from_float(ctx, op) -> None:
    """float32 -> int8 or int16: round(x / scale) + zero point, clamped (TFLite AffineQuantize, half away from zero)."""
    from tvm import relax

    dst = ctx.tensor(op.outputs[0])
    x = relax.op.divide(ctx.input(op, 0), ctx.const(np.float32(dst.scale), "float32"))
    t = relax.op.trunc(x)  # std::round: away from zero at one half (x - trunc(x) is exact)
    away = relax.op.greater_equal(relax.op.abs(relax.op.subtract(x, t)), ctx.const(0.5, "float32"))
    r = relax.op.where(away, relax.op.add(t, relax.op.sign(x)), t)
    q = relax.op.add(relax.op.astype(r, "int32"), ctx.const(dst.zero_point, "int32"))
    info = np.iinfo(dst.dtype)
    ctx.set_output(op, 0, relax.op.astype(relax.op.clip(q, int(info.min), int(info.max)), dst.dtype))
