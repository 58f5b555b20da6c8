"""GPU host backend against PyTorch's fastest modes: TVM Relax for CUDA vs PyTorch eager and torch.compile's
`default`, `reduce-overhead` and `max-autotune`, in float32 and float16, in one run on one GPU.

Usage (on a machine with an NVIDIA GPU, PyTorch and torchvision; TVM 0.27 and this repository on PYTHONPATH):
    python -P benchmarks/gpu.py [--out FILE] [--runs 100] [--models resnet18:1[:graph+tuned16],...]
        [--variants graph,graph16,tuned16] [--trials N --per-task M --minutes T --tuning-dir DIR]
        [--torch-modes eager,default,reduce-overhead,max-autotune] [--dtypes float32,float16] [--profile N]
        [--skip-torch model:dtype:mode,...] [--tune-only]
    python -P benchmarks/gpu.py --merge RUN.json [RUN.json ...] --out benchmarks/results/gpu.json --key KEY
(-P: this folder's profile.py would hide the standard library's from torch.) The run of 2026-12-07 set
TORCHINDUCTOR_MAX_AUTOTUNE_CONV_BACKENDS=ATEN (max-autotune's convolutions from cuDNN: its Triton convolution
templates took minutes per model to autotune). A tuning database in benchmarks/results/tuning/ (NAME-BATCH-PRECISION,
unpacked under --tuning-dir) rebuilds without trials.

Models (torchvision definitions, random weights, seed 0): resnet18 at batch 1 and 32, mobilenet_v2 at batch 1
(`tiny`: a small convolutional network, for trying the script on a machine without torchvision or a GPU, with
`--device cpu`).

PyTorch: for each precision (the model and input cast to float16 for `float16`) eager and torch.compile in each mode;
the first call's seconds are its compile time (inductor's on-disk caches as the machine has them: a second run in
the same hold finds them warm, so `compile_s` of each run is recorded with the run). cuDNN runs float32
convolutions in TF32 as PyTorch's default allows (`torch_tf32` in the results). The reference for every relative
error is the float32 model run eagerly with TF32 off.

Ours (`PLANS`): `torch.export` -> `from_exported_program` -> the host backend's `optimize` (zero pipeline,
meta_schedule from the tuning database when tuned - tensor-core tiling, NHWC and batch norm folded for float16 -
dlight's default GPU schedules for the rest) -> its lowering pipeline -> `relax.build`. Each build records its mode
(`build_mode`: precision, tuned, layout, how many kernel launches RewriteCUDAGraph put in CUDA graphs).

Order per workload: our builds, then PyTorch's modes (since 2026-12-08; before, PyTorch's first), then the profiles.
Latency: the median of `runs` timed calls after warm-up, timed on the device (CUDA events for PyTorch, TVM's
time_evaluator for ours). `vs_fastest_torch`: our time over the fastest PyTorch mode's, either precision, among those within
`TOLERANCE` of the reference.
`--profile N`: the kernels of our fastest build and of the fastest PyTorch mode over N calls, by PyTorch's profiler
(CUPTI sees every kernel of the process, TVM's too, graph-launched ones included): top kernels with their share of
the kernel time, kernel time per call, and what is left of the latency besides kernels (launch gaps).
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import re
import statistics
import sys
import time
from pathlib import Path

MODELS = [("resnet18", 1), ("resnet18", 32), ("mobilenet_v2", 1)]
# our builds: (precision, tuned, CUDA graphs, split-K). graph: untuned (dlight), float32; graph16: untuned, float16
# (float32 accumulation); tuned16: float16 tuned with tensor-core tiling; *_nograph: the same, launches one by one;
# tuned16_splitk: tuned16 with the convolutions that have few output tiles split along their reduction
# (HostOptions.split_k), its database seeded with tuned16's records (the convolutions it leaves alone are the same
# functions), so that its tuning measures the new matrix products; tuned16_splitk_apart: the same with each im2col a
# kernel of its own (passes.SPLIT_K_IM2COL_FUSES off: the previous layer's sum and epilogue not fused into it)
PLANS = {"graph": ("float32", False, True, False), "nograph": ("float32", False, False, False),
         "graph16": ("float16", False, True, False), "tuned": ("float32", True, True, False),
         "tuned16": ("float16", True, True, False), "tuned16_nograph": ("float16", True, False, False),
         "tuned16_splitk": ("float16", True, True, True), "tuned16_splitk_apart": ("float16", True, True, "apart")}
TORCH_MODES = ("eager", "default", "reduce-overhead", "max-autotune")
DTYPES = ("float32", "float16")


def tiny_model():
    import torch

    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.BatchNorm2d(16), torch.nn.ReLU(),
        torch.nn.Conv2d(16, 16, 3, padding=1, groups=16), torch.nn.BatchNorm2d(16), torch.nn.ReLU6(),
        torch.nn.Conv2d(16, 32, 1), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(32, 10))


def make_model(name: str, batch: int, device: str):
    import torch

    torch.manual_seed(0)
    if name == "tiny":
        model, size = tiny_model(), 32
    else:
        import torchvision

        model, size = getattr(torchvision.models, name)(weights=None), 224
    return model.eval().to(device), torch.randn(batch, 3, size, size, device=device)


def sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def torch_latency_ms(fn, x, runs: int, device: str) -> float:
    import torch

    for _ in range(10):
        fn(x)
    sync(device)
    times = []
    for _ in range(runs):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn(x)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn(x)
            times.append(1000 * (time.perf_counter() - t0))
    return statistics.median(times)


def rel_error(got, reference) -> float:
    import numpy as np

    return float(np.linalg.norm(got.astype("float64") - reference) / np.linalg.norm(reference))


def measure_torch(model, x, reference, modes, dtypes, runs: int, device: str, out: dict, progress,
                  skip: frozenset = frozenset()) -> dict:
    """Eager and torch.compile in each mode, per precision, into `out`: latency, first-call (compile) seconds,
    relative error; `progress()` after each. `skip`: (dtype, mode) pairs not run (recorded as skipped)."""
    import torch

    for dtype in dtypes:
        m, xi = (copy.deepcopy(model).half(), x.half()) if dtype == "float16" else (model, x)
        for mode in modes:
            if (dtype, mode) in skip:
                out.setdefault(dtype, {})[mode] = {"skipped": "--skip-torch"}
                print(json.dumps({"torch": dtype, "mode": mode, "skipped": True}), flush=True)
                continue
            torch._dynamo.reset()  # each mode compiles afresh (one forward code object, several modes)
            row = {}
            try:
                with torch.no_grad():
                    fn = m if mode == "eager" else torch.compile(m, mode=None if mode == "default" else mode)
                    t0 = time.monotonic()
                    got = fn(xi).float().cpu().numpy()  # copied out at once: reduce-overhead reuses its output
                    sync(device)
                    if mode != "eager":
                        row["compile_s"] = round(time.monotonic() - t0, 1)
                    row["rel_error"] = rel_error(got, reference)
                    row["ms"] = round(torch_latency_ms(fn, xi, runs, device), 4)
            except Exception as e:  # noqa: BLE001 - one mode's failure is a result too
                row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
            out.setdefault(dtype, {})[mode] = row
            print(json.dumps({"torch": dtype, "mode": mode, **row}), flush=True)
            progress()
    return out


# a PyTorch mode counts as the one to beat only when its output is right: the host backend's own float16 tolerance
# (mobilenet_v2 in float16 with random weights underflows: its activations shrink about tenfold a stage, to 2e-8
# before the classifier, under float16's smallest subnormal 6e-8: the output is all zeros, relative error 1.0 in
# every mode; seen on the CPU with torch 2.13, 2026-12-08)
TOLERANCE = 2e-2


def fastest_torch(table: dict) -> dict | None:
    rows = [(row["ms"], dtype, mode) for dtype, modes in table.items() for mode, row in modes.items()
            if "ms" in row and row["rel_error"] <= TOLERANCE]
    if not rows:
        return None
    ms, dtype, mode = min(rows)
    return {"ms": ms, "dtype": dtype, "mode": mode}


def tvm_build(model, x, precision: str, tuned: bool, graphs: bool, work_dir: Path, device: str, trials: int,
              per_task: int, minutes: float | None, build: bool = True, split_k: bool | str = False):
    """The exported program through the host backend's `optimize` and its lowering pipeline, built: (vm, device,
    build seconds, tuning statistics, mode). Weights are bound as constants (float16: cast once, at build time).
    build=False: optimize only (tuning the database when it is not finished)."""
    import torch
    import tvm
    from tvm import relax
    from tvm.relax.frontend.torch import from_exported_program

    from tinymlaas.backends.host.build import tvm_target_of
    from tinymlaas.backends.host.options import HostOptions
    from tinymlaas.backends.host.passes import build_mode, lowering_config, lowering_pipeline, optimize
    from tinymlaas.targets import get_target

    t0 = time.monotonic()
    with torch.no_grad():
        exported = torch.export.export(model, (x,))
    mod = from_exported_program(exported, keep_params_as_input=False)
    host = get_target("cuda-host" if device == "cuda" else "cpu-host")
    dev = tvm.cuda(0) if device == "cuda" else tvm.cpu(0)
    target = tvm_target_of(host, dev)  # on CUDA the GPU's own architecture and limits, for tuning too
    options = HostOptions(precision=precision, tune_trials=trials if tuned else 0,
                          tune_trials_per_task=per_task or None, tune_minutes=minutes, cuda_graph=graphs,
                          split_k=bool(split_k))
    if tuned:
        work_dir.mkdir(parents=True, exist_ok=True)
    from tinymlaas.backends.host import passes

    passes.SPLIT_K_IM2COL_FUSES = split_k != "apart"
    try:
        mod, stats = optimize(mod, host, target, options, work_dir)
    finally:
        passes.SPLIT_K_IM2COL_FUSES = True
    if not build:
        return None, dev, time.monotonic() - t0, stats, None
    config = {"relax.backend.use_cuda_graph": graphs and device == "cuda", **lowering_config(host, precision)}
    with tvm.transform.PassContext(opt_level=3, config=config):
        with target:
            lowered = lowering_pipeline(target)(mod)
        executable = relax.build(lowered, target=target, relax_pipeline=None)
    mode = build_mode(lowered, host, precision, tuned, graphs and device == "cuda")
    mode["split_k"] = split_k
    return relax.VirtualMachine(executable, dev), dev, time.monotonic() - t0, stats, mode


def seed_database(work_dir: Path, source: Path) -> None:
    """A database not started yet takes the records of `source` (not its finished mark): the functions both builds
    share are measured already."""
    import shutil

    if (work_dir / "database_tuning_record.json").exists() or not (source / "database_tuning_record.json").exists():
        return
    work_dir.mkdir(parents=True, exist_ok=True)
    for f in ("database_workload.json", "database_tuning_record.json"):
        shutil.copy(source / f, work_dir / f)


def tuning_summary(work_dir: Path) -> dict:
    """How many candidates meta_schedule kept in its database and how many of those failed (recorded as 1e10 s)."""
    db = work_dir / "database_tuning_record.json"
    records = [json.loads(line) for line in db.read_text().splitlines()] if db.exists() else []
    failed = sum(1 for _, rec in records if not rec[1] or min(float(t) for t in rec[1]) >= 1e9)
    done = work_dir / "tuning.json"
    return {"records": len(records), "records_failed": failed,
            "tuning": json.loads(done.read_text()) if done.exists() else "not finished"}


def kernel_profile(fn, calls: int, latency_ms: float, top: int = 15) -> dict:
    """The kernels `fn` runs over `calls` calls, as PyTorch's profiler (CUPTI) records them: per kernel name the
    device time and launches; the top ones with their share of all kernel time; kernel time per call against the
    call's latency (the rest: gaps between kernels, launches, host work)."""
    import tempfile

    import torch
    from torch.profiler import ProfilerActivity, profile

    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        prof.export_chrome_trace(f.name)
        events = json.loads(Path(f.name).read_text()).get("traceEvents", [])
    kernels: dict[str, list] = {}
    for e in events:
        if e.get("cat") == "kernel" and "dur" in e:
            kernels.setdefault(e["name"], []).append(float(e["dur"]))
    total = sum(sum(v) for v in kernels.values())
    if not total:
        return {"calls": calls, "error": "the profiler recorded no kernels"}
    ranked = sorted(kernels.items(), key=lambda kv: -sum(kv[1]))
    per_call = total / calls / 1000
    kinds: dict[str, float] = {}
    for name, durs in kernels.items():
        kinds[kernel_kind(name)] = kinds.get(kernel_kind(name), 0.0) + sum(durs)
    return {"calls": calls, "kernel_ms_per_call": round(per_call, 4), "latency_ms": latency_ms,
            "not_in_kernels_ms": round(latency_ms - per_call, 4),
            "launches_per_call": round(sum(len(v) for v in kernels.values()) / calls, 1),
            "by_kind": {k: round(v / total, 3) for k, v in sorted(kinds.items(), key=lambda kv: -kv[1])},
            "top": [{"kernel": name[:120], "share": round(sum(durs) / total, 4),
                     "us_per_call": round(sum(durs) / calls, 2), "launches_per_call": round(len(durs) / calls, 1)}
                    for name, durs in ranked[:top]]}


