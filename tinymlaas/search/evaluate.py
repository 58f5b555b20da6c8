"""Building and running the points of a search.

`evaluate` builds one variant (`compile_model` with it), runs it in the emulator and verifies it against the
interpreter, in a worker process; the `Evaluator` runs a strategy's variants on a local process pool or a Ray
cluster, results in submission order (so the same seed gives the same points whatever the number of workers). Also
here: the seeds every strategy evaluates first, the layer-by-layer profiles behind the guided strategy's prior and
the confirmation of points on the RTL model.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import NamedTuple

from tinymlaas.search.result import Point
from tinymlaas.search.space import Space, Variant


class Job(NamedTuple):
    """One build of a variant (plain data: it travels to a worker process or a Ray worker)."""

    model_path: str
    target: str
    variant: dict  # Variant.to_dict()
    out: str  # the build folder
    inputs: int
    seed: int
    record: bool = False  # into the measurement database
    emulator: str | None = None  # None: the target's
    estimate: bool = False  # the cycle estimate made (and the point's cost, where no true cycles are measured)


def evaluate(job: Job) -> Point:
    """Build, run and verify one variant (in a worker process)."""
    model_path, target, variant_dict, out, inputs, seed, record, emulator, estimate = job
    from tinymlaas.build.pipeline import compile_model
    from tinymlaas.build.request import BuildRequest
    from tinymlaas.errors import TinyMLaaSError

    variant = Variant.from_dict(variant_dict)
    started = time.monotonic()
    try:
        # ranked by exact instructions (or true cycles, or a pipeline table's estimate, which the build always
        # makes), or by llvm-mca's estimate where the strategy asks for it (`estimate`)
        r = compile_model(model_path, target, out, BuildRequest(inputs=inputs, seed=seed, variant=variant,
                                                                  emulator=emulator, estimate_cycles=estimate))
    except TinyMLaaSError as e:
        return Point.refused(variant_dict, variant.short(), e, time.monotonic() - started)
    if record:  # the predictor learns from every point; a database problem costs the row, not the point
        from tinymlaas.measure.database import record_report

        record_report(r)
    return Point.of_report(variant_dict, variant.short(), r, out, time.monotonic() - started)


def seeds(space: Space) -> list[Variant]:
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


class Evaluator:
    """Runs variants (cached by key), in order, on a pool of worker processes, a Ray cluster or in this process.

    emulator: where the points run (None: the target's); ray_address: a Ray address ("auto", "ray://head:10001"),
    or "local" for a cluster of this machine started (and stopped) here."""

    def __init__(self, model_path, target: str, workdir: Path, inputs: int, seed: int, workers: int,
                 progress: Callable | None = None, record: bool = False, emulator: str | None = None,
                 ray_address: str | None = None, weights: tuple = (), accuracy: dict | None = None):
        self.model_path, self.target, self.workdir, self.record = str(model_path), target, workdir, record
        self.weights = weights  # every variant's layers below eight bits (search.low_bit_ladder)
        self.accuracy = accuracy or {}  # weight plan -> its accuracy report (the builds are bit-exact to it)
        self.emulator = emulator
        self.estimate = False  # points ranked by llvm-mca's cycle estimate (a strategy may ask)
        self.workers = workers
        self.inputs, self.seed, self.progress = inputs, seed, progress
        self.points: list[Point] = []
        self.by_key: dict[str, int] = {}
        self.pool = (_RayPool(ray_address) if ray_address
                     else ProcessPoolExecutor(workers) if workers > 1 else None)

    def map(self, fn: Callable, jobs: list) -> Iterable:
        """fn of each job, in order, on the pool."""
        return self.pool.map(fn, jobs) if self.pool else map(fn, jobs)

    def run(self, variants: list[Variant], limit: int, as_given: bool = False) -> list[Point | None]:
        """Points of `variants` (new ones built, at most `limit` in all); None for those past the limit. Each gets
        the search's weight plan unless `as_given` (another rung of its ladder)."""
        new: dict[str, Variant] = {}
        variants = [replace(v, weights=self.weights) for v in variants] if self.weights and not as_given else variants
        for v in variants:
            if v.key() not in self.by_key and v.key() not in new and len(self.points) + len(new) < limit:
                new[v.key()] = v
        new = list(new.values())
        jobs = [Job(self.model_path, self.target, v.to_dict(), str(self.workdir / f"point{len(self.points) + k:04d}"),
                    self.inputs, self.seed, self.record, self.emulator, self.estimate) for k, v in enumerate(new)]
        for v, p in zip(new, self.map(evaluate, jobs)):
            if v.weights in self.accuracy:
                p = p.with_accuracy(self.accuracy[v.weights])
            self.by_key[v.key()] = len(self.points)
            self.points.append(p)
            if self.progress:
                self.progress(len(self.points), limit, p)
        return [self.points[self.by_key[v.key()]] if v.key() in self.by_key else None for v in variants]

    def profile(self, variants: list[Variant], by_estimate: bool) -> list:
        """Per-layer samples (predictor.Sample) of `variants`, each a profiled build in QEMU; labelled with estimated
        cycles (`by_estimate`: where the core has a pipeline table) or instructions."""
        jobs = [(self.model_path, self.target, v.to_dict(), str(self.workdir / f"profile{k:02d}"), by_estimate)
                for k, v in enumerate(variants)]
        return [s for samples in self.map(_profile_layers, jobs) for s in samples]

    def confirm(self, indices: list[int]) -> list[int]:
        """The points `indices` built again for the target's own emulator (the RTL model of its core), one input:
        their true cycles set. Returns those confirmed (verified, with cycles)."""
        jobs = [Job(self.model_path, self.target, self.points[i].variant, str(self.workdir / f"confirm{i:04d}"), 1,
                    self.seed, estimate=self.estimate) for i in indices]
        done = []
        for i, r in zip(indices, self.map(evaluate, jobs)):
            if r.verified and r.cycles is not None:
                self.points[i] = replace(self.points[i], cycles=r.cycles, build_dir=r.build_dir)
                done.append(i)
        return done

    def close(self):
        if self.pool:
            self.pool.shutdown()


def _profile_layers(args) -> list:
    """Per-layer samples of one variant (a profiled build in QEMU; in a worker process); [] if it cannot be built."""
    model_path, target, variant_dict, workdir, by_estimate = args
    from tinymlaas.backends.mcu.profile import profile_model
    from tinymlaas.errors import TinyMLaaSError
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


class _RayPool:
    """The builds fanned out over a Ray cluster, results in submission order (so the same seed gives the same
    points as the local pool). Workers need tinymlaas and its tools installed, and the model and work folder on a
    file system they share with this process."""

    def __init__(self, address: str):
        import ray

        self.started_here = not ray.is_initialized()
        if self.started_here:
            ray.init(address=None if address == "local" else address, include_dashboard=False, log_to_driver=False,
                     configure_logging=False)
        self.ray = ray
        self.tasks: dict[Callable, object] = {}

    def map(self, fn, jobs):
        task = self.tasks.setdefault(fn, self.ray.remote(num_cpus=1)(fn))
        return self.ray.get([task.remote(job) for job in jobs])

    def shutdown(self):
        if self.started_here:
            self.ray.shutdown()
