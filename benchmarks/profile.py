"""Per layer: python benchmarks/profile.py MODEL.tflite TARGET [--kernels auto|tir|dsp|dsp16] [--emulator ibex]
[--json]

Builds the model with per-step profiling and prints one line per step (kernel call or copy), keyed by TFLite
operator index and kernel variant: exact instructions and memory accesses (QEMU), the cycle estimate (llvm-mca's
model of the core x QEMU's per-block counts) and, on Ibex targets, true cycles from the RTL with the estimate's
error.
"""

import argparse
import json
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tinymlaas.backends.mcu.profile import profile_model


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("target")
    ap.add_argument("--kernels", default="auto", choices=("auto", "tir", "dsp", "dsp16"))
    ap.add_argument("--emulator", choices=("qemu", "ibex"), help="ibex: true cycles too (RV32 targets without FPU)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        prof = profile_model(args.model, args.target, Path(tmp), kernels=args.kernels, emulator=args.emulator)
    if args.json:
        print(json.dumps({"model": prof.model, "target": prof.target, "estimate_method": prof.estimate_method,
                          "cycles_source": prof.cycles_source, "totals": prof.totals(),
                          "steps": [asdict(s) for s in prof.steps]}, indent=1))
        return 0
    true = prof.cycles_source is not None
    print(f"{prof.model} on {prof.target}; estimate: {prof.estimate_method}"
          + (f"; true cycles: {prof.cycles_source}" if true else ""))
    print(f"{'op':>4} {'operator':<22} {'variant':<8} {'instructions':>13} {'mem access':>11} {'est. cycles':>13}"
          + (f" {'true cycles':>13} {'CPI':>5} {'est. err':>8}" if true else ""))
    for s in prof.steps:
        line = (f"{'' if s.op_index is None else s.op_index:>4} {s.opcode or s.kernel[:22]:<22} "
                f"{s.implementation or '':<8} {s.instructions:>13,} {s.memory_accesses:>11,} {s.cycles_estimate:>13,.0f}")
        if true:
            err = (s.cycles_estimate - s.cycles) / s.cycles if s.cycles else 0.0
            line += f" {s.cycles:>13,} {s.cycles / max(s.instructions, 1):>5.2f} {err:>+8.1%}"
        print(line)
    tot = prof.totals()
    line = f"{'':>4} {'total':<22} {'':<8} {tot['instructions']:>13,} {tot['memory_accesses']:>11,} {tot['cycles_estimate']:>13,.0f}"
    if true:
        line += (f" {tot['cycles']:>13,} {tot['cycles'] / tot['instructions']:>5.2f}"
                 f" {(tot['cycles_estimate'] - tot['cycles']) / tot['cycles']:>+8.1%}")
    print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
