"""Weights kept in flash at the width the model stores them, widened to float32 inside the kernels.

A float16 export and a dynamic-range (hybrid) export are float networks whose weights were shrunk on purpose: float16
values, or int8 values times a scale per output channel. The importer widens them to float32 (exactly) so the float
operators take them; kept that way they would cost 2x and 4x the flash the user quantized for. This pass runs on the
fused, scheduled kernels: each float32 constant a kernel reads that equals its stored form exactly goes back to that
form (float16 bits, or int8 plus the channel scales as one more kernel argument), and every read of it in the kernel
widens the element (half -> float: the conversion instruction where the core has one, else exponent arithmetic;
int8: q * scale, one correctly rounded float multiply, the value the importer computed). The kernels compute the same
float32 numbers as before, bit for bit; they spend a few instructions per weight read on it.

The same pass keeps an integer model's int8 weights of 4-bit values (frontend/lowbit.py's int4 layers) two to a byte:
each read takes the byte and sign-extends its nibble (a shift pair), so the kernel computes with the same int8 values.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from tinymlaas.ir.kernel_calls import call_kernel, constant, map_kernel_calls, rewrite_buffer, with_inputs

MIN_ELEMENTS = 32  # smaller constants (a bias of a few channels) stay float32: not worth a conversion per read


@dataclass(frozen=True)
class StoredWeights:
    """How the model stores its float operators' weights. half: float16 constants; scales: the scale vectors of the
    int8 constants float operators dequantize (one per tensor, float32)."""

    half: bool = False
    scales: tuple[np.ndarray, ...] = ()
    int4: bool = False  # int8 constants of 4-bit values: two to a byte
    palette: int = 0  # bits: constants of at most 2^palette values kept as indices (ir/weight_decode.py)

    def __bool__(self) -> bool:
        return self.half or bool(self.scales) or self.int4 or bool(self.palette)


def stored_weights(graph) -> StoredWeights:
    """What the model (its graph as stored, before any widening) keeps narrow: float16 constants, int8 constants with
    a quantization that no integer operator reads (dynamic-range weights)."""
    half = any(t.is_const and t.dtype == "float16" for t in graph.tensors)
    integer_reads = {i for op in graph.operators for i in op.inputs
                     if i >= 0 and not any(graph.tensor(j).dtype == "float32" for j in op.inputs if j >= 0)}
    scales = []
    for t in graph.tensors:
        if t.is_const and t.dtype == "int8" and t.quant is not None and t.index not in integer_reads:
            s = np.asarray(t.quant.scale, dtype=np.float32).ravel()
            if not any(np.array_equal(s, seen) for seen in scales):
                scales.append(s)
    return StoredWeights(half, tuple(scales))


@dataclass(frozen=True)
class Narrowed:
    """A constant's stored form: `values` (float16 bits as int16, or int8) and, for int8, the scale of each index
    along `axis`; or, for an int8 constant of 4-bit values, those values two to a byte (`unpacked`: its shape)."""

    values: np.ndarray
    scale: np.ndarray | None = None
    axis: int = -1
    unpacked: tuple[int, ...] | None = None

    @property
    def kind(self) -> str:
        return "int4" if self.unpacked is not None else "int8" if self.scale is not None else "float16"


def pack_int4(c: np.ndarray) -> np.ndarray:
    """int8 values in -8..7, row-major, two to a byte: element 2i in the low nibble of byte i, 2i + 1 in the high."""
    nibbles = (c.ravel().astype(np.int16) & 0xF).astype(np.uint8)
    nibbles = np.append(nibbles, np.uint8(0)) if nibbles.size % 2 else nibbles
    return (nibbles[0::2] | (nibbles[1::2] << 4)).view(np.int8)


def unpack_int4(packed: np.ndarray, shape) -> np.ndarray:
    """pack_int4's inverse (a reference for tests; the kernels decode each read)."""
    b = packed.view(np.uint8).astype(np.int16)
    nibbles = np.stack([b & 0xF, b >> 4], axis=1).ravel()[:int(np.prod(shape))]
    return np.where(nibbles > 7, nibbles - 16, nibbles).astype(np.int8).reshape(shape)


