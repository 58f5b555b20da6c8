"""Cycle estimate without simulating the RTL: QEMU's per-block execution counts x each block's cost.

A block's cost comes from one of two models, named by the target's `estimate:` entry:
- llvm-mca (LLVM's static performance model of the core, e.g. -mcpu=cortex-m4): every block QEMU translated is cut
  from the ELF's disassembly and given to llvm-mca as one code region; its steady-state cycles per execution. It
  knows issue width, latencies and resources, not branch penalties or memory wait states.
- a pipeline table (`estimate: {pipeline: {...}}`): one cycle per instruction plus the stall cycles the core's
  manual gives for each class (load, store, mul, mulh, div, a load whose result the next instruction reads); for
  simple in-order cores such as Ibex, whose manual tabulates them.
Either way, plus a penalty per taken branch or jump (QEMU counts those exits), times how often each block ran,
summed. Checked against Ibex's true cycles in benchmarks/cycles.py.

llvm-mca's Cortex-M models issue every load and store in one cycle, whatever it moves: an LDM of eight words costs
what an ADD does. Where the core's Technical Reference Manual tabulates load/store timing (Cortex-M3, Cortex-M4), the
target's `estimate: {trm_transfers: true}` adds the difference (`transfer_extra`): LDM/STM/PUSH/POP/VLDM/VSTM take
1 + N cycles for N words, LDRD/STRD 3, and a run of pipelined single loads costs one cycle more than its length.
"""

from __future__ import annotations

import hashlib
import re
import shutil
import sqlite3
import subprocess
from dataclasses import dataclass
from pathlib import Path

from tinymlaas.errors import ToolMissing

LLVM_MCA = "llvm-mca-15"
ITERATIONS = 100
# RISC-V cores without a scheduling model of their own use Rocket's (in-order, single issue).
RISCV_MODEL = ("riscv32-unknown-elf", "rocket-rv32", "+m,+c")


@dataclass(frozen=True)
class CycleModel:
    mtriple: str
    mcpu: str
    mattr: str = ""
    taken_branch_penalty: float = 0.0  # cycles a taken branch or jump adds (pipeline refill): the core's manual
    stalls: tuple[tuple[str, float], ...] = ()  # a pipeline table instead of llvm-mca: (class, stall cycles)
    trm_transfers: bool = False  # add the Technical Reference Manual's load/store timing to llvm-mca's (Arm)

    @property
    def name(self) -> str:
        if self.stalls:
            table = ", ".join(f"{k} +{v:g}" for k, v in self.stalls)
            return f"pipeline table ({table}) + {self.taken_branch_penalty:g}/taken branch"
        transfers = " + the TRM's load/store timing" if self.trm_transfers else ""
        return f"llvm-mca {self.mcpu}{transfers} + {self.taken_branch_penalty:g}/taken branch"


# instruction classes of a pipeline table, by mnemonic as objdump prints them (compressed forms expanded)
CLASSES = {
    "load": {"lb", "lh", "lw", "lbu", "lhu"}, "store": {"sb", "sh", "sw"}, "mul": {"mul"},
    "mulh": {"mulh", "mulhsu", "mulhu"}, "div": {"div", "divu", "rem", "remu"},
}
_REG = re.compile(r"\b(?:zero|ra|sp|gp|tp|t[0-6]|s1[01]|s[0-9]|a[0-7]|x[0-9]+)\b")


def table_cost(body: list[str], stalls: dict) -> float:
    """Cycles of one execution of a block of RISC-V instructions: one each, plus their classes' stalls."""
    cycles = float(len(body))
    for k, text in enumerate(body):
        mnemonic, _, operands = text.partition(" ")
        for cls, names in CLASSES.items():
            if mnemonic in names:
                cycles += stalls.get(cls, 0)
        if mnemonic in CLASSES["load"] and stalls.get("load_use") and k + 1 < len(body):
            loaded = _REG.findall(operands)[:1]
            nxt, _, nxt_operands = body[k + 1].partition(" ")
            sources = _REG.findall(nxt_operands)
            if not (nxt in CLASSES["store"] or nxt.startswith("b")):
                sources = sources[1:]  # the first register is written, not read
            if loaded and loaded[0] in sources:
                cycles += stalls["load_use"]
    return cycles


