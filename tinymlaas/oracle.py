"""The oracle: the TFLite interpreter every build is checked against, and the inputs it is checked on.

Its reference kernels where they can run the model (readable, the semantics TFLite Micro follows), its builtin
kernels otherwise (reference_resolver says which, and why). Comparing the build's outputs with the oracle's is
tinymlaas.verify's job.
"""

from __future__ import annotations

import copy

import numpy as np

from tinymlaas.errors import InvalidModel
from tinymlaas.frontend.tflite import TFLiteModel


def make_inputs(model: TFLiteModel, count: int, seed: int) -> list[list[np.ndarray]]:
    """Seeded random inputs covering each input type's range."""
    rng = np.random.default_rng(seed)
    batches = []
    for _ in range(count):
        batch = []
        for spec in model.inputs:
            if spec.dtype == "float32":
                batch.append(rng.standard_normal(spec.shape).astype(np.float32))
            else:
                info = np.iinfo(spec.dtype)
                batch.append(rng.integers(info.min, info.max, size=spec.shape, endpoint=True).astype(spec.dtype))
        batches.append(batch)
    return batches


def _builtin_codes(model) -> list[int]:
    """The builtin operator of each operator code (schema 3a keeps codes above 127 in a second field)."""
    return [max(model.OperatorCodes(i).BuiltinCode(), model.OperatorCodes(i).DeprecatedBuiltinCode())
            for i in range(model.OperatorCodesLength())]


def reference_model(data: bytes) -> bytes:
    """The model as the reference kernels can run it: operators the reference resolver lacks are rewritten into
    ones it has, with the same result bit for bit (TILE -> CONCATENATION of copies, one per tiled axis). Existing
    tensors keep their indices (new ones are appended), so every intermediate tensor can still be compared."""
    from ai_edge_litert import schema_py_generated as s

    model = s.Model.GetRootAs(data, 0)
    codes = _builtin_codes(model)
    if s.BuiltinOperator.TILE not in codes:
        return data
    m = s.ModelT.InitFromObj(model)
    tile = codes.index(s.BuiltinOperator.TILE)  # becomes CONCATENATION: the interpreter registers every listed code
    for sg in m.subgraphs:
        ops = []
        for op in sg.operators:
            multiples = sg.tensors[op.inputs[1]] if codes[op.opcodeIndex] == s.BuiltinOperator.TILE else None
            buffer = m.buffers[multiples.buffer].data if multiples is not None else None
            if multiples is None:
                ops.append(op)
                continue
            if buffer is None or len(buffer) == 0:  # computed multiples: cannot be rewritten
                return data
            reps = np.frombuffer(bytes(buffer), dtype=np.int64 if multiples.type == s.TensorType.INT64 else np.int32)
            current, shape = op.inputs[0], list(sg.tensors[op.inputs[0]].shape)
            axes = [a for a, r in enumerate(reps) if r > 1] or [0]
            for n, axis in enumerate(axes):
                shape[axis] *= int(reps[axis])
                if n == len(axes) - 1:
                    out = op.outputs[0]
                else:
                    t = copy.deepcopy(sg.tensors[op.outputs[0]])
                    t.shape, t.name = np.array(shape, dtype=np.int32), (t.name or b"") + f"/tile{axis}".encode()
                    t.shapeSignature = None
                    sg.tensors.append(t)
                    out = len(sg.tensors) - 1
                cat = s.OperatorT()
                cat.opcodeIndex, cat.outputs = tile, np.array([out], dtype=np.int32)
                cat.inputs = np.array([current] * int(max(reps[axis], 1)), dtype=np.int32)
                cat.builtinOptionsType = s.BuiltinOptions.ConcatenationOptions
                cat.builtinOptions = s.ConcatenationOptionsT()
                cat.builtinOptions.axis = axis
                ops.append(cat)
                current = out
        sg.operators = ops
    code = m.operatorCodes[tile]
    code.builtinCode = code.deprecatedBuiltinCode = s.BuiltinOperator.CONCATENATION
    code.version = 3
    import flatbuffers

    b = flatbuffers.Builder(len(data) + 4096)
    b.Finish(m.Pack(b), file_identifier=b"TFL3")
    return bytes(b.Output())