def narrowed(c: np.ndarray, stored: StoredWeights) -> Narrowed | None:
    """c's stored form, if c equals it exactly (else None: c stays as it is)."""
    if stored.int4 and c.dtype == np.int8 and c.size >= MIN_ELEMENTS and c.min() >= -8 and c.max() <= 7:
        return Narrowed(pack_int4(c), unpacked=tuple(c.shape))
    if c.dtype != np.float32 or c.size < MIN_ELEMENTS or not np.all(np.isfinite(c)):
        return None
    if stored.half:
        h = c.astype(np.float16)
        if np.array_equal(h.astype(np.float32).view(np.uint32), c.view(np.uint32)):
            return Narrowed(h.view(np.int16))
    wide = c.astype(np.float64)
    for s in stored.scales:
        for axis in range(c.ndim) if s.size > 1 else (0,):
            if s.size > 1 and c.shape[axis] != s.size:
                continue
            shape = [1] * c.ndim
            if s.size > 1:
                shape[axis] = s.size
            sb = s.astype(np.float64).reshape(shape)
            with np.errstate(divide="ignore", invalid="ignore"):
                q = np.rint(wide / sb)
            if not np.all(np.abs(q) <= 127) or c.size + 4 * s.size > c.nbytes // 2:  # (a bias: not worth a scale each)
                continue
            # the same float32 the importer wrote (q * scale rounded once): also what the kernel's multiply gives
            if np.array_equal((q * sb).astype(np.float32).view(np.uint32), c.view(np.uint32)):
                return Narrowed(q.astype(np.int8), np.broadcast_to(s, (s.size,)).astype(np.float32),
                                axis if s.size > 1 else -1)
    return None


HALF_WIDENINGS = ("convert", "scale", "integer")  # how a core widens a half: see _widen


def _widen(load, new_buffer, scale_buffer, form: Narrowed, half: str):
    """The value of `load` (a read of the wide weight) computed from the stored form."""
    from tvm import tirx

    if form.unpacked is not None:
        return _nibble(load, new_buffer, form.unpacked)
    axis = form.axis
    x = tirx.BufferLoad(new_buffer, load.indices)
    if scale_buffer is not None:  # the importer's q * scale, rounded once as here
        s = tirx.BufferLoad(scale_buffer, [load.indices[axis] if axis >= 0 else tirx.const(0, "int32")])
        return tirx.Cast("float32", x) * s
    return widen_half(x, half)


def widen_half(x, half: str):
    """float32 of the half whose bits are the int16 `x`. half: convert (the core's half -> float instruction), scale
    (an FPU without one: integer operations and one float multiply), integer (no FPU: integer operations only; a
    soft-float multiply for the rare zero or subnormal half)."""
    from tvm import tirx

    if half == "convert":
        return tirx.Cast("float32", tirx.reinterpret("float16", x))
    # the half sign-extended and shifted: exponent and mantissa land on float32's places, the sign copies above the
    # exponent are cleared; that float32 is 2^112 times too small (exponent bias 127 vs 15; half subnormals land on
    # float32 subnormals): times 2^112 exactly, or for a normal half, 112 added to the exponent field
    bits = tirx.bitwise_and(tirx.shift_left(tirx.Cast("int32", x), tirx.const(13, "int32")),
                            tirx.const(-0x70000001, "int32"))  # 0x8FFFFFFF
    scaled = tirx.reinterpret("float32", bits) * tirx.const(2.0 ** 112, "float32")
    if half == "scale":
        return scaled
    normal = tirx.bitwise_and(tirx.Cast("int32", x), tirx.const(0x7C00, "int32")) != tirx.const(0, "int32")
    return tirx.if_then_else(normal, tirx.reinterpret("float32", bits + tirx.const(112 << 23, "int32")), scaled)


def _nibble(load, packed, shape):
    """The int8 element `load` reads, from its byte in `packed`: shifted up so that its nibble's top bit is the
    word's, then arithmetically down (sign-extended). One shift amount for both nibbles: 28 - 4 * (index & 1)."""
    from tvm import tirx

    i32 = lambda v: tirx.const(v, "int32")
    flat = i32(0)
    for index, extent in zip(load.indices, shape, strict=True):  # row-major
        flat = flat * i32(extent) + tirx.Cast("int32", index)
    byte = tirx.Cast("int32", tirx.BufferLoad(packed, [tirx.shift_right(flat, i32(1))]))
    up = i32(28) - tirx.shift_left(tirx.bitwise_and(flat, i32(1)), i32(2))
    return tirx.Cast("int8", tirx.shift_right(tirx.shift_left(byte, up), i32(28)))


