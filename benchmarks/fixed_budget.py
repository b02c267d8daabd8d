"""Train a classifier for a fixed budget and measure its held-out accuracy.

Shared by `adapter_benchmark.py` and `variants_benchmark.py`. Every method
trains on the same examples in the same order: the first N of the train
split, shuffled with one seed, for the same number of epochs. The held-out
set is the first M of the test split.
"""

import logging
import math
import time

import tensorflow as tf
import tensorflow_datasets as tfds

import keras_adapters.datasets  # noqa: F401, registers the local builders.

logger = logging.getLogger(__name__)

# Shuffle buffer for the training examples. It is larger than either
# training split, so the shuffle is a full permutation.
SHUFFLE_BUFFER = 10_000

# z for a two-sided 95% normal interval.
Z_95 = 1.96


def load_examples(dataset, split, count=None):
    """Return the first `count` examples of a split as (sentence, label) pairs.

    `count=None` takes the whole split. tfds reads the split's files in a
    fixed order, so the same `count` gives the same examples on every run.

    Raises:
        ValueError: if the split has fewer than `count` examples.
    """
    examples = tfds.load(dataset, split=split, shuffle_files=False)
    size = int(examples.cardinality())
    if count is not None and count > size:
        raise ValueError(
            f"The '{split}' split of {dataset} has {size} examples, fewer "
            f"than the {count} requested. Lower the example count."
        )
    if count is not None:
        examples = examples.take(count)
    return examples.map(lambda example: (example["sentence"], example["label"]))


def tokenize(examples, preprocessor):
    """Tokenize (sentence, label) pairs, each cut to its own length.

    The tokens are cached in memory after the first pass, so that several
    models can train on batches of them without tokenizing again.
    """
    return examples.map(
        lambda sentence, label: (_trim_padding(preprocessor(sentence)), label),
        num_parallel_calls=tf.data.AUTOTUNE,
    ).cache()


def make_batches(tokens, sequence_length, batch_size, shuffle_seed=None):
    """Batch tokenized examples of similar length together.

    Batches are drawn from buckets 8 tokens wide and padded only to their
    longest example, which makes the short sentences of both data sets
    cheaper to train on than padding every batch to `sequence_length`. With
    a shuffle seed, the examples are shuffled before bucketing and
    reshuffled every epoch. Each call returns a new pipeline, and pipelines
    made with the same seed under the same global seed
    (`keras.utils.set_random_seed`) give the same batches in the same order.
    """
    # Each example's bucket depends only on its length, so the number of
    # batches does not depend on the order. Giving `fit` that count spares
    # it a warning at the end of every epoch.
    count = count_batches(_bucket(tokens, sequence_length, batch_size))
    if shuffle_seed is not None:
        tokens = tokens.shuffle(SHUFFLE_BUFFER, seed=shuffle_seed)
    batches = _bucket(tokens, sequence_length, batch_size)
    batches = batches.apply(tf.data.experimental.assert_cardinality(count))
    return batches.prefetch(tf.data.AUTOTUNE)


def _bucket(tokens, sequence_length, batch_size):
    boundaries = list(range(16, sequence_length, 8))
    return tokens.bucket_by_sequence_length(
        element_length_func=lambda features, label: tf.shape(
            features["token_ids"]
        )[0],
        bucket_boundaries=boundaries,
        bucket_batch_sizes=[batch_size] * (len(boundaries) + 1),
    )


def _trim_padding(features):
    length = tf.reduce_sum(tf.cast(features["padding_mask"], tf.int32))
    return {key: value[:length] for key, value in features.items()}


def train_and_evaluate(model, train_batches, test_batches, epochs):
    """Fit a compiled model, then evaluate it on the held-out batches.

    The model must be compiled with an `"accuracy"` metric. Returns a dict
    with the held-out accuracy and loss, the number of held-out examples,
    the 95% interval half-width of the accuracy from the test set's size
    alone, and the wall seconds of training and of evaluation.
    """
    start = time.perf_counter()
    history = model.fit(train_batches, epochs=epochs, verbose=0)
    train_seconds = time.perf_counter() - start

    start = time.perf_counter()
    scores = model.evaluate(test_batches, verbose=0, return_dict=True)
    eval_seconds = time.perf_counter() - start

    test_count = count_examples(test_batches)
    accuracy = float(scores["accuracy"])
    return {
        "accuracy": accuracy,
        "loss": float(scores["loss"]),
        "accuracy_interval_95": interval_95(accuracy, test_count),
        "test_examples": test_count,
        "train_loss_last_epoch": float(history.history["loss"][-1]),
        "train_seconds": train_seconds,
        "eval_seconds": eval_seconds,
    }


def count_examples(batches):
    """Count the examples in a dataset of `(features, labels)` batches."""
    return int(
        batches.reduce(0, lambda count, batch: count + tf.shape(batch[1])[0])
    )


def count_batches(batches):
    return int(batches.reduce(0, lambda count, batch: count + 1))


def majority_accuracy(batches):
    """Return the accuracy of always predicting the most frequent label."""
    counts = {}
    for _, labels in batches:
        for label in labels.numpy().tolist():
            counts[label] = counts.get(label, 0) + 1
    return max(counts.values()) / sum(counts.values())


def interval_95(accuracy, count):
    """Half-width of the normal 95% interval of an accuracy on `count` examples.

    It covers only the sampling of the test set, not the spread between
    training runs with other seeds.
    """
    return Z_95 * math.sqrt(accuracy * (1 - accuracy) / count)


def log_result(label, result):
    logger.info(
        "%s: accuracy %.4f ± %.4f on %d held-out examples; trained in %.0f s.",
        label,
        result["accuracy"],
        result["accuracy_interval_95"],
        result["test_examples"],
        result["train_seconds"],
    )
