"""Tensor intrinsics of Arm's DSP extension (Cortex-M4/M7/M33) for TIR's `tensorize`.

SMLAD_DOT4: c += a[0:4] . b[0:4] over int8, read as one word each: SXTB16 splits a word into its even and (after a
rotation by 8) odd bytes as two int16 lanes, and SMLAD multiplies both lane pairs and adds them to the accumulator.
Two words in, six instructions for four multiply-accumulates; in a register tile the words and their SXTB16s are
shared by the tile's rows and columns (LLVM merges the repeated pure calls).
SMLAD_DOT4_W16: the same with b widened to int16 at build time, stored in lane order (b0 b2 b1 b3): its two words
are SMLAD's operands as they are.
"""

from __future__ import annotations

SMLAD_DOT4 = "tinymlaas_smlad_dot4"
SMLAD_DOT4_W16 = "tinymlaas_smlad_dot4_w16"


def lane(k):
    """Where logical element k of a group of four is stored in lane order (an involution: 0 2 1 3)."""
    return k - k % 4 + (k % 2) * 2 + (k % 4) // 2


def _register() -> None:
    from tvm.s_tir import TensorIntrin
    from tvm.script import tirx as T

    def word(buf):  # four int8 as one int32
        return T.reinterpret(buf.vload([0], "int8x4"), dtype="int32")

    def odd(w):  # the word rotated right by 8: SXTB16 then takes bytes 1 and 3
        u = T.reinterpret(w, dtype="uint32")
        return T.reinterpret(T.bitwise_or(T.shift_right(u, T.uint32(8)), T.shift_left(u, T.uint32(24))),
                             dtype="int32")

    def sxtb16(w):
        return T.call_llvm_pure_intrin("int32", "llvm.arm.sxtb16", w)

    def smlad(x, y, acc):
        return T.call_llvm_pure_intrin("int32", "llvm.arm.smlad", x, y, acc)

    def pair(buf, at):  # two int16 as one int32
        return T.reinterpret(buf.vload([at], "int16x2"), dtype="int32")

    def intrinsic(b_dtype: str, b_index, b_even, b_odd):
        """desc: c += sum a[k] * b[b_index(k)]; impl: two SMLADs of a's SXTB16 lanes and b's (b_even, b_odd)."""

        @T.prim_func(s_tir=True)
        def desc(a: T.handle, b: T.handle, c: T.handle) -> None:
            A = T.match_buffer(a, (4,), dtype="int8", offset_factor=1)
            B = T.match_buffer(b, (4,), dtype=b_dtype, offset_factor=1)
            C = T.match_buffer(c, (1,), dtype="int32", offset_factor=1)
            with T.sblock("root"):
                T.reads(C[0:1], A[0:4], B[0:4])
                T.writes(C[0:1])
                for k in T.serial(0, 4):
                    with T.sblock("update"):
                        vk = T.axis.remap("R", [k])
                        C[0] = C[0] + T.cast(A[vk], "int32") * T.cast(B[b_index(vk)], "int32")

        # one expression, no bindings (a binding would be a stack buffer); LLVM merges the repeated loads
        @T.prim_func(s_tir=True)
        def impl(a: T.handle, b: T.handle, c: T.handle) -> None:
            A = T.match_buffer(a, (4,), dtype="int8", offset_factor=1)
            B = T.match_buffer(b, (4,), dtype=b_dtype, offset_factor=1)
            C = T.match_buffer(c, (1,), dtype="int32", offset_factor=1)
            with T.sblock("root"):
                T.reads(C[0:1], A[0:4], B[0:4])
                T.writes(C[0:1])
                C[0] = smlad(sxtb16(odd(word(A))), b_odd(B), smlad(sxtb16(word(A)), b_even(B), C[0]))

        return desc, impl

    TensorIntrin.register(SMLAD_DOT4, *intrinsic("int8", lambda k: k, lambda b: sxtb16(word(b)),
                                                 lambda b: sxtb16(odd(word(b)))), override=True)
    TensorIntrin.register(SMLAD_DOT4_W16, *intrinsic("int16", lambda k: k % 2 * 2 + k // 2, lambda b: pair(b, 0),
                                                     lambda b: pair(b, 2)), override=True)


_register()