def narrow_kernel(func, param: int, form: Narrowed, half: str):
    """`func` reading parameter `param` (a float32 buffer) in its stored form: the buffer's dtype changes and, for
    int8, a scale buffer is added after the inputs (before the outputs: `n_inputs` of the call). None when the kernel
    uses the buffer other than by reading elements (a pointer taken, a matched sub-buffer)."""
    import tvm
    from tvm import tirx

    old = func.params[param]
    shape = form.values.shape if form.unpacked is not None else old.shape
    new = tirx.decl_buffer(shape, str(form.values.dtype), name=old.name + "_stored")
    scale = tirx.decl_buffer((form.scale.size,), "float32", name=old.name + "_scale") if form.scale is not None else None

    def rewrite(node):
        kind = type(node).__name__
        if kind == "TensorLoad" and node.source.same_as(old):
            return _widen(node, new, scale, form, half)
        if kind == "TensorRegion" and node.source.same_as(old):  # what a block reads: packed, the whole buffer
            region = ([tvm.ir.Range.from_min_extent(0, int(form.values.size))] if form.unpacked is not None
                      else node.region)
            return tirx.BufferRegion(new, region)
        return node

    body = rewrite_buffer(func.body, old, rewrite)
    return None if body is None else (new, scale, body)


@dataclass(frozen=True)
class NarrowingReport:
    tensors: int = 0
    wide_bytes: int = 0  # what they took before: float32, or int8 for int4 weights
    stored_bytes: int = 0
    kinds: tuple[str, ...] = ()

    def note(self) -> str:
        kinds = " and ".join(sorted(set(self.kinds)))
        if set(self.kinds) == {"int4"}:
            return (f"{self.tensors} int8 weight tensors of 4-bit values kept two to a byte in flash: "
                    f"{self.stored_bytes:,} B instead of {self.wide_bytes:,} B; the kernels sign-extend each weight "
                    "they read (the same int8 values)")
        return (f"{self.tensors} weight tensors kept at their stored width ({kinds}) in flash: "
                f"{self.stored_bytes:,} B instead of {self.wide_bytes:,} B as float32; the kernels widen each "
                "weight they read (exactly: the same float32 values)")


def narrow_weights(mod, stored: StoredWeights, half: str):
    """The fused, scheduled Relax module with every kernel's weights in their stored form where they equal it.
    Returns (module, NarrowingReport). half: how the core widens a half (HALF_WIDENINGS)."""
    import tvm
    from tvm import tirx

    variants: dict = {}  # (kernel, its narrowed arguments) -> (GlobalVar of the kernel reading them, which it reads)
    counted = {"tensors": 0, "wide": 0, "stored": 0, "kinds": []}

    def variant(func, name, n_inputs, forms, add_kernel):
        params, scales, kept, body = list(func.params), [], set(), func
        for k, f in sorted(forms.items()):
            done = narrow_kernel(tirx.PrimFunc(params, body.body, func.ret_type, func.attrs), k, f, half)
            if done is None:
                continue
            params[k], scale, new_body = done
            body = tirx.PrimFunc(params, new_body, func.ret_type, func.attrs)
            scales += [scale] if scale is not None else []
            kept.add(k)
        return (add_kernel(with_inputs(func, scales, n_inputs, body), name + "_stored") if kept else None), kept

    def narrow(call, add_kernel):
        gv, args = call.args[0], list(call.args[1].fields)
        forms = {k: f for k, a in enumerate(args) if isinstance(a, tvm.ir.expr.Constant)
                 and (f := narrowed(a.value.numpy(), stored)) is not None}
        if not forms:
            return call
        key = (gv.name_hint, tuple((k, f.kind, f.axis) for k, f in sorted(forms.items())))
        if key not in variants:
            variants[key] = variant(mod[gv], gv.name_hint, len(args), forms, add_kernel)
        new_gv, kept = variants[key]
        if new_gv is None:
            return call
        extra, args_wide = [], {k: int(a.value.numpy().nbytes) for k, a in enumerate(args) if k in kept}
        for k in sorted(kept):
            f = forms[k]
            args[k] = constant(f.values)
            extra += [constant(f.scale)] if f.scale is not None else []
            counted["tensors"] += 1
            counted["wide"] += args_wide[k]
            counted["stored"] += f.values.nbytes + (f.scale.nbytes if f.scale is not None else 0)
            counted["kinds"].append(f.kind)
        return call_kernel(new_gv, args + extra, call)

    out = map_kernel_calls(mod, narrow)
    return out, NarrowingReport(counted["tensors"], counted["wide"], counted["stored"], tuple(counted["kinds"]))