_ARM_REG = re.compile(r"\b(?:r1[0-5]|r[0-9]|sb|sl|fp|ip|sp|lr|pc|[sd][0-9]+)\b")
_SINGLE_LOADS = {"ldr", "ldrb", "ldrh", "ldrsb", "ldrsh", "ldrex", "vldr"}
_SINGLE_STORES = {"str", "strb", "strh", "strex", "vstr"}
_MULTIPLE = ("ldm", "stm", "push", "pop", "vldm", "vstm", "vpush", "vpop")


def _arm_mnemonic(text: str) -> str:
    """`ldmia.w` -> `ldm`, `ldrb.w` -> `ldrb`, `vldr.32`/`vpush` as they are (condition and width suffixes off)."""
    m = text.split(" ", 1)[0].split(".")[0]
    for base in _MULTIPLE:
        if m.startswith(base) and base != m and m[len(base):] in ("ia", "ib", "da", "db", "fd", "ea"):
            return base
    return m


def _arm_registers(operands: str) -> list[str]:
    """Registers an instruction names, register ranges ({s0-s7}, {d8-d11}) expanded; d registers count twice
    (two words)."""
    regs = []
    for lo, hi in re.findall(r"\b([rsd]\d+)-([rsd]\d+)\b", operands):
        regs += [f"{lo[0]}{i}" for i in range(int(lo[1:]), int(hi[1:]) + 1)]
    operands = re.sub(r"\b[rsd]\d+-[rsd]\d+\b", "", operands)
    return regs + _ARM_REG.findall(operands)


def _words(regs: list[str]) -> int:
    return sum(2 if r.startswith("d") else 1 for r in regs)


def transfer_extra(body: list[str]) -> float:
    """Cycles the Cortex-M3/M4 Technical Reference Manuals' load/store timing adds to llvm-mca's for a block of
    Thumb instructions (Cortex-M4 TRM, 3.3 "Instruction set summary", "Load/store timings"; Cortex-M3 TRM, 18.3):
    - LDM/STM/PUSH/POP/VLDM/VSTM/VPUSH/VPOP: 1 + N cycles for N words (llvm-mca: 1);
    - LDRD/STRD (and VLDR/VSTR of a double): 3, never pipelined (llvm-mca: 1);
    - LDR of one register: 2 cycles, but a load or store right after it pipelines with it (one cycle less), so a
      run of k single loads and stores that holds a load costs k + 1 (llvm-mca: k).
    llvm-mca charges a cycle of stall when the next instruction reads a loaded register as data; that cycle is part
    of the manual's count, so it is not added twice."""
    parsed = [(_arm_mnemonic(t), _arm_registers(t.split(" ", 1)[1]) if " " in t else []) for t in body]

    def data_use(k: int, loaded: list[str]) -> bool:
        """Instruction k + 1 reads one of `loaded` as data (not as an address: that stall is the manual's too)."""
        if k + 1 >= len(parsed):
            return False
        mnemonic, regs = parsed[k + 1]
        if mnemonic in _SINGLE_STORES or mnemonic in ("strd",):
            reads = regs[:1] if mnemonic != "strd" else regs[:2]
        elif mnemonic.startswith(("stm", "push", "vst", "vpush")):
            reads = regs[1:] if mnemonic.startswith(("stm", "vstm")) else regs
        elif mnemonic in _SINGLE_LOADS or mnemonic.startswith(("ld", "pop", "vld", "vpop")):
            reads = []
        elif mnemonic.startswith(("b", "cmp", "cmn", "tst", "teq")):
            reads = regs
        else:
            reads = regs[1:]  # the first register is written
        return any(r in reads for r in loaded)

    def is_single(mnemonic: str, regs: list[str]) -> bool:
        return (mnemonic in _SINGLE_LOADS or mnemonic in _SINGLE_STORES) and not (
            mnemonic in ("vldr", "vstr") and regs[:1] and regs[0][0] == "d")

    extra, last_load = 0.0, None  # last_load: index of the open run's last single load
    for k, (mnemonic, regs) in enumerate(parsed):
        if is_single(mnemonic, regs):
            if mnemonic in _SINGLE_LOADS:
                last_load = k
            if k + 1 < len(parsed) and is_single(*parsed[k + 1]):
                continue  # the run goes on
            if last_load is not None:  # the run ends here: its first load's second cycle
                extra += 0.0 if data_use(last_load, parsed[last_load][1][:1]) else 1.0
            last_load = None
        elif mnemonic in ("ldrd", "strd", "vldr", "vstr"):
            loaded = regs[:2] if mnemonic in ("ldrd", "vldr") else []
            extra += 2.0 - (1.0 if loaded and data_use(k, loaded) else 0.0)
        elif mnemonic in _MULTIPLE:
            listed = [r for r in regs if r not in regs[:1]] if mnemonic in ("ldm", "stm", "vldm", "vstm") else regs
            loaded = listed if mnemonic in ("ldm", "pop", "vldm", "vpop") else []
            # llvm-mca stalls the next instruction only on the list's last register (the last word to arrive)
            extra += _words(listed) - (1.0 if loaded and data_use(k, loaded[-1:]) else 0.0)
    return extra


