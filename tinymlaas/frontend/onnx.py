"""ONNX models: loaded and checked with the onnx package; for the host targets imported by TVM's ONNX frontend,
for the microcontroller targets converted to TFLite operators (onnx_tflite.py, `onnx_as_tflite`), whose semantics
the firmware reproduces bit for bit. Either way verified against ONNX Runtime (the reference an ONNX user trusts,
as the TFLite interpreter is for TFLite).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from tinymlaas.errors import InvalidModel
from tinymlaas.frontend.tflite import TensorSpec

ONNX_SUFFIX = ".onnx"


@dataclass
class OnnxModel:
    name: str
    path: Path
    data: bytes
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    weights_bytes: int  # the initializers
    notes: list[str] = field(default_factory=list)
    reference_name: str = "ONNX Runtime"

    def proto(self):
        import onnx

        return onnx.load_from_string(self.data)

    def reference_outputs(self, batches: list[list[np.ndarray]]) -> list[list[np.ndarray]]:
        return onnx_reference_outputs(self, batches)

    def to_relax(self):
        return onnx_to_relax(self)

    def operators(self) -> list[str]:
        """The graph's operator types (nested graphs' too), sorted."""
        found = set()

        def visit(graph):
            for node in graph.node:
                found.add(node.op_type)
                for attr in node.attribute:
                    for g in [attr.g] if attr.HasField("g") else list(attr.graphs):
                        visit(g)

        visit(self.proto().graph)
        return sorted(found)


def _dtype(elem_type: int, what: str) -> str:
    import onnx

    try:
        return str(np.dtype(onnx.helper.tensor_dtype_to_np_dtype(elem_type)))
    except (KeyError, TypeError, ValueError) as e:
        raise InvalidModel(f"{what} has an element type ONNX defines but numpy cannot hold ({elem_type})") from e


def _specs(values, initializers: set[str], kind: str) -> list[TensorSpec]:
    specs = []
    for v in values:
        if v.name in initializers:  # old exporters list the weights as graph inputs too
            continue
        if not v.type.HasField("tensor_type"):
            raise InvalidModel(f"{kind} '{v.name}' is not a tensor")
        dims = v.type.tensor_type.shape.dim
        shape = []
        for k, d in enumerate(dims):
            if not d.HasField("dim_value") or d.dim_value <= 0:
                name = d.dim_param or "?"
                raise InvalidModel(f"{kind} '{v.name}' has a dynamic dimension {k} ('{name}'): builds are for "
                                   "static shapes; export the model with a fixed shape (e.g. batch 1)")
            shape.append(int(d.dim_value))
        specs.append(TensorSpec(v.name, tuple(shape), _dtype(v.type.tensor_type.elem_type, f"{kind} '{v.name}'")))
    return specs


def load_onnx(path: str | Path) -> OnnxModel:
    """An ONNX file, checked; InvalidModel (one line) for anything that is not a static-shape ONNX model."""
    import onnx

    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise InvalidModel(f"cannot read {path}: {e.strerror}") from e
    try:
        proto = onnx.load_from_string(data)
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise InvalidModel(f"{path.name} is not a valid ONNX model: {first[:200]}") from e
    external = sorted({entry.value for t in proto.graph.initializer for entry in t.external_data
                       if entry.key == "location"})
    if external:  # PyTorch's exporter keeps the weights in a file beside the model by default: read them in
        outside = [name for name in external if Path(name).name != name or name in ("", ".", "..")]
        if outside:  # a location elsewhere than beside the model (an absolute path, ..) would read any file
            raise InvalidModel(f"{path.name} names external weights outside its folder ({outside[0][:80]}): "
                               "only files beside the model are read")
        missing = [name for name in external if not (path.parent / name).is_file()]
        if missing:
            raise InvalidModel(f"{path.name} keeps its weights in {', '.join(missing)[:120]}, which is not beside "
                               "it: keep the files together, or export with external_data=False (one file)")
        try:
            onnx.load_external_data_for_model(proto, str(path.parent))
            data = proto.SerializeToString()
        except Exception as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise InvalidModel(f"{path.name}: its external weights cannot be read: {first[:200]}") from e
    try:
        onnx.checker.check_model(proto)
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise InvalidModel(f"{path.name} is not a valid ONNX model: {first[:200]}") from e
    initializers = {t.name for t in proto.graph.initializer}
    inputs = _specs(proto.graph.input, initializers, "input")
    outputs = _specs(proto.graph.output, set(), "output")
    weights = sum(onnx.numpy_helper.to_array(t).nbytes for t in proto.graph.initializer)
    return OnnxModel(path.stem, path, data, inputs, outputs, int(weights))


def onnx_reference_outputs(model: OnnxModel, batches: list[list[np.ndarray]]) -> list[list[np.ndarray]]:
    """ONNX Runtime's outputs (CPU, all graph optimizations off: the model as written) for each batch."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(model.data, opts, providers=["CPUExecutionProvider"])
    names = [spec.name for spec in model.inputs]
    return [list(session.run(None, dict(zip(names, batch)))) for batch in batches]


def onnx_to_relax(model: OnnxModel):
    """TVM's ONNX frontend, weights bound as constants (as the TFLite path binds them)."""
    from tvm.relax.frontend.onnx import from_onnx

    try:
        return from_onnx(model.proto(), shape_dict={s.name: list(s.shape) for s in model.inputs},
                         dtype_dict={s.name: s.dtype for s in model.inputs}, keep_params_in_input=False)
    except Exception as e:
        text = str(e).strip().splitlines()
        raise InvalidModel(f"{model.name}: TVM's ONNX frontend cannot import it: {(text or [type(e).__name__])[-1][:200]}") from e


def onnx_as_tflite(model: OnnxModel, source=None, origin: str = "ONNX"):
    """The ONNX model as TFLite operators (frontend/onnx_tflite.py), for the microcontroller targets: a TFLiteModel
    that remembers `source` (the model as the user gave it, `model` itself by default), whose reference (ONNX
    Runtime, PyTorch) then checks the conversion on the build's inputs. `origin` says what it was, for the notes."""
    source = source or model
    from tinymlaas.frontend.onnx_tflite import onnx_to_tflite
    from tinymlaas.frontend.tflite import load_model_bytes

    converted = onnx_to_tflite(model.proto(), model.path.name)
    tflite = load_model_bytes(converted.data, model.path.name, model.path)
    tflite.name = model.name
    tflite.converted_from = source
    tflite.source_output_scales = converted.output_scales
    what = (f"converted from {origin} to {len(tflite.operators)} TFLite operators "
            f"({'QDQ int8' if tflite.quantized else 'float'}); the conversion checked against {source.reference_name}")
    tflite.notes = [what, *converted.notes, *model.notes]
    return tflite
