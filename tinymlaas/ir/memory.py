"""Memory planning: where each intermediate tensor lives in the one static arena.

Policies (a dimension of the variant search, `--memory` on the command line):
  tvm      TVM's StaticPlanBlockMemory as `lower` left it (storage blocks reused by size, laid end to end)
  optimal  offsets chosen by an integer program over the tensors' lifetimes: the smallest arena in which no two
           tensors alive at the same step overlap; concatenations in place first (ir/concat_in_place.py: each
           input written straight into its slice of the output)
  inplace  as optimal, and a kernel that streams (reads its input in raster order and writes its output behind
           the read front) may write over its input where the input dies: the output starts at least the kernel's
           safe distance below the input. Such C kernels are called through their in-place twins (no `restrict`);
           elementwise TIR kernels (distance 0) lose LLVM's noalias.

Offsets and sizes are in units of ARENA_ALIGN. The integer program (scipy's HiGHS) starts from a greedy first-fit
plan, which is also the answer when the program is too large or runs out of nodes (a node limit, not a clock:
the same model plans the same way on any machine), and is not run at all when the greedy plan, without overlaps,
already needs no more than the bytes alive at the busiest step (proven optimal: the common case).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np

from tinymlaas.ir.concat_in_place import concat_in_place
from tinymlaas.ir.lower import ARENA_ALIGN, KernelCall, Program, Region
from tinymlaas.ops.conv_params import ConvParams

POLICIES = ("tvm", "optimal", "inplace")
MAX_PAIRS = 4000  # larger programs keep the greedy plan
NODE_LIMIT = 5000  # in place: overlaps make the search harder
# without overlaps the greedy plan meets the live-bytes bound on almost every model; where not (5 of 48 on the corpus
# and MLPerf Tiny), 300 nodes found the plan 5,000 did, in 2 s instead of 27 (an unrolled float GRU)
NODE_LIMIT_NO_OVERLAPS = 300


# --- which kernels may write over their input, and how far behind its read front ------------------------------

def _read_fronts(params: np.ndarray) -> np.ndarray:
    """For each output pixel in raster order, the lowest input byte its window reads (int8 NHWC)."""
    p = ConvParams.from_array(params)
    n, h, w, c, oh, ow, sh, sw, pt, pl = p.n, p.h, p.w, p.c, p.oh, p.ow, p.sh, p.sw, p.pt, p.pl
    q = np.arange(n * oh * ow)
    b, oy, ox = q // (oh * ow), q // ow % oh, q % ow
    y0 = np.maximum(oy * sh - pt, 0)
    x0 = np.clip(ox * sw - pl, 0, w - 1)
    start = ((b * h + y0) * w + x0) * c
    return np.where(y0 < h, start, n * h * w * c)  # a window wholly in the padding reads nothing


def _future_min(fronts: np.ndarray) -> np.ndarray:
    """fronts[k:].min() for every k (what is still to be read once units before k are done)."""
    return np.minimum.accumulate(fronts[::-1])[::-1]


def gemm_distance(params: np.ndarray, group: int = 2) -> int | None:
    """gemm_dsp.c gemm_layer (gemm4_layer: group=4): pixels in groups, a group's patches gathered before its
    outputs are written."""
    oc = ConvParams.from_array(params).oc
    fronts = _future_min(_read_fronts(params))
    pairs = np.arange(0, len(fronts), group)
    after = pairs + group  # the first pixel still to be read once group p is written
    keep = after < len(fronts)
    if not keep.any():
        return None  # everything is read before anything is written
    return int((after[keep] * oc - fronts[after[keep]]).max())


def gemv_distance(params: np.ndarray) -> int | None:
    """gemm_dsp.c gemv_layer: row b widened whole before row b's outputs are written."""
    p = ConvParams.from_array(params)
    batch, c, oc = p.n, p.c, p.oc
    if batch == 1:
        return None
    b = np.arange(1, batch)
    return int((b * oc - b * c).max())


def depthwise_distance(params: np.ndarray) -> int:
    """gemm_dsp.c depthwise3x3_layer: pixels in raster order, each written channel group by group between the reads
    of its taps: all of pixel q's bytes must lie below everything pixel q and later pixels read."""
    c = ConvParams.from_array(params).c
    fronts = _future_min(_read_fronts(params))
    q = np.arange(len(fronts))
    return int(((q + 1) * c - fronts).max())


