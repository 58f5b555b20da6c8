import os
from pathlib import Path

import pytest

from tinymlaas import PROJECT_ROOT

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


@pytest.fixture(scope="session")
def models_dir() -> Path:
    if not (MODELS_DIR / "kws_ref_model.tflite").exists():
        pytest.fail(f"MLPerf Tiny models not found in {MODELS_DIR} (set TINYMLAAS_MODELS)")
    return MODELS_DIR


def model_path(name: str) -> Path:
    return MODELS_DIR / f"{name}.tflite"
