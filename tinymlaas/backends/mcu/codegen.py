"""Codegen stage: every kernel to one object file for the target via LLVM, plain C calling convention.

TVM 0.27 gives PrimFuncs Buffer-typed parameters, which only the packed (runtime) ABI consumes.
We rewrite each kernel to pointer parameters (`calling_conv` 1: MakePackedAPI leaves it alone),
so LLVM emits `void k(void *, ...)`. Kernel-internal buffers that would need a runtime workspace
allocator (>= 1 KiB after TVM compacts them) become extra pointer parameters: the driver passes a
statically planned scratch area, and no allocator exists on the device.
"""

from __future__ import annotations

import re
import subprocess
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from tinymlaas.errors import BuildFailure
from tinymlaas.ir.lower import ARENA_ALIGN, KernelCall, Program, Region

SYMBOL_PREFIX = "tinymlaas_k_"
STACK_ALLOC_LIMIT = 1024  # TVM puts smaller allocations on the stack, larger ones need a workspace call

_ALLOC_RE = re.compile(r'^(\s*)(\w+) = T\.sblock_alloc_buffer\(\((.*?)\)(?:, "(\w+)")?\)\s*$')
_FLAT_ALLOC_RE = re.compile(r'(\w+) = T\.alloc_buffer\(\((.*?)\)(?:, "(\w+)")?')


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


def _dims(text: str) -> list[int]:
    text = re.sub(r"T\.int(32|64)\((\d+)\)", r"\2", text)
    return [int(x) for x in re.findall(r"-?\d+", text)]


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
        s_tir.transform.LowerOpaqueBlock(),
        tirx.transform.FlattenBuffer(),
    ]
    lowered = tvm.transform.Sequential(passes)(tvm.IRModule({"main": func}))["main"]
    sizes: dict[str, int] = {}
    for name, dims, dtype in _FLAT_ALLOC_RE.findall(lowered.script()):
        n = int(np.prod(_dims(dims), dtype=np.int64)) * np.dtype(dtype or "float32").itemsize
        sizes[name] = max(sizes.get(name, 0), n)
    return sizes


def to_c_abi(func, symbol: str):
    """PrimFunc with Buffer params -> PrimFunc with pointer params (+ hoisted scratch). Returns (func, scratch)."""
    import tvm

    src = func.script()
    declared = {}
    for line in src.splitlines():
        m = _ALLOC_RE.match(line)
        if m:
            declared[m.group(2)] = int(np.prod(_dims(m.group(3)), dtype=np.int64)) * np.dtype(m.group(4) or "float32").itemsize
    big = set()
    if any(b >= STACK_ALLOC_LIMIT for b in declared.values()):  # compaction may shrink them: ask TVM
        big = {n for n, b in _compacted_alloc_bytes(func).items() if b >= STACK_ALLOC_LIMIT}
    if "metadata[" in src:
        raise BuildFailure(f"kernel {symbol}: embedded constant tensors are not supported in kernels")
    lines = src.splitlines()
    head = next(i for i, line in enumerate(lines) if line.startswith("def "))
    params, decls, scratch = [], [], []
    printed = re.findall(r"(\w+): T\.Buffer", lines[head])  # the printer makes repeated names unique
    if len(printed) != len(func.params):
        raise BuildFailure(f"kernel {symbol}: unexpected parameter list {lines[head][:200]}")
    for k, (p, name) in enumerate(zip(func.params, printed)):
        shape = ", ".join(str(int(s)) for s in p.ty.shape)
        dtype = str(p.ty.dtype.dtype)
        params.append(f'p{k}_ptr: T.handle("{dtype}", "global")')
        decls.append(f'    {name} = T.decl_buffer(({shape},), "{dtype}", data=p{k}_ptr)')
    body = []
    for line in lines[head + 1 :]:
        m = _ALLOC_RE.match(line)
        if m and m.group(2) in big:
            name, dims, dtype = m.group(2), _dims(m.group(3)), m.group(4) or "float32"
            params.append(f'{name}_ptr: T.handle("{dtype}", "global")')
            decls.append(f'    {name} = T.decl_buffer(({", ".join(map(str, dims))},), "{dtype}", data={name}_ptr)')
            scratch.append(ScratchBuffer(name, int(np.prod(dims, dtype=np.int64)) * np.dtype(dtype).itemsize))
            continue
        body.append(line)
    attrs_end = 0
    while attrs_end < len(body) and body[attrs_end].strip().startswith("T.func_attr"):
        attrs_end += 1
    text = "\n".join(lines[:head] + [f"def {symbol}({', '.join(params)}):"] + body[:attrs_end] + decls + body[attrs_end:])
    new = tvm.script.from_source(text)
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
