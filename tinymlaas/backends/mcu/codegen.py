"""Codegen stage: every kernel to one object file for the target via LLVM, plain C calling convention.

TVM 0.27 gives PrimFuncs Buffer-typed parameters, which only the packed (runtime) ABI consumes.
We rewrite each kernel to pointer parameters (`calling_conv` 1: MakePackedAPI leaves it alone),
so LLVM emits `void k(void *, ...)`. Kernel-internal buffers that would need a runtime workspace
allocator (>= 1 KiB after TVM compacts them) become extra pointer parameters: the driver passes a
statically planned scratch area, and no allocator exists on the device.
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from tinymlaas.errors import BuildFailure
from tinymlaas.ir.lower import ARENA_ALIGN, KernelCall, Program, Region

SYMBOL_PREFIX = "tinymlaas_k_"
STACK_ALLOC_LIMIT = 1024  # TVM puts smaller allocations on the stack, larger ones need a workspace call



@dataclass(frozen=True)
class ScratchBuffer:
    name: str
    nbytes: int


@dataclass
class KernelObject:
    path: Path
    symbols: dict[str, str]  # kernel name -> C symbol
    scratch: dict[str, list[ScratchBuffer]] = field(default_factory=dict)
    code_bytes: int = 0


def _nbytes(buffer) -> int:
    return int(np.prod([int(d) for d in buffer.ty.shape], dtype=np.int64)) * np.dtype(str(buffer.ty.dtype)).itemsize


def _statements(stmt):
    """Every statement under `stmt` (TVM 0.27 has no Python visitor)."""
    yield stmt
    for attr in ("block", "body", "init", "then_case", "else_case"):
        child = getattr(stmt, attr, None)
        if child is not None and not isinstance(child, (int, float, str)):
            yield from _statements(child)
    for child in getattr(stmt, "seq", None) or ():
        yield from _statements(child)


def _compacted_alloc_bytes(func) -> dict[str, int]:
    """Size of each internal buffer after TVM's own compaction, keyed by name."""
    import tvm
    from tvm import s_tir, tirx

    passes = [
        s_tir.transform.CanonicalizeLoop(),
        s_tir.transform.LowerInitBlock(),
        s_tir.transform.PlanAndUpdateBufferAllocationLocation(),
        s_tir.transform.ConvertBlocksToOpaque(),
        s_tir.transform.CompactBufferAllocation(),
        s_tir.transform.LowerMatchBuffer(),  # a tensorized block's views of its operands
        s_tir.transform.LowerOpaqueBlock(),
        tirx.transform.FlattenBuffer(),
    ]
    lowered = tvm.transform.Sequential(passes)(tvm.IRModule({"main": func}))["main"]
    sizes: dict[str, int] = {}
    for stmt in _statements(lowered.body):
        if isinstance(stmt, tirx.AllocBuffer):
            sizes[stmt.buffer.name] = max(sizes.get(stmt.buffer.name, 0), _nbytes(stmt.buffer))
    return sizes


def to_c_abi(func, symbol: str):
    """PrimFunc with Buffer params -> PrimFunc with pointer params (+ hoisted scratch). Returns (func, scratch).

    Each buffer parameter becomes a pointer parameter and a DeclBuffer of that pointer at the top of the root
    block; the root block's allocations too big for the stack become pointer parameters the same way."""
    import tvm
    from tvm import s_tir, tirx

    def pointer(name, buffer):
        return tvm.ir.Var(name, tvm.ir.PointerType(tvm.ir.PrimType(str(buffer.ty.dtype)), "global"))

    root = func.body
    if not isinstance(root, s_tir.SBlockRealize):
        raise BuildFailure(f"kernel {symbol}: no root block")
    block = root.block
    params = [pointer(f"p{k}_ptr", p) for k, p in enumerate(func.params)]
    decls = [tirx.DeclBuffer(p, data=ptr) for p, ptr in zip(func.params, params)]
    big = set()
    if any(_nbytes(b) >= STACK_ALLOC_LIMIT for b in block.alloc_buffers):  # compaction may shrink them: ask TVM
        big = {n for n, b in _compacted_alloc_bytes(func).items() if b >= STACK_ALLOC_LIMIT}
    kept, scratch = [], []
    for buffer in block.alloc_buffers:
        if buffer.name not in big:
            kept.append(buffer)
            continue
        params.append(pointer(f"{buffer.name}_ptr", buffer))
        decls.append(tirx.DeclBuffer(buffer, data=params[-1]))
        scratch.append(ScratchBuffer(buffer.name, _nbytes(buffer)))
    body = tirx.SeqStmt(decls + [block.body])
    new_block = s_tir.SBlock(block.iter_vars, block.reads, block.writes, block.name_hint, body, block.init, kept,
                             block.match_buffers, block.annotations)
    new = tirx.PrimFunc(params, s_tir.SBlockRealize(root.iter_values, root.predicate, new_block), func.ret_type,
                        func.attrs)
    return new.with_attr({"global_symbol": symbol, "calling_conv": 1}), scratch


