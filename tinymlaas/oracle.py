"""The oracle: the TFLite interpreter every build is checked against, and the inputs it is checked on.

Its reference kernels where they can run the model (readable, the semantics TFLite Micro follows), its builtin
kernels otherwise (reference_resolver says which, and why). Comparing the build's outputs with the oracle's is
tinymlaas.verify's job.
"""

from __future__ import annotations

import copy
import zipfile
from pathlib import Path

import numpy as np

from tinymlaas.errors import InvalidModel
from tinymlaas.frontend.tflite import TFLiteModel, array_for_input, short_input_name


def make_inputs(model: TFLiteModel, count: int, seed: int) -> list[list[np.ndarray]]:
    """Seeded random inputs covering each input's valid range: its type's whole range, or, for an input the model
    uses as indices (token ids into an embedding table), the table's rows (input_ranges)."""
    rng = np.random.default_rng(seed)
    graph = getattr(model, "graph", None)  # ONNX and PyTorch models have none: their index inputs come from the user
    ranges = input_ranges(graph) if graph is not None else {}
    batches = []
    for _ in range(count):
        batch = []
        for k, spec in enumerate(model.inputs):
            if spec.dtype == "float32":
                batch.append(rng.standard_normal(spec.shape).astype(np.float32))
            else:
                info = np.iinfo(spec.dtype)
                lo, hi = ranges.get(k, (info.min, info.max))
                batch.append(rng.integers(lo, hi, size=spec.shape, endpoint=True).astype(spec.dtype))
        batches.append(batch)
    return batches


def load_sample_inputs(path: Path, inputs: list[dict]) -> list[list[np.ndarray]]:
    """An .npz with one array per model input, by name, samples on a leading axis (or one sample as the input's own
    shape): the batches to check with. InvalidModel names a missing, misshapen or mistyped input."""
    try:
        data = np.load(path, allow_pickle=False)
        if not isinstance(data, np.lib.npyio.NpzFile):  # a single .npy array: no names to match the inputs by
            raise TypeError("one array, not named ones")
        with data:
            arrays = {k: data[k] for k in data.files}
    except (OSError, ValueError, TypeError, zipfile.BadZipFile) as e:
        raise InvalidModel(f"sample inputs {Path(path).name}: not a readable .npz of named arrays "
                           f"({type(e).__name__})") from None
    columns = []
    for spec in inputs:
        name, shape = spec["name"], tuple(spec["shape"])
        key = array_for_input(arrays, name)
        if key is None:
            raise InvalidModel(f"sample inputs {Path(path).name}: no array '{short_input_name(name)}' (it holds "
                               f"{', '.join(sorted(arrays)) or 'none'})")
        name = key
        a = arrays[name]
        a = a[None] if a.shape == shape else a
        if a.shape[1:] != shape or len(a) == 0:
            raise InvalidModel(f"sample inputs {Path(path).name}: '{name}' has shape {a.shape}; the model takes "
                               f"{shape} (or N samples of it: (N, {', '.join(map(str, shape))}))")
        if not np.can_cast(a.dtype, spec["dtype"], casting="same_kind"):
            raise InvalidModel(f"sample inputs {Path(path).name}: '{name}' is {a.dtype}; the model takes "
                               f"{spec['dtype']}")
        columns.append(a.astype(spec["dtype"]))
    if len({len(c) for c in columns}) > 1:
        raise InvalidModel(f"sample inputs {Path(path).name}: the inputs hold different numbers of samples "
                           f"({', '.join(str(len(c)) for c in columns)})")
    return [[c[i] for c in columns] for i in range(len(columns[0]))] if columns else []


# operator -> (the input holding indices, the extent they index: a function of the operator and the graph)
_INDEX_USES = {
    "GATHER": (1, lambda op, g: _axis_extent(g.tensor(op.inputs[0]).shape, int(op.opt("axis", 0) or 0))),
    "EMBEDDING_LOOKUP": (0, lambda op, g: g.tensor(op.inputs[1]).shape[0]),
}
# operators index values flow through on their way to the table (reshaped, cast; Keras's Embedding wraps negative
# ids: SELECT_V2(ids < 0, ids + rows, ids)) -> the operand positions they flow through. Ids drawn within the table's
# rows are valid along such routes; the interpreter's reference run confirms it.
_PASS_THROUGH = {"RESHAPE": (0,), "CAST": (0,), "SQUEEZE": (0,), "EXPAND_DIMS": (0,), "TRANSPOSE": (0,),
                 "SLICE": (0,), "STRIDED_SLICE": (0,), "SELECT": (1, 2), "SELECT_V2": (1, 2), "ADD": (0, 1),
                 "SUB": (0,), "MINIMUM": (0, 1), "MAXIMUM": (0, 1)}


def _axis_extent(shape, axis: int) -> int:
    return int(shape[axis if axis >= 0 else len(shape) + axis])


def input_ranges(graph) -> dict[int, tuple[int, int]]:
    """Model input position -> the (lowest, highest) value it may take, for integer inputs used as indices (into
    GATHER's params, an EMBEDDING_LOOKUP's table): random ids beyond the table are not valid input."""
    consumers = graph.consumers()
    ranges: dict[int, tuple[int, int]] = {}
    for k, index in enumerate(graph.inputs):
        if graph.tensor(index).dtype not in ("int32", "int64", "int16", "int8", "uint8"):
            continue
        extents, todo, seen = [], [index], set()
        while todo:
            t = todo.pop()
            seen.add(t)
            for op in consumers.get(t, []):
                use = _INDEX_USES.get(op.opcode)
                if use is not None and op.inputs[use[0]] == t:
                    extents.append(use[1](op, graph))
                elif any(op.inputs[k] == t for k in _PASS_THROUGH.get(op.opcode, ()) if k < len(op.inputs)):
                    todo += [o for o in op.outputs if o not in seen]
        if extents:
            ranges[k] = (0, min(extents) - 1)
    return ranges


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
