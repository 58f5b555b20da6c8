"""tinymlaas: trained models to verified, measured bare-metal firmware for microcontrollers."""

import os
from importlib import resources
from pathlib import Path

__version__ = "0.1.0"

# In a source checkout the data folders (boards as data, firmware sources) sit beside the package; an installed
# package carries copies of them as tinymlaas/_targets and tinymlaas/_firmware (pyproject.toml maps them).
PROJECT_ROOT = Path(__file__).resolve().parent.parent
_CHECKOUT = (PROJECT_ROOT / "pyproject.toml").is_file() and (PROJECT_ROOT / "targets").is_dir()


def data_dir(name: str) -> Path:
    """targets/ or firmware/."""
    return PROJECT_ROOT / name if _CHECKOUT else Path(str(resources.files(__name__) / f"_{name}"))


def build_dir() -> Path:
    """Where compiled helpers are cached: $TINYMLAAS_BUILD_DIR, build/ in a checkout, else the user's cache."""
    if os.environ.get("TINYMLAAS_BUILD_DIR"):
        return Path(os.environ["TINYMLAAS_BUILD_DIR"])
    if _CHECKOUT:
        return PROJECT_ROOT / "build"
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "tinymlaas"
