"""Kernels in the plain C ABI: pointer parameters, and big internal buffers hoisted into scratch."""

import subprocess

import numpy as np
import tvm
from tvm.script import tirx as T

from tinymlaas.backends.mcu.codegen import STACK_ALLOC_LIMIT, llvm_target, to_c_abi
from tinymlaas.targets import get_target


@T.prim_func(s_tir=True)
def reverse_then_scale(A: T.Buffer((32, 32), "float32"), C: T.Buffer((32, 32), "float32")):
    T.func_attr({"tirx.noalias": True})
    X = T.sblock_alloc_buffer((32, 32))
    for i, j in T.grid(32, 32):
        with T.sblock("x"):
            vi, vj = T.axis.remap("SS", [i, j])
            X[vi, vj] = A[vi, vj] + T.float32(1)
    for i, j in T.grid(32, 32):
        with T.sblock("c"):
            vi, vj = T.axis.remap("SS", [i, j])
            C[vi, vj] = X[31 - vi, vj] * T.float32(2)


def test_big_intermediate_becomes_scratch_param(tmp_path):
    func, scratch = to_c_abi(reverse_then_scale, "k")
    assert [b.name for b in scratch] == ["X"] and scratch[0].nbytes == 32 * 32 * 4 >= STACK_ALLOC_LIMIT
    assert len(func.params) == 3  # A, C, X as plain pointers
    assert all(not hasattr(p.ty, "shape") for p in func.params)
    target = get_target("cortex-m4")
    built = tvm.tirx.build(tvm.IRModule({"k": func}), target=llvm_target(target))
    obj = tmp_path / "k.o"
    built.write_to_file(str(obj))
    syms = subprocess.run([target.tool("nm"), str(obj)], capture_output=True, text=True, check=True).stdout
    assert " T k\n" in syms
    # No runtime: nothing undefined but the unwinder personality of .ARM.exidx, which the link discards.
    undefined = subprocess.run([target.tool("nm"), "-u", str(obj)], capture_output=True, text=True, check=True).stdout
    assert set(undefined.split()) - {"U"} <= {"__aeabi_unwind_cpp_pr0"}


def test_small_intermediate_stays_inside():
    @T.prim_func(s_tir=True)
    def small(A: T.Buffer((4,), "float32"), C: T.Buffer((4,), "float32")):
        X = T.sblock_alloc_buffer((4,))
        for i in range(4):
            with T.sblock("x"):
                vi = T.axis.remap("S", [i])
                X[vi] = A[vi] * T.float32(3)
        for i in range(4):
            with T.sblock("c"):
                vi = T.axis.remap("S", [i])
                C[vi] = X[3 - vi]

    func, scratch = to_c_abi(small, "s")
    assert scratch == [] and len(func.params) == 2
    np.testing.assert_equal(len(func.params), 2)
