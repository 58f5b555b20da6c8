"""The parameter block of the convolution C kernels, in Python: the same layout as
firmware/kernels/include/conv_params.h (tests/unit/test_conv_params.py compiles the header and compares).

The kernels take it as `const int32_t *params` (a constant of the model, in flash) and index it with the header's
P_* names, which the header derives from the struct: one definition on each side.
"""

from __future__ import annotations

import ctypes

import numpy as np

HEADER = "kernels/include/conv_params.h"  # under firmware/

# struct tinymlaas_conv_params, in order: shapes NHWC in and out, kernel, stride, dilation, padding top/left,
# zero points, activation bounds, one rounding (the interpreter's fully connected) or two, and the channels from one
# output pixel to the next (0: oc; more where a gemm kernel writes its slice of a concatenation, ir/concat_in_place.py)
CONV_FIELDS = ("n", "h", "w", "c", "oh", "ow", "oc", "kh", "kw", "sh", "sw", "dh", "dw", "pt", "pl",
               "zp_in", "zp_out", "act_min", "act_max", "single", "out_stride")


class ConvParams(ctypes.Structure):
    _fields_ = [(name, ctypes.c_int32) for name in CONV_FIELDS]

    def to_array(self) -> np.ndarray:
        """The int32 block the kernels read (a Relax constant)."""
        return np.frombuffer(bytes(self), dtype=np.int32).copy()

    @classmethod
    def from_array(cls, params) -> ConvParams:
        """The fields of a block the compiler wrote (e.g. to reason about a kernel call's memory accesses)."""
        return cls.from_buffer_copy(np.asarray(params, dtype=np.int32)[:len(CONV_FIELDS)].tobytes())


class DepthwiseRowsParams(ctypes.Structure):
    """struct tinymlaas_depthwise_rows_params: gemm_dsp.c's depthwise3x3_rows walks the layer transposed when
    `transposed` (the compiler picks the longer output side as rows)."""
    _fields_ = [("conv", ConvParams), ("transposed", ctypes.c_int32)]

    def to_array(self) -> np.ndarray:
        return np.frombuffer(bytes(self), dtype=np.int32).copy()
