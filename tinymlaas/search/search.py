"""The variant search: build and run candidates of the Space, keep the Pareto front, pick the best that fits.

Every point is really built, run in the emulator and verified against the interpreter (`compile_model` with the
variant); one that does not verify or does not fit is kept as infeasible, never on the front. Objectives, all
minimised: cost (true cycles where the target's core is simulated from RTL, else exact instructions), RAM, flash,
fidelity loss (0 for a bit-exact integer build; the float build's max relative error). Strategies:
- "random": the default build, the uniform kernel choices, then seeded random samples;
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
The same seed gives the same points in the same order, whatever the number of workers.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from tinymlaas.search.space import Space, Variant

STRATEGIES = ("nsga2", "random", "guided")
OBJECTIVES = ("cost", "ram", "flash", "fidelity_loss")


@dataclass(frozen=True)
class Constraints:
    max_ram: int | None = None
    max_flash: int | None = None
    max_fidelity_loss: float = 0.0  # integer models: bit-exact; float: the float tolerance is the compiler's

    def violation(self, p: Point) -> float:
        """0 when `p` satisfies them, else how far off (relative), for NSGA-II's constraint handling."""
        if not p.verified or p.cost is None:
            return 1e9
        v = 0.0
        if self.max_ram is not None and p.ram > self.max_ram:
            v += (p.ram - self.max_ram) / self.max_ram
        if self.max_flash is not None and p.flash > self.max_flash:
            v += (p.flash - self.max_flash) / self.max_flash
        if p.fidelity_loss > self.max_fidelity_loss:
            v += p.fidelity_loss - self.max_fidelity_loss
        return v


@dataclass(frozen=True)
class Point:
    variant: dict
    label: str
    verified: bool
    cost: int | None = None  # cycles or instructions per inference (cost_kind)
    cost_kind: str = "instructions"
    instructions: int | None = None
    cycles: int | None = None
    ram: int = 0
    flash: int = 0
    fidelity_loss: float = 0.0
    error: str | None = None  # why it was not built (does not fit, a failure), if so
    build_dir: str | None = None
    seconds: float = 0.0

    def objectives(self) -> tuple:
        return (self.cost, self.ram, self.flash, self.fidelity_loss)

    @classmethod
    def of_report(cls, variant: dict, label: str, r, build_dir, seconds: float,
                  fidelity_loss: float | None = None) -> Point:
        """A built point. Fidelity loss, unless given: LSB off the interpreter (integer), relative error (float)."""
        if fidelity_loss is None:
            f = r.fidelity
            fidelity_loss = float(f.get("max_rel_error", 0.0)) if f.get("kind") == "float" \
                else float(f.get("max_lsb_diff", 0))
        cost, kind = ((r.cycles, "cycles") if r.cycles is not None else
                      (round(r.cycles_estimate), "cycles (estimate)") if r.cycles_estimate is not None else
                      (r.instructions, "instructions"))
        return cls(variant, label, r.verified, cost=cost, cost_kind=kind, instructions=r.instructions,
                   cycles=r.cycles, ram=r.sizes["ram_model"], flash=r.sizes["flash_model"],
                   fidelity_loss=fidelity_loss, build_dir=str(build_dir), seconds=round(seconds, 2))

    @classmethod
    def refused(cls, variant: dict, label: str, error: Exception, seconds: float) -> Point:
        """A point that could not be built: too large for the board, or refused by the compiler (kept, off the
        front)."""
        from tinymlaas.errors import ModelTooLarge

        why = f"does not fit: {error}" if isinstance(error, ModelTooLarge) else str(error)
        return cls(variant, label, False, error=why, seconds=round(seconds, 2))


@dataclass
class SearchResult:
    model: str
    target: str
    strategy: str
    budget: int
    seed: int
    space_size: int
    constraints: dict
    points: list[Point]
    front: list[int]  # indices into points: feasible and not dominated
    chosen: int | None  # the cheapest feasible point
    default: int  # the default build's point (always evaluated first)
    seconds: float
    notes: list[str] = field(default_factory=list)
    confirmed: list[int] = field(default_factory=list)  # points also run on the RTL model (their `cycles` set)
    screened: int = 0  # candidates the predictor ranked without building them

    def to_dict(self) -> dict:
        d = asdict(self)
        d["points"] = [asdict(p) for p in self.points]
        return d

    def summary(self) -> dict:
        """What a build's report says about the search that chose it."""
        chosen, default = self.points[self.chosen], self.points[self.default]
        out = {"strategy": self.strategy, "budget": self.budget, "seed": self.seed, "built": len(self.points),
               "space_size": self.space_size, "front": len(self.front), "seconds": self.seconds,
               "chosen": {"variant": chosen.variant, "label": chosen.label, chosen.cost_kind: chosen.cost},
               "default": {"variant": default.variant, default.cost_kind: default.cost}}
        if self.screened:
            out["screened"] = self.screened
        if self.confirmed:
            out["confirmed"] = [{"label": self.points[i].label, "instructions": self.points[i].instructions,
                                 "cycles": self.points[i].cycles} for i in self.confirmed]
            out["chosen"]["cycles"] = chosen.cycles
        return out