def model_for(target) -> CycleModel:
    """The target's `estimate:` entry (targets/*.yaml), else its LLVM CPU."""
    est = target.estimate or {}
    penalty = float(est.get("taken_branch_penalty", 0))
    if "pipeline" in est:
        return CycleModel(RISCV_MODEL[0], "table", "", penalty,
                          tuple((k, float(v)) for k, v in est["pipeline"].items()))
    if target.arch == "riscv":
        return CycleModel(*RISCV_MODEL, penalty) if "mcpu" not in est else CycleModel(
            RISCV_MODEL[0], est["mcpu"], RISCV_MODEL[2], penalty)
    attrs = ",".join(a for a in target.llvm.get("mattr", ()) if a.startswith("+"))
    return CycleModel(target.llvm["mtriple"], est.get("mcpu", target.llvm["mcpu"]), attrs, penalty,
                      trm_transfers=bool(est.get("trm_transfers")))


_INSN = re.compile(r"^\s*([0-9a-f]+):\s+(.*)$")
_POST_INDEXED = re.compile(r"\[(\w+)\],\s*(#-?\w+)$")
_PRE_INDEXED = re.compile(r"(\[[^\]]*\])!")  # `ldrsb.w r3, [ip, #4]!`: llvm-mca 15 refuses the writeback too
_IT = re.compile(r"^it[te]{0,3}$")


def cut_it_block(body: list[str]) -> bool:
    """A Thumb block that ends inside an IT block (QEMU cut it there): its conditional instructions would run on into
    the next code region of llvm-mca's input and make that one fail instead."""
    open_slots = 0
    for text in body:
        mnemonic = text.split(" ", 1)[0]
        open_slots = len(mnemonic) - 1 if _IT.match(mnemonic) else max(open_slots - 1, 0)
    return open_slots > 0


def disassembly(elf: Path, target) -> tuple[list[int], list[str]]:
    """(addresses, instructions) of the ELF's code, in address order, as llvm-mca's assembler reads them."""
    out = subprocess.run([target.tool("objdump"), "-d", "--no-show-raw-insn", str(elf)],
                         capture_output=True, text=True, check=True).stdout
    comment = "@" if target.arch == "arm" else "#"
    addrs, insns = [], []
    for line in out.splitlines():
        m = _INSN.match(line)
        if not m:
            continue
        text = m.group(2).split(comment)[0].split(";")[0].strip()
        if not text or text.startswith((".word", ".short", ".byte", "<UNDEFINED>", "udf")):
            text = "nop"  # data in code: never a block's instruction
        # a branch to an address: to a local label (llvm-mca does not follow branches)
        text = re.sub(r"\b[0-9a-f]+ <[^>]*>$", ".Ltarget", text).replace("\t", " ")
        if target.arch == "arm":  # llvm-mca 15 crashes on post-indexed loads (`ldr.w r3, [r8], #4`): same cost
            text = _POST_INDEXED.sub(r"[\1, \2]", text)  # as the offset form, whose base update it drops
            text = _PRE_INDEXED.sub(r"\1", text)
        text = _as_branch(text, target.arch)
        addrs.append(int(m.group(1), 16))
        insns.append(text)
    return addrs, insns


def _as_branch(text: str, arch: str) -> str:
    """llvm-mca 15 charges every call instruction a fixed 100 cycles (RISC-V's jal/jalr all count as calls): a
    call or jump becomes a branch of the core's own cost to the same place."""
    mnemonic = text.split(" ", 1)[0]
    if arch == "riscv" and mnemonic in ("jal", "j", "jalr", "jr", "ret", "call", "tail"):
        return "beq zero, zero, .Ltarget"
    if arch == "arm" and mnemonic in ("bl", "blx"):
        return "b .Ltarget" if ".Ltarget" in text else "bx " + text.split(" ", 1)[1].strip()
    return text


