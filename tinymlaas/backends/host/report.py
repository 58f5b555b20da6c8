"""The host backend's report: what a host build made, how faithful and how fast it is (HostReport), and its text form."""

from __future__ import annotations

from dataclasses import dataclass, field

from tinymlaas.verify import VerifiedReport


@dataclass
class HostReport(VerifiedReport):
    model: str
    model_path: str
    target: str
    device: str  # the device it ran on, by name
    tvm_target: str
    precision: str
    lowering: str
    latency_ms: float  # median of `latency_runs` timed calls
    latency_runs: int
    fidelity: dict
    sizes: dict
    tuning: dict
    compile_seconds: float
    stages_seconds: dict
    notes: list[str] = field(default_factory=list)
    artifacts: dict = field(default_factory=dict)
    mode: dict = field(default_factory=dict)  # how it runs: precision, tuned, layout, CUDA graphs (passes.build_mode)
    kind: str = "host"


def _graphs(mode: dict) -> str:
    graph = mode.get("cuda_graph")
    if not graph:
        return ""
    if not graph["captured"]:
        return ", kernel launches one by one" + ("" if graph["asked"] else " (CUDA graphs off)")
    return (f", {graph['kernels_in_graphs']} of {mode['kernels']} kernel launches replayed as "
            f"{graph['regions']} CUDA graph(s)")


def format_host_report(r: HostReport) -> str:
    f = r.fidelity
    lines = [
        f"{r.model} on {r.target} ({r.device}); TVM target {r.tvm_target}",
        f"  precision {r.precision}, lowering {r.lowering}" + _graphs(r.mode),
        f"  latency   {r.latency_ms:.4f} ms (median of {r.latency_runs} runs)",
        f"  fidelity  {'PASS' if r.verified else 'FAIL'}: " + ", ".join(
            f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in f.items()
            if k in ("max_abs_error", "max_rel_error", "max_lsb_diff", "inputs")),
        f"  library   {r.sizes['library']:,} B (weights {r.sizes['weights']:,} B)",
    ]
    if r.tuning["trials"]:
        ran = r.tuning["ran"]
        did = (f"{ran['trials']} of {r.tuning['trials']} trials over {ran['tasks']} functions in {ran['seconds']:.0f} s"
               f" (stopped by {ran['stopped_by']})" if ran else "database reused, no trials")
        lines.append(f"  tuning    {did}: {r.tuning['database']}")
    lines += [f"  note: {n}" for n in r.notes]
    return "\n".join(lines)
