"""Tables read back from the TFLite interpreter: the outputs of one operator, with the model's quantization and
options, for every input value. Elementwise int8 operators become a lookup of such a table (bit-exact by
construction); the int16 converters recover the interpreter's interpolation tables from them."""

from __future__ import annotations

import numpy as np

from tinymlaas.errors import UnsupportedOperator

# TFLite TensorType (schema.fbs) -> dtype
TFLITE_TYPES = {0: "float32", 2: "int32", 7: "int16", 9: "int8", 3: "uint8", 6: "bool"}


def lookup_table(graph, op, inputs: np.ndarray | None = None) -> np.ndarray:
    """The interpreter's outputs of `op` for every input value (-128..127 by default) in a one-operator model with the
    model's quantization and options, run with the kernels the model's reference uses."""
    import flatbuffers
    from ai_edge_litert import schema_py_generated as s
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    from tinymlaas.oracle import reference_resolver

    inputs = np.arange(-128, 128, dtype=np.int8) if inputs is None else inputs
    src, dst = graph.tensor(op.inputs[0]), graph.tensor(op.outputs[0])
    tensors = []
    for t in (src, dst):
        tt = s.TensorT()
        tt.name, tt.shape, tt.buffer = t.name.encode(), np.array([len(inputs)], dtype=np.int32), 0
        tt.type = {v: k for k, v in TFLITE_TYPES.items()}[t.dtype]
        if t.quant is not None:
            q = s.QuantizationParametersT()
            q.scale, q.zeroPoint = list(t.quant.scale), list(t.quant.zero_point)
            tt.quantization = q
        tensors.append(tt)
    code = s.OperatorCodeT()
    code.builtinCode = getattr(s.BuiltinOperator, op.opcode)
    code.deprecatedBuiltinCode = min(code.builtinCode, 127)
    code.version = op.version
    fb_op = s.OperatorT()
    fb_op.opcodeIndex, fb_op.inputs, fb_op.outputs = 0, np.array([0], np.int32), np.array([1], np.int32)
    if op.options_type:
        cls = {v: k for k, v in s.BuiltinOptions.__dict__.items() if not k.startswith("_")}[op.options_type]
        opts = getattr(s, cls + "T")()
        for key, value in op.options.items():
            setattr(opts, key, value)
        fb_op.builtinOptionsType, fb_op.builtinOptions = op.options_type, opts
    sg = s.SubGraphT()
    sg.tensors, sg.operators = tensors, [fb_op]
    sg.inputs, sg.outputs = np.array([0], np.int32), np.array([1], np.int32)
    model = s.ModelT()
    model.version, model.operatorCodes, model.subgraphs, model.buffers = 3, [code], [sg], [s.BufferT()]
    b = flatbuffers.Builder(1024)
    b.Finish(model.Pack(b), file_identifier=b"TFL3")
    # the kernels the whole model's reference runs: the reference kernels, or builtin ones where some are missing
    resolver = getattr(OpResolverType, reference_resolver(graph.source))
    it = Interpreter(model_content=bytes(b.Output()), experimental_op_resolver_type=resolver)
    it.allocate_tensors()
    it.set_tensor(it.get_input_details()[0]["index"], inputs)
    it.invoke()
    return it.get_tensor(it.get_output_details()[0]["index"]).copy()


def interpreter_table(ctx, op, inputs: np.ndarray | None = None) -> np.ndarray:
    """`lookup_table`, with the interpreter's refusal (these quantization parameters, inputs outside the domain)
    reported as an unsupported operator naming it."""
    try:
        return lookup_table(ctx.graph, op, inputs)
    except (RuntimeError, ValueError) as e:
        raise UnsupportedOperator([f"{op.opcode} #{op.index} ({str(e).splitlines()[0][:120]})"], ctx.graph.name) from e
