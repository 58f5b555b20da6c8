"""The variant search: build and run candidates of the Space with a strategy, keep the Pareto front, pick the best
that fits.

Every point is really built, run in the emulator and verified against the interpreter (evaluate.py); one that does
not verify or does not fit is kept as infeasible, never on the front (result.py: the points, the objectives, the
front). The strategies (strategies.py) decide which variants to build. The same seed gives the same points in the
same order, whatever the number of workers.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path

from tinymlaas.build.request import BuildRequest
from tinymlaas.search.evaluate import Evaluator, seeds
from tinymlaas.search.result import Constraints, SearchResult, pareto_front
from tinymlaas.search.space import Space, Variant
from tinymlaas.search.strategies import STRATEGIES, Context


def check_searchable(target) -> None:
    """The search builds firmware variants: a target whose backend is not searched is refused, saying what to do."""
    from tinymlaas.backends import backend_for
    from tinymlaas.errors import BuildFailure

    if not backend_for(target).searchable:
        raise BuildFailure(f"the variant search is for microcontroller targets; build for {target.name} with "
                           "`tinymlaas compile` (--precision, --tune-trials)")


def low_bit_ladder(model, request: BuildRequest) -> tuple[list[tuple[tuple, dict | None]], list[str]]:
    """The weight plans a search builds, int8 first and the requested one last (--weights int4/palette/auto, chosen
    once: with auto, by accuracy on --validation, with up to two plans it kept on its way between), each with its
    accuracy (None without --validation); and what the search's notes say of them. [] when all stay int8."""
    from tinymlaas.frontend.lowbit import LOW_BIT, WEIGHT_SETS, low_bit_weights

    if request.weights in WEIGHT_SETS:
        return explored_weights(model, request)
    if request.weights not in LOW_BIT:
        return [], []
    ladder: list = []
    _, layers, accuracy = low_bit_weights(model, request, ladder=ladder)
    plan = tuple((w.op, w.precision) for w in layers if w.precision != "int8")
    note = (f"weights below eight bits in every point: {', '.join(f'#{op} {p}' for op, p in plan) or 'none'}"
            + (f"; {len(ladder) - 1} other plan(s) built on the best of them" if len(ladder) > 1 else ""))
    if accuracy:
        note += (f"; {accuracy['metric']} {accuracy['value']:.4f} on {accuracy['samples']} samples, the model as given "
                 f"{accuracy['reference']:.4f}")
    return [(tuple(sorted(rung.items())), acc) for rung, acc in ladder], [note]


def explored_weights(model, request: BuildRequest) -> tuple[list[tuple[tuple, dict | None]], list[str]]:
    """--weights as a set (int4,palette,auto): each precision's plan (int4 or palette<--palette-bits> in every
    eligible layer; auto's per layer, with the plans it kept on its way), each measured on --validation. The plan
    asked of every candidate is the one of fewest weight bytes within --max-accuracy-drop (int8 where none is); the
    others, int8 first, are the ladder's other rungs, built on the best variant: a plan beyond the limit is built and
    measured, but infeasible, so never on the front nor chosen. Same shape as low_bit_ladder's answer."""
    from tinymlaas.build.request import InvalidRequest
    from tinymlaas.frontend.lowbit import low_bit_weights

    limit = request.max_accuracy_drop
    if limit is not None and not request.validation:
        raise InvalidRequest("max_accuracy_drop", "needs --validation data.npz to measure the accuracy on")
    accuracy: dict[tuple, dict | None] = {}  # every plan built, int8 first
    chosen_by: dict[tuple, tuple[str, int]] = {}  # each precision's own plan: (the precision, its weight bytes)
    for precision in request.weights.split(","):
        ladder: list = []
        # a uniform plan is measured, not refused, beyond the limit (the search keeps it off the front); auto's
        # choice is the limit's
        one = replace(request, weights=precision, max_accuracy_drop=limit if precision == "auto" else None)
        _, layers, _ = low_bit_weights(model, one, ladder=ladder)
        for rung, acc in ladder:
            accuracy.setdefault(tuple(sorted(rung.items())), acc)
        own = tuple((w.op, w.precision) for w in layers if w.precision != "int8")
        accuracy.setdefault(own, ladder[-1][1] if ladder else None)
        name = f"palette{request.palette_bits}" if precision == "palette" else precision
        chosen_by.setdefault(own, (name, sum(w.nbytes for w in layers)))

    def within(plan: tuple) -> bool:
        return limit is None or accuracy[plan] is None or accuracy[plan]["drop"] <= limit

    fits = [plan for plan in chosen_by if within(plan)]
    asked = min(fits, key=lambda plan: chosen_by[plan][1]) if fits else ()
    accuracy.setdefault((), None)
    notes = []
    for plan, (precision, nbytes) in chosen_by.items():
        acc = accuracy[plan]
        notes.append(f"weights {precision}: {len(plan)} layer(s) below eight bits, {nbytes:,} B of layer weights"
                     + (f", {acc['metric']} {acc['value']:.4f} ({acc['drop']:.2f} points lost)" if acc else "")
                     + ("" if within(plan) else f": beyond --max-accuracy-drop {limit:g}, built but off the front"))
    notes.append(f"every candidate got weights {chosen_by[asked][0]}'s plan (the fewest weight bytes within the "
                 f"limit); {len(accuracy) - 1} other plan(s) built on the best of them" if asked else
                 f"no plan of {request.weights} within --max-accuracy-drop {limit:g}: every candidate int8; "
                 f"{len(accuracy) - 1} other plan(s) built on the best of them")
    return [(plan, acc) for plan, acc in accuracy.items() if plan != asked] + [(asked, accuracy[asked])], notes


