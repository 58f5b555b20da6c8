"""TFLite operator semantics in NumPy, for what is decided at compile time.

Used to fold constant sub-graphs (shape arithmetic, weights reshaped by operators) and to resolve index
arithmetic (strided slices with masks, negative axes) before kernels are generated.
"""

from __future__ import annotations

import numpy as np


def norm_axis(axis: int, rank: int) -> int:
    a = int(axis)
    if not -rank <= a < max(rank, 1):
        raise ValueError(f"axis {axis} out of range for rank {rank}")
    return a % max(rank, 1)


def strided_slice_index(rank: int, begin, end, strides, opts) -> tuple:
    """A NumPy index equal to TFLite STRIDED_SLICE with its masks (begin/end/ellipsis/new-axis/shrink, offset)."""
    begin, end, strides = (np.asarray(v).astype(np.int64).ravel().tolist() for v in (begin, end, strides))
    bm, em = int(opts.get("beginMask", 0) or 0), int(opts.get("endMask", 0) or 0)
    elm, nam = int(opts.get("ellipsisMask", 0) or 0), int(opts.get("newAxisMask", 0) or 0)
    sm, offset = int(opts.get("shrinkAxisMask", 0) or 0), bool(opts.get("offset", False))
    index = []
    for i in range(len(begin)):
        bit = 1 << i
        if elm & bit:
            index.append(Ellipsis)
        elif nam & bit:
            index.append(np.newaxis)
        elif sm & bit:
            index.append(int(begin[i]))
        else:
            s = int(strides[i]) if i < len(strides) else 1
            if s == 0:
                raise ValueError("strided slice with stride 0")
            b = None if bm & bit else int(begin[i])
            e = None if em & bit else int(end[i]) + (int(begin[i]) if offset else 0)
            index.append(slice(b, e, s))
    return tuple(index)


def slice_index(begin, size, shape) -> tuple:
    """TFLite SLICE: size -1 takes the rest of the dimension."""
    begin = np.asarray(begin).astype(np.int64).ravel().tolist()
    size = np.asarray(size).astype(np.int64).ravel().tolist()
    return tuple(slice(b, shape[i] if s == -1 else b + s) for i, (b, s) in enumerate(zip(begin, size)))


def pad_widths(paddings: np.ndarray) -> list[tuple[int, int]]:
    p = np.asarray(paddings).astype(np.int64).reshape(-1, 2)
    return [(int(a), int(b)) for a, b in p]