def _evaluate(args) -> Point:
    """Build, run and verify one variant (in a worker process)."""
    model_path, target, variant_dict, out, inputs, seed, record, emulator = args
    from tinymlaas.errors import TinyMLaaSError
    from tinymlaas.pipeline import CompileOptions, compile_model

    variant = Variant.from_dict(variant_dict)
    started = time.monotonic()
    try:
        r = compile_model(model_path, target, out, CompileOptions(inputs=inputs, seed=seed, variant=variant,
                                                                  emulator=emulator))
    except TinyMLaaSError as e:
        return Point.refused(variant_dict, variant.short(), e, time.monotonic() - started)
    if record:  # the predictor learns from every point; a database problem costs the row, not the point
        from tinymlaas.measurements import record_report

        record_report(r)
    return Point.of_report(variant_dict, variant.short(), r, out, time.monotonic() - started)


def dominates(a: Point, b: Point) -> bool:
    pa, pb = a.objectives(), b.objectives()
    return all(x <= y for x, y in zip(pa, pb)) and any(x < y for x, y in zip(pa, pb))


def pareto_front(points: list[Point], constraints: Constraints) -> list[int]:
    feasible = [i for i, p in enumerate(points) if constraints.violation(p) == 0]
    front, seen = [], set()
    for i in feasible:
        if points[i].objectives() in seen:  # equal points: the first stands for them
            continue
        if not any(dominates(points[j], points[i]) for j in feasible if j != i):
            front.append(i)
            seen.add(points[i].objectives())
    return front


class _Evaluator:
    """Runs variants (cached by key), in order, on a pool of worker processes or in this one."""

    def __init__(self, model_path, target: str, workdir: Path, inputs: int, seed: int, workers: int,
                 progress: Callable | None, record: bool = False, emulator: str | None = None,
                 ray_address: str | None = None):
        self.model_path, self.target, self.workdir, self.record = str(model_path), target, workdir, record
        self.emulator = emulator
        self.inputs, self.seed, self.progress = inputs, seed, progress
        self.points: list[Point] = []
        self.by_key: dict[str, int] = {}
        self.pool = (_RayPool(ray_address) if ray_address
                     else ProcessPoolExecutor(workers) if workers > 1 else None)

    def run(self, variants: list[Variant], limit: int) -> list[Point]:
        """Points of `variants` (new ones built, at most `limit` in all); None for those past the limit."""
        new: dict[str, Variant] = {}
        for v in variants:
            if v.key() not in self.by_key and v.key() not in new and len(self.points) + len(new) < limit:
                new[v.key()] = v
        new = list(new.values())
        jobs = [(self.model_path, self.target, v.to_dict(), str(self.workdir / f"point{len(self.points) + k:04d}"),
                 self.inputs, self.seed, self.record, self.emulator) for k, v in enumerate(new)]
        results = self.pool.map(_evaluate, jobs) if self.pool else map(_evaluate, jobs)
        for v, p in zip(new, results):
            self.by_key[v.key()] = len(self.points)
            self.points.append(p)
            if self.progress:
                self.progress(len(self.points), limit, p)
        return [self.points[self.by_key[v.key()]] if v.key() in self.by_key else None for v in variants]

    def close(self):
        if self.pool:
            self.pool.shutdown()


class _RayPool:
    """The builds fanned out over a Ray cluster, results in submission order (so the same seed gives the same
    points as the local pool). Workers need tinymlaas and its tools installed, and the model and work folder on a
    file system they share with this process. address: a Ray address ("auto", "ray://head:10001"), or "local" for a
    cluster of this machine started (and stopped) here."""

    def __init__(self, address: str):
        import ray

        self.started_here = not ray.is_initialized()
        if self.started_here:
            ray.init(address=None if address == "local" else address, include_dashboard=False, log_to_driver=False,
                     configure_logging=False)
        self.ray, self.task = ray, ray.remote(num_cpus=1)(_evaluate)

    def map(self, fn, jobs):
        return self.ray.get([self.task.remote(job) for job in jobs])

    def shutdown(self):
        if self.started_here:
            self.ray.shutdown()


