"""meta_schedule tuning for the host backend: which functions to tune (the heaviest), in what order (unmeasured
first), over what design space (tensor-core tiling for float16 on CUDA), built how (in this process, CUDA by nvcc) and
in rounds within a time budget, its database kept per target and model so a rebuild costs no tuning.
Takes a Relax module after the zero pipeline; knows nothing of the passes before it or of the build after it.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import os
import shutil
import time
from pathlib import Path

from tinymlaas.targets import HostTarget


def tuning_folder(target: HostTarget, model_sha256: str, precision: str, base: Path) -> Path:
    return base / target.name / f"{model_sha256[:16]}-{precision}"


# trials per function in each tuning round (a time budget is checked between rounds). Each round pays the evolutionary
# search once per function (~18 s on the lent H100's host, whatever the trials): rounds of 4 were mostly that
ROUNDS = (32, 64, 128)
# meta_schedule's evolutionary search, smaller than its defaults (a population of 512 evolved 4 times): picking 32
# tensor-core candidates for one resnet18 convolution took 95 s on 2 cores and 54 s on the H100's host, 36 s here
# with 256 and 2 - time a time-boxed tuning spends measuring instead (the first round's cost model is untrained, so
# its evolution ranks by nothing)
SEARCH = {"population_size": 256, "genetic_num_iters": 2}
BUILD_THREADS = 16
# the functions tuned: the fewest, heaviest first, that hold this share of the model's floating-point work (the
# rest keep dlight's schedules). On resnet18 the convolutions; elementwise and pooling functions are memory-bound and
# each round's ~18 s of search per function bought them little.
FLOP_SHARE = 0.95


def heaviest_tasks(tasks, share: float = FLOP_SHARE) -> list:
    """The tasks (meta_schedule ExtractedTask) carrying `share` of the FLOPs (per call x calls), heaviest first; a
    function the estimator cannot read is tuned too (first); all of them when none has measurable FLOPs."""
    from tvm.s_tir.analysis import estimate_tir_flops

    def flops(task) -> float | None:
        try:
            return float(estimate_tir_flops(task.dispatched[0])) * int(task.weight)
        except Exception:  # noqa: BLE001 - unreadable: tuned, not dropped
            return None

    measured = {id(t): flops(t) for t in tasks}
    unread = [t for t in tasks if measured[id(t)] is None]
    ranked = sorted((t for t in tasks if measured[id(t)] is not None), key=lambda t: measured[id(t)], reverse=True)
    total = sum(measured[id(t)] for t in ranked)
    if total <= 0:
        return unread + ranked
    chosen, covered = list(unread), 0.0
    for task in ranked:
        if covered >= share * total:
            break
        chosen.append(task)
        covered += measured[id(task)]
    return chosen


def unmeasured_first(tasks, work_dir: Path) -> list:
    """The tasks the database in `work_dir` holds no measurement of first, then the rest, each group in its given
    order: a round's trials run out in task order, so a tuning cut short and resumed (or given too few trials to reach
    every function) measures the functions it never reached before it re-tunes the others."""
    if not (work_dir / "database_tuning_record.json").is_file():
        return list(tasks)
    from tvm.s_tir import meta_schedule as ms

    db = ms.database.JSONDatabase(work_dir=str(work_dir))

    def measured(task) -> bool:
        mod = task.dispatched[0]
        return db.has_workload(mod) and bool(db.get_top_k(db.commit_workload(mod), 1))

    return sorted(tasks, key=measured)  # stable: False (unmeasured) first


def tensor_core_space():
    """meta_schedule's design space with tensor-core tiling (wmma 16x16x16, float16 inputs, float32 or float16
    accumulation) first, the plain CUDA rules for what does not tensorize. TVM's own "cuda-tensorcore" set also holds
    an mma rule whose software pipeline fails on a convolution with a fused epilogue ("not a stage pipeline"), which
    would end the tuning of that function: left out."""
    import tvm.s_tir.tensor_intrin.cuda  # noqa: F401 - registers the wmma intrinsics the rule names
    from tvm.s_tir import meta_schedule as ms
    from tvm.s_tir.meta_schedule.schedule_rule import MultiLevelTilingTensorCore, ReuseType, ScheduleRule

    def group(accumulate: str, trans: str) -> dict:
        return {"init": f"wmma_fill_16x16x16_{accumulate}", "load_a": "wmma_load_16x16x16_f16_a_shared_dyn",
                "load_b": f"wmma_load_16x16x16_f16_b{trans}_shared_dyn",
                "compute": f"wmma_sync_16x16x16_f16f16{accumulate}{trans}",
                "store": f"wmma_store_16x16x16_{accumulate}_shared_dyn"}

    wmma = MultiLevelTilingTensorCore(
        intrin_groups=[group(acc, trans) for acc in ("f32", "f16") for trans in ("", "_trans")],
        structure="SSSRRSRS", tile_binds=["blockIdx.y", "blockIdx.x", "threadIdx.y"], max_innermost_factor=4,
        vector_load_lens=[1, 2, 3, 4, 8, 16], reuse_read=ReuseType("must", [4], "shared.dyn"),
        reuse_write=ReuseType("must", [2], "shared.dyn"))
    cuda = list(ScheduleRule.create("cuda"))  # [apply-custom-rule, ...the rest]
    return ms.space_generator.PostOrderApply(sch_rules=[cuda[0], wmma, *cuda[1:]], postprocs="cuda-tensorcore",
                                             mutator_probs="cuda-tensorcore")


def in_process_builder(threads: int = BUILD_THREADS, config: dict | None = None):
    """A meta_schedule builder that builds candidates in threads of this process (nvcc runs as subprocesses).

    meta_schedule's LocalBuilder starts a fresh pool of processes for every batch of candidates, and each imports TVM
    (8-10 s on the lent H100's host, more when 16 start at once): on the H100 a batch of 16 took 47 s to build, and
    with its 30 s timeout 61 of 94 candidates of one resnet18 round failed, even elementwise ones. Built here, a
    candidate costs its compilation only."""
    from concurrent.futures import ThreadPoolExecutor

    import tvm
    from tvm.ir.utils import derived_object
    from tvm.s_tir.meta_schedule.builder import BuilderResult, PyBuilder
    from tvm.s_tir.meta_schedule.builder.local_builder import default_build, default_export

    def one(build_input):
        try:
            with tvm.transform.PassContext(config=config or {}):  # a pass context holds per thread
                built = default_build(build_input.mod, build_input.target, None)
            return BuilderResult(default_export(built), None)
        except Exception as e:  # noqa: BLE001 - a candidate that does not build is a failed trial, not a failed tuning
            return BuilderResult(None, f"in-process builder: {type(e).__name__}: {str(e)[-300:]}")

    @derived_object
    class InProcessBuilder(PyBuilder):
        def build(self, build_inputs):
            with ThreadPoolExecutor(max_workers=threads) as pool:
                return list(pool.map(one, build_inputs))

    return InProcessBuilder()


@contextlib.contextmanager
def parallel_cuda_compiler():
    """CUDA candidates compiled by nvcc (subprocesses) while tuning, where nvcc is installed. TVM 0.27 compiles with
    NVRTC in-process by default, and concurrent NVRTC compilations serialize: on the lent H100's host 12 tensor-core
    candidates built in 16 threads took 14.7 s with NVRTC and 6.7 s with nvcc (one at a time 2.9 vs 2.5 s each) - a
    tuning round spent 40-48 s of its ~80 s per function building 32. A compiler the user chose is left alone."""
    chosen = "TVM_CUDA_COMPILE_MODE" in os.environ
    if not chosen and shutil.which("nvcc"):
        os.environ["TVM_CUDA_COMPILE_MODE"] = "nvcc"
    try:
        yield
    finally:
        if not chosen:
            os.environ.pop("TVM_CUDA_COMPILE_MODE", None)


@contextlib.contextmanager
def fast_tvmscript_parsing():
    """TVM's TVMScript parser takes `inspect.stack()` for every function it parses (496 when meta_schedule first
    imports TVM's tensor intrinsics, in every tuning process), and `inspect` looks up the module of each frame whose
    file is a pseudo-file (`<frozen importlib._bootstrap>`, parsed code) by scanning all of sys.modules, every time:
    that import took 39 s in a bare process and 132 s in one with the service and TensorFlow loaded (5,100 modules),
    3.7 s with this. A pseudo-file belongs to no module - the answer the scan comes to - so it is given at once."""
    scan = inspect.getmodule
    if getattr(scan, "pseudo_files_have_no_module", False):  # already in place (another build, nested)
        yield
        return

    def getmodule(obj, _filename=None):
        if _filename is not None and _filename.startswith("<") and _filename.endswith(">"):
            return None
        return scan(obj, _filename)

    getmodule.pseudo_files_have_no_module = True
    inspect.getmodule = getmodule
    try:
        yield
    finally:
        inspect.getmodule = scan


# functions per meta_schedule call within a round. meta_schedule keeps a call's measurements only when the call ends
# (it collects a function's results when it picks that function again, or at the end): resnet18 b32's one round of
# 12 functions, stopped after 170 s on the lent H100 (4 functions sent to measurement, 30-55 s each), kept no
# record. In calls of 4 functions a stopped tuning loses at most the call under way, and the minutes budget is
# checked between calls.
TASKS_PER_CALL = 4

# written when a tuning ends: a database without it is from a tuning cut short (its records are kept, and the next
# build goes on tuning from them instead of taking a half-measured database as done)
TUNED = "tuning.json"


def is_tuned(work_dir: Path) -> bool:
    return (work_dir / TUNED).is_file()


def tune(mod, tvm_target, work_dir: Path, trials: int, per_task: int | None = None,
         minutes: float | None = None, seed: int = 0, tensor_cores: bool = False, config: dict | None = None) -> dict:
    """meta_schedule over the module's fused functions (the module after the zero pipeline), its database in
    `work_dir`. In rounds of a few trials per function (ROUNDS, growing), each in calls of TASKS_PER_CALL functions,
    so a time budget can stop it between calls and a stopped tuning keeps what its finished calls measured;
    each round's search starts from the best schedules measured so far (they are in the database). tensor_cores: the
    design space tries wmma tiling first (float16 modules); config: PassContext settings the candidates are lowered
    with. Returns what ran."""
    import logging

    from tvm.s_tir import meta_schedule as ms

    # its per-round tables go to work_dir/logs; on the console (stdout, where --json writes) only warnings
    logger = logging.getLogger("tvm.s_tir.meta_schedule")
    logger.setLevel(logging.WARNING)
    # meta_schedule reconfigures this logger naming every handler it holds, and fails on one without a name (such as
    # pytest's capture handlers, attached during an earlier tuning in the same process)
    for handler in [h for h in logger.handlers if not h.get_name()]:
        logger.removeHandler(handler)
    every = ms.relax_integration.extract_tasks(mod, tvm_target)
    tasks = unmeasured_first(heaviest_tasks(every, FLOP_SHARE), work_dir)
    per_task = per_task or trials
    records = work_dir / "database_tuning_record.json"
    started, asked, given, rounds, stopped_by = time.monotonic(), 0, 0, 0, "trials"
    while asked < trials and given < per_task and stopped_by == "trials":
        share = min(ROUNDS[min(rounds, len(ROUNDS) - 1)], per_task - given)
        for first in range(0, max(1, len(tasks)), TASKS_PER_CALL):
            if minutes is not None and time.monotonic() - started >= 60 * minutes:
                stopped_by = "minutes"
                break
            if asked >= trials:
                break
            group = tasks[first:first + TASKS_PER_CALL]
            n = min(trials - asked, share * max(1, len(group)))
            contexts, weights = ms.relax_integration.extracted_tasks_to_tune_contexts(
                group, str(work_dir), space=tensor_core_space() if tensor_cores else "post-order-apply",
                strategy=ms.search_strategy.EvolutionarySearch(**SEARCH), seed=seed + rounds)
            with parallel_cuda_compiler() if tvm_target.kind.name == "cuda" else contextlib.nullcontext():
                ms.relax_integration.tune_tasks(tasks=contexts, task_weights=weights, work_dir=str(work_dir),
                                                max_trials_global=n, max_trials_per_task=share,
                                                builder=in_process_builder(config=config), runner="local",
                                                database="json", cost_model="xgb", measure_callbacks="default",
                                                task_scheduler="gradient")
            asked += n
        if stopped_by == "minutes" and first == 0:
            break  # the budget was spent before this round began
        given, rounds = given + share, rounds + 1
    # what was measured (a function with few possible schedules runs out of candidates before its share)
    measured = len(records.read_text().splitlines()) if records.exists() else 0
    ran = {"tasks": len(tasks), "functions": len(every), "rounds": rounds, "trials": measured,
           "seconds": round(time.monotonic() - started, 1), "stopped_by": stopped_by}
    (work_dir / TUNED).write_text(json.dumps(ran) + "\n")
    return ran

