"""Per-layer schedules of the integer compute kernels (convolution, depthwise convolution, fully connected): the
space the tuner searches layer by layer, and the TIR schedule each point stands for.

A kernel from ops/int8_te.py is two blocks: `acc`, the reduction (spatial loops then reduction loops), and
`requantize`, its epilogue. A `LayerSchedule` tiles the output into a register block of `px_block` output pixels x
`oc_block` output channels, orders the tile loops and the reduction loops, unrolls the innermost reduction by
`reduction_unroll`, and places the requantization after each tile or after each row of tiles. `fold_zero_point`
changes the computation itself (the converter reads it): the input's zero point is folded into the bias at build
time and padding reads as the zero point, one subtraction less per multiply-accumulate.

Every point is valid for the layer it was enumerated for (`space_of`); a point of another layer is refused by
`check`. Points are plain data (JSON in variants and in the tuning log).
"""

from __future__ import annotations

import functools
import itertools
import json
import math
from dataclasses import asdict, dataclass, fields

ATTR = "tinymlaas.layer_schedule"  # the PrimFunc attribute carrying a layer's schedule (LayerSchedule.key())

OC_BLOCKS = (1, 2, 4, 8, 16)
PX_BLOCKS = (1, 2, 3, 4, 5, 8)
REDUCTION_UNROLLS = (1, 2, 3, 4, 8)  # of the innermost reduction loop; 3: a 3-wide kernel's row
REDUCTION_ORDERS = ("hwc", "chw")  # kernel rows, columns, channels innermost; or channels outermost
REQUANT = ("tile", "row")  # after each register tile; after each row of tiles (a row of accumulators on the stack)


@dataclass(frozen=True)
class LayerSchedule:
    oc_block: int = 1
    px_block: int = 1
    reduction_unroll: int = 1
    reduction_order: str = "hwc"
    pixels_outer: bool = True  # tile loops: pixels outside channels (weights re-read per pixel tile) or inside
    unroll_tile: bool = True  # the register tile's loops unrolled: accumulators in registers
    fold_zero_point: bool = False
    requant: str = "tile"
    unroll_taps: bool = False  # every kernel row and column unrolled: loads of one input shared by neighbouring taps
    proven_requant: bool = False  # gemm_dsp.c's requantization without 64-bit rounding steps, where the layer's
    # weights prove it exact (dsp_layouts.requant_table; TFLite's form where they do not): int8 only
    dsp_dot: bool = False  # the inner product of four int8 pairs tensorized as two SMLADs (ir/arm_intrinsics.py)
    wide_weights: bool = False  # with dsp_dot: the weights widened to int16 in lane order at build time (twice the
    # flash, no SXTB16 for them)
    split_borders: bool = False  # padded layers: the row and pixel-tile loops split (TVM's LoopPartition) into the
    # border, which tests each read against the padding, and the interior, which reads without tests (more code)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> LayerSchedule:
        unknown = set(d) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"unknown layer schedule parameter(s): {', '.join(sorted(unknown))}")
        for f in fields(cls):  # each as its default's type (a bool is not an int here)
            if f.name in d and type(d[f.name]) is not type(f.default):
                raise ValueError(f"{f.name} is {type(f.default).__name__}, not {d[f.name]!r}"[:120])
        return cls(**d)

    def key(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))

    def short(self) -> str:
        return (f"{self.px_block}x{self.oc_block} tile, unroll {self.reduction_unroll} {self.reduction_order}"
                + (", channels outer" if not self.pixels_outer else "") + (", rolled" if not self.unroll_tile else "")
                + (", zp folded" if self.fold_zero_point else "") + (f", requant per {self.requant}")
                + (", taps unrolled" if self.unroll_taps else "") + (", proven requant" if self.proven_requant else "")
                + (", SMLAD" if self.dsp_dot else "") + (" int16 weights" if self.wide_weights else "")
                + (", borders split" if self.split_borders else ""))


@dataclass(frozen=True)
class KernelShape:
    """What a layer's schedule space depends on: the kernel family and its loop extents."""
    family: str  # "conv", "depthwise", "dense"
    pixels: int  # extent of the pixel axis tiled (output width; all output pixels of a 1x1 stride-1 unpadded
    # convolution, whose rows its kernel runs as one axis: geometry.pixels_in_rows; the batch for dense)
    channels: int  # output channels (output features)
    reduction: tuple[int, ...]  # reduction extents in "hwc" order: (kh, kw, cin), (kh, kw) or (depth,)
    zero_point: bool  # the input has a nonzero zero point (folding it is a real choice)
    int8: bool = True  # int8 activations (int16x8 has neither zero points nor the proven requantization)
    dsp: bool = False  # the core has Arm's DSP extension (SMLAD): the tensorized inner product is a choice
    padded: bool = True  # reads that are not plain (padding; a weight zero point): no tensorized inner product