def reference_interpreter(data: bytes, preserve_all_tensors: bool = False):
    """The interpreter the build must reproduce, with the kernels `reference_resolver` found safe for this model
    (the reference kernels, or the builtin ones where the reference resolver cannot run it)."""
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    resolver = getattr(OpResolverType, reference_resolver(data))
    it = Interpreter(model_content=reference_model(data), experimental_op_resolver_type=resolver,
                     experimental_preserve_all_tensors=preserve_all_tensors)
    it.allocate_tensors()
    return it


def interpreter(model: TFLiteModel):
    return reference_interpreter(model.data)


_RESOLVERS: dict[str, str] = {}

# Run in a child process: the interpreter aborts the whole process on some models (a failed check in a kernel's
# preparation), which must not take the compiler or the server with it.
_PROBE = r"""
import sys, numpy as np
from ai_edge_litert.interpreter import Interpreter, OpResolverType
data = sys.stdin.buffer.read()
try:
    it = Interpreter(model_content=data, experimental_op_resolver_type=getattr(OpResolverType, sys.argv[1]))
    it.allocate_tensors()
    for d in it.get_input_details():
        it.set_tensor(d["index"], np.zeros(d["shape"], dtype=d["dtype"]))
    it.invoke()
except Exception as e:
    sys.stderr.write(str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__)
    sys.exit(3 if "Didn't find op" in str(e) else 4)
"""


def reference_resolver(data: bytes) -> str:
    """BUILTIN_REF, or the builtin kernels for a model with an operator the reference resolver lacks or aborts on.

    Each is tried in a child process first; a model the interpreter cannot run at all is refused (InvalidModel)."""
    import hashlib
    import signal
    import subprocess
    import sys

    key = hashlib.sha256(data).hexdigest()
    if key in _RESOLVERS:
        return _RESOLVERS[key]
    problems = []
    for resolver in ("BUILTIN_REF", "BUILTIN_WITHOUT_DEFAULT_DELEGATES"):
        if resolver == "BUILTIN_REF" and _wrong_reference_kernels(data):
            continue
        proc = subprocess.run([sys.executable, "-c", _PROBE, resolver], input=reference_model(data), capture_output=True, timeout=600, check=False,
                              env={**__import__("os").environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
        if proc.returncode == 0:
            _RESOLVERS[key] = resolver
            return resolver
        if proc.returncode < 0:
            problems.append(f"{resolver} kernels abort ({signal.Signals(-proc.returncode).name})")
        elif proc.returncode == 3:
            problems.append(f"{resolver} kernels lack an operator")
        else:
            message = proc.stderr.decode(errors="replace").strip().splitlines()
            raise InvalidModel(f"the TFLite interpreter refuses the model: {message[-1][:200] if message else 'error'}")
    raise InvalidModel(f"the TFLite interpreter cannot run the model ({'; '.join(problems)})")


def _wrong_reference_kernels(data: bytes) -> bool:
    """Operators whose reference kernel returns wrong values although it runs: the quantized SUM (its outputs are
    mostly -1 in ai-edge-litert 2.3; the optimized kernel computes what TFLite's SUM specifies)."""
    from ai_edge_litert import schema_py_generated as s

    model = s.Model.GetRootAs(data, 0)
    codes = _builtin_codes(model)
    for g in range(model.SubgraphsLength()):
        sg = model.Subgraphs(g)
        for i in range(sg.OperatorsLength()):
            op = sg.Operators(i)
            if codes[op.OpcodeIndex()] == s.BuiltinOperator.SUM and op.InputsLength() and \
                    sg.Tensors(op.Inputs(0)).Type() in (s.TensorType.INT8, s.TensorType.INT16):
                return True
    return False


def reference_outputs(model: TFLiteModel, batches: list[list[np.ndarray]]) -> list[list[np.ndarray]]:
    it = interpreter(model)
    ins, outs = it.get_input_details(), it.get_output_details()
    results = []
    for batch in batches:
        for detail, x in zip(ins, batch):
            it.set_tensor(detail["index"], x)
        it.invoke()
        results.append([it.get_tensor(d["index"]).copy() for d in outs])
    return results