# by name, first match; Triton's pointwise kernels are named after the operators they fuse ("..._convolution_relu"
# is a batch norm and ReLU after a convolution)
KINDS = [("elementwise", r"^triton_poi"), ("depthwise", r"depthwise|dwconv|group_conv"), ("convolution", r"conv|implicit_gemm|cudnn|xmma|sm90_|cutlass"),
         ("matmul", r"matmul|dense|gemm|gemv"), ("pooling", r"pool|mean|reduce|adaptive"),
         ("layout/cast", r"transpose|permute|layout|cast|copy|convert"),
         ("elementwise", r"add|relu|clip|elementwise|triton_poi|bias|batch_norm")]


def kernel_kind(name: str) -> str:
    low = name.lower()
    return next((kind for kind, pattern in KINDS if re.search(pattern, low)), "other")


def measure(name: str, batch: int, args, variants, out: dict, progress) -> dict:
    """One workload into `out` (already among the run's models): PyTorch's modes, our builds, the profiles;
    `progress()` (the run written so far) after each measurement, so a command cut off keeps what it measured."""
    import numpy as np
    import torch

    device, runs = args.device, args.runs
    model, x = make_model(name, batch, device)
    out.update({"model": name, "batch": batch})
    if not args.tune_only:
        with torch.no_grad():
            tf32 = torch.backends.cudnn.allow_tf32
            torch.backends.cudnn.allow_tf32 = False  # the reference: float32 throughout
            reference = model(x).double().cpu().numpy()
            torch.backends.cudnn.allow_tf32 = tf32
    model_cpu, x_cpu = copy.deepcopy(model).cpu(), x.cpu()
    ours = out.setdefault("tvm", {})
    for kind in variants:
        precision, tuned, graphs, split_k = PLANS[kind]
        work_dir = Path(args.tuning_dir) / f"{name}-{batch}-{precision}{'-splitk' if split_k else ''}"
        if split_k and tuned:
            seed_database(work_dir, Path(args.tuning_dir) / f"{name}-{batch}-{precision}")
        row = ours.setdefault(kind, {})
        if tuned and not args.trials:
            row["error"] = "a tuned build needs --trials (no trials run once its database is finished)"
            continue
        try:
            vm, dev, seconds, stats, mode = tvm_build(model_cpu, x_cpu, precision, tuned, graphs, work_dir, device,
                                                      args.trials, args.per_task, args.minutes,
                                                      build=not args.tune_only, split_k=split_k)
            if tuned:
                row["tuning_run"], row["tuning"] = stats, tuning_summary(work_dir)
            row["build_s"] = round(seconds, 1)
            if vm is not None:
                import tvm

                row["mode"] = mode
                if tuned and not row["tuning"]["records"]:  # an empty database: every function is dlight's
                    mode["tuned"] = False
                xt = tvm.runtime.tensor(x_cpu.numpy(), dev)
                got = vm["main"](xt)
                got = (got if hasattr(got, "numpy") else got[0]).numpy()  # the program returns a tuple
                timer = vm.time_evaluator("main", dev, number=1, repeat=runs, min_repeat_ms=0)
                row["ms"] = round(1000 * statistics.median(timer(xt).results), 4)
                row["rel_error"] = rel_error(got.astype(np.float64), reference)
                if args.profile and device == "cuda":
                    row["_vm"], row["_xt"] = vm, xt  # profiled below, for the fastest of ours
        except Exception as e:  # noqa: BLE001 - one build's failure is a result too
            row["error"] = f"{type(e).__name__}: {str(e)[:400]}"
        print(json.dumps({"tvm": kind, **{k: v for k, v in row.items() if not k.startswith("_")}}), flush=True)
        progress()
    if not args.tune_only:  # PyTorch's modes after ours: a run cut off in a long max-autotune compile keeps ours
        out["torch"] = {}
        skip = frozenset(tuple(spec.split(":")[1:]) for spec in args.skip_torch.split(",")
                         if spec.split(":")[0] == name)
        measure_torch(model, x, reference, args.torch_modes.split(","), args.dtypes.split(","), runs, device,
                      out["torch"], progress, skip)
        out["torch_fastest"] = fastest_torch(out["torch"])
        for row in ours.values():
            if "ms" in row and out["torch_fastest"]:
                row["vs_fastest_torch"] = round(row["ms"] / out["torch_fastest"]["ms"], 3)
        progress()
    if args.profile and device == "cuda":
        built = {k: r for k, r in ours.items() if "_vm" in r}
        if built:
            best = min(built, key=lambda k: built[k]["ms"])
            vm, xt = built[best]["_vm"], built[best]["_xt"]
            out["profile_ours"] = {"variant": best, **kernel_profile(lambda: vm["main"](xt), args.profile,
                                                                      built[best]["ms"])}
        fastest = out.get("torch_fastest")
        if fastest:
            with torch.no_grad():
                m, xi = (copy.deepcopy(model).half(), x.half()) if fastest["dtype"] == "float16" else (model, x)
                torch._dynamo.reset()
                fn = m if fastest["mode"] == "eager" else torch.compile(
                    m, mode=None if fastest["mode"] == "default" else fastest["mode"])
                fn(xi)
                out["profile_torch"] = {**fastest, **kernel_profile(lambda: fn(xi), args.profile, fastest["ms"])}
        for r in ours.values():
            r.pop("_vm", None), r.pop("_xt", None)
    return out


