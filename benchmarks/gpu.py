"""GPU host backend, first measurements: TVM Relax for CUDA vs PyTorch eager vs torch.compile, in one run.

Usage (on a machine with an NVIDIA GPU, PyTorch and torchvision; TVM 0.27 and this repository on PYTHONPATH):
    python -P benchmarks/gpu.py [--out FILE] [--runs 100] [--models resnet18:1[:dlight+tuned],...]
                                [--trials N --per-task M --minutes T --logs DIR] [--variants dlight,tuned,tuned16]
(-P: this folder's profile.py would hide the standard library's from torch.)

Models (torchvision definitions, random weights, seed 0): resnet18 at batch 1 and 32, mobilenet_v2 at batch 1.
TVM: `torch.export` -> `from_exported_program` -> the host backend's `optimize` (the zero pipeline, dlight's
default GPU schedules: untuned, the starting point issue 13 tunes from) -> `relax.build` for CUDA; the same with
kernel launches as CUDA graphs (`graph`). With --trials, also tuned builds: meta_schedule through the host backend's
tuner (at most N trials, M per task, --minutes per model, in rounds), dlight for what it leaves, CUDA graphs; in
float32 (`tuned`) and in float16 with float32 accumulation and tensor-core tiling (`tuned16`; torch's own
convolutions run as TF32 on tensor cores, `torch_tf32` in the results, the same 10-bit mantissa). Latency: the median
of `runs` timed calls after warm-up, timed on the device (CUDA events for PyTorch, TVM's time_evaluator for TVM).
Error: ||tvm - torch|| / ||torch|| on the same random input, outputs compared in float32.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

MODELS = [("resnet18", 1), ("resnet18", 32), ("mobilenet_v2", 1)]
# the TVM builds: (precision, tuned, CUDA graphs). dlight: untuned; graph: untuned, launches as CUDA graphs; tuned:
# meta_schedule + CUDA graphs; tuned16: float16 (accumulating in float32) with tensor-core tiling, tuned, graphs
PLANS = {"dlight": ("float32", False, False), "graph": ("float32", False, True), "tuned": ("float32", True, True),
         "graph16": ("float16", False, True), "tuned16": ("float16", True, True)}


def torch_latency_ms(fn, x, runs: int) -> float:
    import torch

    for _ in range(10):
        fn(x)
    torch.cuda.synchronize()
    times = []
    for _ in range(runs):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn(x)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def tvm_build(model, x, precision: str = "float32", trials: int = 0, per_task: int = 0, work_dir: str = "tuning",
              cuda_graph: bool = False, minutes: float | None = None):
    """The exported program built for CUDA by the host backend's own optimization (`optimize`: float16 as mixed
    precision, tuning when `trials` - meta_schedule in rounds within the trials and minutes given, tensor-core tiling
    for float16 - and dlight's default schedules for the rest), optionally with the kernel launches captured as CUDA
    graphs: (vm, device, build seconds, tuning statistics). Weights are bound as constants (float16: cast once, at
    build time)."""
    import torch
    import tvm
    from tvm import relax
    from tvm.relax.frontend.torch import from_exported_program

    from tinymlaas.backends.host.options import HostOptions
    from tinymlaas.backends.host.passes import lowering_config, optimize
    from tinymlaas.targets import get_target

    t0 = time.monotonic()
    with torch.no_grad():
        exported = torch.export.export(model, (x,))
    mod = from_exported_program(exported, keep_params_as_input=False)
    dev = tvm.cuda(0)
    target = tvm.target.Target.from_device(dev)  # the GPU's own architecture and limits, for tuning too
    host = get_target("cuda-host")
    options = HostOptions(precision=precision, tune_trials=trials, tune_trials_per_task=per_task or None,
                          tune_minutes=minutes)
    if trials:
        Path(work_dir).mkdir(parents=True, exist_ok=True)
    mod, stats = optimize(mod, host, target, options, Path(work_dir))
    config = {"relax.backend.use_cuda_graph": cuda_graph, **lowering_config(host, precision)}
    with tvm.transform.PassContext(opt_level=3, config=config):
        executable = relax.build(mod, target=target)
    return relax.VirtualMachine(executable, dev), dev, time.monotonic() - t0, stats


def tuning_summary(work_dir: str) -> dict:
    """How many candidates meta_schedule kept in its database, how many of those failed (it records a failed build
    or run as 1e10 s), and how many error lines its logs hold."""
    db = Path(work_dir) / "database_tuning_record.json"
    records = [json.loads(line) for line in db.read_text().splitlines()] if db.exists() else []
    failed = sum(1 for _, rec in records if not rec[1] or min(float(t) for t in rec[1]) >= 1e9)
    logs = sorted((Path(work_dir) / "logs").glob("*.log")) if (Path(work_dir) / "logs").exists() else []
    errors = sum(log.read_text(errors="replace").count("Error") for log in logs)
    return {"records": len(records), "records_failed": failed, "log_files": len(logs), "log_error_lines": errors}


def measure(name: str, batch: int, runs: int, trials: int = 0, per_task: int = 0, variants=("dlight", "graph"),
            logs: str | None = None, minutes: float | None = None) -> dict:
    import numpy as np
    import torch
    import torchvision
    import tvm

    torch.manual_seed(0)
    model = getattr(torchvision.models, name)(weights=None).eval().cuda()
    x = torch.randn(batch, 3, 224, 224, device="cuda")
    out = {"model": name, "batch": batch}
    with torch.no_grad():
        reference = model(x).float().cpu().numpy()
        out["torch_eager_ms"] = round(torch_latency_ms(model, x, runs), 4)
        t0 = time.monotonic()
        compiled = torch.compile(model)
        compiled(x)
        out["torch_compile_s"] = round(time.monotonic() - t0, 1)
        out["torch_compile_ms"] = round(torch_latency_ms(compiled, x, runs), 4)
        # like for like with our float16 builds: torch.compile of the model in half precision (cuDNN's float16
        # tensor-core convolutions); its error against the float32 reference is reported the same way
        import copy

        half, x16 = copy.deepcopy(model).half(), x.half()
        compiled16 = torch.compile(half)
        got16 = compiled16(x16).float().cpu().numpy()
        out["torch_compile16_ms"] = round(torch_latency_ms(compiled16, x16, runs), 4)
        out["torch_compile16_rel_error"] = float(np.linalg.norm(got16 - reference) / np.linalg.norm(reference))
        del half, x16, compiled16
    model, x = model.cpu(), x.cpu()
    for kind in [v for v in variants if not PLANS[v][1] or trials]:
        precision, tuned, graph = PLANS[kind]
        tune = trials if tuned else 0
        work_dir = f"tuning-{name}-{batch}-{precision}"
        try:
            vm, dev, seconds, stats = tvm_build(model, x, precision, tune, per_task, work_dir, graph, minutes)
            if stats:
                out[f"tuning_run_{precision}"] = stats
            xt = tvm.runtime.tensor(x.numpy(), dev)
            got = vm["main"](xt)
            got = (got if hasattr(got, "numpy") else got[0]).numpy().astype("float32")  # the program returns a tuple
            timer = vm.time_evaluator("main", dev, number=1, repeat=runs, min_repeat_ms=0)
            out[f"tvm_{kind}_build_s"] = round(seconds, 1)
            out[f"tvm_{kind}_ms"] = round(1000 * statistics.median(timer(xt).results), 4)
            out[f"tvm_{kind}_rel_error"] = float(np.linalg.norm(got - reference) / np.linalg.norm(reference))
            out[f"tvm_{kind}_vs_torch_compile"] = round(out[f"tvm_{kind}_ms"] / out["torch_compile_ms"], 3)
            if precision == "float16":
                out[f"tvm_{kind}_vs_torch_compile16"] = round(out[f"tvm_{kind}_ms"] / out["torch_compile16_ms"], 3)
        except Exception as e:  # noqa: BLE001 - one model's failure is a result too
            out[f"tvm_{kind}_error"] = f"{type(e).__name__}: {str(e)[:400]}"
        print(json.dumps(out), flush=True)  # so far: a run cut short still tells what it measured
        if tune:
            out[f"tuning_{precision}"] = tuning_summary(work_dir)
            if logs:  # meta_schedule's own logs, to read why candidates failed
                import shutil

                shutil.make_archive(str(Path(logs) / work_dir), "gztar", work_dir)
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "gpu.json"))
    ap.add_argument("--runs", type=int, default=100)
    ap.add_argument("--models", default=",".join(f"{m}:{b}" for m, b in MODELS), help="name:batch[:variant+variant],... (variants for that model, else --variants)")
    ap.add_argument("--trials", type=int, default=0, help="meta_schedule trials per model (default 0: no tuning)")
    ap.add_argument("--per-task", type=int, default=0, help="at most this many trials per task")
    ap.add_argument("--minutes", type=float, help="tuning time budget per model (checked between rounds)")
    ap.add_argument("--variants", default="dlight,graph,tuned,tuned16", help=f"which TVM builds ({', '.join(PLANS)})")
    ap.add_argument("--logs", help="folder for meta_schedule's logs (a .tar.gz per model)")
    args = ap.parse_args()
    import torch
    import tvm

    results = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "tvm": tvm.__version__,
               "python": platform.python_version(), "runs": args.runs,
               "torch_tf32": {"cudnn": torch.backends.cudnn.allow_tf32, "matmul": torch.backends.cuda.matmul.allow_tf32},
               "tuning": {"trials": args.trials, "per_task": args.per_task, "minutes": args.minutes}
               if args.trials else "none (dlight)",
               "models": []}
    for spec in args.models.split(","):
        name, batch, *own = spec.split(":")  # name:batch[:dlight+tuned16]: this model's own builds
        variants = own[0].split("+") if own else args.variants.split(",")
        unknown = set(variants) - set(PLANS)
        if unknown:
            ap.error(f"unknown variant(s) {', '.join(sorted(unknown))} in '{spec}' (known: {', '.join(PLANS)})")
        r = measure(name, int(batch), args.runs, args.trials, args.per_task, variants, args.logs, args.minutes)
        print(json.dumps(r), flush=True)
        results["models"].append(r)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    nan = float("nan")
    print(f"{'model':<14}{'batch':>6}{'eager ms':>10}{'compile ms':>12}{'compile16':>10}{'dlight ms':>10}"
          f"{'tuned ms':>10}{'tuned16 ms':>11}{'best/compile':>13}{'t16/c16':>8}")
    for r in results["models"]:
        best = min((r[f"tvm_{k}_ms"] for k in PLANS if f"tvm_{k}_ms" in r), default=nan)
        print(f"{r['model']:<14}{r['batch']:>6}{r['torch_eager_ms']:>10.3f}{r['torch_compile_ms']:>12.3f}"
              f"{r['torch_compile16_ms']:>10.3f}{r.get('tvm_dlight_ms', nan):>10.3f}{r.get('tvm_tuned_ms', nan):>10.3f}"
              f"{r.get('tvm_tuned16_ms', nan):>11.3f}{best / r['torch_compile_ms']:>13.2f}"
              f"{r.get('tvm_tuned16_ms', nan) / r['torch_compile16_ms']:>8.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
