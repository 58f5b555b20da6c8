"""Models trained on data a package ships (scikit-learn's handwritten digits), with their held-out samples, for
accuracy measurements (low-bit weights, `--validation`). Run once; the files are committed.

    .venv/bin/python tests/corpus/trained.py

trained/digits_cnn_int8.tflite      2-D CNN on the digits upsampled to 16x16 (three convolutions, two dense layers)
trained/digits_signal_int8.tflite   1-D (sensor-style) CNN on each digit read as a 64-sample signal
trained/*_validation.npz            the held-out 20% (x float in [0, 1], y the digit), never trained on
Full-integer int8 (int8 input and output), calibrated on the training samples.
"""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
import numpy as np
import tensorflow as tf

OUT = Path(__file__).resolve().parent / "trained"
SEED = 2026


def digits() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = (d.images / 16.0).astype(np.float32)  # 8x8, values 0..16
    order = np.random.default_rng(SEED).permutation(len(x))
    cut = int(0.8 * len(x))
    return x[order[:cut]], d.target[order[:cut]], x[order[cut:]], d.target[order[cut:]]


def cnn() -> tf.keras.Model:
    L = tf.keras.layers
    return tf.keras.Sequential([
        tf.keras.Input((16, 16, 1)),
        L.Conv2D(16, 3, padding="same", activation="relu"),
        L.Conv2D(32, 3, strides=2, padding="same", activation="relu"),
        L.Conv2D(32, 3, strides=2, padding="same", activation="relu"),
        L.Flatten(),
        L.Dense(64, activation="relu"),
        L.Dense(10),
    ])


def signal() -> tf.keras.Model:
    L = tf.keras.layers
    return tf.keras.Sequential([
        tf.keras.Input((64, 1)),
        L.Conv1D(16, 5, padding="same", activation="relu"),
        L.Conv1D(32, 5, strides=2, padding="same", activation="relu"),
        L.Conv1D(48, 3, strides=2, padding="same", activation="relu"),
        L.Flatten(),
        L.Dense(48, activation="relu"),
        L.Dense(10),
    ])


def train_and_convert(name: str, model: tf.keras.Model, x, y, x_val, y_val) -> None:
    tf.keras.utils.set_random_seed(SEED)
    model.compile(optimizer=tf.keras.optimizers.Adam(2e-3),
                  loss=tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"])
    model.fit(x, y, epochs=40, batch_size=32, verbose=0)
    _, accuracy = model.evaluate(x_val, y_val, verbose=0)
    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.representative_dataset = lambda: ([x[i:i + 1]] for i in range(0, len(x), 4))
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    converter.inference_input_type = converter.inference_output_type = tf.int8
    (OUT / f"{name}_int8.tflite").write_bytes(converter.convert())
    np.savez_compressed(OUT / f"{name}_validation.npz", x=x_val, y=y_val.astype(np.int32))
    print(f"{name}: float top-1 {accuracy:.4f} on {len(x_val)} held-out samples")


def main() -> None:
    OUT.mkdir(exist_ok=True)
    x, y, x_val, y_val = digits()
    up = lambda a: np.kron(a, np.ones((1, 2, 2), np.float32))[..., None]  # 8x8 -> 16x16
    train_and_convert("digits_cnn", cnn(), up(x), y, up(x_val), y_val)
    train_and_convert("digits_signal", signal(), x.reshape(-1, 64, 1), y, x_val.reshape(-1, 64, 1), y_val)


if __name__ == "__main__":
    main()
