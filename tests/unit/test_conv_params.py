"""The convolution kernels' parameter block has one layout in C (firmware/kernels/include/conv_params.h) and in
Python (tinymlaas/ops/conv_params.py): a C program compiled with the host's gcc prints the header's offsets, sizes
and P_* indices, which must equal the ctypes structures'."""

import ctypes
import shutil
import subprocess

import numpy as np
import pytest

from tinymlaas import data_dir
from tinymlaas.ops.conv_params import CONV_FIELDS, HEADER, ConvParams, DepthwiseRowsParams


def _c_layout(tmp_path) -> dict[str, int]:
    gcc = shutil.which("gcc") or shutil.which("cc")
    if gcc is None:
        pytest.skip("no host C compiler")
    lines = [f'printf("conv.{f} %zu\\n", offsetof(struct tinymlaas_conv_params, {f}));' for f in CONV_FIELDS]
    lines += [f'printf("P_{f.upper()} %d\\n", (int)P_{f.upper()});' for f in CONV_FIELDS]
    lines += ['printf("sizeof.conv %zu\\n", sizeof(struct tinymlaas_conv_params));',
              'printf("rows.conv %zu\\n", offsetof(struct tinymlaas_depthwise_rows_params, conv));',
              'printf("rows.transposed %zu\\n", offsetof(struct tinymlaas_depthwise_rows_params, transposed));',
              'printf("P_TRANSPOSED %d\\n", (int)P_TRANSPOSED);',
              'printf("sizeof.rows %zu\\n", sizeof(struct tinymlaas_depthwise_rows_params));']
    source = tmp_path / "layout.c"
    source.write_text('#include <stdio.h>\n#include "conv_params.h"\nint main(void)\n{\n    '
                      + "\n    ".join(lines) + "\n    return 0;\n}\n")
    exe = tmp_path / "layout"
    header = data_dir("firmware") / HEADER
    subprocess.run([gcc, "-std=c11", "-Wall", "-Werror", f"-I{header.parent}", str(source), "-o", str(exe)], check=True)
    out = subprocess.run([str(exe)], check=True, capture_output=True, text=True).stdout
    return {key: int(value) for key, value in (line.split() for line in out.splitlines())}


def test_python_and_c_layouts_agree(tmp_path):
    c = _c_layout(tmp_path)
    i32 = ctypes.sizeof(ctypes.c_int32)
    assert [name for name, _ in ConvParams._fields_] == list(CONV_FIELDS)
    for field in CONV_FIELDS:
        offset = getattr(ConvParams, field).offset
        assert c[f"conv.{field}"] == offset, field
        assert c[f"P_{field.upper()}"] == offset // i32, field  # the index the kernels read it at
    assert c["sizeof.conv"] == ctypes.sizeof(ConvParams)
    assert c["rows.conv"] == DepthwiseRowsParams.conv.offset
    assert c["rows.transposed"] == DepthwiseRowsParams.transposed.offset
    assert c["P_TRANSPOSED"] == DepthwiseRowsParams.transposed.offset // i32
    assert c["sizeof.rows"] == ctypes.sizeof(DepthwiseRowsParams)


def test_blocks_are_the_int32_arrays_the_kernels_read():
    values = list(range(-5, len(CONV_FIELDS) - 5))
    params = ConvParams(*values)
    block = params.to_array()
    assert block.dtype == np.int32 and block.tolist() == values
    assert ConvParams.from_array(block).zp_in == values[CONV_FIELDS.index("zp_in")]
    rows = DepthwiseRowsParams(params, 1).to_array()
    assert rows.tolist() == values + [1]
