"""Shared fixtures: tiny randomly initialised keras-hub models."""

import os

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import keras_hub  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

VOCABULARY_SIZE = 64
HIDDEN_SIZE = 16
NUM_LAYERS = 2
SEQUENCE_LENGTH = 8
BATCH_SIZE = 4

_COMMON = dict(
    num_layers=NUM_LAYERS,
    num_heads=2,
    hidden_dim=HIDDEN_SIZE,
    intermediate_dim=32,
    max_sequence_length=SEQUENCE_LENGTH,
)


def _bert():
    return keras_hub.models.BertBackbone(
        vocabulary_size=VOCABULARY_SIZE, **_COMMON
    )


def _roberta():
    return keras_hub.models.RobertaBackbone(
        vocabulary_size=VOCABULARY_SIZE, **_COMMON
    )


def _xlm_roberta():
    return keras_hub.models.XLMRobertaBackbone(
        vocabulary_size=VOCABULARY_SIZE, **_COMMON
    )


def _distil_bert():
    return keras_hub.models.DistilBertBackbone(
        vocabulary_size=VOCABULARY_SIZE, **_COMMON
    )


def _electra():
    return keras_hub.models.ElectraBackbone(
        vocab_size=VOCABULARY_SIZE, embedding_dim=8, **_COMMON
    )


def _albert():
    # One shared TransformerEncoder runs at both depths.
    return keras_hub.models.AlbertBackbone(
        vocabulary_size=VOCABULARY_SIZE,
        embedding_dim=8,
        num_groups=1,
        num_inner_repetitions=1,
        **_COMMON,
    )


# family: (backbone factory, classifier class or None, uses segment ids,
#          number of distinct TransformerEncoder blocks)
FAMILIES = {
    "bert": (_bert, keras_hub.models.BertTextClassifier, True, NUM_LAYERS),
    "roberta": (
        _roberta,
        keras_hub.models.RobertaTextClassifier,
        False,
        NUM_LAYERS,
    ),
    "xlm_roberta": (
        _xlm_roberta,
        keras_hub.models.XLMRobertaTextClassifier,
        False,
        NUM_LAYERS,
    ),
    "distil_bert": (
        _distil_bert,
        keras_hub.models.DistilBertTextClassifier,
        False,
        NUM_LAYERS,
    ),
    "electra": (_electra, None, True, NUM_LAYERS),
    "albert": (_albert, keras_hub.models.AlbertTextClassifier, True, 1),
}


def make_backbone(family, seed=0):
    keras.utils.set_random_seed(seed)
    return FAMILIES[family][0]()


def make_classifier(family, seed=0, num_classes=2):
    """Return a tiny task model of `family`, or its backbone if it has none."""
    backbone = make_backbone(family, seed)
    classifier_class = FAMILIES[family][1]
    if classifier_class is None:
        return backbone
    return classifier_class(
        backbone=backbone, num_classes=num_classes, preprocessor=None
    )


def make_inputs(family, seed=0, batch_size=BATCH_SIZE):
    rng = np.random.default_rng(seed)
    token_ids = rng.integers(1, VOCABULARY_SIZE, (batch_size, SEQUENCE_LENGTH))
    padding_mask = np.ones((batch_size, SEQUENCE_LENGTH), dtype=bool)
    # The last example is padded, so masking is exercised too.
    padding_mask[-1, SEQUENCE_LENGTH // 2 :] = False
    token_ids[~padding_mask] = 0
    inputs = {"token_ids": token_ids.astype("int32"), "padding_mask": padding_mask}
    if FAMILIES[family][2]:
        inputs["segment_ids"] = np.zeros_like(inputs["token_ids"])
    return inputs


def model_outputs(model, inputs):
    """Return the model's inference outputs as one float64 array."""
    outputs = model(inputs, training=False)
    if isinstance(outputs, dict):
        outputs = outputs["sequence_output"]
    return keras.ops.convert_to_numpy(outputs).astype("float64")


@pytest.fixture(params=sorted(FAMILIES))
def family(request):
    return request.param


def fit_briefly(model, inputs, epochs=3, learning_rate=5e-2):
    """Compile `model` with Adam and fit it a few steps on `inputs`."""
    if isinstance(model, keras_hub.models.Backbone):
        # A backbone has no task loss, so pull its outputs towards ones.
        loss = "mse"
        targets = {
            key: np.ones(tuple(value.shape), "float32")
            for key, value in model(inputs).items()
        }
    else:
        loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
        targets = np.arange(inputs["token_ids"].shape[0]) % 2
    model.compile(optimizer=keras.optimizers.Adam(learning_rate), loss=loss)
    model.fit(inputs, targets, epochs=epochs, verbose=0)


def changed_weight_groups(model, before):
    """Return the training groups whose weights differ from `before`.

    `before` contains the values of `model.weights` in order. Every frozen
    weight must be bit-identical to its old value, and the assert names the
    first one that is not.
    """
    import keras_adapters

    groups = keras_adapters.rewriting.weight_groups(model)
    changed_groups = set()
    for weight, old_value in zip(model.weights, before):
        new_value = keras.ops.convert_to_numpy(weight)
        if weight.trainable:
            if not np.array_equal(new_value, old_value):
                changed_groups.add(groups[id(weight)])
        else:
            assert np.array_equal(new_value, old_value), weight.path
    return changed_groups


def layers_from_first_block(model):
    """Return the backbone's top-level layers from its first block on.

    The layer norms in these layers train beside adapters in every block.
    Those that the graph runs before the first block, such as the
    embeddings' layer norm, stay frozen.
    """
    import itertools

    import keras_adapters

    backbone = keras_adapters.rewriting.find_backbone(model)
    first_block = keras_adapters.rewriting.find_blocks(model)[0][1]
    return list(
        itertools.dropwhile(lambda layer: layer is not first_block, backbone.layers)
    )
