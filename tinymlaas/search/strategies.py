"""The search strategies. Each is a function of a `Context` (the space, the evaluator, the seeds, the budget, ...)
that builds points through the evaluator until the budget is spent and returns an `Outcome` (what else it found
out); `STRATEGIES` names them. A new strategy is one function and one line there.

- "random": the seeds (the default build, the uniform kernel choices, the smallest arena), then seeded random
  samples;
- "nsga2": pymoo's NSGA-II (integer genes) seeded with the same points, asked and told in generations so that the
  builds of one generation run in parallel;
- "guided": the same seeds, then rounds in which the learned predictors screen a pool of sampled candidates
  without building them and only their top few are built and run. A few variants (Space.profiled: each
  implementation on every layer, TIR under each schedule, no fusion) are profiled layer by layer, and the layer
  predictor (predictor.Predictor over those layers) gives each candidate a prior cost, the sum of its layers'
  (predictor.LayerwiseCost); the variant model (predictor.VariantModel, refitted on every point measured so far)
  learns what the prior misses. On a target whose core is simulated from RTL (Ibex) the candidates run in QEMU
  (exact instructions and the core's pipeline-table cycle estimate, fast) and the best few by estimated cycles are
  confirmed on the RTL model: true cycles choose.
- "tune": every convolution and fully connected layer tuned on its own, over its space of TIR schedules and our C
  kernels, with the tuning log and the schedule predictor (tuning.py); the cheapest candidate of each layer
  assembled into one variant; "tune-random": the same without the predictor (its baseline).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace

import numpy as np

from tinymlaas.search.evaluate import Evaluator
from tinymlaas.search.result import OBJECTIVES, Constraints
from tinymlaas.search.space import Space, Variant


@dataclass
class Context:
    """What a strategy works with."""

    space: Space
    evaluator: Evaluator
    seeds: list[Variant]  # evaluated first, by every strategy
    budget: int  # points built at most
    seed: int
    constraints: Constraints
    graph: object  # the model's cleaned graph
    target: object  # its tinymlaas.targets.Target
    pool: int = 2000  # guided: candidates the predictor screens per round
    confirm: int = 2  # guided: the best confirmed on the RTL model, where the target's core has one


@dataclass
class Outcome:
    screened: int = 0  # candidates ranked without being built
    confirmed: list[int] = field(default_factory=list)  # points also run on the RTL model (their `cycles` set)
    notes: list[str] = field(default_factory=list)
    space_size: int | None = None  # the space the strategy searched, where it is not the variant space (layer tuning)


def random_sampling(ctx: Context) -> Outcome:
    rng = np.random.default_rng(ctx.seed)
    variants, tries = list(ctx.seeds), 0
    while len({v.key() for v in variants}) < min(ctx.budget, ctx.space.size) and tries < 100 * ctx.budget:
        variants.append(ctx.space.sample(rng))
        tries += 1
    ctx.evaluator.run(variants, ctx.budget)
    return Outcome()


def nsga2(ctx: Context) -> Outcome:
    from pymoo.algorithms.moo.nsga2 import NSGA2
    from pymoo.core.evaluator import Evaluator as PymooEvaluator
    from pymoo.core.problem import Problem
    from pymoo.operators.crossover.sbx import SBX
    from pymoo.operators.mutation.pm import PM
    from pymoo.operators.repair.rounding import RoundingRepair
    from pymoo.problems.static import StaticProblem

    space, ev, budget = ctx.space, ctx.evaluator, ctx.budget
    bounds = np.array(space.bounds)
    problem = Problem(n_var=len(bounds), n_obj=len(OBJECTIVES), n_ieq_constr=1, xl=np.zeros(len(bounds)),
                      xu=bounds - 1, vtype=int)
    pop_size = max(4, min(budget // 3, 16))
    start = np.array([space.encode(v) for v in ctx.seeds][:pop_size])
    if len(start) < pop_size:  # fill the first generation with seeded random genes
        rng = np.random.default_rng(ctx.seed)
        extra = np.array([[rng.integers(0, b) for b in bounds] for _ in range(pop_size - len(start))])
        start = np.vstack([start, extra])
    algorithm = NSGA2(pop_size=pop_size, sampling=start, eliminate_duplicates=True,
                      crossover=SBX(prob=0.9, eta=3.0, vtype=float, repair=RoundingRepair()),
                      mutation=PM(prob=1.0, eta=3.0, vtype=float, repair=RoundingRepair()))
    algorithm.setup(problem, seed=ctx.seed, verbose=False)
    stale = 0
    while len(ev.points) < budget and stale < 5:
        pop = algorithm.ask()
        X = np.clip(np.round(pop.get("X")).astype(int), 0, bounds - 1)
        before = len(ev.points)
        results = ev.run([space.decode(x) for x in X], budget)
        stale = stale + 1 if len(ev.points) == before else 0
        big = 1e18
        F = np.array([[v if p and v is not None else big for v in (p.objectives() if p else (None,) * len(OBJECTIVES))]
                      for p in results], dtype=float)
        G = np.array([[ctx.constraints.violation(p) if p else 1e9] for p in results], dtype=float)
        PymooEvaluator().eval(StaticProblem(problem, F=F, G=G), pop)
        algorithm.tell(infills=pop)
    return Outcome()


def guided(ctx: Context) -> Outcome:
    from tinymlaas.search.predictor import VariantFeatures

    ev = ctx.evaluator
    rtl = ctx.target.rtl is not None
    if rtl:  # candidates in QEMU (fast); the best confirmed on the RTL model at the end
        ev.emulator = "qemu"
    ev.run(ctx.seeds, ctx.budget)  # the seeds first: their cost kind is what the prior predicts
    prior, profiled = _layer_prior(ctx)
    screened = _screen(ctx, VariantFeatures(ctx.graph, ctx.space), prior)
    notes = [f"the predictor screened {screened:,} candidates; {len(ev.points)} were built"
             + (f"; {profiled} layers profiled for its prior" if prior else "")]
    confirmed = ev.confirm(_best_and_default(ctx)) if rtl else []
    confirmed = [i for i in confirmed if ctx.constraints.violation(ev.points[i]) == 0]
    return Outcome(screened, confirmed, notes)


def _layer_prior(ctx: Context) -> tuple[Callable | None, int]:
    """The layer predictor fitted on the profiled variants (Space.profiled; the first: the default build): a
    function of candidates -> their predicted cost relative to the default build's, and how many layers it was
    fitted on; None when too few layers were measured."""
    from tinymlaas.search.predictor import LayerwiseCost, Predictor

    ev, profiled = ctx.evaluator, ctx.space.profiled()
    by_estimate = bool(ev.points) and ev.points[0].cost_kind != "instructions"  # the cost the search ranks by
    samples = ev.profile(profiled, by_estimate)
    try:
        predictor = Predictor(use_qemu=False, label="cycles" if by_estimate else "instructions").fit(samples)
    except ValueError:
        return None, 0
    cost = LayerwiseCost(predictor, ctx.graph, ctx.target)
    base = float(cost([profiled[0]])[0])
    return (lambda variants: cost(variants) / base), len(samples)


def _screen(ctx: Context, featurize, prior: Callable | None) -> int:
    """Per round, `ctx.pool` sampled candidates are ranked and the best `batch` built. The rank: the layer
    predictor's prior (relative to the default build), times the variant model's correction fitted on what was
    measured (cost over prior); either alone where the other is missing. Returns how many were screened."""
    from tinymlaas.search.predictor import VariantModel

    space, ev, budget = ctx.space, ctx.evaluator, ctx.budget
    rng = np.random.default_rng(ctx.seed)
    batch, screened = max(2, budget // 4), 0
    while len(ev.points) < budget:
        base = ev.points[0].cost or 1  # the default build: costs relative to it
        known = [(Variant.from_dict(p.variant), p.cost / base) for p in ev.points if p.verified and p.cost]
        seen = {replace(Variant.from_dict(p.variant), weights=()).key() for p in ev.points}  # as candidates are
        candidates: dict[str, Variant] = {}
        for _ in range(ctx.pool):
            v = space.sample(rng)
            if v.key() not in seen:
                candidates.setdefault(v.key(), v)
        if not candidates:
            break
        cands = list(candidates.values())
        screened += len(cands)
        predicted = prior(cands) if prior else np.ones(len(cands))
        if len(known) >= 3:
            expected = prior([v for v, _ in known]) if prior else np.ones(len(known))
            model = VariantModel(seed=int(rng.integers(1 << 30))).fit(
                [featurize(v) for v, _ in known], [c / e for (_, c), e in zip(known, expected)])
            predicted = predicted * model.predict([featurize(v) for v in cands])
        if prior or len(known) >= 3:
            cands = [cands[i] for i in np.argsort(predicted, kind="stable")]
        before = len(ev.points)
        ev.run(cands[:batch], budget)
        if len(ev.points) == before:
            break
    return screened


def _best_and_default(ctx: Context) -> list[int]:
    """The `ctx.confirm` best feasible points (by estimated cycles where the core has a pipeline table, else
    instructions), and the default build (the baseline)."""
    points = ctx.evaluator.points
    best = sorted((i for i, p in enumerate(points) if ctx.constraints.violation(p) == 0),
                  key=lambda i: points[i].objectives())[:ctx.confirm]
    if points and points[0].verified and 0 not in best:
        best.append(0)
    return best


Strategy = Callable[[Context], Outcome]
def tune(ctx: Context) -> Outcome:
    from tinymlaas.search.tuning import tune_strategy

    return tune_strategy(ctx)


def tune_random(ctx: Context) -> Outcome:
    from tinymlaas.search.tuning import tune_strategy

    return tune_strategy(ctx, screen=False)


STRATEGIES: dict[str, Strategy] = {"nsga2": nsga2, "random": random_sampling, "guided": guided, "tune": tune,
                                   "tune-random": tune_random}
