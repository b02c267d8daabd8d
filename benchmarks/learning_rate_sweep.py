"""Compare learning rates for the adapter benchmark on held-out training sentences.

Usage:

```
python benchmarks/learning_rate_sweep.py --method houlsby --learning-rates 1e-3 3e-3
```

Each learning rate trains one model per seed, the way
`adapter_benchmark.py` trains it in its accuracy phase, on the first 6,072
sentences of the train split. After every epoch it reports the accuracy on
the last 1,000 sentences of the train split, which the benchmark's test
sentences are not part of, so choosing by these figures leaves the test
split untouched. The seed sets the start and the batch order, as in the
benchmark. The default is seed 0 only, so the figures then show no spread
between seeds.
The model is all-MiniLM-L6-v2 as a two-class classifier. On 2 CPU cores, one
model took 6 to 7 minutes for 3 epochs with adapters and 12 minutes with full
fine-tuning, the latter while other jobs ran. Each further seed or rate adds
another model's time.
"""

import argparse
import json
import logging
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import keras_hub  # noqa: E402

import adapter_benchmark  # noqa: E402
import fixed_budget  # noqa: E402
import report  # noqa: E402

logger = logging.getLogger("learning_rate_sweep")

TRAIN_SPLIT = "train[:6072]"
VALIDATION_SPLIT = "train[6072:]"
# The sweep uses the benchmark's default sequence length, batch size and
# AdapterDrop setting, so its models train like the benchmark's.
BENCHMARK_DEFAULTS = adapter_benchmark.build_parser().parse_args([])
SEQUENCE_LENGTH = BENCHMARK_DEFAULTS.sequence_length
BATCH_SIZE = BENCHMARK_DEFAULTS.batch_size


def build_parser():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--method",
        choices=adapter_benchmark.METHOD_ORDER,
        required=True,
        help="training method, as in adapter_benchmark.py",
    )
    parser.add_argument(
        "--learning-rates",
        type=adapter_benchmark.positive_float,
        nargs="+",
        required=True,
        help="Adam learning rates to try, one model per rate and seed",
    )
    parser.add_argument(
        "--epochs",
        type=adapter_benchmark.positive_int,
        default=3,
        help="epochs per model; the accuracy is reported after each (default: 3)",
    )
    parser.add_argument(
        "--seeds",
        type=adapter_benchmark.non_negative_int,
        nargs="+",
        default=[0],
        help="random seeds, one model per learning rate and seed (default: 0)",
    )
    parser.add_argument(
        "--bottleneck-size",
        type=adapter_benchmark.positive_int,
        default=None,
        help=(
            "adapter bottleneck size r of the adapter methods (default: the "
            "package's default, the hidden size divided by 16, 24 for MiniLM)"
        ),
    )
    parser.add_argument(
        "--lora-rank",
        type=adapter_benchmark.positive_int,
        default=None,
        help="LoRA rank, needed with --method lora",
    )
    parser.add_argument(
        "--output",
        metavar="PATH",
        help=(
            "also append one JSON line per learning rate and seed to this file "
            "(default: print the results only)"
        ),
    )
    return parser


def sweep(args):
    """Train one model per learning rate and seed, and yield its results."""
    preprocessor = keras_hub.models.BertTextClassifierPreprocessor.from_preset(
        adapter_benchmark.checkpoint_path(), sequence_length=SEQUENCE_LENGTH
    )
    train_tokens = fixed_budget.tokenize(
        fixed_budget.load_examples(adapter_benchmark.DATASET, TRAIN_SPLIT),
        preprocessor,
    )
    validation_batches = fixed_budget.make_batches(
        fixed_budget.tokenize(
            fixed_budget.load_examples(adapter_benchmark.DATASET, VALIDATION_SPLIT),
            preprocessor,
        ),
        SEQUENCE_LENGTH,
        BATCH_SIZE,
    )
    # The benchmark's model setup reads these settings only.
    settings = argparse.Namespace(
        bottleneck_size=args.bottleneck_size,
        skip_blocks=BENCHMARK_DEFAULTS.skip_blocks,
        lora_rank=args.lora_rank,
    )
    runs = [(rate, seed) for rate in args.learning_rates for seed in args.seeds]
    for rate, seed in runs:
        keras.utils.set_random_seed(seed)
        model = adapter_benchmark.build_model(
            args.method, settings, learning_rate=rate, metrics=["accuracy"]
        )
        train_batches = fixed_budget.make_batches(
            train_tokens, SEQUENCE_LENGTH, BATCH_SIZE, shuffle_seed=seed
        )
        start = time.perf_counter()
        history = model.fit(
            train_batches,
            epochs=args.epochs,
            validation_data=validation_batches,
            verbose=0,
        )
        yield {
            "method": args.method,
            "learning_rate": rate,
            "seed": seed,
            "bottleneck_size": args.bottleneck_size,
            "validation_accuracy_by_epoch": history.history["val_accuracy"],
            "train_seconds": time.perf_counter() - start,
        }
        del model
        keras.backend.clear_session(free_memory=True)


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.method == adapter_benchmark.LORA_METHOD and args.lora_rank is None:
        parser.error("missing --lora-rank, which --method lora needs")
    report.check_output_folders(parser, output=args.output)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    for result in sweep(args):
        by_epoch = ", ".join(
            f"{value:.4f}" for value in result["validation_accuracy_by_epoch"]
        )
        print(
            f"{result['method']} at learning rate {result['learning_rate']:g}, "
            f"seed {result['seed']}: "
            f"held-out accuracy after each epoch {by_epoch}; trained in "
            f"{result['train_seconds']:.0f} s",
            flush=True,
        )
        if args.output:
            with open(args.output, "a") as file:
                file.write(json.dumps(result) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