def _run_mca(model: CycleModel, source: str) -> subprocess.CompletedProcess:
    return subprocess.run([LLVM_MCA, f"-mtriple={model.mtriple}", f"-mcpu={model.mcpu}",
                           *([f"-mattr={model.mattr}"] if model.mattr else []), f"-iterations={ITERATIONS}",
                           "-all-views=false", "-summary-view"], input=source, capture_output=True, text=True,
                          check=False)


CACHE_PATH: Path | None = None  # where BlockCosts keeps its file (None: the build folder)


class BlockCosts:
    """llvm-mca's cycles per block, kept across builds (an SQLite file in the build folder): a block's cost depends
    only on its instructions and the core's model, and the builds of one model's variants, or of models sharing the
    C kernels, repeat most blocks. Safe for the search's parallel workers (WAL, one transaction per write)."""

    def __init__(self, model: CycleModel, path: Path | None = None):
        from tinymlaas import build_dir

        self.path = path or CACHE_PATH or build_dir() / "mca-blocks.sqlite"
        self.salt = f"{LLVM_MCA}|{model.mtriple}|{model.mcpu}|{model.mattr}|{ITERATIONS}"

    def key(self, body: list[str]) -> str:
        return hashlib.sha256("\n".join([self.salt, *body]).encode()).hexdigest()

    def _connect(self) -> sqlite3.Connection:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(self.path, timeout=60)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("CREATE TABLE IF NOT EXISTS blocks (key TEXT PRIMARY KEY, cycles REAL NOT NULL, "
                     "fallback INTEGER NOT NULL)")
        return conn

    def get(self, keys: list[str]) -> dict[str, tuple[float, bool]]:
        conn, found = self._connect(), {}
        try:
            for k in range(0, len(keys), 500):
                chunk = keys[k:k + 500]
                rows = conn.execute(f"SELECT key, cycles, fallback FROM blocks WHERE key IN ({','.join('?' * len(chunk))})",
                                    chunk).fetchall()
                found.update({key: (cycles, bool(fb)) for key, cycles, fb in rows})
        finally:
            conn.close()
        return found

    def put(self, costs: dict[str, tuple[float, bool]]) -> None:
        conn = self._connect()
        try:
            with conn:
                conn.executemany("INSERT OR REPLACE INTO blocks VALUES (?, ?, ?)",
                                 [(k, c, int(fb)) for k, (c, fb) in costs.items()])
        finally:
            conn.close()


def mca_input(bodies: list[list[str]], thumb: bool) -> tuple[str, list[int]]:
    """llvm-mca's input with one code region per block (each branch to its own end label), and the 1-based line
    where each region's first instruction is."""
    comment = "@" if thumb else "#"
    lines, starts = [".syntax unified", ".thumb"] if thumb else [], []
    for k, body in enumerate(bodies):
        starts.append(len(lines) + 2)
        lines += [f"{comment} LLVM-MCA-BEGIN b{k}", *(s.replace(".Ltarget", f".Lt{k}") for s in body),
                  f".Lt{k}:", f"{comment} LLVM-MCA-END b{k}"]
    return "\n".join(lines) + "\n", starts


