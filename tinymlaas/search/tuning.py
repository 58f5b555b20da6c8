"""Layer-by-layer schedule tuning (the search strategy "tune").

Every convolution, depthwise convolution and fully connected layer with a TIR kernel has a space of schedules
(ir/layer_schedule.py: register tiles, loop orders, unrolling, the zero point folded, where requantization goes;
about a thousand or more points for a typical convolution) beside our C kernels. Layers of one signature (operator,
shapes, strides, padding, activation, precision) cost the same in any model, so they are tuned once per target:

1. the tuning log (measure/tuning_log.py) says what is known already about each signature: from this model or any
   other, on this machine or another worker;
2. the C kernels each layer offers are profiled once (one build each, every layer at once), then the two
   register-blocked schedules the core's register file suggests (layer_schedule.register_blocked);
3. rounds: every build gives each signature one candidate schedule, and the build is profiled layer by layer in
   QEMU (exact instructions and per-block counts, the cycle estimate from them), so one build measures one
   schedule of every layer. Which candidate: the schedule predictor (predictor.SchedulePredictor: gradient-boosted
   trees over the schedule's knobs and the code they imply per MAC, trained on the log of this target across
   models) ranks the layer's whole space and the best not yet measured is built; without enough records, seeded
   random picks;
4. assembly: each layer takes its cheapest measured candidate (C kernel or schedule); the whole model is built
   and verified against the interpreter like any point of a search.

The cost is the core's estimated cycles where it has a pipeline table (Cortex-M), else exact instructions.
"""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tinymlaas.ir.layer_schedule import KernelShape, LayerSchedule, kernel_shape, register_blocked, space_of
from tinymlaas.measure.tuning_log import TuningLog, candidate_key
from tinymlaas.search.predictor import SchedulePredictor, TunedLayer
from tinymlaas.search.space import Variant


@dataclass(frozen=True)
class LayerGroup:
    """The layers of one signature in a model: tuned as one."""
    signature: str  # JSON
    shape: KernelShape
    op_indices: tuple[int, ...]
    implementations: tuple[str, ...]  # the kernels the layers offer besides the TIR one (C kernels)
    space: tuple[LayerSchedule, ...]


ROUND = 2  # profiled builds per round: the predictor is refitted between rounds
ACCUMULATORS = {"riscv": 16, "arm": 8}  # register-tile accumulators a core's register file holds beside the operands
KERNELS_REVISION = 10  # raised when the code the kernels compile to changes: older log records no longer hold


def log_target(target) -> str:
    """The tuning log's target column: the target's name and a fingerprint of how its kernels are compiled and
    costed (the LLVM target, the C compiler and its flags, KERNELS_REVISION, the cycle estimate's settings), so a
    record measured under another code generator or cost model is not taken for this one's."""
    import hashlib

    codegen = json.dumps({"llvm": target.llvm, "cc": [target.cc_prefix, *target.cc_flags],
                          "revision": KERNELS_REVISION, "estimate": target.estimate}, sort_keys=True)
    return f"{target.name}#{hashlib.sha256(codegen.encode()).hexdigest()[:8]}"


def layer_signature(graph, op) -> str:
    """What a layer's cost depends on, as JSON (the target is a column of its own)."""
    x, w, out = graph.tensor(op.inputs[0]), graph.tensor(op.inputs[1]), graph.tensor(op.outputs[0])
    keys = ("strideH", "strideW", "dilationHFactor", "dilationWFactor", "padding", "explicitPadding",
            "fusedActivationFunction", "depthMultiplier", "keepNumDims")
    return json.dumps({"opcode": op.opcode, "precision": graph.precision(op), "input": list(x.shape),
                       "weights": list(w.shape), "output": list(out.shape),
                       "options": {k: op.opt(k, None) for k in keys if op.opt(k, None) is not None},
                       "zero_point": bool(x.zero_point)}, sort_keys=True)


def layer_groups(graph, target) -> list[LayerGroup]:
    """The tunable layers of a model on a target, grouped by signature (in the order of their first layer)."""
    from tinymlaas.ops.registry import candidates

    groups: dict[str, list] = {}
    for op in graph.operators:
        shape = kernel_shape(graph, op, target)
        offered = candidates(graph, op, target)
        if shape is None or "tir" not in offered:
            continue
        sig = layer_signature(graph, op)
        groups.setdefault(sig, [shape, [], tuple(i for i in offered if i != "tir")])[1].append(op.index)
    return [LayerGroup(sig, shape, tuple(ops), impls, tuple(space_of(shape)))
            for sig, (shape, ops, impls) in groups.items()]


