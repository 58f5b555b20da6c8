"""Bytes over the air per device: the full signed image, the image compressed (LZMA2, 64 KiB dictionary), a
signed patch from the image the device runs (bsdiff or Zstandard against the base: the smaller), and the model
image alone (model-only: the smaller of it compressed and a signed patch from the model the device runs) where
the new build's code part is the base's (the same model ABI), for three kinds of update; rows under `payloads`
in benchmarks/results/fleet.json (its other keys are fleet.py's and are kept).

Usage: python benchmarks/payloads.py [--models DIR] [--target cortex-m4] [--out FILE]

The updates, each built, verified against the interpreter and signed as the service does (package_build):
  firmware-one-line  the same model, one line of the firmware harness changed (a message string), version bumped
  model-retrained    the same architecture with every weight and bias tensor's values reshuffled (a model
                     retrained from another seed: same value distribution, no weight where it was), version bumped
  model-different    another model
model_only is null where it does not apply, and model_only_note says why.
"""

from __future__ import annotations

import argparse
import json
import lzma
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tinymlaas import __version__
from tinymlaas.build.pipeline import compile_model
from tinymlaas.build.request import BuildRequest
from tinymlaas.ota.delta import MODEL_ONLY_ALLOWANCE, compress_image, make_patch, read_patch
from tinymlaas.ota.package import generate_key, package_build
from tinymlaas.targets import get_target

HARNESS_LINE = ('printf("tinymlaas: cannot open inputs.bin or outputs.bin\\n");',
                'printf("tinymlaas: cannot open the inputs or the outputs file\\n");')


def retrained(model: Path, out: Path, seed: int = 1) -> Path:
    """`model` with the values of every constant tensor (weights, biases) shuffled within the tensor, element by
    element of its type."""
    import tflite

    data = bytearray(model.read_bytes())
    m = tflite.Model.GetRootAsModel(data, 0)
    rng = np.random.default_rng(seed)
    types = {tflite.TensorType.INT8: np.int8, tflite.TensorType.INT32: np.int32, tflite.TensorType.INT16: np.int16,
             tflite.TensorType.FLOAT32: np.float32}
    done = set()
    g = m.Subgraphs(0)
    for t in range(g.TensorsLength()):
        tensor = g.Tensors(t)
        index = tensor.Buffer()
        buf = m.Buffers(index)
        if index in done or buf.DataLength() <= 16 or tensor.Type() not in types:
            continue
        view = buf.DataAsNumpy().view(types[tensor.Type()])
        view[:] = rng.permutation(view)
        done.add(index)
    out.write_bytes(bytes(data))
    assert done, "no constant tensor found"
    return out


def signed_build(model: Path, target, work: Path, key: Path, version: str) -> dict:
    out = work / f"build-{version}"
    report = compile_model(model, target.name, out, BuildRequest(inputs=2, estimate_cycles=False))
    assert report.verified, f"{model.name}: not verified"
    package = package_build(out, target, key, version)
    weights = (out / "weights.bin").read_bytes() if (out / "weights.bin").exists() else b""
    image = package.image.read_bytes()
    return {"image": image, "weights": weights, "abi": package.abi,
            "model_image": package.model_image.read_bytes() if package.model_image else None}


def model_only(old: dict, new: dict, key: Path, target) -> tuple[int | None, str]:
    """Bytes of the model-only payload as the service makes it (the smaller of the model image as xz and a signed
    patch from the firmware image the device runs, whose own model it runs), or None and why it does not apply."""
    from tinymlaas.backends.mcu.firmware import qemu_layout

    if new["abi"] is None:
        region = qemu_layout(target).model_region
        return None, (f"not applicable: the new build's constants ({len(new['weights']):,} B) exceed the "
                      f"{region.size:,} B model region of {target.name}: no model image")
    if old["abi"] != new["abi"]:
        return None, "not applicable: the new build's code part is not the base's (another model ABI)"
    packed = len(compress_image(new["model_image"]))
    patched = len(make_patch(old["image"], new["model_image"], key))
    return min(packed, patched), (f"the model image {'patched from the running image' if patched < packed else 'as xz'}"
                                  " (the same model ABI)")