def kernel_shape(graph, op, target=None) -> KernelShape | None:
    """The kernel shape of an operator whose TIR kernel takes a LayerSchedule on `target`, else None."""
    if graph.precision(op) not in ("int8", "int16") or op.opcode not in FAMILIES:
        return None
    x, w, out = graph.tensor(op.inputs[0]), graph.tensor(op.inputs[1]), graph.tensor(op.outputs[0])
    family = FAMILIES[op.opcode]
    if not w.is_const:
        return None
    zp, int8 = bool(x.zero_point), x.dtype == "int8"
    grouped = family == "conv" and int(w.shape[3]) != int(x.shape[3])  # its reads depend on the output channel:
    dsp = bool(target is not None and target.dsp) and not grouped  # no tensorized inner product
    if family == "dense":
        depth = int(w.shape[1])
        return KernelShape("dense", int(x.size) // depth, int(w.shape[0]), (depth,), zp, int8, dsp, bool(w.zero_point))
    if len(out.shape) != 4:
        return None
    from tinymlaas.ops.geometry import pixels_in_rows, window_padding

    h, wd = int(x.shape[1]), int(x.shape[2])
    kh, kw = int(w.shape[1]), int(w.shape[2])
    pads = window_padding(op, h, wd, kh, kw)
    if family == "depthwise":
        if int(op.opt("depthMultiplier", 1) or 1) != 1:
            return None
        return KernelShape("depthwise", int(out.shape[2]), int(out.shape[3]), (kh, kw), zp, int8, dsp, any(pads))
    pixels = int(out.shape[1]) * int(out.shape[2]) if pixels_in_rows(op, h, wd, kh, kw) else int(out.shape[2])
    return KernelShape("conv", pixels, int(out.shape[3]), (kh, kw, int(w.shape[3])), zp, int8, dsp, any(pads))


FAMILIES = {"CONV_2D": "conv", "DEPTHWISE_CONV_2D": "depthwise", "FULLY_CONNECTED": "dense"}


def innermost(shape: KernelShape, order: str) -> int:
    """The reduction axis the kernel's innermost loop walks for this order (its trip count)."""
    red = shape.reduction
    if shape.family == "dense":
        return red[0]
    if order == "hwc":
        return red[-1]
    return red[1] if shape.family == "conv" else red[0]  # chw: kw innermost for conv, kh for depthwise


def space_of(shape: KernelShape) -> list[LayerSchedule]:
    """Every distinct valid schedule of a layer of this shape (default first)."""
    orders = REDUCTION_ORDERS if shape.family != "dense" and len([r for r in shape.reduction if r > 1]) > 1 \
        else REDUCTION_ORDERS[:1]
    out = [LayerSchedule()]
    taps = 1 if shape.family == "dense" else shape.reduction[0] * shape.reduction[1]
    dot = shape.dsp and shape.int8 and not shape.padded and shape.reduction[-1] % 4 == 0 and shape.family != "depthwise"
    dots = ((False, False), (True, False), (True, True)) if dot else ((False, False),)
    borders = (False, True) if shape.padded and shape.family != "dense" else (False,)
    for oc, px, order, unroll, outer, tile, fold, req, all_taps, proven, (dsp_dot, wide), split in itertools.product(
            OC_BLOCKS, PX_BLOCKS, orders, REDUCTION_UNROLLS, (True, False), (True, False), (False, True), REQUANT,
            (False, True), (True, False) if shape.int8 else (False,), dots, borders):
        if oc > shape.channels or px > shape.pixels or (oc == 1 and px == 1 and not tile):
            continue
        inner = innermost(shape, order)
        if unroll > inner or inner % unroll:
            continue
        if fold and not shape.zero_point:
            continue
        if req == "row" and (oc >= shape.channels or not outer):  # a row of tiles is a tile when one spans it
            continue
        if all_taps and not (1 < taps <= 25 and unroll == 1):  # the taps' loops take the unrolling then
            continue
        if dsp_dot and (order != "hwc" or unroll != 1 or (shape.zero_point and not fold) or shape.pixels % px
                        or shape.channels % oc or not tile):
            continue  # four channels at a time, innermost, read as they are (the zero point folded), whole tiles
        s = LayerSchedule(oc, px, unroll, order, outer, tile, fold, req, all_taps, proven, dsp_dot, wide, split)
        if s != out[0]:
            out.append(s)
    return out


def register_blocked(shape: KernelShape, space, accumulators: int) -> list[LayerSchedule]:
    """At most two points of `space` a register file suggests, for a tuner to measure before any model of its own:
    the largest register tile of at most `accumulators` accumulators, as square as it comes (and the next shape of
    that size or smaller), unrolled, the zero point folded, the proven requantization, interiors without padding
    tests, on DSP cores the SMLAD inner product with widened weights; depthwise: one channel, up to 8 pixels, every
    tap unrolled (neighbouring taps share loads)."""
    def plain(s: LayerSchedule) -> bool:
        return (s.unroll_tile and s.requant == "tile" and s.reduction_order == "hwc" and s.reduction_unroll == 1
                and s.fold_zero_point == shape.zero_point and s.proven_requant == shape.int8
                and s.split_borders == (shape.padded and shape.family != "dense") and s.wide_weights == s.dsp_dot)

    pool = [s for s in space if plain(s) and s.oc_block * s.px_block <= accumulators]
    if shape.family == "depthwise":
        taps = [s for s in pool if s.oc_block == 1 and s.unroll_taps]
        pool = taps or [s for s in pool if s.oc_block == 1]
    else:
        pool = [s for s in pool if not s.unroll_taps]
        dots = [s for s in pool if s.dsp_dot]
        pool = dots or pool
    pool.sort(key=lambda s: (-s.oc_block * s.px_block, abs(s.oc_block - s.px_block), not s.pixels_outer,
                             -s.oc_block))
    picks: list[LayerSchedule] = []
    for s in pool:
        if all((s.oc_block, s.px_block) != (p.oc_block, p.px_block) for p in picks):
            picks.append(s)
        if len(picks) == 2:
            break
    return picks


def _depthwise(shape: KernelShape):
    """One channel a tile and as many pixels as fit (five at most: the weight loaded once for five products),
    accumulators in registers, the zero point folded into the bias, the proven requantization per tile, the padded
    border's loops apart: what tuning chose for every 3x3 depthwise layer of KWS and VWW on Cortex-M4 and nearly
    every one on Cortex-M7 (benchmarks/results/tuning.json). Each knob falls back where a layer's space lacks it."""
    for px, fold, proven, split in itertools.product((5, 4, 3, 2, 1), (True, False), (True, False), (True, False)):
        yield LayerSchedule(oc_block=1, px_block=px, pixels_outer=False, unroll_tile=True, fold_zero_point=fold,
                            requant="tile", proven_requant=proven, split_borders=split)


def _conv_few_channels(shape: KernelShape):
    """A convolution over one to three input channels whose tap rows are not whole words (an RGB image's first
    layer): two output channels and a few pixels a tile, the taps' loops unrolled in the tile, the zero point folded,
    the proven requantization per tile, the border apart: what tuning chose for the 3x3 RGB layers of VWW and
    ResNet-8 on Cortex-M4 and M7 (benchmarks/results/tuning.json). The C kernels' word-wide products waste lanes
    there and gather each window byte by byte; other convolutions keep them (no candidate: an empty rule)."""
    if len(shape.reduction) != 3:
        return
    _, kw, cin = shape.reduction
    if cin >= 4 or kw * cin % 4 == 0:
        return
    for oc, px, fold, proven, split in itertools.product((2, 1), (3, 2, 4, 1), (True, False), (True, False),
                                                         (True, False)):
        yield LayerSchedule(oc_block=oc, px_block=px, pixels_outer=False, unroll_tile=True, fold_zero_point=fold,
                            requant="tile", proven_requant=proven, split_borders=split)


# The schedule a TIR kernel takes when none is given, by family (a family not listed takes LayerSchedule(): TIR's own
# loops). The families listed are also the ones the default build ("auto") builds with TIR rather than the C
# micro-kernels. Depthwise, the default builds (estimated cycles; instructions on RV32), every output bit-exact:
# KWS on Cortex-M4 6.54 M -> 5.47 M (each 3x3 depthwise layer 507,627 -> 241,968; with LayerSchedule() 1,129,410),
# VWW 20.09 M -> 17.21 M (code +16.5 KB: the border loops), on Cortex-M7 12.41 M -> 11.38 M; KWS on Cortex-M33 and
# M55 -12% and -13%, on Cortex-M3 10.73 M -> 9.14 M, on RV32IMAC 11.66 M -> 10.28 M instructions (VWW 35.22 M ->
# 30.91 M, code +24 KB). Convolutions over one to three channels (2026-12-07; the layer's estimated cycles, bit-exact):
# VWW's RGB layer on Cortex-M4 2.27 M -> 1.56 M (the whole model 17.20 M -> 16.48 M), ResNet-8's 1.61 M -> 1.51 M;
# on RV32IMAC 3.25 M -> 1.88 M and 2.37 M -> 1.52 M instructions.
DEFAULT_SCHEDULES = {"depthwise": _depthwise, "conv": _conv_few_channels}


@functools.lru_cache(maxsize=256)  # asked for each layer by the kernel choice and again by its lowering
def default_schedule(shape: KernelShape | None) -> LayerSchedule | None:
    """The first of DEFAULT_SCHEDULES's candidates for this shape that lies in its space; None where none is
    listed (the kernel's loops as TIR makes them)."""
    rule = DEFAULT_SCHEDULES.get(shape.family) if shape is not None else None
    if rule is None:
        return None
    space = set(space_of(shape))
    return next((s for s in rule(shape) if s in space), None)


def default_for(graph, op, target) -> LayerSchedule | None:
    """default_schedule of an operator on a microcontroller target; None on a host target (its TIR goes through
    TVM's own schedules for the CPU or GPU)."""
    if getattr(target, "kind", None) == "host":
        return None
    return default_schedule(kernel_shape(graph, op, target))


def check(shape: KernelShape, schedule: LayerSchedule) -> str | None:
    """Why `schedule` cannot run a layer of this shape (None: it can)."""
    if schedule == LayerSchedule() or schedule in space_of(shape):
        return None
    return f"schedule {schedule.short()} is not in the space of this {shape.family} layer"


def features(shape: KernelShape, schedule: LayerSchedule) -> dict:
    """Numbers the tuning predictor sees for one (layer, schedule): the schedule's knobs and what they imply."""
    tile = schedule.oc_block * schedule.px_block
    red = 1
    for r in shape.reduction:
        red *= r
    return {
        "oc_block": schedule.oc_block, "px_block": schedule.px_block, "tile": tile,
        "loads_per_mac": (schedule.oc_block + schedule.px_block) / tile,
        "reduction_unroll": schedule.reduction_unroll, "chw": int(schedule.reduction_order == "chw"),
        "pixels_outer": int(schedule.pixels_outer), "unroll_tile": int(schedule.unroll_tile),
        "fold_zero_point": int(schedule.fold_zero_point), "requant_row": int(schedule.requant == "row"),
        "pixel_remainder": shape.pixels % schedule.px_block, "channel_remainder": shape.channels % schedule.oc_block,
        "live_registers": tile * int(schedule.unroll_tile) + schedule.oc_block + schedule.px_block,
        "family": ("conv", "depthwise", "dense").index(shape.family), "pixels": shape.pixels,
        "channels": shape.channels, "reduction": red, "innermost": innermost(shape, schedule.reduction_order),
        "kernel_taps": red // (shape.reduction[-1] if shape.family == "conv" else 1),
        "unroll_taps": int(schedule.unroll_taps), "proven_requant": int(schedule.proven_requant),
        "dsp_dot": int(schedule.dsp_dot), "wide_weights": int(schedule.wide_weights),
        "padded": int(shape.padded), "split_borders": int(schedule.split_borders),
        **_implied_work(shape, schedule, red),
    }


def _implied_work(shape: KernelShape, schedule: LayerSchedule, red: int) -> dict:
    """What the tiling implies for the loops, relative to the layer's MACs (shapes differ between models; these
    ratios carry over): tiles padded past the extents, reduction-loop trips, operand loads, spills."""
    px_tiles, oc_tiles = -(-shape.pixels // schedule.px_block), -(-shape.channels // schedule.oc_block)
    tiles, macs = px_tiles * oc_tiles, shape.pixels * shape.channels * red
    inner = innermost(shape, schedule.reduction_order)
    live = schedule.oc_block * schedule.px_block + schedule.oc_block + schedule.px_block
    return {"tile_waste": tiles * schedule.oc_block * schedule.px_block * red / macs,
            "log_tiles": math.log(tiles), "log_macs": math.log(macs),
            "log_inner_trips": math.log(tiles * red / max(1, min(schedule.reduction_unroll, inner))),
            "loads_rel": tiles * red * (schedule.oc_block + schedule.px_block) / macs,
            "spill_arm": max(0, live - 11), "spill_riscv": max(0, live - 24), "outputs_rel": 1.0 / red,
            "unroll_covers": int(schedule.reduction_unroll >= inner),
            "px_share": schedule.px_block / shape.pixels, "oc_share": schedule.oc_block / shape.channels}


# --- the TIR schedule ------------------------------------------------------------------------------------------

def apply(sch, schedule: LayerSchedule) -> bool:
    """Schedule the `acc`/`requantize` kernel in `sch` as `schedule` says. False: not such a kernel (left as is)."""
    from tinymlaas.ir.schedule import root_blocks

    blocks = {sch.get(b).name_hint: b for b in root_blocks(sch)}
    if set(blocks) - {"keep_total"} != {"acc", "requantize"}:  # keep_total: the proven requantization's sum
        return False
    acc = blocks["acc"]
    loops = sch.get_loops(acc)
    spatial = sum(1 for iv in sch.get(acc).iter_vars if int(iv.iter_type) == 0)
    outer, (px, oc), reduction = loops[:spatial - 2], loops[spatial - 2:spatial], list(loops[spatial:])
    extent = lambda loop: int(sch.get(loop).extent)
    axis_extent = (extent(px), extent(oc))
    pxo, pxi = sch.split(px, [None, schedule.px_block]) if schedule.px_block > 1 else (px, None)
    oco, oci = sch.split(oc, [None, schedule.oc_block]) if schedule.oc_block > 1 else (oc, None)
    if schedule.reduction_order == "chw" and len(reduction) > 1:
        reduction = [reduction[-1], *reduction[:-1]] if len(reduction) == 3 else reduction[::-1]
    red_inner = None
    if schedule.dsp_dot:  # four channels innermost, below the tile: the tensorized inner product
        reduction[-1], red_inner = sch.split(reduction[-1], [None, 4])
    elif schedule.reduction_unroll > 1:
        if schedule.reduction_unroll >= extent(reduction[-1]):
            red_inner = reduction.pop()
        else:
            reduction[-1], red_inner = sch.split(reduction[-1], [None, schedule.reduction_unroll])
    taps = []  # conv: the kernel's rows and columns, not its channels; depthwise: its whole reduction
    if schedule.unroll_taps:
        taps = reduction if len(reduction) == 2 else reduction[1:] if schedule.reduction_order == "chw" \
            else reduction[:2]
    tile_outer = [pxo, oco] if schedule.pixels_outer else [oco, pxo]
    tile_inner = [loop for loop in (pxi, oci) if loop is not None]
    reductions = [r for r in (*reduction, red_inner) if r is not None]
    if schedule.dsp_dot:
        sch.reorder(*outer, *tile_outer, *reduction, *tile_inner, red_inner)
    else:
        sch.reorder(*outer, *tile_outer, *reductions, *tile_inner)
    at = tile_outer[0] if schedule.requant == "row" else tile_outer[1]
    if "keep_total" in blocks:
        sch.reverse_compute_at(blocks["keep_total"], at)
    sch.reverse_compute_at(blocks["requantize"], at)
    init = sch.decompose_reduction(acc, reduction[0] if reduction else red_inner)
    if red_inner is not None and not schedule.dsp_dot:
        sch.unroll(red_inner)
    for loop in taps:
        sch.unroll(loop)
    if schedule.unroll_tile:
        for loop in tile_inner:
            sch.unroll(loop)
        n_tile = len(tile_inner)
        for block in (init, blocks["requantize"]) if schedule.requant == "tile" else (init,):
            block_loops = sch.get_loops(block)
            for loop in block_loops[len(block_loops) - n_tile:] if n_tile else ():
                sch.unroll(loop)
    if schedule.dsp_dot:
        from tinymlaas.ir.arm_intrinsics import SMLAD_DOT4, SMLAD_DOT4_W16

        sch.tensorize(red_inner, SMLAD_DOT4_W16 if schedule.wide_weights else SMLAD_DOT4)
    # A tile that does not divide its axis: TVM's LoopPartition splits the tile loop into the full tiles, without
    # bounds tests (accumulators stay in registers), and the last, partial one.
    hinted = [loop for loop, block, total in ((pxo, schedule.px_block, axis_extent[0]),
                                              (oco, schedule.oc_block, axis_extent[1])) if total % block]
    if schedule.split_borders:  # the padding's bounds tests hold on the rows and pixel tiles at the borders only
        hinted += [loop for loop in (*outer[-1:], pxo) if loop not in hinted]
    for loop in hinted:
        sch.annotate(loop, "pragma_loop_partition_hint", 1)
    return True


def of_func(func) -> LayerSchedule | None:
    """The LayerSchedule a PrimFunc was tagged with by its converter (None: untagged)."""
    value = func.attrs.get(ATTR) if func.attrs is not None else None
    return LayerSchedule.from_dict(json.loads(str(value))) if value is not None else None
