"""ONNX and PyTorch models on the microcontroller targets: fresh PyTorch exports of the test architectures
(tests/helpers/torch_onnx.py: CNN, depthwise-separable, MLP, 1-D conv, a small ViT, LSTM+GRU, decoder pieces,
norms, activations) as float ONNX, QDQ int8 from onnxruntime's quantize_static (uint8 activations
per-tensor, its default; int8 per-channel), a float `.pt2` and a PT2E-quantized `.pt2`, each built for Cortex-M4 and
RV32 (float on rv32imafc, int8 on rv32imac): exact instructions, flash, RAM, weights against the file's, and the
conversion's check against ONNX Runtime / PyTorch; a form the exporter or quantizer cannot make is a row saying so.
One JSON, all rows from one run.

Usage: python benchmarks/onnx_mcu.py [--out benchmarks/results/onnx_mcu.json]
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import sys
import tempfile
from pathlib import Path

from tqdm import tqdm

ROOT = Path(__file__).resolve().parent.parent
sys.path[0] = str(ROOT)  # not benchmarks/: its profile.py would shadow the library module torch imports

from tests.helpers.torch_onnx import ARCHITECTURES, export_onnx, export_pt2, export_pt2e, quantize_qdq
from tinymlaas import __version__
from tinymlaas.build.pipeline import compile_model
from tinymlaas.build.request import BuildRequest
from tinymlaas.errors import TinyMLaaSError

FORMS = {  # name -> (how it is made, integer?)
    "onnx-float": (lambda arch, d: export_onnx(arch, d / f"{arch}.onnx"), False),
    "onnx-qdq-u8": (lambda arch, d: quantize_qdq(d / f"{arch}.onnx", d / f"{arch}-u8.onnx"), True),
    "onnx-qdq-s8-per-channel": (lambda arch, d: quantize_qdq(d / f"{arch}.onnx", d / f"{arch}-s8.onnx", signed=True),
                                True),
    "pt2-float": (lambda arch, d: export_pt2(arch, d / f"{arch}.pt2"), False),
    "pt2e-int8": (lambda arch, d: export_pt2e(arch, d / f"{arch}-pt2e.pt2"), True),
}


def file_weights(path: Path) -> int:
    """The weight bytes the model file holds (initializers, or the program's parameters and constants)."""
    if path.suffix == ".onnx":
        from tinymlaas.frontend.onnx import load_onnx

        return load_onnx(path).weights_bytes
    from tinymlaas.frontend.torch_export import load_exported_program

    return load_exported_program(path).weights_bytes


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "onnx_mcu.json"))
    args = ap.parse_args()
    logging.disable(logging.WARNING)  # the quantizers' advice on pre-processing, once per model
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        jobs = []
        for arch in ARCHITECTURES:
            for form, (make, integer) in FORMS.items():
                try:
                    path = make(arch, d)
                except Exception as e:  # noqa: BLE001 - an exporter or quantizer that cannot make this form
                    rows.append({"architecture": arch, "form": form, "target": None, "verified": False,
                                 "not_made": f"{type(e).__name__}: {str(e).strip().splitlines()[-1][:160]}"})
                    continue
                for target in ("cortex-m4", "rv32imac" if integer else "rv32imafc"):
                    jobs.append((arch, form, path, target))
        for arch, form, path, target in tqdm(jobs, desc="onnx/pt2 builds", unit="build"):
            row = {"architecture": arch, "form": form, "target": target, "file_weights": file_weights(path)}
            try:
                r = compile_model(path, target, d / f"{arch}-{form}-{target}", BuildRequest(inputs=10))
                row.update(verified=r.verified, lowering=r.lowering, instructions=r.instructions,
                           flash_model=r.sizes["flash_model"], ram_model=r.sizes["ram_model"],
                           weights=r.sizes["weights"], fidelity=r.fidelity, compile_seconds=r.compile_seconds)
            except TinyMLaaSError as e:
                row.update(verified=False, refused=str(e))
            rows.append(row)
    result = {"benchmark": "ONNX and PyTorch models on microcontrollers", "tinymlaas_version": __version__,
              "host": platform.platform(), "inputs_per_build": 10, "results": rows}
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    for r in rows:
        if "instructions" not in r:
            print(f"{r['architecture']:<10} {r['form']:<24} {r['target'] or '-':<10} "
                  f"{(r.get('refused') or 'not made: ' + r['not_made'])[:90]}")
            continue
        src = r["fidelity"]["source"]
        check = f"{src['max_lsb_diff']:g} LSB" if "max_lsb_diff" in src else f"rel {src['max_rel_error']:.1e}"
        print(f"{r['architecture']:<10} {r['form']:<24} {r['target']:<10} {r['lowering']:<8} "
              f"{r['instructions']:>10,} instr  flash {r['flash_model']:>7,} B  RAM {r['ram_model']:>6,} B  "
              f"weights {r['weights']:>6,} B (file {r['file_weights']:>6,})  vs {src['reference'][:12]}: {check}  "
              f"{'PASS' if r['verified'] else 'FAIL'}")


if __name__ == "__main__":
    main()
