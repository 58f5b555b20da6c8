"""The constant operands of the DSP micro-kernels (firmware/kernels/optimized/gemm_dsp.c) as the compiler lays them
out: weights blocked and widened for SMLAD, depthwise 3x3 taps and rows, and the per-channel requantization table
whose cheap C form is proved exact here."""

from __future__ import annotations

import numpy as np

LANES = (0, 2, 1, 3)  # SXTAB16 widens a word's bytes 0, 2 and 1, 3: int16 weights follow that order


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
        quads = quads[..., LANES]
    return np.ascontiguousarray(quads.transpose(0, 2, 1, 3))


def gemv4_weights(w2d: np.ndarray) -> np.ndarray:
    """(OC, K) values in -8..7 -> gemm_dsp.c's 4-bit gemv layout: blocked_weights' [OC/4][K/4][channel 0..3][4] with
    channels 2p and 2p + 1 in the low and high nibbles of one byte: [OC/4][K/4][pair 0..1][k0 k1 k2 k3]."""
    blocked = blocked_weights(w2d, 4, wide=False).astype(np.int16)
    pairs = blocked.reshape(*blocked.shape[:2], 2, 2, 4)  # [..][pair][channel in pair][k]
    return np.ascontiguousarray(((pairs[..., 0, :] & 0xF) | ((pairs[..., 1, :] & 0xF) << 4)).astype(np.uint8)
                                .view(np.int8))


def gemm_w4_weights(w2d: np.ndarray) -> np.ndarray:
    """(OC, K) values in -8..7 -> gemm_dsp.c's 4-bit 2x2 layout: blocked_weights' [OC/2][K/4][channel 0..1][4] with
    the pair in one byte per k, channel 0 in the low nibble: [OC/2][K/4][k0 k1 k2 k3], one word per pair and quad."""
    blocked = blocked_weights(w2d, 2, wide=False).astype(np.int16)
    return np.ascontiguousarray(((blocked[..., 0, :] & 0xF) | ((blocked[..., 1, :] & 0xF) << 4)).astype(np.uint8)
                                .view(np.int8))


def sums_fit_at_16x(w2d: np.ndarray, zp_in: int) -> bool:
    """The 4-bit loops' sums, 16 x the products', fit in 32 bits for any int8 input (every partial sum is at most
    the largest input offset times the channel's sum of |w|)."""
    x_max = max(abs(-128 - zp_in), abs(127 - zp_in))
    return 16 * x_max * int(np.abs(w2d.astype(np.int64)).sum(axis=1).max(initial=0)) < 2**31


def fits_int4(w: np.ndarray) -> bool:
    """Weights that are 4-bit values (a layer --weights int4 re-quantized: frontend/lowbit.py)."""
    return w.size > 0 and int(w.min()) >= -8 and int(w.max()) <= 7


def gemm4_weights(w2d: np.ndarray) -> np.ndarray:
    """(OC, K) int8 -> gemm_dsp.c's four-pixel layout, int16 and doubled (the sums come out as the doubled ones its
    requantization takes): [OC/2][K/4][k0 k2 | k1 k3][channel 0..1][2], the two channels' words of one half of a
    quad adjacent (one LDRD)."""
    blocked = blocked_weights(w2d, 2, wide=True)  # [OC/2][K/4][channel][k0 k2 k1 k3]
    halves = blocked.reshape(*blocked.shape[:3], 2, 2)  # [..][channel][half][2]
    return np.ascontiguousarray(halves.transpose(0, 1, 3, 2, 4)) * np.int16(2)


def requantize_exact(acc: int, mult: int, shift: int, single: bool) -> int | None:
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


def depthwise_rows_weights(w: np.ndarray, transposed: bool = False) -> np.ndarray:
    """TFLite depthwise 3x3 weights (1, 3, 3, C) -> [C][3 rows][w0 w1 w2 0] int16, doubled: the layout of
    gemm_dsp.c's depthwise3x3_rows (its accumulator is 2 * the sum); transposed: rows are the kernel's columns."""
    rows = np.zeros((w.shape[3], 3, 4), dtype=np.int16)
    rows[:, :, :3] = 2 * w[0].astype(np.int16).transpose((2, 1, 0) if transposed else (2, 0, 1))
    return rows


def requant_table(w2d: np.ndarray, bias: np.ndarray, mult: np.ndarray, shift: np.ndarray, zp_in: int, zp_out: int,
                  act: tuple[int, int], single: bool, left: bool = False) -> np.ndarray | None:
    """Per output channel {bias, multiplier, round, shift} for gemm_dsp.c's requantization, or None.

    The C code skips 64-bit arithmetic, saturation and the sign tests of TFLite's formulas; that is exact
    only while no intermediate can overflow, which is proved here from the weights: |accumulator| is at
    most |bias| + max|x - zp_in| * sum|w|. The output zero point is folded into the rounding constant.
    left (gemm_dsp.c's 4-bit kernels only, gemv_w4 and gemm_w4): a multiplier of 1/2 or more (single rounding: TFLite
    shifts right by 32 or fewer; double: left by s >= 0 before its high multiply, no rounding shift) is taken as
    smmulr((acc + bias) << k, m) + zp_out, k = s + 1 (one rounding, half up, in both), stored with shift -(k + 1)
    and round zp_out.
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
        if left and e <= 0 and m > 0 and 0 <= s + 1 <= 30 and a << (s + 1) < 2**31:
            rows.append((b, m, zp_out, -(s + 2)))  # (acc * m + 2^(30 - s)) >> (31 - s) as one SMMULR
            continue
        ends = [requantize_exact(b + sign * d, m, s, single) for sign in (-1, 1)]
        if a >= 2**31 or None in ends:
            return None
        lo, hi = (min(max(v + zp_out, act[0]), act[1]) for v in ends)
        if lo != hi:
            return None
        rows.append((0, 0, 2 * lo, 1))  # (0 + 2 * lo) >> 1
    return np.array(rows, dtype=np.int32)


def depthwise3x3_taps(w: np.ndarray, wide: bool) -> np.ndarray:
    """TFLite depthwise 3x3 weights (1, 3, 3, C), C a multiple of 4 -> [C/4][9 taps][4 lanes]: a channel block's tap
    words adjacent (gemm_dsp.c's depthwise3x3; wide: int16 in SXTAB16's lane order)."""
    taps = w.reshape(9, w.shape[3] // 4, 4).transpose(1, 0, 2)
    taps = taps[..., LANES].astype(np.int16) if wide else taps
    return np.ascontiguousarray(taps)
