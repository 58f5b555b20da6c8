"""Schedule stage: TIR schedules applied to each fused kernel.

The default schedule inlines every injective stage (padding, bias, requantization, activation)
into its consumer and computes each reduction's epilogue right after the reduction of one
output element, so the intermediates shrink to registers and no full-size temporary remains.
"""

from __future__ import annotations


def root_blocks(sch):
    return sch.get_child_blocks(sch.get_sblock("root"))


KEEP_PREFIX = "keep_"  # stages a kernel wants materialized per element rather than inlined


def inline_injective(sch) -> None:
    from tvm.s_tir import ScheduleError

    changed = True
    while changed:
        changed = False
        for block in root_blocks(sch):
            if sch.get(block).name_hint.startswith(KEEP_PREFIX):
                continue
            after_keep = any(sch.get(p).name_hint.startswith(KEEP_PREFIX) for p in sch.get_producers(block))
            for inline in (sch.compute_inline,) if after_keep else (sch.compute_inline, sch.reverse_compute_inline):
                try:
                    inline(block)
                except ScheduleError:  # not inlinable here
                    continue
                changed = True
                break
            if changed:
                break


def epilogue_at_reduction(sch) -> None:
    from tvm.s_tir import ScheduleError

    for block in root_blocks(sch):
        iters = sch.get(block).iter_vars
        spatial = sum(1 for iv in iters if int(iv.iter_type) == 0)
        if spatial == len(iters) or spatial == 0:
            continue
        loops = sch.get_loops(block)
        for consumer in sch.get_consumers(block):
            try:
                sch.reverse_compute_at(consumer, loops[spatial - 1])
            except ScheduleError:  # the consumer cannot follow this reduction: it stays a separate loop nest
                continue


def keep_stages_at_consumer(sch) -> None:
    """Compute each keep_ stage inside its consumer's innermost loop: one element, held in a register (where a layer
    schedule left it beside its consumer in a tile, it stays there: a tile of registers)."""
    from tvm.s_tir import ScheduleError

    for block in root_blocks(sch):
        if not sch.get(block).name_hint.startswith(KEEP_PREFIX):
            continue
        consumers = sch.get_consumers(block)
        if len(consumers) == 1:
            try:
                sch.compute_at(block, sch.get_loops(consumers[0])[-1])
            except ScheduleError:
                continue


def init_before_extremum(sch, every_reduction: bool = False) -> None:
    """Write a max/min reduction's initial value in a loop of its own, before the reduction loops. Left in the loop
    (`if k == 0`), LLVM may load the output's stale value and branch on it (a core without a max instruction), so
    the instruction count would depend on what the arena held before: the count of one input must repeat.
    (Doing it for every reduction changes counts both ways, by up to 41%: a schedule choice for the search.)"""
    from tvm import tirx

    for block in root_blocks(sch):
        stmt = sch.get(block)
        if stmt.init is None or not isinstance(stmt.body, tirx.BufferStore):
            continue
        if not every_reduction and not isinstance(stmt.body.value, (tirx.Max, tirx.Min)):
            continue
        spatial = sum(1 for iv in stmt.iter_vars if int(iv.iter_type) == 0)
        loops = sch.get_loops(block)
        if len(loops) > spatial:
            sch.decompose_reduction(block, loops[spatial])


def unroll_innermost_reduction(sch, max_extent: int) -> None:
    """Unroll each reduction's innermost loop where its extent is a constant of at most `max_extent`."""
    from tvm import tirx

    for block in root_blocks(sch):
        stmt = sch.get(block)
        if stmt.init is None and not any(int(iv.iter_type) == 2 for iv in stmt.iter_vars):
            continue
        loops = sch.get_loops(block)
        if not loops:
            continue
        extent = sch.get(loops[-1]).extent
        if isinstance(extent, tirx.IntImm) and 1 < int(extent) <= max_extent:
            sch.unroll(loops[-1])


def default_schedule(func, decompose_init: bool = False, unroll: int = 0):
    """The schedule of every TIR kernel; the keyword arguments are the variant search's choices (ScheduleSpec)."""
    from tvm import s_tir

    from tinymlaas.ir import layer_schedule

    tuned = layer_schedule.of_func(func)
    if tuned is not None:  # the layer's own schedule (the attribute goes: equal kernels stay shared)
        func = func.without_attr(layer_schedule.ATTR)
    sch = s_tir.Schedule(func)
    inline_injective(sch)
    if tuned is not None and layer_schedule.apply(sch, tuned):
        keep_stages_at_consumer(sch)
        return sch.mod["main"]
    epilogue_at_reduction(sch)
    keep_stages_at_consumer(sch)
    init_before_extremum(sch, every_reduction=decompose_init)
    if unroll:
        unroll_innermost_reduction(sch, unroll)
    return sch.mod["main"]


def schedule_for(spec=None):
    """The schedule function for a search.space.ScheduleSpec (None: the default)."""
    if spec is None or (not spec.decompose_init and not spec.unroll):
        return default_schedule  # still applies each layer's own schedule (layer_schedule.ATTR)
    return lambda func: default_schedule(func, spec.decompose_init, spec.unroll)
