"""What a search found: its points (built, run and verified, or refused), their Pareto front, the one chosen; written
as front.json, front.png and the chosen build.

Objectives, all minimised: cost (true cycles where the target's core is simulated from RTL, else exact instructions
or the core's cycle estimate), RAM, flash, fidelity loss (0 for a bit-exact integer build; the float build's max
relative error), accuracy drop (points of the --validation metric lost against the model as given, by the weights
below eight bits; 0 without them or without a validation set). A point that does not verify or does not fit is kept
as infeasible, never on the front.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

OBJECTIVES = ("cost", "ram", "flash", "fidelity_loss", "accuracy_drop")


@dataclass(frozen=True)
class Constraints:
    max_ram: int | None = None
    max_flash: int | None = None
    max_fidelity_loss: float = 0.0  # integer models: bit-exact; float: the float tolerance is the compiler's
    max_accuracy_drop: float | None = None

    @classmethod
    def of(cls, request) -> Constraints:
        """The constraints a BuildRequest sets."""
        return cls(request.max_ram, request.max_flash, float(request.max_fidelity_loss), request.max_accuracy_drop)

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
        if self.max_accuracy_drop is not None and p.accuracy_drop > self.max_accuracy_drop:
            v += p.accuracy_drop - self.max_accuracy_drop
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
    accuracy: float | None = None  # the --validation metric of its weights (the build is bit-exact to them)
    accuracy_drop: float = 0.0  # points of it lost against the model as given
    # the whole block a build's report carries (metric, value, reference, drop, samples), None without --validation
    accuracy_of_weights: dict | None = None
    weights_bytes: int | None = None  # the build's sizes.weights (weights, biases, tables: what --weights shrinks)

    def objectives(self) -> tuple:
        return (self.cost, self.ram, self.flash, self.fidelity_loss, self.accuracy_drop)

    def with_accuracy(self, report: dict) -> Point:
        """The point with its weights' accuracy (lowbit.Judge.report)."""
        return replace(self, accuracy=report["value"], accuracy_drop=float(report["drop"]),
                       accuracy_of_weights=dict(report))

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
                   fidelity_loss=fidelity_loss, build_dir=str(build_dir), seconds=round(seconds, 2),
                   weights_bytes=r.sizes.get("weights"))

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
        if chosen.accuracy_of_weights:  # weights below eight bits judged on --validation
            out["chosen"]["accuracy"] = chosen.accuracy_of_weights
            out["chosen"]["weights_bytes"] = chosen.weights_bytes
        if self.screened:
            out["screened"] = self.screened
        if self.confirmed:
            out["confirmed"] = [{"label": self.points[i].label, "instructions": self.points[i].instructions,
                                 "cycles": self.points[i].cycles} for i in self.confirmed]
            out["chosen"]["cycles"] = chosen.cycles
        return out


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
        chosen, report = result.points[result.chosen], best / "report.json"
        if chosen.accuracy_of_weights and report.is_file():  # measured once per plan, not in each point's build
            data = json.loads(report.read_text())
            if data.get("accuracy") is None:
                data["accuracy"] = chosen.accuracy_of_weights
                report.write_text(json.dumps(data, indent=2) + "\n")
    return artifacts


def format_result(result: SearchResult, artifacts: dict) -> str:
    pts = result.points
    d = pts[result.default]
    size = f"{result.space_size:,}" if result.space_size < 10**9 else f"{result.space_size:.2e}"
    accuracy = any(p.accuracy is not None for p in pts)  # a column of the metric where weights go below 8 bits
    lines = [(f"{result.model} on {result.target}: {len(pts)} variants built of {size} "
              f"({result.strategy}, seed {result.seed}, {result.seconds:.0f} s)"),
             f"{'':2}{'variant':<48} {d.cost_kind:>14} {'RAM':>9} {'flash':>9} {'loss':>6}"
             + (f" {'accuracy':>9} {'drop':>6}" if accuracy else "")]
    for i in sorted(result.front, key=lambda i: pts[i].objectives()):
        p = pts[i]
        mark = "*" if i == result.chosen else " "
        lines.append(f"{mark} {p.label:<48.48} {p.cost:>14,} {p.ram:>9,} {p.flash:>9,} {p.fidelity_loss:>6.2g}"
                     + (f" {p.accuracy:>9.4f} {p.accuracy_drop:>6.2f}" if accuracy and p.accuracy is not None else ""))
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
    marker's colour is flash. Where points carry an accuracy (weights below eight bits judged on --validation), a
    second panel: cost against flash, the colour the accuracy lost."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = result.points
    ok = [i for i, p in enumerate(pts) if p.cost is not None]
    judged = [i for i in ok if pts[i].accuracy is not None]
    fig, axes = plt.subplots(1, 2 if judged else 1, figsize=(12 if judged else 7, 4.5), dpi=110, squeeze=False)
    ax = axes[0][0]
    if judged:
        flash_ax = axes[0][1]
        sc = flash_ax.scatter([pts[i].flash for i in judged], [pts[i].cost for i in judged],
                              c=[pts[i].accuracy_drop for i in judged], cmap="magma_r", s=36)
        fig.colorbar(sc, ax=flash_ax, label="accuracy lost (points)")
        front = [i for i in result.front if i in judged]
        flash_ax.scatter([pts[i].flash for i in front], [pts[i].cost for i in front], s=90, facecolors="none",
                         edgecolors="red", label="Pareto front")
        if result.chosen is not None:
            c = pts[result.chosen]
            flash_ax.scatter([c.flash], [c.cost], marker="*", s=220, c="red", label="chosen")
        flash_ax.set_xlabel("flash (B)")
        flash_ax.set_title("flash x cost x accuracy", fontsize=9)
        flash_ax.legend(fontsize=7, loc="best")
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
