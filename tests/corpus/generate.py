"""Generate the test corpus with TensorFlow, the way users export models (run once; the .tflite files are committed).

    make corpus        # (make setup installs TensorFlow 2.21, requirements-tensorflow.lock)

ops/: one small graph per operator (odd shapes), as float32, full-int8 (float interface, QUANTIZE/DEQUANTIZE at
the edges, as the converter emits by default) and int16x8. models/: whole architectures of the kinds TinyML users
train, built with Keras 3 and converted with TFLiteConverter.from_keras_model; recurrent networks also with Keras 2
(tf-keras, `pip install --no-deps tf-keras==2.21.0`), whose LSTM the converter fuses into UNIDIRECTIONAL_SEQUENCE_LSTM
(Keras 3's becomes a WHILE loop). manifest.json lists every file with the TFLite operators it holds; what the
converter refused is listed as such.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
import numpy as np
import tensorflow as tf

HERE = Path(__file__).resolve().parent
RNG = np.random.default_rng(2026)
IMG = (1, 7, 9, 5)  # odd everything
SEQ = (1, 13, 6)
VOCAB = 50  # the token-id model's vocabulary


def const(shape, scale=0.5):
    return tf.constant(RNG.standard_normal(shape).astype(np.float32) * scale)


def pos(x):
    return tf.abs(x) + 0.5


_PRELU = tf.keras.layers.PReLU(alpha_initializer=tf.keras.initializers.RandomUniform(0.05, 0.4), shared_axes=[1, 2])

# name -> (input shapes, function of the inputs)
OPS = {
    "abs": ([IMG], lambda x: tf.abs(x)),
    "add": ([IMG, IMG], lambda x, y: x + y),
    "add_broadcast_relu": ([IMG], lambda x: tf.nn.relu(x + const((5,)))),
    "add_n": ([IMG, IMG, IMG], lambda x, y, z: tf.add_n([x, y, z])),
    "arg_max": ([SEQ], lambda x: tf.cast(tf.argmax(x, axis=-1, output_type=tf.int32), tf.float32)),
    "arg_min": ([SEQ], lambda x: tf.cast(tf.argmin(x, axis=1, output_type=tf.int32), tf.float32)),
    "average_pool_2d": ([IMG], lambda x: tf.nn.avg_pool2d(x, 3, 2, "SAME")),
    "batch_matmul": ([(1, 5, 7), (1, 7, 3)], lambda x, y: tf.matmul(x, y)),
    "batch_to_space_nd": ([(4, 3, 5, 2)], lambda x: tf.batch_to_space(x, [2, 2], [[0, 1], [1, 0]])),
    "broadcast_to": ([(1, 1, 9, 5)], lambda x: tf.broadcast_to(x, (1, 7, 9, 5)) * 1.5),
    "ceil": ([IMG], lambda x: tf.math.ceil(x * 3.0)),
    "concatenation": ([IMG, IMG], lambda x, y: tf.concat([x, y * 2.0], axis=-1)),
    "conv_2d": ([IMG], lambda x: tf.nn.relu6(tf.nn.conv2d(x, const((3, 3, 5, 6)), 2, "SAME") + const((6,)))),
    "conv_2d_valid_dilated": ([(1, 11, 10, 3)], lambda x: tf.nn.conv2d(x, const((3, 2, 3, 4)), 1, "VALID",
                                                                      dilations=2)),
    "cos": ([IMG], lambda x: tf.cos(x)),
    "cumsum": ([SEQ], lambda x: tf.cumsum(x, axis=1)),
    "depth_to_space": ([(1, 3, 5, 8)], lambda x: tf.nn.depth_to_space(x, 2)),
    "depthwise_conv_2d": ([IMG], lambda x: tf.nn.depthwise_conv2d(x, const((3, 3, 5, 2)), [1, 1, 1, 1], "SAME")),
    "div": ([IMG, IMG], lambda x, y: x / pos(y)),
    "elu": ([IMG], lambda x: tf.nn.elu(x)),
    "equal": ([IMG], lambda x: tf.cast(tf.equal(tf.round(x), 0.0), tf.float32)),
    "exp": ([IMG], lambda x: tf.exp(x)),
    "expand_dims": ([SEQ], lambda x: tf.nn.conv2d(tf.expand_dims(x, 1), const((1, 3, 6, 4)), 1, "SAME")),
    "floor": ([IMG], lambda x: tf.floor(x * 3.0)),
    "floor_div": ([IMG], lambda x: tf.math.floordiv(x * 4.0, 1.5)),
    "floor_mod": ([IMG], lambda x: tf.math.floormod(x * 4.0, 1.5)),
    "fully_connected": ([(1, 37)], lambda x: tf.nn.relu(tf.matmul(x, const((37, 11))) + const((11,)))),
    "gather": ([IMG], lambda x: tf.gather(x, [4, 0, 2, 2], axis=2)),
    "gather_nd": ([(5, 7)], lambda x: tf.gather_nd(x, [[1, 2], [4, 6], [0, 0]])),
    "gelu": ([IMG], lambda x: tf.nn.gelu(x, approximate=False)),
    "greater": ([IMG, IMG], lambda x, y: tf.cast(tf.greater(x, y), tf.float32)),
    "hard_swish": ([IMG], lambda x: x * tf.nn.relu6(x + 3.0) / 6.0),
    "l2_normalization": ([SEQ], lambda x: tf.math.l2_normalize(x, axis=-1)),
    "leaky_relu": ([IMG], lambda x: tf.nn.leaky_relu(x, 0.3)),
    "less_equal": ([IMG, IMG], lambda x, y: tf.cast(tf.less_equal(x, y), tf.float32)),
    "log": ([IMG], lambda x: tf.math.log(pos(x))),
    "log_softmax": ([SEQ], lambda x: tf.nn.log_softmax(x)),
    "logical_and_or_not": ([IMG, IMG], lambda x, y: tf.cast(tf.logical_or(tf.logical_and(x > 0, y > 0),
                                                                         tf.logical_not(x > y)), tf.float32)),
    "logistic": ([IMG], lambda x: tf.sigmoid(x)),
    "max_pool_2d": ([IMG], lambda x: tf.nn.max_pool2d(x, (2, 3), (2, 2), "VALID")),
    "maximum_minimum": ([IMG, IMG], lambda x, y: tf.minimum(tf.maximum(x, y), 0.7)),
    "mean": ([IMG], lambda x: tf.reduce_mean(x, axis=[1, 2], keepdims=True)),
    "mean_last_axis": ([SEQ], lambda x: tf.reduce_mean(x, axis=-1)),
    "mirror_pad_reflect": ([IMG], lambda x: tf.pad(x, [[0, 0], [2, 1], [1, 2], [0, 0]], "REFLECT")),
    "mirror_pad_symmetric": ([IMG], lambda x: tf.pad(x, [[0, 0], [1, 1], [2, 0], [0, 0]], "SYMMETRIC")),
    "mul": ([IMG, IMG], lambda x, y: x * y),
    "mul_broadcast": ([IMG], lambda x: x * const((9, 1))),
    "neg": ([IMG], lambda x: -x),
    "not_equal": ([IMG], lambda x: tf.cast(tf.not_equal(tf.round(x), 0.0), tf.float32)),
    "pack": ([SEQ, SEQ], lambda x, y: tf.stack([x, y], axis=2)),
    "pad": ([IMG], lambda x: tf.pad(x, [[0, 0], [1, 2], [0, 1], [0, 0]])),
    "padv2": ([IMG], lambda x: tf.pad(x, [[0, 0], [1, 0], [2, 1], [0, 0]], constant_values=1.5)),
    "pow": ([IMG], lambda x: tf.pow(pos(x), 1.7)),
    "prelu": ([IMG], lambda x: _PRELU(x)),
    "reduce_max": ([IMG], lambda x: tf.reduce_max(x, axis=[1, 2])),
    "reduce_min": ([IMG], lambda x: tf.reduce_min(x, axis=-1, keepdims=True)),
    "reduce_prod": ([SEQ], lambda x: tf.reduce_prod(x, axis=-1)),
    "relu": ([IMG], lambda x: tf.nn.relu(x)),
    "relu6": ([IMG], lambda x: tf.nn.relu6(x * 4.0)),
    "relu_n1_to_1": ([IMG], lambda x: tf.clip_by_value(x, -1.0, 1.0)),
    "reshape": ([IMG], lambda x: tf.reshape(x, (1, 63, 5)) * 2.0),
    "resize_bilinear": ([IMG], lambda x: tf.image.resize(x, (13, 17), "bilinear")),
    "resize_bilinear_align": ([IMG], lambda x: tf.compat.v1.image.resize_bilinear(x, (13, 17), align_corners=True)),
    "resize_nearest": ([IMG], lambda x: tf.image.resize(x, (14, 18), "nearest")),
    "reverse_v2": ([IMG], lambda x: tf.reverse(x, axis=[2])),
    "round": ([IMG], lambda x: tf.round(x * 4.0)),
    "rsqrt": ([IMG], lambda x: tf.math.rsqrt(pos(x))),
    "select_v2": ([IMG, IMG], lambda x, y: tf.where(x > y, x, y * 2.0)),
    "sign": ([IMG], lambda x: tf.sign(x)),
    "sin": ([IMG], lambda x: tf.sin(x)),
    "slice": ([IMG], lambda x: tf.slice(x, [0, 1, 2, 1], [1, 4, -1, 3])),
    "softmax": ([SEQ], lambda x: tf.nn.softmax(x * 2.0)),
    "space_to_batch_nd": ([(1, 6, 5, 2)], lambda x: tf.space_to_batch(x, [2, 2], [[0, 0], [1, 0]])),
    "space_to_depth": ([(1, 6, 4, 3)], lambda x: tf.nn.space_to_depth(x, 2)),
    "split": ([IMG], lambda x: tf.concat(tf.split(x, 3, axis=2)[::-1], axis=-1) * 1.0),
    "split_v": ([IMG], lambda x: tf.add_n([t[:, :, :3] for t in tf.split(x, [2, 4, 1], axis=1)[:1]]) * 1.0),
    "sqrt": ([IMG], lambda x: tf.sqrt(pos(x))),
    "square": ([IMG], lambda x: tf.square(x)),
    "squared_difference": ([IMG, IMG], lambda x, y: tf.math.squared_difference(x, y)),
    "squeeze": ([(1, 7, 1, 5)], lambda x: tf.squeeze(x, axis=2) * 2.0),
    "strided_slice": ([IMG], lambda x: x[:, 1:-1:2, ::-2, 1:]),
    "strided_slice_shrink": ([IMG], lambda x: x[0, 3, :, 2:4]),
    "sub": ([IMG, IMG], lambda x, y: x - y),
    "sum": ([IMG], lambda x: tf.reduce_sum(x, axis=[2])),
    "tanh": ([IMG], lambda x: tf.tanh(x)),
    "tile": ([(1, 3, 4, 2)], lambda x: tf.tile(x, [1, 2, 1, 3])),
    "transpose": ([IMG], lambda x: tf.transpose(x, [0, 3, 1, 2])),
    "transpose_conv": ([(1, 4, 5, 3)], lambda x: tf.nn.conv2d_transpose(x, const((3, 3, 6, 3)), (1, 8, 10, 6), 2,
                                                                        "SAME")),
    "transpose_conv_valid": ([(1, 4, 5, 3)], lambda x: tf.nn.conv2d_transpose(x, const((2, 3, 4, 3)), (1, 5, 7, 4),
                                                                              1, "VALID")),
    "unpack": ([SEQ], lambda x: tf.add_n(tf.unstack(x, axis=2)[1:4])),
    "zeros_like_fill": ([IMG], lambda x: x + tf.zeros_like(x) + tf.fill([1, 7, 9, 5], 0.25)),
}


def representative(shapes, positive=False, vocab=None):
    def gen():
        for _ in range(32):
            if vocab:  # token ids
                yield [RNG.integers(0, vocab, s).astype(np.int32) for s in shapes]
            else:
                yield [RNG.standard_normal(s).astype(np.float32) for s in shapes]
    return gen


def convert(converter, precision, shapes, vocab=None, io_type=None):
    if io_type is not None:  # the model's own interface in that type (the converter's default: float32)
        converter.inference_input_type = converter.inference_output_type = io_type
    if precision == "float16":  # weights stored as float16, DEQUANTIZE to float32 before use
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.target_spec.supported_types = [tf.float16]
    elif precision == "dynamic":  # dynamic-range: int8 weights (per channel), float activations
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
    if precision in ("int8", "int16x8"):
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.representative_dataset = representative(shapes, vocab=vocab)
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8] if precision == "int8" else [
            tf.lite.OpsSet.EXPERIMENTAL_TFLITE_BUILTINS_ACTIVATIONS_INT16_WEIGHTS_INT8]
    return converter.convert()


def operators_of(data: bytes) -> list[str]:
    from ai_edge_litert import schema_py_generated as s

    names = {v: k for k, v in s.BuiltinOperator.__dict__.items() if not k.startswith("_")}
    m = s.ModelT.InitFromObj(s.Model.GetRootAsModel(data, 0))
    return sorted({names[max(m.operatorCodes[op.opcodeIndex].builtinCode,
                             m.operatorCodes[op.opcodeIndex].deprecatedBuiltinCode)] for op in m.subgraphs[0].operators})


def op_models(only=None):
    out = HERE / "ops"
    out.mkdir(exist_ok=True)
    entries = {}
    for name, (shapes, fn) in OPS.items():
        if only and name not in only:
            continue
        specs = [tf.TensorSpec(s, tf.float32, name=f"x{i}") for i, s in enumerate(shapes)]
        try:
            concrete = tf.function(fn, input_signature=specs).get_concrete_function()
        except Exception as e:  # a generator bug: say which graph
            raise SystemExit(f"{name}: {str(e).strip().splitlines()[-1]}") from e
        for precision in ("float32", "int8", "int16x8"):
            key = f"{name}_{precision}"
            try:
                data = convert(tf.lite.TFLiteConverter.from_concrete_functions([concrete], fn), precision, shapes)
            except Exception as e:  # noqa: BLE001 - the converter refuses this operator in this precision
                entries[key] = {"precision": precision, "refused": str(e).strip().splitlines()[-1][:200]}
                continue
            (out / f"{key}.tflite").write_bytes(data)
            entries[key] = {"file": f"ops/{key}.tflite", "precision": precision, "operators": operators_of(data)}
            print(key, entries[key]["operators"], file=sys.stderr)
    return entries


def architectures():
    """Whole networks of the kinds TinyML users train (random weights, Keras 3 layers, exported as users export)."""
    from tensorflow import keras
    from tensorflow.keras import layers as L

    keras.utils.set_random_seed(7)

    def resnet8():
        x = inp = keras.Input((32, 32, 3))
        x = L.ReLU()(L.BatchNormalization()(L.Conv2D(16, 3, padding="same")(x)))
        for filters, stride in ((16, 1), (32, 2), (64, 2)):
            y = L.ReLU()(L.BatchNormalization()(L.Conv2D(filters, 3, stride, padding="same")(x)))
            y = L.BatchNormalization()(L.Conv2D(filters, 3, padding="same")(y))
            if stride != 1:
                x = L.Conv2D(filters, 1, stride)(x)
            x = L.ReLU()(L.Add()([x, y]))
        x = L.Dense(10, activation="softmax")(L.GlobalAveragePooling2D()(x))
        return keras.Model(inp, x)

    def ds_cnn_kws():
        x = inp = keras.Input((49, 10, 1))
        x = L.ReLU()(L.BatchNormalization()(L.Conv2D(32, (10, 4), (2, 2), padding="same")(x)))
        for _ in range(3):
            x = L.ReLU()(L.BatchNormalization()(L.DepthwiseConv2D(3, padding="same")(x)))
            x = L.ReLU()(L.BatchNormalization()(L.Conv2D(32, 1)(x)))
        x = L.AveragePooling2D((25, 5))(x)
        return keras.Model(inp, L.Dense(12, activation="softmax")(L.Flatten()(x)))

    def conv1d_sensor():
        x = inp = keras.Input((128, 3))
        x = L.Conv1D(16, 5, activation="relu", padding="same")(x)
        x = L.MaxPooling1D(2)(x)
        x = L.Conv1D(24, 3, activation="relu")(x)
        x = L.GlobalAveragePooling1D()(x)
        return keras.Model(inp, L.Dense(6, activation="softmax")(x))

    def lstm_unrolled():
        inp = keras.Input((20, 8))
        x = L.LSTM(16, unroll=True)(inp)
        return keras.Model(inp, L.Dense(4)(x))

    def gru_unrolled():
        inp = keras.Input((15, 6))
        x = L.GRU(12, unroll=True)(inp)
        return keras.Model(inp, L.Dense(3, activation="softmax")(x))

    def conv_autoencoder():
        x = inp = keras.Input((32, 32, 1))
        x = L.Conv2D(8, 3, 2, padding="same", activation="relu")(x)
        x = L.Conv2D(16, 3, 2, padding="same", activation="relu")(x)
        x = L.Conv2DTranspose(8, 3, 2, padding="same", activation="relu")(x)
        x = L.Conv2DTranspose(1, 3, 2, padding="same", activation="sigmoid")(x)
        return keras.Model(inp, x)

    def unet_tiny():
        inp = keras.Input((24, 24, 2))
        a = L.Conv2D(8, 3, padding="same", activation="relu")(inp)
        b = L.Conv2D(16, 3, padding="same", activation="relu")(L.MaxPooling2D()(a))
        u = L.UpSampling2D()(b)
        x = L.Conv2D(8, 3, padding="same", activation="relu")(L.Concatenate()([a, u]))
        return keras.Model(inp, L.Conv2D(3, 1, activation="softmax")(x))

    def flatten_mlp():
        inp = keras.Input((28, 28, 1))
        x = L.Dense(32, activation="relu")(L.Flatten()(inp))
        return keras.Model(inp, L.Dense(10)(x))

    def dense_autoencoder():
        inp = keras.Input((160,))
        x = inp
        for units in (64, 16, 64):
            x = L.ReLU()(L.BatchNormalization()(L.Dense(units)(x)))
        return keras.Model(inp, L.Dense(160)(x))

    def tiny_transformer():
        inp = keras.Input((16, 24))
        att = L.MultiHeadAttention(num_heads=2, key_dim=12)(inp, inp)
        x = L.LayerNormalization()(L.Add()([inp, att]))
        ff = L.Dense(24)(L.Dense(48, activation="gelu")(x))
        x = L.LayerNormalization()(L.Add()([x, ff]))
        return keras.Model(inp, L.Dense(5, activation="softmax")(L.GlobalAveragePooling1D()(x)))

    def mobilenet_v2():
        return keras.applications.MobileNetV2((96, 96, 3), alpha=0.35, weights=None, classes=10)

    def mobilenet_v3_small():
        return keras.applications.MobileNetV3Small((96, 96, 3), alpha=0.75, weights=None, classes=10,
                                                   include_preprocessing=False, dropout_rate=0.0)

    def grouped_cnn():  # int8: a CONV_2D whose filter has a quarter of the input's channels (Conv2D groups=4)
        x = inp = keras.Input((12, 11, 8))
        x = L.Conv2D(16, 3, padding="same", groups=4, activation="relu")(x)
        x = L.Conv2D(12, 3, strides=2, groups=2, activation="relu")(x)
        return keras.Model(inp, L.Dense(5)(L.GlobalAveragePooling2D()(x)))

    def uint8_io_cnn():  # exported with uint8 input and output (inference_input_type=tf.uint8), as for a camera
        x = inp = keras.Input((16, 16, 3))
        x = L.Conv2D(8, 3, 2, padding="same", activation="relu")(x)
        x = L.DepthwiseConv2D(3, padding="same", activation="relu")(x)
        x = L.Conv2D(16, 1, activation="relu")(x)
        return keras.Model(inp, L.Dense(4, activation="softmax")(L.GlobalAveragePooling2D()(x)))
    uint8_io_cnn.precisions = ("int8",)
    uint8_io_cnn.io_type = tf.uint8

    def token_text_classifier():  # token ids (int32) -> Embedding (GATHER) -> pooled -> classes
        inp = keras.Input((20,), dtype="int32")
        x = L.Embedding(VOCAB, 16)(inp)
        x = L.Conv1D(16, 3, activation="relu")(x)
        return keras.Model(inp, L.Dense(3, activation="softmax")(L.GlobalAveragePooling1D()(x)))
    token_text_classifier.vocab = VOCAB

    def dilated_tcn():  # dilated causal 1-D convolutions and a dilated 2-D one, as a TCN stacks them
        inp = keras.Input((40, 4))
        x = inp
        for rate in (1, 2, 4):
            x = L.Conv1D(8, 3, padding="causal", dilation_rate=rate, activation="relu")(x)
        x = L.Reshape((5, 8, 8))(x)
        x = L.Conv2D(6, 3, padding="same", dilation_rate=2, activation="relu")(x)
        return keras.Model(inp, L.Dense(3)(L.GlobalAveragePooling2D()(x)))

    def bilstm_unrolled():  # Keras Bidirectional: a forward and a reversed LSTM, every time step its own operators
        inp = keras.Input((16, 6))
        x = L.Bidirectional(L.LSTM(16, unroll=True, return_sequences=True))(inp)  # the backward one's REVERSE_V2
        return keras.Model(inp, L.Dense(4, activation="softmax")(L.GlobalAveragePooling1D()(x)))
    bilstm_unrolled.precisions = ("float32", "int8")

    def inception_mini():  # Inception-style blocks: 1x1, 1x1->3x3, 1x1->3x3->3x3 and pool->1x1 branches concatenated
        x = inp = keras.Input((32, 32, 3))
        x = L.Conv2D(16, 3, 2, padding="same", activation="relu")(x)
        for width in (8, 12):
            a = L.Conv2D(width, 1, activation="relu")(x)
            b = L.Conv2D(width, 3, padding="same", activation="relu")(L.Conv2D(width // 2, 1, activation="relu")(x))
            c = L.Conv2D(width // 2, 1, activation="relu")(x)
            c = L.Conv2D(width, 3, padding="same", activation="relu")(L.Conv2D(width, 3, padding="same",
                                                                              activation="relu")(c))
            d = L.Conv2D(width, 1, activation="relu")(L.MaxPooling2D(3, 1, padding="same")(x))
            x = L.MaxPooling2D()(L.Concatenate()([a, b, c, d]))
        return keras.Model(inp, L.Dense(10, activation="softmax")(L.GlobalAveragePooling2D()(x)))

    def squeezenet_mini():  # SqueezeNet fire modules: a 1x1 squeeze, then 1x1 and 3x3 expands concatenated
        x = inp = keras.Input((32, 32, 3))
        x = L.MaxPooling2D(3, 2, padding="same")(L.Conv2D(24, 3, 2, padding="same", activation="relu")(x))
        for squeeze, expand in ((8, 16), (8, 16), (12, 24)):
            s = L.Conv2D(squeeze, 1, activation="relu")(x)
            x = L.Concatenate()([L.Conv2D(expand, 1, activation="relu")(s),
                                 L.Conv2D(expand, 3, padding="same", activation="relu")(s)])
        x = L.Conv2D(10, 1, activation="relu")(x)
        return keras.Model(inp, L.Softmax()(L.GlobalAveragePooling2D()(x)))

    def bilinear_autoencoder():  # separable encoder, bilinear upsampling decoder with concatenated skips
        inp = keras.Input((32, 32, 1))
        e1 = L.SeparableConv2D(8, 3, padding="same", activation="relu")(inp)
        e2 = L.SeparableConv2D(16, 3, 2, padding="same", activation="relu")(e1)
        e3 = L.SeparableConv2D(24, 3, 2, padding="same", activation="relu")(e2)
        d2 = L.Concatenate()([L.UpSampling2D(interpolation="bilinear")(e3), e2])
        d2 = L.SeparableConv2D(16, 3, padding="same", activation="relu")(d2)
        d1 = L.Concatenate()([L.UpSampling2D(interpolation="bilinear")(d2), e1])
        d1 = L.SeparableConv2D(8, 3, padding="same", activation="relu")(d1)
        return keras.Model(inp, L.Conv2D(1, 1, activation="sigmoid")(d1))

    return {f.__name__: f for f in (resnet8, ds_cnn_kws, conv1d_sensor, lstm_unrolled, gru_unrolled, conv_autoencoder,
                                    unet_tiny, flatten_mlp, dense_autoencoder, tiny_transformer, mobilenet_v2,
                                    mobilenet_v3_small, grouped_cnn, uint8_io_cnn, token_text_classifier,
                                    dilated_tcn, bilstm_unrolled, inception_mini, squeezenet_mini,
                                    bilinear_autoencoder)}


def keras2_architectures():
    """Recurrent networks as Keras 2 (tf-keras) exports them: fused LSTM operators with state tensors. A fixed batch
    of 1, as the fused conversion needs."""
    import tf_keras as k

    k.utils.set_random_seed(11)

    def lstm_stacked_keras2():
        x = inp = k.Input((9, 5), batch_size=1)
        x = k.layers.LSTM(12, return_sequences=True)(x)
        x = k.layers.LSTM(7)(x)
        return k.Model(inp, k.layers.Dense(4, activation="softmax")(x))

    def lstm_time_major_keras2():
        inp = k.Input((6, 3), batch_size=1)
        x = k.layers.LSTM(10, time_major=True, return_sequences=True)(k.layers.Permute((2, 1))(inp))
        return k.Model(inp, k.layers.Dense(2)(k.layers.Flatten()(x)))

    return {f.__name__: f for f in (lstm_stacked_keras2, lstm_time_major_keras2)}


# architectures also exported with narrow weights (float16, dynamic-range int8), as users shrink a float model
NARROW_WEIGHTS = {"resnet8", "ds_cnn_kws", "conv1d_sensor", "flatten_mlp"}


def arch_models(only=None, precisions=None):
    out = HERE / "models"
    out.mkdir(exist_ok=True)
    entries = {}
    builders = architectures()
    if not only or only - set(builders):  # the Keras 2 networks need tf-keras (see the module's docstring)
        builders.update(keras2_architectures())
    for name, build in builders.items():
        if only and name not in only:
            continue
        model = build()
        shapes = [(1, *i.shape[1:]) for i in model.inputs]
        narrow = ("float16", "dynamic") if name in NARROW_WEIGHTS else ()
        for precision in getattr(build, "precisions", ("float32", "int8", "int16x8")) + narrow:
            if precisions and precision not in precisions:
                continue
            key = f"{name}_{precision}"
            try:
                data = convert(tf.lite.TFLiteConverter.from_keras_model(model), precision, shapes,
                               getattr(build, "vocab", None), getattr(build, "io_type", None))
            except Exception as e:  # noqa: BLE001 - the converter refuses this network in this precision
                entries[key] = {"precision": precision, "refused": str(e).strip().splitlines()[-1][:200]}
                continue
            (out / f"{key}.tflite").write_bytes(data)
            entries[key] = {"file": f"models/{key}.tflite", "precision": precision, "operators": operators_of(data),
                            "architecture": True}
            print(key, entries[key]["operators"], file=sys.stderr)
    return entries


def main() -> None:
    """generate.py [--precisions P,Q] [NAME ...]: only these graphs (default all), only these precisions."""
    args, precisions = sys.argv[1:], None
    if args[:1] == ["--precisions"]:
        precisions, args = set(args[1].split(",")), args[2:]
    only = set(args)
    manifest_path = HERE / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else {}
    if not only or only & set(OPS):
        manifest.update(op_models(only))
    if not only or only - set(OPS):
        manifest.update(arch_models(only, precisions))
    manifest_path.write_text(json.dumps(dict(sorted(manifest.items())), indent=1) + "\n")


if __name__ == "__main__":
    main()