def merge(files: list[str], out: Path, key: str, note: dict) -> None:
    """Runs (each a file this script wrote) into one entry `latest` of `out`; the entry `latest` held before is
    kept under `key`."""
    runs = [json.loads(Path(f).read_text()) for f in files]
    merged = {**{k: v for k, v in runs[0].items() if k != "models"}, **note,
              "models": [m for r in runs for m in r["models"]]}
    old = json.loads(out.read_text()) if out.exists() else {}
    if "latest" in old:
        old[key] = old.pop("latest")
    out.write_text(json.dumps({"latest": merged, **old}, indent=2) + "\n")


def table(results: dict) -> str:
    lines = [f"{'model':<14}{'batch':>6}{'ours':>10}{'variant':>10}{'torch best':>12}{'mode':>28}{'ratio':>7}"]
    for r in results["models"]:
        ours = {k: v for k, v in r.get("tvm", {}).items() if "ms" in v}
        best = min(ours, key=lambda k: ours[k]["ms"]) if ours else None
        fast = r.get("torch_fastest") or {}
        lines.append(f"{r['model']:<14}{r['batch']:>6}{ours[best]['ms'] if best else float('nan'):>10.3f}"
                     f"{best or '-':>10}{fast.get('ms', float('nan')):>12.3f}"
                     f"{(fast.get('dtype', '-') + ' ' + fast.get('mode', '')):>28}"
                     f"{ours[best].get('vs_fastest_torch', float('nan')) if best else float('nan'):>7.2f}")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "gpu.json"))
    ap.add_argument("--runs", type=int, default=100)
    ap.add_argument("--models", default=",".join(f"{m}:{b}" for m, b in MODELS),
                    help="name:batch[:variant+variant],... (variants for that model, else --variants)")
    ap.add_argument("--variants", default="graph,graph16,tuned16", help=f"our builds ({', '.join(PLANS)})")
    ap.add_argument("--torch-modes", default=",".join(TORCH_MODES))
    ap.add_argument("--dtypes", default=",".join(DTYPES))
    ap.add_argument("--skip-torch", default="", help="model:dtype:mode,... PyTorch columns not run (e.g. "
                    "mobilenet_v2:float16:max-autotune: float16 underflows to zeros with random weights, 2.5 min of compiling)")
    ap.add_argument("--trials", type=int, default=0, help="meta_schedule trials per model for the tuned builds: "
                    "a finished database (tuning.json) is reused without trials")
    ap.add_argument("--per-task", type=int, default=0, help="at most this many trials per task")
    ap.add_argument("--minutes", type=float, help="tuning time budget per model (checked between rounds)")
    ap.add_argument("--tuning-dir", default="tuning", help="tuning databases, one folder per model and precision")
    ap.add_argument("--search-population", type=int, help="meta_schedule's evolutionary search population "
                    "(default: the host backend's)")
    ap.add_argument("--flop-share", type=float, help="tune the heaviest functions holding this share of the FLOPs "
                    "(default: the host backend's)")
    ap.add_argument("--profile", type=int, default=0, help="profile the kernels over this many calls")
    ap.add_argument("--tune-only", action="store_true", help="tune the tuned builds' databases, measure nothing")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="cpu: to try the script (cpu-host)")
    ap.add_argument("--merge", nargs="+", help="merge these runs into --out as `latest` (the old one kept)")
    ap.add_argument("--key", help="with --merge: the key the old `latest` is kept under")
    ap.add_argument("--note", default="{}", help="with --merge: JSON fields added to the merged run")
    args = ap.parse_args()
    if args.merge:
        if not args.key:
            ap.error("--merge needs --key")
        merge(args.merge, Path(args.out), args.key, json.loads(args.note))
        return 0
    from tinymlaas.backends.host import tuning

    if args.search_population:
        tuning.SEARCH = {**tuning.SEARCH, "population_size": args.search_population}
    if args.flop_share:
        tuning.FLOP_SHARE = args.flop_share
    import torch
    import tvm

    results = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "command": " ".join(sys.argv),
               "device": torch.cuda.get_device_name(0) if args.device == "cuda" else platform.processor(),
               "torch": torch.__version__, "tvm": tvm.__version__, "python": platform.python_version(),
               "runs": args.runs,
               "torch_tf32": {"cudnn": torch.backends.cudnn.allow_tf32,
                              "matmul": torch.backends.cuda.matmul.allow_tf32},
               "tuning": {"trials": args.trials, "per_task": args.per_task, "minutes": args.minutes,
                          "search": tuning.SEARCH, "flop_share": tuning.FLOP_SHARE},
               "models": []}
    def save():  # the run so far, the models being measured included (unpicklable handles left out)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        text = json.dumps(results, indent=2, default=lambda _: None)
        Path(args.out).write_text(text + "\n")

    for spec in args.models.split(","):
        name, batch, *own = spec.split(":")  # name:batch[:graph+tuned16]: this model's own builds
        variants = [v for v in (own[0].split("+") if own else args.variants.split(",")) if v]
        unknown = set(variants) - set(PLANS)
        if unknown:
            ap.error(f"unknown variant(s) {', '.join(sorted(unknown))} in '{spec}' (known: {', '.join(PLANS)})")
        if args.tune_only:
            variants = [v for v in variants if PLANS[v][1]]
        current: dict = {}
        results["models"].append(current)
        measure(name, int(batch), args, variants, current, save)
        save()
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
