"""Compile and fit adapted models inside and outside a MirroredStrategy scope.

Run as a separate process, because logical CPU devices must be configured
before TensorFlow starts. Prints one JSON object that maps each case to the
stage that raised (`"compile"`, `"fit"` or `None`), the exception's class
and message, and, for the model created inside the scope, where its adapter
weights live.
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
import keras_hub  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from conftest import make_inputs  # noqa: E402

import keras_adapters  # noqa: E402

GLOBAL_BATCH_SIZE = 8


def make_model():
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
    return keras_hub.models.BertTextClassifier(
        backbone=backbone, num_classes=2, preprocessor=None, dropout=0.0
    )


def make_dataset():
    inputs = make_inputs("bert", batch_size=GLOBAL_BATCH_SIZE)
    # Keras 3.15 with TensorFlow 2.21 fails under MirroredStrategy on boolean
    # model inputs, so the padding mask is fed as int32.
    inputs["padding_mask"] = inputs["padding_mask"].astype("int32")
    labels = np.arange(GLOBAL_BATCH_SIZE) % 2
    dataset = tf.data.Dataset.from_tensor_slices((inputs, labels))
    return dataset.repeat(2).batch(GLOBAL_BATCH_SIZE)


def compile_model(model):
    model.compile(
        optimizer=keras.optimizers.SGD(0.5),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )


def run_case(steps):
    """Run `steps`, a list of (stage, function), and report the first error."""
    for stage, function in steps:
        try:
            function()
        except Exception as error:  # noqa: BLE001, the error is the result.
            return {
                "stage": stage,
                "error": type(error).__name__,
                "message": str(error),
            }
    return {"stage": None, "error": None, "message": None}


def adapted_outside_compiled_inside(strategy):
    model = make_model()
    keras_adapters.add_adapters(model, bottleneck_size=4)

    def compile_in_scope():
        with strategy.scope():
            compile_model(model)

    return run_case(
        [
            ("compile", compile_in_scope),
            ("fit", lambda: model.fit(make_dataset(), verbose=0)),
        ]
    )


def adapters_added_outside(strategy):
    with strategy.scope():
        model = make_model()
    keras_adapters.add_adapters(model, bottleneck_size=4)
    return run_case(
        [
            ("compile", lambda: compile_model(model)),
            ("fit", lambda: model.fit(make_dataset(), verbose=0)),
        ]
    )


def fit_inside_only(strategy):
    model = make_model()
    keras_adapters.add_adapters(model, bottleneck_size=4)
    compile_model(model)

    def fit_in_scope():
        with strategy.scope():
            model.fit(make_dataset(), verbose=0)

    return run_case([("fit", fit_in_scope)])


def train_on_batch_inside_only(strategy):
    model = make_model()
    keras_adapters.add_adapters(model, bottleneck_size=4)
    compile_model(model)
    inputs, labels = next(iter(make_dataset()))

    def train_in_scope():
        with strategy.scope():
            model.train_on_batch(inputs, labels)

    return run_case([("fit", train_in_scope)])


def unadapted_compiled_inside(strategy):
    # The same mistake without adapters, so without the check: this is the
    # error that Keras and TensorFlow raise on their own.
    model = make_model()

    def compile_in_scope():
        with strategy.scope():
            compile_model(model)

    return run_case(
        [
            ("compile", compile_in_scope),
            ("fit", lambda: model.fit(make_dataset(), verbose=0)),
        ]
    )


def created_inside(strategy):
    with strategy.scope():
        model = make_model()
        keras_adapters.add_adapters(model, bottleneck_size=4)
        compile_model(model)
    adapter_weights = [
        weight
        for _, adapter in keras_adapters.rewriting.iter_adapters(model)
        for weight in adapter.weights
    ]
    initial = [keras.ops.convert_to_numpy(w).copy() for w in adapter_weights]
    result = run_case([("fit", lambda: model.fit(make_dataset(), verbose=0))])

    result["num_adapter_weights"] = len(adapter_weights)
    result["num_distributed"] = sum(
        isinstance(weight.value, tf.distribute.DistributedValues)
        for weight in adapter_weights
    )
    result["num_in_scope"] = sum(
        strategy.extended.variable_created_in_scope(weight.value)
        for weight in adapter_weights
    )
    result["replica_devices"] = sorted(
        {
            component.device
            for weight in adapter_weights
            for component in strategy.experimental_local_results(weight.value)
        }
    )
    result["max_training_change"] = max(
        float(np.abs(keras.ops.convert_to_numpy(weight) - old).max())
        for weight, old in zip(adapter_weights, initial)
    )
    return result


def main():
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    cases = {
        "adapted_outside_compiled_inside": adapted_outside_compiled_inside,
        "adapters_added_outside": adapters_added_outside,
        "fit_inside_only": fit_inside_only,
        "train_on_batch_inside_only": train_on_batch_inside_only,
        "unadapted_compiled_inside": unadapted_compiled_inside,
        "created_inside": created_inside,
    }
    results = {name: case(strategy) for name, case in cases.items()}
    print(json.dumps(results))


if __name__ == "__main__":
    main()