def cost_of(row: dict, by_estimate: bool) -> float | None:
    return row.get("cycles_estimate") if by_estimate else row.get("instructions")


def training_samples(rows: list[dict], by_estimate: bool, exclude_model: str | None = None) -> list:
    """(TunedLayer, schedule, cost) of the TIR candidates in tuning-log rows (a model left out, for held-out
    figures)."""
    out = []
    for r in rows:
        cost = cost_of(r, by_estimate)
        if r["schedule"] is None or not cost or r["model_name"] == exclude_model:
            continue
        shape = r["layer"].get("kernel_shape")
        if shape is None:
            continue
        layer = TunedLayer(KernelShape(**{**shape, "reduction": tuple(shape["reduction"])}),
                           json.dumps(r["layer"], sort_keys=True))
        out.append((layer, LayerSchedule.from_dict(r["schedule"]), float(cost)))
    return out


@dataclass
class LayerState:
    group: LayerGroup
    measured: dict  # candidate -> row (from the log and from this run)
    order: list[int]  # indices into group.space, the next to build first

    def next_schedule(self) -> LayerSchedule | None:
        while self.order:
            s = self.group.space[self.order.pop(0)]
            if candidate_key("tir", s) not in self.measured:
                return s
        return None

    def best(self, by_estimate: bool) -> tuple[str, LayerSchedule | None, float] | None:
        """The cheapest candidate measured: (implementation, schedule or None, cost)."""
        found = [(cost_of(r, by_estimate), k, r) for k, r in self.measured.items() if cost_of(r, by_estimate)]
        if not found:
            return None
        cost, key, row = min(found, key=lambda t: (t[0], t[1]))
        impl = key.split(":", 1)[0]
        return impl, (LayerSchedule.from_dict(row["schedule"]) if row["schedule"] else None), cost


def _log_layer(group: LayerGroup) -> str:
    """The signature as logged: with its kernel shape (what the predictor learns from)."""
    d = json.loads(group.signature)
    d["kernel_shape"] = {**group.shape.__dict__, "reduction": list(group.shape.reduction)}
    return json.dumps(d, sort_keys=True)


def _profile_steps(args) -> dict:
    """One variant profiled layer by layer in QEMU (in a worker): per operator, instructions and estimated cycles."""
    model_path, target, variant_dict, workdir = args
    from tinymlaas.backends.mcu.profile import profile_model
    from tinymlaas.errors import InternalError, TinyMLaaSError

    try:
        prof = profile_model(model_path, target, Path(workdir), emulator="qemu",
                             variant=Variant.from_dict(variant_dict))
    except (TinyMLaaSError, InternalError) as e:  # one candidate refused or failed: the others go on (noted)
        return {"error": str(e).splitlines()[0][:300]}
    except Exception as e:  # noqa: BLE001 - a compiler failure on one generated candidate: noted, never chosen
        return {"error": f"internal error ({type(e).__name__}): {str(e).splitlines()[0][:300]}"}
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    per_op: dict[int, list] = {}
    for s in prof.steps:
        if s.op_index is not None:
            acc = per_op.setdefault(s.op_index, [0, 0.0])
            acc[0] += s.instructions
            acc[1] += s.cycles_estimate or 0.0
    return {"verified": prof.verified, "per_op": {str(k): v for k, v in per_op.items()}}


