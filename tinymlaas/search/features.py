"""Static features of a layer, known without building it: what the runtime predictor learns from."""

from __future__ import annotations

import math

import numpy as np

from tinymlaas.ir.layer_schedule import innermost

# Multiply-accumulates per output element, from the weight tensor's shape (TFLite layouts).
_MACS_PER_OUTPUT = {
    "CONV_2D": lambda w: int(np.prod(w[1:])),  # OHWI: kh * kw * cin
    "DEPTHWISE_CONV_2D": lambda w: int(w[1] * w[2]),  # 1HWC: kh * kw
    "TRANSPOSE_CONV": lambda w: int(np.prod(w[1:])),
    "FULLY_CONNECTED": lambda w: int(w[-1]),
    "BATCH_MATMUL": lambda w: int(w[-2]),
}


# The geometry a kernel's loops follow (what makes two layers of the same MACs cost differently): for convolutions
# OHWI / 1HWC weights and NHWC outputs, for fully connected layers OI weights.
GEOMETRY = ("kernel_h", "kernel_w", "in_channels", "out_channels", "stride", "out_pixels")


def _geometry(op, ins, outs) -> dict:
    if len(ins) < 2 or len(ins[1].shape) < 2 or not outs:
        return {}
    w, out = list(ins[1].shape), list(outs[0].shape)
    if op.opcode in ("CONV_2D", "DEPTHWISE_CONV_2D", "TRANSPOSE_CONV") and len(w) == 4 and len(out) == 4:
        cin = w[3] if op.opcode != "DEPTHWISE_CONV_2D" else int(ins[0].shape[-1])
        return {"kernel_h": w[1], "kernel_w": w[2], "in_channels": cin, "out_channels": out[3],
                "stride": max(int(op.opt("strideH", 1) or 1), int(op.opt("strideW", 1) or 1)),
                "out_pixels": out[1] * out[2]}
    if op.opcode == "FULLY_CONNECTED":
        return {"kernel_h": 1, "kernel_w": 1, "in_channels": w[-1], "out_channels": w[0], "stride": 1,
                "out_pixels": int(np.prod(out[:-1]))}
    return {}


def layer_features(graph, op) -> dict:
    """Shapes, dtypes, precision, bytes read and written, constant bytes, MACs and loop geometry of one
    operator."""
    ins = [graph.tensor(i) for i in op.inputs if i >= 0]
    outs = [graph.tensor(i) for i in op.outputs]
    acts = [t for t in ins if not t.is_const]
    consts = [t for t in ins if t.is_const]
    out_elems = sum(t.size for t in outs)
    macs = 0
    if op.opcode in _MACS_PER_OUTPUT and len(ins) > 1 and len(ins[1].shape) >= 2:
        macs = out_elems * _MACS_PER_OUTPUT[op.opcode](ins[1].shape)
    nbytes = lambda ts: int(sum(t.size * np.dtype(t.dtype).itemsize for t in ts))
    return {
        "opcode": op.opcode,
        "precision": graph.precision(op),
        "input_shapes": [list(t.shape) for t in acts],
        "output_shapes": [list(t.shape) for t in outs],
        "const_shapes": [list(t.shape) for t in consts],
        "bytes_in": nbytes(acts),
        "bytes_out": nbytes(outs),
        "const_bytes": nbytes(consts),
        "output_elements": out_elems,
        "macs": macs,
        **_geometry(op, ins, outs),
    }


# --- a (layer, schedule) as the schedule predictor sees it ------------------------------------------------------
# What a schedule does to the generated code, per multiply-accumulate: loop trips, operand loads, zero-point
# subtractions, padding tests, requantizations, spills. Ratios to the layer's MACs carry over between layers of
# different sizes (what ranking a layer of a model never seen needs; benchmarks/tuning.py's predictor block).
# MONOTONE: the counts a schedule can only lose cycles by adding (the predictor's monotone constraints).
MONOTONE = frozenset({"trips_pm", "outer_trips_pm", "in_loads_pm", "w_loads_pm", "loads_pm", "unpack_pm", "zp_sub_pm",
                      "tests_pm", "requant_pm", "row_traffic_pm", "tiles_pm", "spill_arm_pm", "spill_riscv_pm",
                      "tested_share"})
REGISTERS = {"arm": 10, "riscv": 24}  # accumulators and operands a core holds beside pointers and counters


def schedule_features(shape, schedule, layer: dict | None = None) -> dict:
    """Numbers the schedule predictor learns from: the schedule's knobs, the code they imply per MAC (shape: an
    ir.layer_schedule.KernelShape), and with `layer` (the tuning log's signature: shapes, strides, padding) the
    share of outputs whose window meets the padding."""
    return {**_knobs(shape, schedule), **_code_per_mac(shape, schedule), **_border_features(shape, schedule, layer)}