def _seeds(space: Space) -> list[Variant]:
    """What every search evaluates first: the default build, then each implementation on every layer, then the
    default in the smallest arena."""
    impls = sorted({c for layer in space.layers for c in layer.choices})
    out = [space.default()]
    for impl in impls:
        v = space.uniform(impl)
        if v not in out:
            out.append(v)
    out.append(replace(space.default(), memory="inplace"))
    return out


def search(model_path, target: str, workdir, budget: int = 16, strategy: str = "nsga2", seed: int = 0,
           constraints: Constraints | None = None, inputs: int = 3, workers: int | None = None,
           progress: Callable | None = None, record: bool = False, pool: int = 2000, confirm: int = 2,
           ray_address: str | None = None) -> SearchResult:
    """Search the variant space of `model_path` on `target` with at most `budget` builds.

    guided: `pool` candidates screened by the predictor per round; `confirm` best on the RTL model (Ibex targets).
    ray_address: build on a Ray cluster instead of the local process pool ("local" starts one here)."""
    from tinymlaas.frontend.cleanup import clean
    from tinymlaas.frontend.tflite import load_tflite
    from tinymlaas.targets import get_target

    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {', '.join(STRATEGIES)}")
    if budget < 1:
        raise ValueError("budget must be at least 1")
    if get_target(target).kind == "host":
        from tinymlaas.errors import BuildFailure

        raise BuildFailure(f"the variant search is for microcontroller targets; build for {target} with "
                           "`tinymlaas compile` (--precision, --tune-trials)")
    constraints = constraints or Constraints()
    started = time.monotonic()
    model = load_tflite(model_path)
    space = Space.of(clean(model.graph, shapes_from_interpreter=True), get_target(target))
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    workers = workers or min(os.cpu_count() or 1, 8)
    rtl = strategy == "guided" and get_target(target).rtl is not None
    ev = _Evaluator(Path(model_path).resolve(), target, workdir.resolve(), inputs, seed, workers, progress, record,
                    emulator="qemu" if rtl else None, ray_address=ray_address)
    rng = np.random.default_rng(seed)
    screened, confirmed, notes = 0, [], []
    try:
        initial = _seeds(space)
        if strategy == "guided":
            from tinymlaas.search.predictor import VariantFeatures

            graph = clean(model.graph, shapes_from_interpreter=True)
            ev.run(initial, budget)  # the seeds first: their cost kind is what the prior predicts
            prior, profiled = _layer_prior(ev, graph, get_target(target), space.profiled())
            screened = _guided(space, ev, initial, budget, rng, VariantFeatures(graph, space), pool, prior)
            notes.append(f"the predictor screened {screened:,} candidates; {len(ev.points)} were built"
                         + (f"; {profiled} layers profiled for its prior" if prior else ""))
            if rtl:
                confirmed = _confirm(ev, constraints, confirm, workdir)
            confirmed = [i for i in confirmed if constraints.violation(ev.points[i]) == 0]
        elif strategy == "random":
            variants, tries = list(initial), 0
            while len({v.key() for v in variants}) < min(budget, space.size) and tries < 100 * budget:
                variants.append(space.sample(rng))
                tries += 1
            ev.run(variants, budget)
        else:
            _nsga2(space, ev, initial, budget, seed, constraints)
    finally:
        ev.close()
    points = ev.points
    front = pareto_front(points, constraints)
    chosen = min(front, key=lambda i: points[i].objectives()) if front else None  # the cheapest, then smallest
    if confirmed:  # true cycles decide between the candidates QEMU ranked best
        chosen = min(confirmed, key=lambda i: (points[i].cycles, points[i].objectives()))
        ranked_by = points[confirmed[0]].cost_kind
        notes.append(f"the best by {ranked_by} and the default build ({len(confirmed)}) run on the RTL model; the "
                     "fewest true cycles chosen")
    if chosen is None:
        notes.append("no variant satisfied the constraints")
    return SearchResult(model.name, target, strategy, budget, seed, space.size, asdict(constraints), points, front,
                        chosen, 0, round(time.monotonic() - started, 1), notes, confirmed, screened)


def _profile_layers(args) -> list:
    """Per-layer samples of one variant (a profiled build in QEMU; in a worker process); [] if it cannot be built.
    The label is the cost the search ranks by: instructions, or estimated cycles where the core has a table."""
    model_path, target, variant_dict, workdir, by_estimate = args
    from tinymlaas.errors import TinyMLaaSError
    from tinymlaas.pipeline import profile_model
    from tinymlaas.search.predictor import profile_samples
    from tinymlaas.targets import get_target

    try:
        prof = profile_model(model_path, target, Path(workdir), emulator="qemu",
                             variant=Variant.from_dict(variant_dict))
    except TinyMLaaSError:
        return []
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return profile_samples(prof, get_target(target).core, cycles="estimate" if by_estimate else "true")


