"""What a host build takes (the host backend fills it from the build request, by field name)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class HostOptions:
    precision: str = "float32"  # float16: weights and activations in half precision, accumulation in float32
    tune_trials: int = 0  # meta_schedule trials in all (0: dlight's defaults only)
    tune_trials_per_task: int | None = None
    tune_minutes: float | None = None  # stop tuning after the round that passes this many minutes
    tuning_dir: Path | None = None  # databases, one folder per target and model; default beside the output
    inputs: int = 3  # random inputs checked against the reference (TFLite interpreter, ONNX Runtime)
    seed: int = 0
    runs: int = 50  # timed calls (median) after warm-up
    cuda_graph: bool = True  # CUDA: kernel launches captured once and replayed as CUDA graphs
    sample_inputs: Path | None = None  # .npz of inputs to check with instead of `inputs` random ones
    # CUDA float16 tuned: convolutions with few output tiles split their reduction (passes.py); on since its first GPU
    # measurement (benchmarks/results/gpu.json: resnet18 b1 on an H100, 2.05x faster than without in the same run)
    split_k: bool = True
