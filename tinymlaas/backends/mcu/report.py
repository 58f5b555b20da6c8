"""A firmware build's report for people: one line per figure."""

from __future__ import annotations

from tinymlaas.backends.mcu.build import CompileReport, fmt


def repeat_text(exact: bool | None) -> str:
    return "n/a: recurrent state carried over" if exact is None else "exact" if exact else "DIFFERS"


def format_report(r: CompileReport) -> str:
    f, s = r.fidelity, r.sizes
    if f["kind"] == "float":
        fid = f"max rel error {f['max_rel_error']:.2e} (abs {f['max_abs_error']:.2e})"
        if "max_lsb_diff" in f:  # a float output of quantized layers, measured in their steps
            fid += f", {f['max_lsb_diff']:g} LSB of its quantization"
    else:
        fid = f"{f['exact_fraction'] * 100:.2f}% of output bytes bit-exact, max {f['max_lsb_diff']} LSB off"
    rows = [
        ("model", r.model),
        ("target", f"{r.target} ({r.core}, board class {r.board})"),
        ("lowering", {"integer": "integer kernels", "float": "float32", "mixed": "integer and float32 kernels",
                      "float-emulated": "int8 through float ops"}[r.lowering]),
        ("verified", f"{'PASS' if r.verified else 'FAIL'}: {fid} over {f['inputs']} inputs [{f['tolerance']}]"),
        *([("source check", source_text(f["source"]))] if f.get("source") else []),
        *([("accuracy", accuracy_text(r.accuracy))] if r.accuracy else []),
        *([("weights", weights_text(r.weights))] if r.weights else []),
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
    text = "\n".join(f"{k:<{width}}  {v}" for k, v in rows)
    return text + ("\n\n" + format_profile(r.profile) if r.profile else "")


def accuracy_text(a: dict) -> str:
    """The validation set's metric on the build's arithmetic against the model as given (lowbit.Judge.report)."""
    worse = f"{a['drop']:.2f} points lower" if a["drop"] > 0 else f"{-a['drop']:.2f} points higher" if a["drop"] < 0 \
        else "the same"
    return f"{a['metric']} {a['value']:.4f} on {a['samples']} samples; the model as given {a['reference']:.4f} ({worse})"


def weights_text(layers: list) -> str:
    """Each weight layer's precision (frontend/lowbit.py LayerWeights.to_dict), counted."""
    from collections import Counter

    counts = Counter(w["precision"] for w in layers)
    low = [str(w["op"]) for w in layers if w["precision"] != "int8"]
    kinds = ", ".join(f"{n} {p}" for p, n in sorted(counts.items(), key=lambda x: x[0] != "int8"))
    return (f"{kinds} (below eight bits: operators {', '.join(low) or 'none'}); "
            f"{fmt(sum(w['bytes'] for w in layers))} B of layer weights")


def source_text(src: dict) -> str:
    """A converted model's check against its own framework (verify.source_fidelity), for people."""
    figure = (f"max {src['max_lsb_diff']:g} LSB off" if "max_lsb_diff" in src
              else f"max rel error {src['max_rel_error']:.2e}")
    return (f"{'PASS' if src['passed'] else 'FAIL'}: the conversion against {src['reference']}, {figure} over "
            f"{src['inputs']} inputs [{src['tolerance']}]")


def format_profile(p: dict) -> str:
    """A per-layer profile (backends.mcu.profile.Profile.to_dict()): one line per step, keyed by the TFLite
    operator and kernel variant, with true cycles and the estimate's error where the core runs from its RTL."""
    true = p["cycles_source"] is not None
    lines = [f"per layer: {p['model']} on {p['target']}; estimate: {p['estimate_method']}"
             + (f"; true cycles: {p['cycles_source']}" if true else ""),
             f"{'op':>4} {'operator':<22} {'variant':<8} {'instructions':>13} {'mem access':>11} {'est. cycles':>13}"
             + (f" {'true cycles':>13} {'CPI':>5} {'est. err':>8}" if true else "")]
    for s in p["steps"]:
        line = (f"{'' if s['op_index'] is None else s['op_index']:>4} {s['opcode'] or s['kernel'][:22]:<22} "
                f"{s['implementation'] or '':<8} {s['instructions']:>13,} {s['memory_accesses']:>11,} "
                f"{s['cycles_estimate']:>13,.0f}")
        if true:
            err = (s["cycles_estimate"] - s["cycles"]) / s["cycles"] if s["cycles"] else 0.0
            line += f" {s['cycles']:>13,} {s['cycles'] / max(s['instructions'], 1):>5.2f} {err:>+8.1%}"
        lines.append(line)
    tot = p["totals"]
    line = (f"{'':>4} {'total':<22} {'':<8} {tot['instructions']:>13,} {tot['memory_accesses']:>11,} "
            f"{tot['cycles_estimate']:>13,.0f}")
    if true:
        line += (f" {tot['cycles']:>13,} {tot['cycles'] / tot['instructions']:>5.2f}"
                 f" {(tot['cycles_estimate'] - tot['cycles']) / tot['cycles']:>+8.1%}")
    return "\n".join([*lines, line])