def tune_strategy(ctx, screen: bool = True):
    """The search strategy "tune" (see the module's docstring); `ctx` is strategies.Context. screen=False: the
    candidates in seeded random order, no predictor (the baseline it is measured against, "tune-random").

    A signature whose log already holds as many schedules as this run would build is settled: it costs no build
    (a second model with the same layers, or the same model again, goes straight to assembly).
    The history of the tuned layers' cost (the sum of each layer's best so far, after each profiled build) is
    written to tuning_history.json in the work folder."""
    from tinymlaas.search.strategies import Outcome

    ev, target, graph = ctx.evaluator, ctx.target, ctx.graph
    by_estimate = target.arch == "arm"  # a pipeline table: rank by estimated cycles
    ev.estimate = by_estimate
    rtl = target.rtl is not None
    if rtl:  # candidates in QEMU (fast); the tuned and the default build confirmed on the RTL model at the end
        ev.emulator = "qemu"
    default = ctx.space.default()
    ev.run([default], ctx.budget)  # point 0: the baseline
    groups = layer_groups(graph, target)
    if not groups:
        return Outcome(notes=["no layer of this model has a tunable kernel: only the default build was made"])
    log, logged_as = TuningLog(), log_target(target)
    rng = np.random.default_rng(ctx.seed)
    states = [LayerState(g, log.measured(logged_as, _log_layer(g)), list(rng.permutation(len(g.space))))
              for g in groups]
    known_before = sum(1 for st in states if st.measured)
    profiles = max(0, ctx.budget - len(ev.points) - 1)  # the last build: the assembled variant
    impls = sorted({i for st in states for i in st.group.implementations} | {"tir"})
    for st in states:  # settled: the log holds the schedules a fresh run of this budget would measure
        if sum(1 for key in st.measured if ":" in key) >= profiles - len(impls):
            st.order = []
    history: list[dict] = []

    def tuned_cost() -> float | None:
        best = [st.best(by_estimate) for st in states]
        if any(b is None for b in best):
            return None
        return sum(b[2] * len(st.group.op_indices) for st, b in zip(states, best))
    built, screened, failed = 0, 0, []
    model_name = Path(ev.model_path).stem

    def run_round(variants: list[Variant], picks: list[list]) -> None:
        nonlocal built
        jobs = [(ev.model_path, target.name, v.to_dict(), str(ev.workdir / f"tune{built + k:04d}"))
                for k, v in enumerate(variants)]
        for k, (v, result) in enumerate(zip(variants, ev.map(_profile_steps, jobs))):
            built += 1
            if ev.progress:
                ev.progress(len(ev.points) + built, ctx.budget, None)
            if result.get("error") or not result.get("verified"):
                failed.append(result.get("error") or "outputs differ from the interpreter's")
                continue  # a candidate that does not verify is never chosen (and not logged)
            for st, (impl, schedule) in zip(states, picks[k]):
                counts = [result["per_op"].get(str(i)) for i in st.group.op_indices]
                if any(c is None for c in counts):
                    continue
                row = {"instructions": round(sum(c[0] for c in counts) / len(counts)),
                       "cycles_estimate": sum(c[1] for c in counts) / len(counts), "cycles": None,
                       "schedule": schedule.to_dict() if schedule else None, "model_name": model_name}
                key = candidate_key(impl, schedule)
                if key not in st.measured:
                    log.record(logged_as, _log_layer(st.group), key, **row)
                    st.measured[key] = row
            history.append({"build": built, "tuned_layers_cost": tuned_cost()})

    def variant_of(picks: list) -> Variant:
        kernels, layers = dict(default.kernels), {}
        for st, (impl, schedule) in zip(states, picks):
            for i in st.group.op_indices:
                kernels[i] = impl
                if schedule is not None:
                    layers[i] = schedule
        return Variant(kernels=tuple(sorted(kernels.items())), layers=tuple(sorted(layers.items())))

    # the C kernels and the plain TIR kernel, where the log lacks them: one build each, every layer at once
    baseline = []
    for impl in impls:
        picks = [(impl if impl in (*st.group.implementations, "tir") else "tir", None) for st in states]
        if any(candidate_key(p[0]) not in st.measured for st, p in zip(states, picks)):
            baseline.append(picks)
    # then the register-blocked schedules the core's register file suggests (layer_schedule.register_blocked):
    # anchors for the predictor before it has records of its own
    seeds = [register_blocked(st.group.shape, st.group.space, ACCUMULATORS[target.arch]) for st in states]
    for k in range(max((len(x) for x in seeds), default=0)):
        picks = [("tir", x[k]) if k < len(x) else (st.best(by_estimate) or ("tir", None))[:2]
                 for st, x in zip(states, seeds)]
        if any(p[1] is not None and candidate_key("tir", p[1]) not in st.measured for st, p in zip(states, picks)):
            baseline.append(picks)
    baseline = baseline[:profiles]
    run_round([variant_of(p) for p in baseline], baseline)
    batch = ROUND  # not the worker count: the same seed picks the same candidates on any pool
    while built < profiles:
        if screen:
            screened += _rank(states, log.rows(logged_as), by_estimate, ctx.seed)
        picks_list = []
        for _ in range(min(batch, profiles - built)):
            picks = []
            for st in states:
                s = st.next_schedule()
                picks.append(("tir", s) if s is not None else (st.best(by_estimate) or ("tir", None))[:2])
            if all(p[1] is None or candidate_key("tir", p[1]) in st.measured for st, p in zip(states, picks)):
                break
            picks_list.append(picks)
        if not picks_list:
            break
        run_round([variant_of(p) for p in picks_list], picks_list)
    best = [st.best(by_estimate) for st in states]
    chosen = [(b[0], b[1]) if b else ("tir", None) for b in best]
    assembled = variant_of(chosen)
    ev.run([assembled], ctx.budget + 1)
    confirmed = ev.confirm(sorted({0, len(ev.points) - 1})) if rtl else []
    tuned = sum(len(st.group.op_indices) for st, c in zip(states, chosen) if c[1] is not None)
    untuned = sum(len(st.group.op_indices) for st, c in zip(states, chosen) if c[1] is None)
    notes = [f"{len(groups)} layer signatures ({sum(len(g.op_indices) for g in groups)} layers), "
             f"{sum(len(g.space) for g in groups):,} schedules in their spaces; {built} profiled builds"
             + (f"; the predictor ranked {screened:,} candidates" if screened else ""),
             f"{known_before} of {len(groups)} signatures had records in the tuning log before this run",
             f"assembled: {tuned} layers on a tuned TIR schedule, {untuned} on a C or plain kernel"]
    if failed:
        notes.append(f"{len(failed)} profiled builds failed or did not verify (none chosen): {failed[0]}")
    (ev.workdir / "tuning_history.json").write_text(json.dumps(
        {"cost": "cycles_estimate" if by_estimate else "instructions", "screened": screen, "history": history,
         "baseline_builds": len(baseline),  # the C kernels, the plain TIR kernel, the register-blocked seeds
         "layers": [{"signature": json.loads(st.group.signature), "ops": list(st.group.op_indices),
                     "measured": len(st.measured), "space": len(st.group.space),
                     "best": _best_dict(st.best(by_estimate))} for st in states]},
        indent=1))
    combinations = math.prod(len(st.group.space) + len(st.group.implementations) for st in states)
    return Outcome(screened=screened, confirmed=confirmed, notes=notes, space_size=combinations)