def _plan_of(point) -> tuple:
    return tuple(sorted((int(k), v) for k, v in (point.variant.get("weights") or {}).items()))


def search(model_path, target: str, workdir, request: BuildRequest | None = None, *,
           progress: Callable | None = None, record: bool = False, pool: int = 2000,
           confirm: int = 2) -> SearchResult:
    """Search the variant space of `model_path` on `target` with at most `request.budget` builds (default 16).

    From the request: the strategy, the seed, the inputs per point (default 3), the workers (default: the CPU count,
    at most 8), `ray` (build on a Ray cluster instead of the local process pool; "local" starts one here) and the
    constraints (max_ram, max_flash, max_fidelity_loss). The points run on the target's own runner.
    guided: `pool` candidates screened by the predictor per round; `confirm` best on the RTL model (Ibex targets)."""
    from tinymlaas.backends.mcu import load_firmware_model
    from tinymlaas.frontend.cleanup import clean
    from tinymlaas.targets import get_target

    request = request or BuildRequest()
    budget = request.budget or 16
    if request.strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {', '.join(STRATEGIES)}")
    if budget < 1:
        raise ValueError("budget must be at least 1")
    check_searchable(get_target(target))
    constraints = Constraints.of(request)
    started = time.monotonic()
    model = load_firmware_model(model_path)
    graph = clean(model.graph, shapes_from_interpreter=True)
    space = Space.of(graph, get_target(target))
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    ladder, notes_before = low_bit_ladder(model, request)
    weights = ladder[-1][0] if ladder else ()
    rungs = ladder[:-1] if budget > len(ladder) else []  # the other plans, built on the best variant at the end
    ev = Evaluator(Path(model_path).resolve(), target, workdir.resolve(), request.inputs or 3, request.seed,
                   request.workers or min(os.cpu_count() or 1, 8), progress, record,
                   ray_address=request.ray, weights=weights, accuracy={plan: acc for plan, acc in ladder if acc})
    try:
        outcome = STRATEGIES[request.strategy](Context(space, ev, seeds(space), budget - len(rungs), request.seed,
                                                       constraints, graph, get_target(target), pool, confirm))
        best = pareto_front(ev.points, constraints)  # feasible points only: built, verified, costed
        if rungs and best:
            best_variant = Variant.from_dict(ev.points[min(best, key=lambda i: ev.points[i].objectives())].variant)
            ev.run([replace(best_variant, weights=plan) for plan, _ in rungs], budget, as_given=True)
    finally:
        ev.close()
    points, confirmed, notes = ev.points, outcome.confirmed, [*notes_before, *outcome.notes]
    front = pareto_front(points, constraints)
    # the cheapest, then smallest; of the feasible points with the weights asked for, where there is one (the other
    # plans are there to show what accuracy buys: a --variant of the front rebuilds any of them)
    feasible = [i for i, p in enumerate(points) if constraints.violation(p) == 0]
    asked = [i for i in feasible if _plan_of(points[i]) == weights] or front
    chosen = min(asked, key=lambda i: points[i].objectives()) if asked else None
    if chosen is not None and chosen not in front:
        notes.append(f"the chosen build has the weights asked for; another plan built on the way dominates it "
                     f"(on the front: {', '.join(points[i].label for i in front)})")
    if confirmed:  # true cycles decide between the candidates QEMU ranked best (of the weights asked for, too)
        eligible = [i for i in confirmed if _plan_of(points[i]) == weights] or confirmed
        chosen = min(eligible, key=lambda i: (points[i].cycles, points[i].objectives()))
        ranked_by = points[confirmed[0]].cost_kind
        notes.append(f"the best by {ranked_by} and the default build ({len(confirmed)}) run on the RTL model; the "
                     "fewest true cycles chosen")
    if chosen is None:
        notes.append("no variant satisfied the constraints")
    return SearchResult(model.name, target, request.strategy, budget, request.seed, outcome.space_size or space.size,
                        asdict(constraints),
                        points, front, chosen, 0, round(time.monotonic() - started, 1), notes, confirmed,
                        outcome.screened)
