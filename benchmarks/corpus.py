"""The corpus architectures (tests/corpus/models, made with TensorFlow 2.21 / Keras 3) on Cortex-M4 and RV32:
exact instructions per inference, model flash and RAM, fidelity. One JSON, all rows from one run.

Usage: python benchmarks/corpus.py [--out benchmarks/results/corpus_architectures.json]
float32 rows run on cortex-m4 and rv32imafc (FPU), int8 and int16x8 rows on cortex-m4 (DSP) and rv32imac (no FPU).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
from pathlib import Path

from tqdm import tqdm

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tinymlaas import __version__
from tinymlaas.build.pipeline import compile_model
from tinymlaas.build.request import BuildRequest
from tinymlaas.errors import TinyMLaaSError

TARGETS = {"float32": ("cortex-m4", "rv32imafc"), "int8": ("cortex-m4", "rv32imac"), "int16x8": ("cortex-m4", "rv32imac")}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "corpus_architectures.json"))
    args = ap.parse_args()
    corpus = ROOT / "tests" / "corpus"
    manifest = json.loads((corpus / "manifest.json").read_text())
    jobs = [(key, entry, target) for key, entry in sorted(manifest.items())
            if entry.get("architecture") and "file" in entry and entry["precision"] in TARGETS
            for target in TARGETS[entry["precision"]]]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for key, entry, target in tqdm(jobs, desc="corpus", unit="build"):
            row = {"model": key, "precision": entry["precision"], "target": target}
            try:
                r = compile_model(corpus / entry["file"], target, Path(tmp) / f"{key}-{target}", BuildRequest(inputs=3))
                row.update(verified=r.verified, lowering=r.lowering, instructions=r.instructions,
                           flash_model=r.sizes["flash_model"], ram_model=r.sizes["ram_model"],
                           weights=r.sizes["weights"], fidelity=r.fidelity, compile_seconds=r.compile_seconds)
            except TinyMLaaSError as e:  # not supported yet, or too large for the board: the reason is the figure
                row.update(verified=False, refused=str(e))
            rows.append(row)
    result = {"benchmark": "corpus architectures", "tinymlaas_version": __version__, "host": platform.platform(),
              "inputs_per_build": 3, "results": rows}
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    for r in rows:
        figures = (f"{r['instructions']:>12,} instr  flash {r['flash_model']:>9,} B  RAM {r['ram_model']:>8,} B  "
                   f"{'PASS' if r['verified'] else 'FAIL'}") if "instructions" in r else r["refused"][:90]
        print(f"{r['model']:<28} {r['target']:<10} {figures}")


if __name__ == "__main__":
    main()
