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
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tinymlaas.backends.mcu.profile import profile_model
from tinymlaas.backends.mcu.report import format_profile


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
        print(json.dumps(prof.to_dict(), indent=1))
        return 0
    print(format_profile(prof.to_dict()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