def row(kind: str, old: dict, new: dict, key: Path, target) -> dict:
    image = new["image"]
    patch = make_patch(old["image"], image, key)
    xz = compress_image(image)
    weights_xz = len(lzma.compress(new["weights"], preset=9)) if new["weights"] else None
    full = len(image)
    model, why = model_only(old, new, key, target)
    sizes = [("full", full), ("compressed", len(xz)), ("delta", len(patch))] + ([("model_only", model)] if model else [])
    smallest = min(sizes, key=lambda x: x[1])
    sent = "model_only" if model and model <= MODEL_ONLY_ALLOWANCE * smallest[1] else smallest[0]
    out = {"update": kind, "full": full, "compressed": len(xz), "delta": len(patch),
           "delta_method": read_patch(patch).method, "model_only": model, "model_only_note": why,
           "model_image_bytes": len(new["model_image"]) if new["model_image"] else None,
           "compressed_vs_full": round(len(xz) / full, 4), "delta_vs_full": round(len(patch) / full, 4),
           "weights_bytes": len(new["weights"]), "weights_compressed": weights_xz,
           "smallest": smallest[0], "sent": sent}
    if weights_xz:
        out["delta_vs_compressed_weights"] = round(len(patch) / weights_xz, 3)
        if model:
            out["model_only_vs_compressed_weights"] = round(model / weights_xz, 3)
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default=str(ROOT.parent / "shared" / "models" / "mlperf-tiny"))
    ap.add_argument("--target", default="cortex-m4")
    ap.add_argument("--model", default="kws_ref_model", help="the model updated (default kws_ref_model)")
    ap.add_argument("--other", default="ad01_int8", help="the different model (default ad01_int8)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "fleet.json"))
    args = ap.parse_args()
    models, target = Path(args.models), get_target(args.target)
    start = time.monotonic()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        key = generate_key(work / "signing.pem")
        model = models / f"{args.model}.tflite"
        base = signed_build(model, target, work, key, "1.0.1")

        from tinymlaas.backends.mcu import firmware  # one line of the harness changed, in a copy

        original = firmware.FIRMWARE_DIR
        changed = work / "firmware"
        shutil.copytree(original, changed)
        harness = (changed / "harness.c").read_text()
        assert harness.count(HARNESS_LINE[0]) == 1, "the harness line to change is not there"
        (changed / "harness.c").write_text(harness.replace(*HARNESS_LINE))
        firmware.FIRMWARE_DIR = changed
        try:
            one_line = signed_build(model, target, work, key, "1.0.2")
        finally:
            firmware.FIRMWARE_DIR = original
        again = retrained(model, work / "retrained.tflite")
        rows = [row("firmware-one-line", base, one_line, key, target),
                row("model-retrained", base, signed_build(again, target, work, key, "1.0.3"), key, target),
                row("model-different", base, signed_build(models / f"{args.other}.tflite", target, work, key,
                                                          "1.0.4"), key, target)]
    out = Path(args.out)
    doc = json.loads(out.read_text()) if out.exists() else {}
    doc["payloads"] = {
        "date": time.strftime("%Y-%m-%d"), "tinymlaas": __version__, "seconds": round(time.monotonic() - start, 1),
        "machine": {"python": platform.python_version(), "platform": platform.platform()},
        "model": args.model, "other_model": args.other, "target": target.name,
        "method": "each update built, verified and signed as the service does; bytes of the full signed image, "
                  "the image as LZMA2 (xz, 64 KiB dictionary), the signed patch from the base build (the smaller of bsdiff and "
                  "Zstandard with the base as dictionary) "
                  "(1.0.1 of the model); model_only: the new build's model image (its weights.bin signed, with its "
                  "model ABI) as xz or as a signed patch from the base's image, the smaller, where the code part is "
                  "the base's; sent: what the service sends (the smallest, or model_only within "
                  f"{MODEL_ONLY_ALLOWANCE - 1:.0%} of it); weights_compressed: the new build's weights.bin as xz -9",
        "goals": {"firmware-one-line": "delta <= 5% of full",
                  "model-retrained": "delta and model_only <= 1.1x compressed weights"},
        "rows": rows,
    }
    out.write_text(json.dumps(doc, indent=2) + "\n")
    for r in rows:
        print(f"{r['update']:<18} full {r['full']:>8,}  compressed {r['compressed']:>8,} ({r['compressed_vs_full']:.1%})"
              f"  delta {r['delta']:>8,} ({r['delta_vs_full']:.1%})  model-only {r['model_only'] or '-':>8}"
              f"  weights xz {r['weights_compressed'] or 0:>7,}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