def llvm_target(target):
    import tvm

    return tvm.target.Target(dict(target.llvm))


def build_kernels(program: Program, target, workdir: Path, narrow_indices: bool = True) -> tuple[Program, KernelObject]:
    """Compile all kernels of `program` into one object. Returns a new Program whose calls pass the planned
    scratch buffers (the input program is left as it was: a search builds one program many times)."""
    import tvm

    funcs, symbols, scratch = {}, {}, {}
    for gv, func in program.kernels.functions.items():
        symbol = SYMBOL_PREFIX + gv.name_hint
        funcs[symbol], scratch[gv.name_hint] = to_c_abi(func, symbol)
        symbols[gv.name_hint] = symbol
    obj = workdir / "kernels.o"
    try:
        mod = tvm.IRModule(funcs)
        if narrow_indices:  # legalized Relax ops index with int64: 32-bit cores pay for it, soft-float cores in libgcc
            narrow = tvm.tirx.transform.ForceNarrowIndexToInt32()
            for gv, f in list(mod.functions.items()):
                if not (f.attrs and f.attrs.get("tinymlaas.int32_indices")):
                    mod[gv] = narrow(tvm.IRModule({gv: f}))[gv]
        built = tvm.tirx.build(mod, target=llvm_target(target))
        built.write_to_file(str(obj))
    except Exception as e:
        raise BuildFailure(f"LLVM code generation failed for {target.name}: {str(e).splitlines()[-1][:300]}") from e
    # No C++ unwinding on the device: drop the unwind tables LLVM emits on Arm (they would pull in libgcc's
    # unwinder) and TVM's module-entry alias.
    subprocess.run(
        [target.tool("objcopy"), "--remove-section=.ARM.exidx*", "--remove-section=.ARM.extab*",
         "--strip-symbol=__tvm_ffi_main", str(obj)],
        check=True, capture_output=True,
    )

    # Kernels run one after another: each one's scratch starts at offset 0 of one shared area.
    scratch_bytes, steps = 0, []
    for step in program.steps:
        if isinstance(step, KernelCall) and not step.extern and scratch[step.kernel]:
            offset, extra = 0, []
            for buf in scratch[step.kernel]:
                extra.append(Region("scratch", offset=offset, nbytes=buf.nbytes))
                offset += (buf.nbytes + ARENA_ALIGN - 1) // ARENA_ALIGN * ARENA_ALIGN
            scratch_bytes = max(scratch_bytes, offset)
            step = replace(step, args=step.args + tuple(extra))
        steps.append(step)
    planned = replace(program, steps=tuple(steps), scratch_bytes=scratch_bytes)
    return planned, KernelObject(obj, symbols, scratch, code_bytes=object_code_bytes(obj, target))


def object_code_bytes(obj: Path, target) -> int:
    """Bytes of code and read-only data in an object file (what it adds to flash)."""
    out = subprocess.run([target.tool("size"), "-A", str(obj)], capture_output=True, text=True, check=True).stdout
    total = 0
    for line in out.splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[0].startswith((".text", ".rodata", ".data", ".srodata", ".sdata")) and parts[1].isdigit():
            total += int(parts[1])
    return total