def _best_dict(best) -> dict | None:
    if best is None:
        return None
    impl, schedule, cost = best
    return {"implementation": impl, "schedule": schedule.to_dict() if schedule else None, "cost": cost}


def _rank(states: list[LayerState], rows: list[dict], by_estimate: bool, seed: int) -> int:
    """Reorder each layer's unmeasured candidates by the schedule predictor (trained on the log of this target);
    left in seeded random order where it cannot be trained yet. Returns how many candidates were ranked."""
    samples = training_samples(rows, by_estimate)
    try:
        predictor = SchedulePredictor(seed).fit(samples)
    except ValueError:
        return 0
    ranked, rng = 0, np.random.default_rng([seed, len(rows)])  # the same picks for the same seed and log
    for st in states:
        if not st.order:
            continue
        scores = predictor.predict(TunedLayer(st.group.shape, _log_layer(st.group)),
                                   [st.group.space[i] for i in st.order])
        # mostly the predicted best; every fourth pick a random one of the rest: the log then holds samples from
        # the whole space, which is what ranking the next model's layers (unlike these) needs
        by_score = [st.order[i] for i in np.argsort(scores, kind="stable")]
        head, tail = by_score[: math.ceil(len(by_score) / 4)], by_score[math.ceil(len(by_score) / 4):]
        mixed = []
        for k, i in enumerate(head):
            mixed.append(i)
            if k % 3 == 2 and tail:
                mixed.append(tail.pop(int(rng.integers(len(tail)))))
        st.order = mixed + tail
        ranked += len(by_score)
    return ranked
