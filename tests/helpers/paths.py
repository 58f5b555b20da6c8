"""Where the tests' inputs are: the MLPerf Tiny models (outside the repository) and the committed corpus."""

import os
from pathlib import Path

from tinymlaas import PROJECT_ROOT

REPO_ROOT = Path(__file__).resolve().parents[2]
TESTS_DIR = REPO_ROOT / "tests"
CORPUS = TESTS_DIR / "corpus"  # made by tests/corpus/generate.py (`make corpus`)
CORPUS_MODELS = CORPUS / "models"
CORPUS_OPS = CORPUS / "ops"

MODELS_DIR = Path(os.environ.get("TINYMLAAS_MODELS", PROJECT_ROOT.parent / "shared" / "models" / "mlperf-tiny")).resolve()

ALL_MODELS = [
    "kws_ref_model",
    "kws_ref_model_float32",
    "vww_96_int8",
    "vww_96_float",
    "pretrainedResnet_quant",
    "pretrainedResnet",
    "ad01_int8",
    "ad01_fp32",
]


def model_path(name: str) -> Path:
    """An MLPerf Tiny model by name (the `models_dir` fixture fails the test when they are missing)."""
    return MODELS_DIR / f"{name}.tflite"