def _knobs(shape, s) -> dict:
    macs = math.prod(shape.reduction)
    return {"conv": int(shape.family == "conv"), "depthwise": int(shape.family == "depthwise"),
            "dense": int(shape.family == "dense"), "padded": int(shape.padded), "zero_point": int(shape.zero_point),
            "px_block": s.px_block, "oc_block": s.oc_block, "tile": s.px_block * s.oc_block,
            "reduction_unroll": s.reduction_unroll, "chw": int(s.reduction_order == "chw"),
            "pixels_outer": int(s.pixels_outer), "unroll_tile": int(s.unroll_tile), "fold": int(s.fold_zero_point),
            "requant_row": int(s.requant == "row"), "unroll_taps": int(s.unroll_taps),
            "proven": int(s.proven_requant), "dsp_dot": int(s.dsp_dot), "wide_weights": int(s.wide_weights),
            "split_borders": int(s.split_borders), "innermost": innermost(shape, s.reduction_order),
            "log_reduction": math.log(macs), "log_pixels": math.log(shape.pixels),
            "log_channels": math.log(shape.channels), "px_share": s.px_block / shape.pixels,
            "oc_share": s.oc_block / shape.channels, "px_remainder": (shape.pixels % s.px_block) / shape.pixels,
            "oc_remainder": (shape.channels % s.oc_block) / shape.channels}


def _code_per_mac(shape, s) -> dict:
    """The loop nest layer_schedule.apply makes, counted per MAC: the innermost reduction loop's body holds the
    unrolled reduction steps times the tile (when the tile is unrolled: accumulators in registers; rolled, each MAC
    loads and stores its accumulator)."""
    red, family = shape.reduction, shape.family
    total = math.prod(red)
    taps = 1 if family == "dense" else red[0] * red[1]
    inner = innermost(shape, s.reduction_order)
    tile = s.oc_block * s.px_block
    step = 4 if s.dsp_dot else min(s.reduction_unroll, inner)  # reduction steps one trip of the inner loop does
    body = step * (taps if s.unroll_taps and family == "depthwise" else 1)
    in_loads, w_loads = (s.px_block / tile, s.oc_block / tile) if s.unroll_tile else (1.0, 1.0)
    unpack = 0.0
    if s.dsp_dot:  # a word of four int8 per load, SXTB16 twice to widen it (the widened weights need none)
        in_loads, w_loads = in_loads / 4, w_loads / 4
        unpack = (2 * s.px_block + (0 if s.wide_weights else 2 * s.oc_block)) / (4 * tile)
    zp_sub = in_loads if shape.zero_point and not s.fold_zero_point else 0.0
    live = (tile if s.unroll_tile else 0) + s.px_block + s.oc_block + (s.px_block if zp_sub else 0)
    return {"trips_pm": 0.0 if body >= total and s.unroll_tile else 1.0 / ((tile if s.unroll_tile else 1) * body),
            "outer_trips_pm": 1.0 / (tile * inner) if inner < total else 0.0,
            "in_loads_pm": in_loads, "w_loads_pm": w_loads, "unpack_pm": unpack, "zp_sub_pm": zp_sub,
            "loads_pm": in_loads + w_loads + (0.0 if s.unroll_tile else 2.0) + (2.0 / total if s.requant == "row" else 0),
            "mac_ops_pm": 0.5 if s.dsp_dot else 1.0, "requant_pm": (0.5 if s.proven_requant else 1.0) / total,
            "row_traffic_pm": 2.0 / total if s.requant == "row" else 0.0, "tiles_pm": 1.0 / (tile * total),
            "tests_pm": in_loads if shape.padded and family != "dense" and not s.split_borders else 0.0,
            "live": live, "spill_arm_pm": max(0, live - REGISTERS["arm"]) / tile,
            "spill_riscv_pm": max(0, live - REGISTERS["riscv"]) / tile, "body": body,
            "unroll_covers": int(body >= inner)}


def _padded_lines(n_out: int, n_in: int, k: int, stride: int, dilation: int, same: bool) -> list[int]:
    """The output rows (or columns) whose window reaches into SAME padding."""
    if not same:
        return []
    before = max(0, (n_out - 1) * stride + (k - 1) * dilation + 1 - n_in) // 2
    return [r for r in range(n_out) if r * stride < before or r * stride - before + (k - 1) * dilation >= n_in]


def _border_features(shape, s, layer: dict | None) -> dict:
    """Where the padding's bounds tests run: every read without split_borders; with it, only the rows and the pixel
    tiles that meet the padding (TVM's LoopPartition). From the signature's shapes and options (TFLite: padding 0 is
    SAME)."""
    none = {"log_rows": 0.0, "stride": 1, "border_share": 0.0, "tested_share": float(shape.padded and
                                                                                      shape.family != "dense")}
    if not layer or len(layer.get("output", ())) != 4 or len(layer.get("input", ())) != 4 or shape.family == "dense":
        return none
    (_, h, w, _), (_, ho, wo, _), weights = layer["input"], layer["output"], layer["weights"]
    o = layer.get("options") or {}
    same = o.get("padding", 0) == 0
    sh, sw = int(o.get("strideH", 1) or 1), int(o.get("strideW", 1) or 1)
    rows = _padded_lines(ho, h, weights[1], sh, int(o.get("dilationHFactor", 1) or 1), same)
    cols = _padded_lines(wo, w, weights[2], sw, int(o.get("dilationWFactor", 1) or 1), same)
    tiled_cols = 0
    if shape.pixels == wo:  # the pixel tiles run along a row: those holding a padded column test every read
        tiles = {c // s.px_block for c in cols}
        tiled_cols = sum(min(s.px_block, wo - t * s.px_block) for t in tiles)
    share = 1 - (1 - len(rows) / ho) * (1 - len(cols) / wo)
    tested = 1 - (1 - len(rows) / ho) * (1 - tiled_cols / wo)
    padded = shape.padded and (rows or cols)
    return {"log_rows": math.log(ho), "stride": max(sh, sw), "border_share": share,
            "tested_share": (tested if s.split_borders else 1.0) if padded else 0.0}