def crashing_block(model: CycleModel, bodies: list[list[str]], thumb: bool) -> int | None:
    """Which of `bodies` makes llvm-mca crash (one of them does, together): by halving, log2(n) runs, not n (a model of
    a thousand operators has thousands of blocks). None if none does alone."""
    def crashes(ks) -> bool:
        return _run_mca(model, mca_input([bodies[k] for k in ks], thumb)[0]).returncode != 0

    candidates = list(range(len(bodies)))
    while len(candidates) > 1:
        half = candidates[:len(candidates) // 2]
        candidates = half if crashes(half) else candidates[len(candidates) // 2:]
    return candidates[0] if candidates and crashes(candidates) else None


def block_cycles(elf: Path, target, blocks: set[tuple[int, int]], model: CycleModel | None = None) -> dict:
    """(address, instructions) -> estimated cycles per execution. A block llvm-mca cannot read (rare: an IT block
    cut by QEMU) counts one cycle per instruction, and is named in the result's "fallback" entry."""
    model = model or model_for(target)
    addrs, insns = disassembly(elf, target)
    index = {a: i for i, a in enumerate(addrs)}
    if model.stalls:
        stalls, result = dict(model.stalls), {"fallback": []}
        for vaddr, n in blocks:
            i = index.get(vaddr)
            result[vaddr, n] = table_cost(insns[i:i + n], stalls) if i is not None else float(n)
            if i is None:
                result["fallback"].append((vaddr, n))
        return result
    thumb = target.arch == "arm"
    pending = {}
    for vaddr, n in blocks:
        i = index.get(vaddr & ~1 if thumb else vaddr)
        pending[vaddr, n] = insns[i:i + n] if i is not None and i + n <= len(insns) else None
    bodies = dict(pending)
    result, fallback = {}, []
    for key, body in list(pending.items()):
        if body is None or (thumb and cut_it_block(body)):
            result[key] = float(key[1])
            fallback.append(key)
            del pending[key]
    cache = BlockCosts(model)
    cache_keys = {key: cache.key(body) for key, body in pending.items()}
    known = cache.get(sorted(set(cache_keys.values())))
    for key in list(pending):
        if cache_keys[key] in known:
            result[key], was_fallback = known[cache_keys[key]]
            if was_fallback:
                fallback.append(key)
            del pending[key]
    measured = set(pending)
    if pending and shutil.which(LLVM_MCA) is None:
        raise ToolMissing(f"'{LLVM_MCA}' is not installed (run `make setup`)")
    while pending:
        keys = list(pending)
        source, starts = mca_input([pending[key] for key in keys], thumb)
        proc = _run_mca(model, source)
        # llvm-mca drops a region it cannot assemble (exit status 0 all the same): those blocks fall back
        bad_lines = {int(n) for n in re.findall(r"<stdin>:(\d+):\d+: error", proc.stderr)}
        if proc.returncode == 0 and not bad_lines:
            totals = [int(x) for x in re.findall(r"^Total Cycles:\s+(\d+)", proc.stdout, re.MULTILINE)]
            if len(totals) != len(keys):
                raise ToolMissing(f"{LLVM_MCA} reported {len(totals)} regions for {len(keys)} blocks")
            result.update({key: total / ITERATIONS for key, total in zip(keys, totals)})
            break
        if bad_lines:
            bad = {max(i for i, s in enumerate(starts) if s <= line) for line in bad_lines}
        else:  # llvm-mca crashed without naming a line: halve the blocks until one alone crashes it
            k = crashing_block(model, [pending[key] for key in keys], thumb)
            if k is None:
                raise ToolMissing(f"{LLVM_MCA} failed: {proc.stderr.strip().splitlines()[-1:]}")
            bad = {k}
        for k in bad:
            result[keys[k]] = float(keys[k][1])
            fallback.append(keys[k])
            del pending[keys[k]]
    cache.put({cache_keys[key]: (result[key], key in fallback) for key in measured})
    if model.trm_transfers:  # after the cache: it keeps llvm-mca's own figure
        for key, body in bodies.items():
            if body is not None:
                result[key] += transfer_extra(body)
    result["fallback"] = fallback
    return result


def block_cost(body: list[str], model: CycleModel) -> float:
    """Estimated cycles of one execution of a straight-line block (assembly as objdump prints it), uncached."""
    if model.stalls:
        return table_cost(body, dict(model.stalls))
    proc = _run_mca(model, mca_input([body], model.mtriple.startswith("thumb"))[0])
    totals = re.findall(r"^Total Cycles:\s+(\d+)", proc.stdout, re.MULTILINE)
    if proc.returncode != 0 or len(totals) != 1:
        raise ToolMissing(f"{LLVM_MCA} could not read the block: {proc.stderr.strip()[-200:]}")
    return int(totals[0]) / ITERATIONS + (transfer_extra(body) if model.trm_transfers else 0.0)


def estimate(blocks: dict, costs: dict, model: CycleModel) -> float:
    """Estimated cycles of one region from its blocks' execution and taken-exit counts."""
    return sum(count * costs[key] + taken * model.taken_branch_penalty for key, (count, taken) in blocks.items())


def estimate_run(elf: Path, target, run, model: CycleModel | None = None) -> tuple[list[float], CycleModel, int]:
    """Each counted region of a QEMU run (blocks=True) estimated, the marks' own cost (its calibration region)
    taken off: (cycles per region, the model used, blocks that fell back to one cycle per instruction)."""
    model = model or model_for(target)
    regions = [run.calibration, *run.regions]
    costs = block_cycles(elf, target, {k for r in regions for k in r.blocks}, model)
    marks = estimate(run.calibration.blocks, costs, model)
    return [round(estimate(r.blocks, costs, model) - marks, 1) for r in run.regions], model, len(costs["fallback"])
