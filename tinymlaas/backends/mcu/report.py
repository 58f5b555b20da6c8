"""A firmware build's report for people: one line per figure."""

from __future__ import annotations

from tinymlaas.backends.mcu.build import CompileReport, fmt


def repeat_text(exact: bool | None) -> str:
    return "n/a: recurrent state carried over" if exact is None else "exact" if exact else "DIFFERS"


def format_report(r: CompileReport) -> str:
    f, s = r.fidelity, r.sizes
    if f["kind"] == "float":
        fid = f"max rel error {f['max_rel_error']:.2e} (abs {f['max_abs_error']:.2e})"
    else:
        fid = f"{f['exact_fraction'] * 100:.2f}% of output bytes bit-exact, max {f['max_lsb_diff']} LSB off"
    rows = [
        ("model", r.model),
        ("target", f"{r.target} ({r.core}, board class {r.board})"),
        ("lowering", {"integer": "integer kernels", "float": "float32", "mixed": "integer and float32 kernels",
                      "float-emulated": "int8 through float ops"}[r.lowering]),
        ("verified", f"{'PASS' if r.verified else 'FAIL'}: {fid} over {f['inputs']} inputs [{f['tolerance']}]"),
        ("instructions/inference", (f"{fmt(r.instructions)} (range {fmt(r.instructions_min)}.."
                                    f"{fmt(r.instructions_max)}, repeat {repeat_text(r.instructions_repeat_exact)})")),
        ("memory accesses", fmt(r.memory_accesses) if r.memory_accesses is not None else "not counted by " + r.runner),
        *([("cycles/inference", (f"{fmt(r.cycles)} (CPI {r.cycles / max(r.instructions, 1):.2f}, "
                                 f"{r.cycles / r.clock_hz * 1e3:.2f} ms at {r.clock_hz / 1e6:g} MHz, repeat "
                                 f"{repeat_text(r.cycles_repeat_exact)}; {r.cycles_source})"))]
          if r.cycles is not None else []),
        *([("cycles/inference", (f"~{fmt(round(r.cycles_estimate))} estimated, ~{r.cycles_estimate / r.clock_hz * 1e3:.2f}"
                                 f" ms at {r.clock_hz / 1e6:g} MHz ({r.cycles_estimate_method}; true cycles need "
                                 "the core's RTL)"))]
          if r.cycles is None and r.cycles_estimate is not None else []),
        ("flash (model)", (f"{fmt(s['flash_model'])} B = code {fmt(s['model_code'])} + weights {fmt(s['weights'])}"
                           f"  [board {fmt(r.fits['flash_limit'])} B]")),
        ("RAM (model)", (f"{fmt(s['ram_model'])} B = arena {fmt(s['arena'])} + scratch {fmt(s['kernel_scratch'])}"
                         + (f" + state {fmt(s['state'])}" if s.get("state") else "") + f" + stack {fmt(s['stack_peak'] or 0)}  [board {fmt(r.fits['ram_limit'])} B]")),
        ("firmware image", f"flash {fmt(s['firmware_flash'])} B, other data/bss {fmt(s['data_bss_other'])} B"),
        ("compile time", f"{r.compile_seconds:.1f} s"),
        ("output", r.artifacts.get("dir", "")),
    ]
    rows += [("note", n) for n in r.notes]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)
