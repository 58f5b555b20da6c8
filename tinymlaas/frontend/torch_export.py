"""PyTorch exported programs (`torch.export.save`, a `.pt2` archive): loaded with PyTorch; for the host targets
imported by TVM's exported-program frontend, for the microcontroller targets exported to ONNX by PyTorch and converted
from there (`exported_program_as_tflite`); either way verified against the program itself run by PyTorch on the CPU in
float32 (the reference a PyTorch user trusts, as the TFLite interpreter is for TFLite).

A `.pt2` archive holds pickled objects that PyTorch unpickles with code execution allowed: the command line loads a
user's own file, the multi-tenant service refuses them (server.services.models.add_model) and takes ONNX instead.
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from tinymlaas.errors import InvalidModel, ToolMissing
from tinymlaas.frontend.tflite import TensorSpec

PT2_SUFFIX = ".pt2"


@dataclass
class ExportedProgramModel:
    name: str
    path: Path
    data: bytes
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    weights_bytes: int  # parameters, buffers and constants
    program: object = field(repr=False)  # torch.export.ExportedProgram
    notes: list[str] = field(default_factory=list)
    reference_name: str = "PyTorch (CPU, float32)"

    def reference_outputs(self, batches: list[list[np.ndarray]]) -> list[list[np.ndarray]]:
        """The program run by PyTorch on each batch."""
        import torch

        module = self.program.module()
        results = []
        with torch.no_grad():
            for batch in batches:
                out = module(*[torch.from_numpy(np.ascontiguousarray(x)) for x in batch])
                results.append([t.detach().numpy() for t in _flat(out)])
        return results

    def to_relax(self):
        """TVM's exported-program frontend, weights bound as constants (as the TFLite path binds them)."""
        from tvm.relax.frontend.torch import from_exported_program

        try:
            with warnings.catch_warnings():  # PyTorch's deprecation notices about its own pytree classes
                warnings.simplefilter("ignore", FutureWarning)
                return from_exported_program(self.program, keep_params_as_input=False)
        except Exception as e:  # TVM's errors name the operator in their last line: that line for the user
            text = str(e).strip().splitlines()
            raise InvalidModel(f"{self.name}: TVM's PyTorch frontend cannot import it: "
                               f"{(text or [type(e).__name__])[-1][:200]}") from e


def _flat(out) -> list:
    return list(out) if isinstance(out, (tuple, list)) else [out]


def _spec(name: str, value, kind: str) -> TensorSpec:
    import torch

    if not isinstance(value, torch.Tensor):
        raise InvalidModel(f"{kind} '{name}' is a {type(value).__name__}, not a tensor: builds take tensors")
    shape = []
    for k, d in enumerate(value.shape):
        if not isinstance(d, int):
            raise InvalidModel(f"{kind} '{name}' has a dynamic dimension {k} ('{d}'): builds are for static "
                               "shapes; export the model without dynamic_shapes (e.g. batch 1)")
        shape.append(d)
    dtype = str(value.dtype).removeprefix("torch.")
    try:
        np.dtype(dtype)
    except TypeError as e:
        raise InvalidModel(f"{kind} '{name}' has element type {dtype}, which numpy cannot hold") from e
    return TensorSpec(name, tuple(shape), dtype)


def load_exported_program(path: str | Path) -> ExportedProgramModel:
    """A `.pt2` archive from `torch.export.save`; InvalidModel (one line) for anything else, or for a program with
    dynamic shapes or non-tensor inputs."""
    try:
        import torch
    except ImportError as e:
        raise ToolMissing("PyTorch exported programs (.pt2) need PyTorch: pip install torch") from e

    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise InvalidModel(f"cannot read {path}: {e.strerror}") from e
    with contextlib.suppress(ImportError):  # defines quantize_per_tensor & co., which PT2E-quantized programs call
        import torch.ao.quantization.fx._decomposed
    quiet = logging.getLogger("torch.export")  # it logs a traceback on stderr before raising for a damaged archive
    level = quiet.level
    quiet.setLevel(logging.CRITICAL)
    try:
        with warnings.catch_warnings():  # as in to_relax
            warnings.simplefilter("ignore", FutureWarning)
            program = torch.export.load(io.BytesIO(data))
    except Exception as e:  # a damaged or foreign archive fails in many ways: one line for the user
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise InvalidModel(f"{path.name} is not a PyTorch exported program (torch.export.save): {first[:200]}") from e
    finally:
        quiet.setLevel(level)
    graph = program.graph
    placeholders = {n.name: n for n in graph.nodes if n.op == "placeholder"}
    user_inputs = program.graph_signature.user_inputs
    inputs = [_spec(name, placeholders[name].meta.get("val"), "input") for name in user_inputs]
    output_node = next(n for n in graph.nodes if n.op == "output")
    returned = _flat(output_node.args[0])
    user_outputs = set(program.graph_signature.user_outputs)
    outputs = [_spec(n.name, n.meta.get("val"), "output") for n in returned
               if getattr(n, "name", None) in user_outputs]
    tensors = [*program.state_dict.values(), *program.constants.values()]
    weights = sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))
    return ExportedProgramModel(path.stem, path, data, inputs, outputs, int(weights), program)


def exported_program_as_tflite(model: ExportedProgramModel):
    """The program as TFLite operators for the microcontroller targets: exported to ONNX by PyTorch's own exporter,
    converted as any ONNX model (frontend/onnx_tflite.py), the conversion checked against PyTorch."""
    import torch

    from tinymlaas.frontend.onnx import OnnxModel, onnx_as_tflite

    try:  # the exporter reports its steps on stdout: kept off it (a --json report is the only thing there)
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            exported = torch.onnx.export(model.program, dynamo=True, external_data=False, verbose=False)
    except ImportError as e:
        raise ToolMissing(f"PyTorch's ONNX exporter needs {e.name or 'onnxscript'}: pip install onnxscript") from e
    except Exception as e:  # the exporter names the operator it has no ONNX form for in its last line
        text = str(e).strip().splitlines()
        raise InvalidModel(f"{model.name}: PyTorch cannot export it to ONNX for a microcontroller build: "
                           f"{(text or [type(e).__name__])[-1][:200]}") from e
    proto = exported.model_proto
    onnx_model = OnnxModel(model.name, model.path, proto.SerializeToString(), model.inputs, model.outputs,
                           model.weights_bytes)
    return onnx_as_tflite(onnx_model, source=model, origin="the exported program (through ONNX)")