# C symbol -> (safe distance from the kernel's params, its in-place twin). The output must start at least `distance`
# bytes below the input's start (negative: it may start that far above it; None: any overlap is safe).
STREAMING: dict[str, tuple[Callable, str]] = {
    "tinymlaas_gemm_w8": (gemm_distance, "tinymlaas_gemm_w8_inplace"),
    "tinymlaas_gemm_w16": (gemm_distance, "tinymlaas_gemm_w16_inplace"),
    "tinymlaas_gemm_w4": (gemm_distance, "tinymlaas_gemm_w4_inplace"),
    "tinymlaas_gemm_w4l": (gemm_distance, "tinymlaas_gemm_w4l_inplace"),
    "tinymlaas_gemm4_w16": (lambda params: gemm_distance(params, group=4), "tinymlaas_gemm4_w16_inplace"),
    "tinymlaas_gemv_w8": (gemv_distance, "tinymlaas_gemv_w8_inplace"),
    "tinymlaas_gemv_w16": (gemv_distance, "tinymlaas_gemv_w16_inplace"),
    "tinymlaas_gemv_w8_pt": (gemv_distance, "tinymlaas_gemv_w8_pt_inplace"),
    "tinymlaas_gemv_w16_pt": (gemv_distance, "tinymlaas_gemv_w16_pt_inplace"),
    "tinymlaas_gemv_w4": (gemv_distance, "tinymlaas_gemv_w4_inplace"),
    "tinymlaas_gemv_p4": (gemv_distance, "tinymlaas_gemv_p4_inplace"),
    "tinymlaas_gemv_p4_pt": (gemv_distance, "tinymlaas_gemv_p4_pt_inplace"),
    "tinymlaas_gemv_w4_pt": (gemv_distance, "tinymlaas_gemv_w4_pt_inplace"),
    "tinymlaas_depthwise3x3_w8": (depthwise_distance, "tinymlaas_depthwise3x3_w8_inplace"),
    "tinymlaas_depthwise3x3_w16": (depthwise_distance, "tinymlaas_depthwise3x3_w16_inplace"),
}

STREAMING_TWINS = frozenset(twin for _, twin in STREAMING.values())

# --- the problem: tensors, lifetimes, which pairs conflict --------------------------------------------------------

@dataclass(frozen=True)
class Tensor:
    key: int  # Region.tensor
    size: int  # units of ARENA_ALIGN
    first: int  # step that writes it
    last: int  # last step that reads it


@dataclass(frozen=True)
class InPlace:
    """Step `step` may write `output` over `input` (its last read) if output starts >= distance units below."""
    step: int
    input: int
    output: int
    distance: int | None  # units; None: any overlap is safe


@dataclass(frozen=True)
class MemoryPlan:
    policy: str
    offsets: dict  # tensor key -> byte offset
    arena_bytes: int
    overlapped: tuple[int, ...]  # steps whose output overlaps their input (in-place twins)
    optimal: bool  # proven optimal by the integer program


