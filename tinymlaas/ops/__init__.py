"""Operators: TFLite operators lowered to Relax, one converter per (operator, precision).

The modules import each other in one direction only (tests/unit/test_ops_imports.py checks it):
  helpers    semantics, geometry, quantization, emit, interpreter_tables, dsp_layouts, conv_params, int8_te
             (the TE integer kernels), registry
  families   float32, movement, int8, int16, recurrent, detection: converters, registered on import; they import
             helpers only, never one another
  this file  imports the families, so that importing anything of tinymlaas.ops fills the registry
"""

from tinymlaas.ops import detection, float32, int8, int16, movement, recurrent  # noqa: F401
