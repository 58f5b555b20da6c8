"""Exact instructions per layer: python benchmarks/profile.py MODEL.tflite TARGET [--kernels auto|tir|dsp]

Builds the model with per-step profiling (each kernel call is its own counted region in the emulator)
and prints one line per step plus the total. Only int8 models' kernels carry their TFLite tensor number.
"""

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tinymlaas.pipeline import profile_model


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("target")
    ap.add_argument("--kernels", default="auto", choices=("auto", "tir", "dsp", "dsp16"))
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        steps = profile_model(args.model, args.target, Path(tmp), kernels=args.kernels)
    for name, count in steps:
        print(f"{count:>14,}  {name}")
    print(f"{sum(c for _, c in steps):>14,}  total")
    return 0


if __name__ == "__main__":
    sys.exit(main())