def _units(nbytes: int) -> int:
    return -(-nbytes // ARENA_ALIGN)


def arena_regions(step):
    return [r for r in (step.args if isinstance(step, KernelCall) else (step.src, step.dst)) if r.kind == "arena"]


def _tensors(program: Program) -> list[Tensor]:
    first, last, size = {}, {}, {}
    for k, step in enumerate(program.steps):
        for r in arena_regions(step):
            first.setdefault(r.tensor, k)
            last[r.tensor] = k
            size[r.tensor] = max(size.get(r.tensor, 0), r.within + r.nbytes)
    return [Tensor(t, _units(size[t]), first[t], last[t]) for t in sorted(first)]


def _distance_units(nbytes: int | None) -> int | None:
    """Rounded to the safe side: further below when positive, less far above when negative."""
    if nbytes is None:
        return None
    return _units(nbytes) if nbytes > 0 else -((-nbytes) // ARENA_ALIGN)


def _elementwise(program: Program, step: KernelCall) -> bool:
    """A TIR kernel declared elementwise by its converter (ops/emit.py emit_kernel)."""
    if step.extern:
        return False
    attrs = program.kernels[step.kernel].attrs
    return bool(attrs and attrs.get("tinymlaas.elementwise"))


def _whole(r: Region, tensors: dict[int, Tensor]) -> bool:
    """An arena region that is its whole tensor (not a slice of a concatenation's output)."""
    return r.kind == "arena" and r.within == 0 and _units(r.nbytes) == tensors[r.tensor].size


def _in_place_pairs(program: Program, tensors: dict[int, Tensor]) -> list[InPlace]:
    pairs = []
    for k, step in enumerate(program.steps):
        if not isinstance(step, KernelCall):
            continue
        args = [a for a in step.args if a.kind != "scratch"]  # a TIR kernel's scratch comes after its output
        y = args[-1]
        if step.extern and step.kernel in STREAMING:
            candidates = [(args[0], _distance_units(STREAMING[step.kernel][0](program.constants[args[-2].index])))]
        elif _elementwise(program, step):  # element i written after its inputs' element i is read, ascending
            candidates = [(x, 0) for x in args[:-1] if x.nbytes == y.nbytes]
        else:
            continue
        for x, distance in candidates:
            if (_whole(x, tensors) and _whole(y, tensors) and tensors[x.tensor].last == k and tensors[y.tensor].first == k
                    and sum(a.kind == "arena" and a.tensor == x.tensor for a in args) == 1):
                pairs.append(InPlace(k, x.tensor, y.tensor, distance))
    return pairs


def _conflicts(tensors: list[Tensor]) -> list[tuple[int, int]]:
    out = []
    for i, a in enumerate(tensors):
        for b in tensors[i + 1:]:
            if a.first <= b.last and b.first <= a.last:
                out.append((a.key, b.key))
    return out


class _Rules:
    """Whether two tensors may sit where they are: disjoint, or an in-place pair within its distance."""

    def __init__(self, tensors: list[Tensor], pairs: list[InPlace]):
        self.size = {t.key: t.size for t in tensors}
        self.pair = {(p.output, p.input): p for p in pairs}

    def ok(self, a: int, oa: int, b: int, ob: int) -> bool:
        if oa + self.size[a] <= ob or ob + self.size[b] <= oa:
            return True
        for (y, oy), (x, ox) in (((a, oa), (b, ob)), ((b, ob), (a, oa))):
            p = self.pair.get((y, x))
            if p is not None:
                return p.distance is None or oy + p.distance <= ox
        return False


def live_bound(tensors: list[Tensor]) -> int:
    """The most units alive at one step: a lower bound of any plan without overlaps."""
    if not tensors:
        return 0
    change = np.zeros(max(t.last for t in tensors) + 2, dtype=np.int64)
    for t in tensors:
        change[t.first] += t.size
        change[t.last + 1] -= t.size
    return int(np.cumsum(change).max())


def _greedy(tensors: list[Tensor], conflicts, rules: _Rules) -> dict[int, int]:
    """First fit, largest first (as TFLite Micro's greedy planner), with in-place positions as candidates."""
    neighbours: dict[int, set] = {t.key: set() for t in tensors}
    for a, b in conflicts:
        neighbours[a].add(b)
        neighbours[b].add(a)
    placed: dict[int, int] = {}
    for t in sorted(tensors, key=lambda t: (-t.size, t.first, t.key)):
        near = [n for n in neighbours[t.key] if n in placed]
        candidates = {0} | {placed[n] + rules.size[n] for n in near}
        for n in near:
            if (p := rules.pair.get((t.key, n))) is not None:  # t written over n
                candidates.add(placed[n] - (p.distance or 0))
            if (p := rules.pair.get((n, t.key))) is not None:  # n written over t
                candidates.add(placed[n] + (p.distance or 0))
        placed[t.key] = next(o for o in sorted(c for c in candidates if c >= 0)
                             if all(rules.ok(t.key, o, n, placed[n]) for n in near))
    return placed


def _ilp(tensors: list[Tensor], conflicts, rules: _Rules, bound: int,
         node_limit: int = NODE_LIMIT) -> tuple[dict[int, int], bool] | None:
    """min arena s.t. conflicting tensors are disjoint (or in place within distance). None: no better answer."""
    from scipy.optimize import Bounds, LinearConstraint, milp
    from scipy.sparse import coo_array

    index = {t.key: i for i, t in enumerate(tensors)}
    pairs = [(a, b) for a, b in conflicts
             if not any(p.distance is None for p in (rules.pair.get((a, b)), rules.pair.get((b, a))) if p)]
    nt, nz = len(tensors), len(pairs)
    m = nt  # the arena's size, after the offsets
    reaches = [abs(p.distance) for p in rules.pair.values() if p.distance is not None]
    big = 2 * bound + max(reaches, default=0) + 1  # relaxes a disjunct that z switches off
    entries, hi = [], []  # (row, column, coefficient) of a sparse matrix: two rows per pair

    def row(coeffs: dict, upper: float):
        entries.extend((len(hi), j, v) for j, v in coeffs.items())
        hi.append(upper)

    for t in tensors:  # offset + size <= arena
        row({index[t.key]: 1, m: -1}, -t.size)
    for z, (a, b) in enumerate(pairs):
        ia, ib, iz = index[a], index[b], nt + 1 + z
        # z = 0: a below b; z = 1: b below a. Below an in-place partner, the distance replaces the size.
        reach_a = rules.pair[(a, b)].distance if (a, b) in rules.pair else rules.size[a]
        reach_b = rules.pair[(b, a)].distance if (b, a) in rules.pair else rules.size[b]
        row({ia: 1, ib: -1, iz: -big}, -reach_a)
        row({ib: 1, ia: -1, iz: big}, big - reach_b)
    c = np.zeros(nt + 1 + nz)
    c[m] = 1
    integrality = np.ones(nt + 1 + nz)
    upper = np.concatenate([np.full(nt + 1, bound), np.ones(nz)])
    r, col, v = zip(*entries)
    a = coo_array((v, (r, col)), shape=(len(hi), nt + 1 + nz)).tocsr()
    res = milp(c, constraints=LinearConstraint(a, -np.inf, np.array(hi)), integrality=integrality,
               bounds=Bounds(np.zeros(nt + 1 + nz), upper),
               options={"node_limit": node_limit, "presolve": True, "time_limit": 600.0})
    if res.x is None:
        return None
    offsets = {t.key: round(res.x[index[t.key]]) for t in tensors}
    return offsets, res.status == 0


def plan(program: Program, policy: str = "tvm") -> Program:
    """A new Program with the arena laid out by `policy` (the input is left as it was)."""
    if policy not in POLICIES:
        raise ValueError(f"memory policy '{policy}': one of {', '.join(POLICIES)}")
    if policy == "tvm":
        return program
    tvm_plan = program
    program, concatenations = concat_in_place(program)
    result = plan_offsets(program, policy)
    if result.arena_bytes > tvm_plan.arena_bytes or (  # e.g. a greedy plan of a large graph
            result.arena_bytes == tvm_plan.arena_bytes and not result.overlapped and not concatenations.concatenations):
        return replace(tvm_plan, notes=tvm_plan.notes + (
            f"memory: the {policy} plan ({result.arena_bytes:,} B) is no smaller than TVM's: TVM's kept",))
    overlapped = set(result.overlapped)

    def place(r: Region) -> Region:
        return replace(r, offset=result.offsets[r.tensor] + r.within) if r.kind == "arena" else r

    steps, unaliased = [], set()
    for k, step in enumerate(program.steps):
        if isinstance(step, KernelCall):
            kernel = step.kernel
            if k in overlapped and step.extern:
                kernel = STREAMING[kernel][1]
            elif k in overlapped:
                unaliased.add(kernel)
            step = replace(step, args=tuple(place(a) for a in step.args), kernel=kernel)
        else:
            step = replace(step, src=place(step.src), dst=place(step.dst))
        steps.append(step)
    kernels = program.kernels
    if unaliased:  # TVM declares buffer pointers noalias to LLVM: overlapped, the loop's order has to stay
        import tvm

        kernels = tvm.IRModule({gv: f.with_attr("tirx.noalias", False) if gv.name_hint in unaliased else f
                                for gv, f in program.kernels.functions.items()})
    note = (f"memory: {policy} plan, arena {result.arena_bytes:,} B (TVM's plan {tvm_plan.arena_bytes:,} B)"
            + (f", {len(overlapped)} layer(s) in place" if overlapped else "")
            + ("" if result.optimal else ", not proven optimal"))
    return replace(program, kernels=kernels, steps=tuple(steps), arena_bytes=result.arena_bytes,
                   notes=program.notes + (note,))


def plan_offsets(program: Program, policy: str) -> MemoryPlan:
    tensors = _tensors(program)
    by_key = {t.key: t for t in tensors}
    pairs = _in_place_pairs(program, by_key) if policy == "inplace" else []
    rules = _Rules(tensors, pairs)
    conflicts = _conflicts(tensors)
    offsets = _greedy(tensors, conflicts, rules)
    arena = max((offsets[t.key] + t.size for t in tensors), default=0)
    # no plan is smaller than the bytes alive at the busiest step (overlaps aside): a greedy plan that reaches it
    # is optimal, and the integer program (seconds to a minute on a long unrolled network) is not needed
    optimal = not pairs and arena == live_bound(tensors)
    if tensors and not optimal and len(conflicts) <= MAX_PAIRS:
        solved = _ilp(tensors, conflicts, rules, arena, NODE_LIMIT if pairs else NODE_LIMIT_NO_OVERLAPS)
        if solved is not None:
            candidate, proven = solved
            size = max(candidate[t.key] + t.size for t in tensors)
            if size <= arena and all(rules.ok(a, candidate[a], b, candidate[b]) for a, b in conflicts):
                offsets, arena, optimal = candidate, size, proven
    overlapped = tuple(p.step for p in pairs
                       if offsets[p.output] < offsets[p.input] + by_key[p.input].size
                       and offsets[p.input] < offsets[p.output] + by_key[p.output].size)
    return MemoryPlan(policy, {k: v * ARENA_ALIGN for k, v in offsets.items()}, arena * ARENA_ALIGN, overlapped,
                      optimal)
