"""Verify stage: a build's outputs against the oracle's (tinymlaas.oracle), bit-exact or within a bounded error."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from tinymlaas.frontend.tflite import TFLiteModel
from tinymlaas.oracle import reference_interpreter

FLOAT_REL_TOLERANCE = 1e-5
MIXED_MAX_LSB = 2  # quantized outputs of a graph with float operators inside (or int8 lowered through float)


@dataclass
class Fidelity:
    kind: str  # "float" or "quantized"
    inputs: int
    passed: bool
    # float outputs
    max_abs_error: float | None = None
    max_rel_error: float | None = None  # max |y - ref| / max |ref|, per output tensor
    # quantized outputs
    exact_fraction: float | None = None  # share of output bytes identical to the interpreter's
    max_lsb_diff: int | None = None
    tolerance: str = ""

    def to_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None}


class VerifiedReport:
    """What every build report (firmware or host library) answers: verified against the interpreter, as JSON."""

    fidelity: dict

    @property
    def verified(self) -> bool:
        return bool(self.fidelity.get("passed"))

    def to_dict(self) -> dict:
        d = dict(self.__dict__)
        d["verified"] = self.verified
        return d


def split_outputs(model: TFLiteModel, raw: bytes, count: int) -> list[list[np.ndarray]]:
    per = sum(t.nbytes for t in model.outputs)
    if len(raw) != per * count:
        raise ValueError(f"firmware wrote {len(raw)} output bytes, expected {per * count}")
    results = []
    for i in range(count):
        off, batch = i * per, []
        for spec in model.outputs:
            batch.append(np.frombuffer(raw, dtype=spec.dtype, count=int(np.prod(spec.shape)), offset=off).reshape(spec.shape))
            off += spec.nbytes
        results.append(batch)
    return results


def compare(
    model: TFLiteModel, got: list[list[np.ndarray]], want: list[list[np.ndarray]], integer_kernels: bool = False,
    float_tolerance: float = FLOAT_REL_TOLERANCE,
) -> Fidelity:
    """Float outputs must be within FLOAT_REL_TOLERANCE. Quantized outputs must be bit-exact when the
    build uses integer kernels only; with float arithmetic inside, within MIXED_MAX_LSB of the output's scale.
    A converted model's float output computed from a dequantized value (source_output_scales) is measured in that
    value's steps, as against its own framework (source_lsb_tolerance): a float result a hair apart from the
    interpreter's (its exp or log, the build's) that lands on a rounding boundary requantizes one step away, and
    float arithmetic after it spreads that step."""
    scales = getattr(model, "source_output_scales", ())  # host builds compare ONNX models too
    if scales and all(scales) and not integer_kernels and all(t.dtype == "float32" for t in model.outputs):
        max_abs, max_rel, max_lsb = 0.0, 0.0, 0.0
        for g_batch, w_batch in zip(got, want):
            for g, w, scale in zip(g_batch, w_batch, scales):
                err = float(np.max(np.abs(g.astype(np.float64) - w.astype(np.float64)))) if g.size else 0.0
                top = float(np.max(np.abs(w))) if w.size else 0.0
                max_abs, max_lsb = max(max_abs, err), max(max_lsb, round(err / scale, 3))
                max_rel = max(max_rel, err / top if top > 0 else err)
        tolerance = source_lsb_tolerance(model)
        return Fidelity("float", len(got), passed=max_lsb <= tolerance, max_abs_error=max_abs, max_rel_error=max_rel,
                        max_lsb_diff=max_lsb,
                        tolerance=f"within {tolerance} LSB of the quantization each output is computed from (float "
                        "arithmetic between integer layers: a value on a rounding boundary may requantize one "
                        "step away)")
    if all(t.dtype == "float32" for t in model.outputs) and not integer_kernels:
        max_abs, max_rel = 0.0, 0.0
        for g_batch, w_batch in zip(got, want):
            for g, w in zip(g_batch, w_batch):
                err = float(np.max(np.abs(g.astype(np.float64) - w.astype(np.float64)))) if g.size else 0.0
                scale = float(np.max(np.abs(w))) if w.size else 0.0
                max_abs = max(max_abs, err)
                max_rel = max(max_rel, err / scale if scale > 0 else err)
        return Fidelity(
            "float", len(got), passed=max_rel <= float_tolerance, max_abs_error=max_abs, max_rel_error=max_rel,
            tolerance=f"relative error <= {float_tolerance:g}",
        )
    same = total = 0
    max_lsb = 0
    for g_batch, w_batch in zip(got, want):
        for g, w in zip(g_batch, w_batch):
            if g.dtype.kind == "f":  # dequantized outputs of an integer graph: compared as bit patterns
                g, w = g.view(np.int32), w.view(np.int32)
            diff = np.abs(g.astype(np.int64) - w.astype(np.int64))
            same += int(np.count_nonzero(diff == 0))
            total += diff.size
            max_lsb = max(max_lsb, int(diff.max()) if diff.size else 0)
    if integer_kernels:
        passed, tolerance = max_lsb == 0, "bit-exact"
    else:  # float arithmetic before a requantization: a result on a rounding boundary may round the other way
        passed = max_lsb <= MIXED_MAX_LSB
        tolerance = (f"within {MIXED_MAX_LSB} LSB of the output's quantization (float arithmetic inside the "
                     "graph: a value on a rounding boundary may requantize one step away)")
    return Fidelity(
        "quantized", len(got), passed=passed, exact_fraction=same / total if total else 1.0,
        max_lsb_diff=max_lsb, tolerance=tolerance,
    )


@dataclass
class LayerCheck:
    tensor: str
    operator: str
    nbytes: int
    exact_fraction: float | None  # None: no step of the build produced this tensor
    max_lsb_diff: int | None


VIEW_OPCODES = ("RESHAPE", "SQUEEZE", "EXPAND_DIMS")  # the same bytes in another shape: views in a build


def compare_layers(model: TFLiteModel, batch: list[np.ndarray], steps: list[bytes],
                   op_indices: list[int | None], outputs_written: list[int | None], it=None) -> list[LayerCheck]:
    """Every operator's output against what the build wrote for it, for one input.

    `it`: the interpreter (preserving all tensors) that ran the inputs before this one, for a model whose state
    carries over between inferences.

    A step carries the TFLite operator it computes (the last one when several were fused); the last step of an
    operator wrote its output; a model output is what the last step writing its output buffer wrote (that binding
    may have lost its name). A reshape is a view of its input's bytes (no step of its own): its input's step stands
    for it. Operators fused into a later kernel, or folded at compile time, have no tensor of their own in the build
    (None). Tensors keep their indices in `reference_model`'s rewrite, so they are read by index from the reference
    run."""
    it = it or reference_interpreter(model.data, preserve_all_tensors=True)
    for detail, x in zip(it.get_input_details(), batch):
        it.set_tensor(detail["index"], x)
    it.invoke()
    last = {index: k for k, index in enumerate(op_indices) if index is not None}
    writer = {out: k for k, out in enumerate(outputs_written) if out is not None}
    checks, step_of = [], {}  # tensor -> the step that wrote it
    for op in model.graph.operators:
        tensor = model.graph.tensor(op.outputs[0])
        want = it.get_tensor(op.outputs[0])
        k = last.get(op.index)
        if k is None and op.opcode in VIEW_OPCODES:
            k = step_of.get(op.inputs[0])
        if op.outputs[0] in model.graph.outputs:
            k = writer.get(model.graph.outputs.index(op.outputs[0]), k)
        if k is not None:
            step_of[op.outputs[0]] = k
        if k is None or len(steps[k]) != want.nbytes:
            checks.append(LayerCheck(tensor.name, op.opcode, want.nbytes, None, None))
            continue
        got = np.frombuffer(steps[k], dtype=want.dtype).astype(np.int64)
        diff = np.abs(got - want.astype(np.int64).ravel())
        checks.append(LayerCheck(tensor.name, op.opcode, want.nbytes, float(np.mean(diff == 0)),
                                 int(diff.max()) if diff.size else 0))
    return checks


SOURCE_MAX_LSB = 2  # a QDQ model's outputs against its own framework (see source_fidelity)
REQUANTIZATIONS_PER_EXTRA_LSB = 4  # see source_lsb_tolerance


def source_lsb_tolerance(model: TFLiteModel) -> int:
    """SOURCE_MAX_LSB, plus one step for every REQUANTIZATIONS_PER_EXTRA_LSB float results quantized again inside the
    model (QUANTIZE: a float layer norm, attention product or softmax between integer layers). Each is a rounding
    both sides make, and may land one step apart, and a step early on spreads through the layers after it. Measured
    on 60 random inputs of a small ViT (9 such quantizations) against PyTorch (PT2E) and ONNX Runtime (QDQ): 0-3
    steps; CNNs, with none, 0-2."""
    inner = sum(1 for op in model.graph.operators if op.opcode == "QUANTIZE"
                and model.graph.tensor(op.inputs[0]).dtype == "float32" and op.inputs[0] not in model.graph.inputs)
    return SOURCE_MAX_LSB + inner // REQUANTIZATIONS_PER_EXTRA_LSB


def source_fidelity(model: TFLiteModel, batches: list[list[np.ndarray]], want: list[list[np.ndarray]]) -> dict | None:
    """A converted model (ONNX, PyTorch) against its own reference on the build's inputs: what the firmware computes
    (bit for bit the interpreter's `want`) is what the user's framework computes. Float outputs within
    FLOAT_REL_TOLERANCE; outputs dequantized from int8 within SOURCE_MAX_LSB steps of their scale: ONNX Runtime
    (and PyTorch) requantize every layer in float, rounding half to even, where TFLite's integer kernels use a
    fixed-point multiplier rounding half away from zero, so a value on a rounding boundary lands one step away; and
    TFLite's integer sigmoid/tanh/softmax write at fixed scales (1/256, 1/128), requantized into the model's.
    None for a model that was not converted."""
    source = model.converted_from
    if source is None:
        return None
    ref = source.reference_outputs(batches)
    max_rel = max_lsb = 0.0
    quantized = False
    for r_batch, w_batch in zip(ref, want):
        for k, (r, w) in enumerate(zip(r_batch, w_batch)):
            r, w = np.asarray(r, np.float64), np.asarray(w, np.float64)
            if r.shape != w.shape:
                raise ValueError(f"output {k}: {source.reference_name} gives shape {r.shape}, the conversion {w.shape}")
            err = float(np.max(np.abs(r - w))) if r.size else 0.0
            scale = model.source_output_scales[k] if k < len(model.source_output_scales) else None
            if scale:
                quantized = True
                max_lsb = max(max_lsb, round(err / scale, 3))
            else:
                top = float(np.max(np.abs(r))) if r.size else 0.0
                max_rel = max(max_rel, err / top if top > 0 else err)
    result = {"reference": source.reference_name, "inputs": len(want), "passed": max_rel <= FLOAT_REL_TOLERANCE}
    if any(s is None for s in model.source_output_scales) or not model.source_output_scales:
        result["max_rel_error"] = max_rel
    if quantized:
        tolerance = source_lsb_tolerance(model)
        result["max_lsb_diff"] = max_lsb
        result["passed"] = result["passed"] and max_lsb <= tolerance
        result["tolerance"] = (f"within {tolerance} LSB of each output's quantization: {source.reference_name} "
                               "requantizes in float (round half to even), TFLite's integer kernels and the firmware "
                               "in fixed point (round half away from zero)"
                               + (", and float results quantized again inside the model each round once more"
                                  if tolerance > SOURCE_MAX_LSB else "")
                               + "; a float output computed from a dequantized value by softmax, sigmoid, tanh or a "
                               "reshape is measured in that value's steps")
    else:
        result["tolerance"] = f"relative error <= {FLOAT_REL_TOLERANCE:g}"
    return result
