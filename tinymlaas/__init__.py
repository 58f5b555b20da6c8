"""tinymlaas: trained models to verified, measured bare-metal firmware for microcontrollers."""

from pathlib import Path

__version__ = "0.1.0"

# The repository's data folders (boards, firmware sources) sit beside the package.
PROJECT_ROOT = Path(__file__).resolve().parent.parent
