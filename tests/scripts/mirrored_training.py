"""Train adapters on one device and under MirroredStrategy; print both.

Run as a separate process, because logical CPU devices must be configured
before TensorFlow starts. Prints one JSON object with the largest absolute
difference between the trained weights of the two runs, and the largest
change that training made on one device.
"""

import json
import os
import sys

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import tensorflow as tf  # noqa: E402

_CPU = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(
    _CPU, [tf.config.LogicalDeviceConfiguration()] * 2
)

import keras  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from conftest import make_inputs  # noqa: E402

import keras_adapters  # noqa: E402
import keras_hub  # noqa: E402

GLOBAL_BATCH_SIZE = 8


def train(strategy):
    inputs = make_inputs("bert", batch_size=GLOBAL_BATCH_SIZE)
    # NOTE: Keras 3.15 with TensorFlow 2.21 fails under MirroredStrategy on
    # any boolean model input (an AddN over bool), so the padding mask is
    # fed as int32, which keras-hub's BERT accepts.
    inputs["padding_mask"] = inputs["padding_mask"].astype("int32")
    labels = np.arange(GLOBAL_BATCH_SIZE) % 2
    dataset = tf.data.Dataset.from_tensor_slices((inputs, labels))
    dataset = dataset.repeat(4).batch(GLOBAL_BATCH_SIZE)

    with strategy.scope():
        keras.utils.set_random_seed(0)
        backbone = keras_hub.models.BertBackbone(
            vocabulary_size=64,
            num_layers=2,
            num_heads=2,
            hidden_dim=16,
            intermediate_dim=32,
            max_sequence_length=8,
            dropout=0.0,
        )
        model = keras_hub.models.BertTextClassifier(
            backbone=backbone, num_classes=2, preprocessor=None, dropout=0.0
        )
        keras_adapters.add_adapters(model, bottleneck_size=4)
        model.compile(
            optimizer=keras.optimizers.SGD(0.5),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        )
    initial = {
        weight.path: keras.ops.convert_to_numpy(weight).copy()
        for weight in model.trainable_weights
    }
    model.fit(dataset, epochs=1, verbose=0)
    trained = {
        weight.path: keras.ops.convert_to_numpy(weight)
        for weight in model.trainable_weights
    }
    return initial, trained


def main():
    initial, single = train(tf.distribute.get_strategy())
    _, mirrored = train(tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"]))
    training_change = max(
        float(np.abs(single[path] - initial[path]).max()) for path in single
    )
    difference = max(
        float(np.abs(single[path] - mirrored[path]).max()) for path in single
    )
    print(
        json.dumps(
            {
                "max_difference": difference,
                "num_weights": len(single),
                "max_training_change": training_change,
                "same_paths": sorted(single) == sorted(mirrored),
            }
        )
    )


if __name__ == "__main__":
    main()