def _layer_prior(ev: _Evaluator, graph, target, seeds: list[Variant]):
    """The layer predictor fitted on `seeds` profiled layer by layer (the first: the default build): a function of
    candidates -> their predicted cost relative to the default build's; None when too few layers were measured."""
    from tinymlaas.search.predictor import LayerwiseCost, Predictor

    by_estimate = bool(ev.points) and ev.points[0].cost_kind != "instructions"
    jobs = [(ev.model_path, ev.target, v.to_dict(), str(ev.workdir / f"profile{k:02d}"), by_estimate)
            for k, v in enumerate(seeds)]
    samples = [x for xs in (ev.pool.map(_profile_layers, jobs) if ev.pool else map(_profile_layers, jobs))
               for x in xs]
    try:
        predictor = Predictor(use_qemu=False, label="cycles" if by_estimate else "instructions").fit(samples)
    except ValueError:
        return None, 0
    cost = LayerwiseCost(predictor, graph, target)
    base = float(cost([seeds[0]])[0])
    return (lambda variants: cost(variants) / base), len(samples)


def _guided(space: Space, ev: _Evaluator, initial: list[Variant], budget: int, rng, featurize,
            pool: int, prior: Callable | None = None) -> int:
    """Seeds first; then per round `pool` sampled candidates are ranked and the best `batch` built. The rank: the
    layer predictor's prior (relative to the default build), times the variant model's correction fitted on what
    was measured (cost over prior); either alone where the other is missing. Returns how many were screened."""
    from tinymlaas.search.predictor import VariantModel

    ev.run(initial, budget)
    batch, screened = max(2, budget // 4), 0
    while len(ev.points) < budget:
        base = ev.points[0].cost or 1  # the default build: costs relative to it
        known = [(Variant.from_dict(p.variant), p.cost / base) for p in ev.points if p.verified and p.cost]
        seen = {Variant.from_dict(p.variant).key() for p in ev.points}
        candidates: dict[str, Variant] = {}
        for _ in range(pool):
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


def _confirm(ev: _Evaluator, constraints: Constraints, count: int, workdir: Path) -> list[int]:
    """The `count` best feasible points (by estimated cycles where the core has a pipeline table, else
    instructions), and the default build (the baseline), run again on the RTL model: their true cycles."""
    from dataclasses import replace

    feasible = sorted((i for i, p in enumerate(ev.points) if constraints.violation(p) == 0),
                      key=lambda i: ev.points[i].objectives())[:count]
    if ev.points and ev.points[0].verified and 0 not in feasible:
        feasible.append(0)
    jobs = [(ev.model_path, ev.target, ev.points[i].variant, str(workdir / f"confirm{i:04d}"), 1, ev.seed, False,
             None) for i in feasible]
    results = ev.pool.map(_evaluate, jobs) if ev.pool else map(_evaluate, jobs)
    done = []
    for i, r in zip(feasible, results):
        if r.verified and r.cycles is not None:
            ev.points[i] = replace(ev.points[i], cycles=r.cycles, build_dir=r.build_dir)
            done.append(i)
    return done


def _nsga2(space: Space, ev: _Evaluator, initial: list[Variant], budget: int, seed: int,
           constraints: Constraints) -> None:
    from pymoo.algorithms.moo.nsga2 import NSGA2
    from pymoo.core.evaluator import Evaluator
    from pymoo.core.problem import Problem
    from pymoo.operators.crossover.sbx import SBX
    from pymoo.operators.mutation.pm import PM
    from pymoo.operators.repair.rounding import RoundingRepair
    from pymoo.problems.static import StaticProblem

    bounds = np.array(space.bounds)
    problem = Problem(n_var=len(bounds), n_obj=len(OBJECTIVES), n_ieq_constr=1, xl=np.zeros(len(bounds)),
                      xu=bounds - 1, vtype=int)
    pop_size = max(4, min(budget // 3, 16))
    start = np.array([space.encode(v) for v in initial][:pop_size])
    if len(start) < pop_size:  # fill the first generation with seeded random genes
        rng = np.random.default_rng(seed)
        extra = np.array([[rng.integers(0, b) for b in bounds] for _ in range(pop_size - len(start))])
        start = np.vstack([start, extra])
    algorithm = NSGA2(pop_size=pop_size, sampling=start, eliminate_duplicates=True,
                      crossover=SBX(prob=0.9, eta=3.0, vtype=float, repair=RoundingRepair()),
                      mutation=PM(prob=1.0, eta=3.0, vtype=float, repair=RoundingRepair()))
    algorithm.setup(problem, seed=seed, verbose=False)
    stale = 0
    while len(ev.points) < budget and stale < 5:
        pop = algorithm.ask()
        X = np.clip(np.round(pop.get("X")).astype(int), 0, bounds - 1)
        before = len(ev.points)
        results = ev.run([space.decode(x) for x in X], budget)
        stale = stale + 1 if len(ev.points) == before else 0
        big = 1e18
        F = np.array([[p.cost if p and p.cost is not None else big, p.ram if p else big, p.flash if p else big,
                       p.fidelity_loss if p else big] for p in results], dtype=float)
        G = np.array([[constraints.violation(p) if p else 1e9] for p in results], dtype=float)
        Evaluator().eval(StaticProblem(problem, F=F, G=G), pop)
        algorithm.tell(infills=pop)


def write_result(result: SearchResult, out: Path) -> dict:
    """front.json, front.png and the chosen build (copied to out/best). Returns the artifacts' paths."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "front.json").write_text(json.dumps(result.to_dict(), indent=1) + "\n")
    artifacts = {"json": str(out / "front.json"), "plot": str(plot_front(result, out / "front.png"))}
    if result.chosen is not None and result.points[result.chosen].build_dir:
        best = out / "best"
        shutil.rmtree(best, ignore_errors=True)
        shutil.copytree(result.points[result.chosen].build_dir, best)
        artifacts["best"] = str(best)
    return artifacts


def format_result(result: SearchResult, artifacts: dict) -> str:
    pts = result.points
    d = pts[result.default]
    lines = [(f"{result.model} on {result.target}: {len(pts)} variants built of {result.space_size:,} "
              f"({result.strategy}, seed {result.seed}, {result.seconds:.0f} s)"),
             f"{'':2}{'variant':<48} {d.cost_kind:>14} {'RAM':>9} {'flash':>9} {'loss':>6}"]
    for i in sorted(result.front, key=lambda i: pts[i].objectives()):
        p = pts[i]
        mark = "*" if i == result.chosen else " "
        lines.append(f"{mark} {p.label:<48.48} {p.cost:>14,} {p.ram:>9,} {p.flash:>9,} {p.fidelity_loss:>6.2g}")
    if d.cost is not None:
        lines.append(f"  {'default build: ' + d.label:<48.48} {d.cost:>14,} {d.ram:>9,} {d.flash:>9,}")
    for i in result.confirmed:
        lines.append(f"  confirmed on the RTL model: {pts[i].label}: {pts[i].cycles:,} cycles "
                     f"({pts[i].instructions:,} instructions)")
    if result.chosen is not None and d.cost:
        lines.append(f"chosen (*): {pts[result.chosen].cost / d.cost:.3f}x the default build's {d.cost_kind}")
    lines += result.notes
    lines += [f"{k}: {v}" for k, v in artifacts.items()]
    return "\n".join(lines)


def plot_front(result: SearchResult, path: Path) -> Path:
    """Cost against RAM for every point built; the front joined, the default and the chosen build marked; the
    marker's colour is flash."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = result.points
    ok = [i for i, p in enumerate(pts) if p.cost is not None]
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    if ok:
        sc = ax.scatter([pts[i].ram for i in ok], [pts[i].cost for i in ok], c=[pts[i].flash for i in ok],
                        cmap="viridis", s=28, alpha=0.8, label="built and verified" if all(pts[i].verified for i in ok)
                        else "built")
        fig.colorbar(sc, ax=ax, label="flash (B)")
    if result.front:  # not dominated in (cost, RAM, flash, fidelity loss), so not only in this projection
        ax.scatter([pts[i].ram for i in result.front], [pts[i].cost for i in result.front], s=80,
                   facecolors="none", edgecolors="red", label="Pareto front")
    if pts and pts[result.default].cost is not None:
        d = pts[result.default]
        ax.scatter([d.ram], [d.cost], marker="s", s=90, facecolors="none", edgecolors="k", label="default build")
    if result.chosen is not None:
        c = pts[result.chosen]
        ax.scatter([c.ram], [c.cost], marker="*", s=220, c="red", label=f"chosen: {c.label}")
    kind = next((p.cost_kind for p in pts if p.cost is not None), "instructions")
    ax.set_xlabel("RAM (B)")
    ax.set_ylabel(f"{kind} per inference")
    ax.set_title(f"{result.model} on {result.target}: {len(pts)} variants ({result.strategy}, seed {result.seed})",
                 fontsize=9)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
