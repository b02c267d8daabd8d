"""Train adapters with keras.callbacks.BackupAndRestore, optionally dying mid-way.

The test that runs this script compares the trained weights of several runs,
so every run must compute the same steps from the same start:

- the weights start from one seed, and dropout is off, so no random numbers
  are drawn during training;
- the data is a fixed array, fed in the same order every epoch, with no
  shuffling, so epoch `e`, batch `b` is the same batch in every run;
- everything runs on one CPU device, in float32, so the same steps give the
  same numbers.

Modes:

- default: train `--epochs` epochs with BackupAndRestore in `backup_dir`.
  With `--kill-at-step N`, the process sends itself SIGKILL right after its
  Nth step (counted from 1 over all epochs), as a crashed machine would stop.
  Run again with the same `backup_dir`, it resumes from the backup.
- `--replay-epoch K --replay-steps B`: no BackupAndRestore. Train epochs
  before K, then B steps of epoch K, then epoch K again from its first batch
  through the last epoch. This is what a run that resumes from a backup taken
  after B steps of epoch K computes in Keras 3.15.

Each run writes its trainable weights to the `.npz` file given as its first
argument, and prints one JSON object with the epochs it started and the
steps it ran.
"""

import argparse
import json
import os
import signal
import sys

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import keras_hub  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from conftest import SEQUENCE_LENGTH  # noqa: E402
from conftest import VOCABULARY_SIZE  # noqa: E402
from conftest import make_inputs  # noqa: E402

import keras_adapters  # noqa: E402

NUM_EXAMPLES = 32
BATCH_SIZE = 4
STEPS_PER_EPOCH = NUM_EXAMPLES // BATCH_SIZE


def make_dataset():
    """Return the same `STEPS_PER_EPOCH` batches, in the same order, each epoch."""
    inputs = make_inputs("bert", batch_size=NUM_EXAMPLES)
    labels = np.arange(NUM_EXAMPLES) % 2
    return tf.data.Dataset.from_tensor_slices((inputs, labels)).batch(BATCH_SIZE)


def make_model():
    """Return a compiled, adapted tiny BERT classifier with dropout off."""
    keras.utils.set_random_seed(0)
    backbone = keras_hub.models.BertBackbone(
        vocabulary_size=VOCABULARY_SIZE,
        num_layers=2,
        num_heads=2,
        hidden_dim=16,
        intermediate_dim=32,
        max_sequence_length=SEQUENCE_LENGTH,
        dropout=0.0,
    )
    model = keras_hub.models.BertTextClassifier(
        backbone=backbone, num_classes=2, preprocessor=None, dropout=0.0
    )
    keras_adapters.add_adapters(model, bottleneck_size=4)
    # Adam keeps moment estimates and a step count, so resuming with a
    # fresh optimizer would give different weights than restoring it.
    model.compile(
        optimizer=keras.optimizers.Adam(1e-2),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    return model


class RecordProgress(keras.callbacks.Callback):
    """Record the epochs started and steps run, and die at a chosen step."""

    def __init__(self, kill_at_step=None):
        super().__init__()
        self.kill_at_step = kill_at_step
        self.epochs_started = []
        self.steps = 0

    def on_epoch_begin(self, epoch, logs=None):
        self.epochs_started.append(epoch)

    def on_train_batch_end(self, batch, logs=None):
        self.steps += 1
        if self.steps == self.kill_at_step:
            os.kill(os.getpid(), signal.SIGKILL)


def train_with_backup(model, args):
    backup = keras.callbacks.BackupAndRestore(
        args.backup_dir, save_freq=args.save_freq
    )
    progress = RecordProgress(args.kill_at_step)
    # BackupAndRestore comes first, so a step's backup is written before
    # that step's kill.
    model.fit(
        make_dataset(),
        epochs=args.epochs,
        callbacks=[backup, progress],
        verbose=0,
    )
    return progress


def train_replay(model, args):
    progress = RecordProgress()
    model.fit(make_dataset(), epochs=args.replay_epoch, callbacks=[progress], verbose=0)
    model.fit(
        make_dataset(),
        initial_epoch=args.replay_epoch,
        epochs=args.replay_epoch + 1,
        steps_per_epoch=args.replay_steps,
        callbacks=[progress],
        verbose=0,
    )
    model.fit(
        make_dataset(),
        initial_epoch=args.replay_epoch,
        epochs=args.epochs,
        callbacks=[progress],
        verbose=0,
    )
    return progress


def save_frequency(text):
    return text if text == "epoch" else int(text)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("output", help="Path of the .npz file to write.")
    parser.add_argument("--backup-dir", help="BackupAndRestore's folder.")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument(
        "--save-freq",
        type=save_frequency,
        default="epoch",
        help="BackupAndRestore's save_freq: 'epoch' or a number of steps.",
    )
    parser.add_argument("--kill-at-step", type=int, default=None)
    parser.add_argument("--replay-epoch", type=int, default=None)
    parser.add_argument("--replay-steps", type=int, default=None)
    args = parser.parse_args(argv)

    model = make_model()
    if args.replay_epoch is None:
        progress = train_with_backup(model, args)
    else:
        progress = train_replay(model, args)

    np.savez(
        args.output,
        **{
            weight.path: keras.ops.convert_to_numpy(weight)
            for weight in model.trainable_weights
        },
    )
    print(
        json.dumps(
            {"epochs_started": progress.epochs_started, "steps": progress.steps}
        )
    )


if __name__ == "__main__":
    main()
