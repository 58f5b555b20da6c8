"""Staged rollout decisions: plain data in, the next step out (no database, no network).

A deployment's devices are ordered and cut into stages by cumulative percentage (e.g. 10, 50, 100).
A stage is notified as a whole. The next stage starts when the succeeded fraction of the current
stage reaches the success threshold; the whole rollout halts as soon as the failed fraction of the
devices notified so far reaches the error threshold, and no later stage is ever notified.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

TERMINAL = ("succeeded", "failed", "rejected", "timed_out", "cancelled")
FAILED = ("failed", "rejected", "timed_out")  # timed_out: a notified device said nothing for the plan's job_timeout
JOB_TIMEOUT_RANGE = (10, 7 * 24 * 3600)  # seconds


@dataclass(frozen=True)
class RolloutPlan:
    stages: tuple[int, ...] = (100,)  # cumulative percentages, increasing, ending at 100
    success_threshold: float = 1.0  # fraction of a stage that must succeed before the next one starts
    error_threshold: float = 0.1  # fraction of notified devices failed that halts the rollout
    job_timeout: int = 1800  # seconds a notified device may stay silent before its job counts as failed

    def problems(self) -> dict[str, str]:
        """Field name -> what is wrong with it (empty when the plan is valid)."""
        out = {}
        s = list(self.stages)
        if not s or any(not 0 < p <= 100 for p in s) or s != sorted(set(s)) or s[-1] != 100:
            out["stages"] = "cumulative percentages, strictly increasing, each in 1..100, the last 100"
        if not 0 < self.success_threshold <= 1:
            out["success_threshold"] = "a fraction in (0, 1]"
        if not 0 < self.error_threshold <= 1:
            out["error_threshold"] = "a fraction in (0, 1]"
        low, high = JOB_TIMEOUT_RANGE
        if not low <= self.job_timeout <= high:
            out["job_timeout"] = f"seconds in {low}..{high}"
        return out


def stage_bounds(plan: RolloutPlan, n_devices: int) -> list[tuple[int, int]]:
    """[start, end) device indexes of each stage; every stage has at least one device while any remain."""
    bounds, start = [], 0
    for pct in plan.stages:
        end = min(n_devices, max(start + 1, math.ceil(n_devices * pct / 100)))
        if end > start:
            bounds.append((start, end))
        start = end
    return bounds


@dataclass(frozen=True)
class Decision:
    state: str  # "in_progress", "succeeded", "halted"
    notify_stage: int | None  # a stage to notify now, or None
    reason: str = ""


def decide(plan: RolloutPlan, statuses: list[str], current_stage: int) -> Decision:
    """Given each device's job status (in stage order) and the stage notified last, what happens next."""
    bounds = stage_bounds(plan, len(statuses))
    if not bounds:
        return Decision("succeeded", None, "no devices")
    if current_stage < 0:
        return Decision("in_progress", 0)
    notified = statuses[: bounds[current_stage][1]]
    failed = sum(s in FAILED for s in notified)
    if failed and failed / len(notified) >= plan.error_threshold:
        return Decision("halted", None, f"{failed} of {len(notified)} notified devices failed "
                        f"(error threshold {plan.error_threshold:.0%})")
    start, end = bounds[current_stage]
    stage = statuses[start:end]
    succeeded = sum(s == "succeeded" for s in stage)
    if current_stage + 1 < len(bounds):
        if succeeded / len(stage) >= plan.success_threshold:
            return Decision("in_progress", current_stage + 1)
        if all(s in TERMINAL for s in stage):
            return Decision("halted", None, f"stage {current_stage + 1}: {succeeded} of {len(stage)} succeeded "
                            f"(success threshold {plan.success_threshold:.0%})")
        return Decision("in_progress", None)
    if all(s in TERMINAL for s in statuses):
        return Decision("succeeded", None, f"{sum(s == 'succeeded' for s in statuses)} of {len(statuses)} updated")
    return Decision("in_progress", None)
