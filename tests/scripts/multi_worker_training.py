"""Train adapters as one worker of a MultiWorkerMirroredStrategy cluster.

The test that runs this script starts one process per worker, each with a
`TF_CONFIG` that lists the cluster's loopback addresses and names its own
task. Each process prints `step N` after every training step and, once
training ends, writes the trainable weights before and after training to
the `.npz` file given as its first argument, under the keys `initial/<path>`
and `trained/<path>`.
"""

import argparse
import os
import sys
import time

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import keras_hub  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from conftest import make_inputs  # noqa: E402

import keras_adapters  # noqa: E402

GLOBAL_BATCH_SIZE = 8


def make_dataset():
    """Return an endless, unshuffled dataset of global batches."""
    inputs = make_inputs("bert", batch_size=GLOBAL_BATCH_SIZE)
    # Keras 3.15 with TensorFlow 2.21 fails under tf.distribute on boolean
    # model inputs, so the padding mask is fed as int32.
    inputs["padding_mask"] = inputs["padding_mask"].astype("int32")
    labels = np.arange(GLOBAL_BATCH_SIZE) % 2
    dataset = tf.data.Dataset.from_tensor_slices((inputs, labels))
    dataset = dataset.repeat().batch(GLOBAL_BATCH_SIZE)
    # The examples come from tensors, not files, so each worker takes every
    # other example (DATA), which the AUTO policy would pick after a warning.
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = (
        tf.data.experimental.AutoShardPolicy.DATA
    )
    return dataset.with_options(options)


def make_model():
    """Return a compiled, adapted tiny BERT classifier without dropout."""
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
    return model


class PrintStep(keras.callbacks.Callback):
    """Print each finished step, then wait `delay` seconds."""

    def __init__(self, delay):
        super().__init__()
        self.delay = delay

    def on_train_batch_end(self, batch, logs=None):
        print(f"step {batch}", flush=True)
        time.sleep(self.delay)


def trainable_values(model):
    return {
        weight.path: keras.ops.convert_to_numpy(weight).copy()
        for weight in model.trainable_weights
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("output", help="Path of the .npz file to write.")
    parser.add_argument("--steps", type=int, default=5, help="Training steps.")
    parser.add_argument(
        "--step-delay",
        type=float,
        default=0.0,
        help="Seconds to wait after each step, so a test can act mid-training.",
    )
    args = parser.parse_args(argv)

    # No collective timeout (`CommunicationOptions(timeout_seconds=...)`) is
    # set. It would bound every collective, the first included, which waits
    # for the slowest worker to start, and TensorFlow documents it as a
    # debugging aid that starts one thread per collective. A lost peer is
    # found without it. A killed worker's sockets are reset at once, and
    # TensorFlow 2.21's strategy starts a coordination service whose missing
    # heartbeats abort the collectives of a frozen worker's peers, in 10 to
    # 13 seconds in the tests.
    strategy = tf.distribute.MultiWorkerMirroredStrategy()
    with strategy.scope():
        model = make_model()
    initial = trainable_values(model)

    model.fit(
        make_dataset(),
        steps_per_epoch=args.steps,
        epochs=1,
        verbose=0,
        callbacks=[PrintStep(args.step_delay)],
    )
    trained = trainable_values(model)

    arrays = {f"initial/{path}": value for path, value in initial.items()}
    arrays.update({f"trained/{path}": value for path, value in trained.items()})
    np.savez(args.output, **arrays)


if __name__ == "__main__":
    main()
