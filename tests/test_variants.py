"""The contract every named adapter variant must meet, on tiny backbones."""

import keras
import numpy as np
import pytest
from conftest import HIDDEN_SIZE
from conftest import NUM_LAYERS
from conftest import changed_weight_groups
from conftest import fit_briefly
from conftest import make_classifier
from conftest import make_inputs
from conftest import model_outputs
from keras_hub.layers import TransformerEncoder

import keras_adapters
from keras_adapters import AdapterConfig
from keras_adapters import registry

BOTTLENECK_SIZE = 4
PROJECTIONS = 2 * HIDDEN_SIZE * BOTTLENECK_SIZE + HIDDEN_SIZE + BOTTLENECK_SIZE
INNER_NORM = 2 * HIDDEN_SIZE

# variant: (config, adapters per block, parameters per adapter, adapted
#           blocks)
VARIANTS = {
    "houlsby": ("houlsby", 2, PROJECTIONS, NUM_LAYERS),
    "pfeiffer": ("pfeiffer", 1, PROJECTIONS, NUM_LAYERS),
    "parallel": ("parallel", 1, PROJECTIONS, NUM_LAYERS),
    "norm_before": (
        AdapterConfig(layer_norm="before"),
        2,
        PROJECTIONS + INNER_NORM,
        NUM_LAYERS,
    ),
    "norm_after": (
        AdapterConfig(layer_norm="after"),
        2,
        PROJECTIONS + INNER_NORM,
        NUM_LAYERS,
    ),
    "adapter_drop": (AdapterConfig(skip_blocks=1), 2, PROJECTIONS, 1),
}


@pytest.fixture(params=sorted(VARIANTS))
def variant(request):
    return request.param


def _adapt(model, variant, **kwargs):
    config = VARIANTS[variant][0]
    return keras_adapters.add_adapters(
        model, config=config, bottleneck_size=BOTTLENECK_SIZE, **kwargs
    )


_TRAINED = {}


def _train(variant):
    """Return a model adapted with `variant` and trained briefly, built once.

    Callers only read and save it, so the file tests share it.
    """
    if variant not in _TRAINED:
        model = make_classifier("bert")
        _adapt(model, variant)
        fit_briefly(model, make_inputs("bert"), learning_rate=1e-2)
        _TRAINED[variant] = model
    return _TRAINED[variant]


def test_identity_at_initialisation(variant):
    model = make_classifier("bert")
    inputs = make_inputs("bert")
    expected = model_outputs(model, inputs)

    _adapt(model, variant)
    received = model_outputs(model, inputs)

    # Near-zero up-projections move the outputs by about 1e-5 of their
    # scale; 1e-3 leaves room for the parallel variant's scaling of 4.
    scale = np.abs(expected).max()
    assert np.abs(received - expected).max() <= 1e-3 * scale


def test_variant_runs(variant):
    # Guards the identity test: adapters that did not run would pass it too.
    model = make_classifier("bert")
    inputs = make_inputs("bert")
    expected = model_outputs(model, inputs)

    large = keras.initializers.RandomNormal(stddev=1.0, seed=1)
    _adapt(model, variant, up_bias_initializer=large)
    if variant == "norm_after":
        # The output norm starts with a zero scale, so give it a scale and
        # a shift. A constant shift alone would vanish in the block's own
        # layer norm.
        rng = np.random.default_rng(0)
        for _, adapter in keras_adapters.rewriting.iter_adapters(model):
            adapter.layer_norm_gamma.assign(np.ones(HIDDEN_SIZE))
            adapter.layer_norm_beta.assign(rng.normal(size=HIDDEN_SIZE))

    # The tiny classifier's logits are near 1e-2, so compare to their scale.
    scale = np.abs(expected).max()
    assert np.abs(model_outputs(model, inputs) - expected).max() > 0.1 * scale


def test_trainable_count(variant):
    model = make_classifier("bert")
    _adapt(model, variant)
    config, per_block, per_adapter, blocks = VARIANTS[variant]

    counts = keras_adapters.count_parameters(model)

    assert counts.adapters == blocks * per_block * per_adapter


def test_only_trainable_weights_change(variant):
    model = make_classifier("bert")
    _adapt(model, variant)
    before = [keras.ops.convert_to_numpy(w) for w in model.weights]

    fit_briefly(model, make_inputs("bert"), learning_rate=1e-2)

    changed = changed_weight_groups(model, before)
    assert changed == {"adapters", "layer_norms", "head"}


def test_file_round_trip(variant, tmp_path):
    trained = _train(variant)
    path = keras_adapters.save_adapters(trained, tmp_path / "a.safetensors")
    model = make_classifier("bert")

    keras_adapters.load_adapters(model, path)

    inputs = make_inputs("bert")
    np.testing.assert_array_equal(
        model_outputs(model, inputs), model_outputs(trained, inputs)
    )


def test_keras_file_round_trip(variant, tmp_path):
    trained = _train(variant)
    trained.save(tmp_path / "model.keras")

    model = keras.models.load_model(tmp_path / "model.keras")

    inputs = make_inputs("bert")
    np.testing.assert_array_equal(
        model_outputs(model, inputs), model_outputs(trained, inputs)
    )


def test_remove_restores_base_model(variant):
    model = make_classifier("bert")
    inputs = make_inputs("bert")
    expected = model_outputs(model, inputs)
    _adapt(model, variant)

    keras_adapters.remove_adapters(model, "adapter")

    np.testing.assert_array_equal(model_outputs(model, inputs), expected)
    assert not any(
        isinstance(layer, keras_adapters.BranchInputTap)
        for layer in model._flatten_layers()
    )


def test_adapter_drop_freezes_lower_layer_norms():
    model = make_classifier("bert")
    _adapt(model, "adapter_drop")
    backbone = keras_adapters.rewriting.find_backbone(model)

    lower = backbone.get_layer("transformer_layer_0")
    upper = backbone.get_layer("transformer_layer_1")
    embeddings_norm = backbone.get_layer("embeddings_layer_norm")

    assert not any(w.trainable for w in lower.weights)
    assert not any(w.trainable for w in embeddings_norm.weights)
    upper_norms = [
        layer
        for layer in upper._flatten_layers()
        if isinstance(layer, keras.layers.LayerNormalization)
    ]
    assert all(w.trainable for layer in upper_norms for w in layer.weights)


def test_adapter_drop_skipping_every_block_raises():
    model = make_classifier("bert")
    with pytest.raises(ValueError, match="skip_blocks"):
        keras_adapters.add_adapters(model, skip_blocks=NUM_LAYERS)


def test_config_round_trip():
    config = AdapterConfig(
        mode="parallel",
        placements=("feedforward",),
        scaling=2.0,
        layer_norm="before",
        skip_blocks=1,
    )

    restored = keras.saving.deserialize_keras_object(
        keras.saving.serialize_keras_object(config)
    )

    assert restored == config


def test_named_configs():
    parallel = keras_adapters.get_adapter_config("parallel")

    assert keras_adapters.get_adapter_config("houlsby").placements == (
        "attention",
        "feedforward",
    )
    assert keras_adapters.get_adapter_config("pfeiffer").placements == (
        "feedforward",
    )
    assert parallel.mode == "parallel"
    assert parallel.scaling == 4.0
    assert not parallel.residual


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"mode": "serial"}, "mode"),
        ({"mode": "parallel", "placements": ("attention",)}, "feed-forward"),
        ({"layer_norm": "inside"}, "layer_norm"),
        ({"skip_blocks": -1}, "skip_blocks"),
        ({"scaling": "4"}, "scaling"),
        ({"placements": ("ffn",)}, "placement"),
    ],
)
def test_bad_config_raises(fields, message):
    with pytest.raises(ValueError, match=message):
        AdapterConfig(**fields)


def test_unknown_config_name_raises():
    with pytest.raises(ValueError, match="Unknown adapter config"):
        keras_adapters.get_adapter_config("lora")


def test_parallel_reads_branch_input():
    # A parallel adapter on the feed-forward branch must read the
    # input of the branch's first dense layer, not the branch output.
    model = make_classifier("bert")
    keras_adapters.add_adapters(model, config="parallel", bottleneck_size=4)
    backbone = keras_adapters.rewriting.find_backbone(model)
    block = backbone.get_layer("transformer_layer_0")
    tap = block._feedforward_intermediate_dense
    recorded = []
    original_record = tap.branch_input.record

    def record(value):
        recorded.append(value)
        original_record(value)

    tap.branch_input.record = record
    model(make_inputs("bert"), training=False)

    assert isinstance(tap, keras_adapters.BranchInputTap)
    assert len(recorded) == 1
    assert recorded[0].shape[-1] == HIDDEN_SIZE


def test_parallel_drops_branch_input_after_call():
    model = make_classifier("bert")
    keras_adapters.add_adapters(model, config="parallel", bottleneck_size=4)
    backbone = keras_adapters.rewriting.find_backbone(model)
    tap = backbone.get_layer("transformer_layer_0")._feedforward_intermediate_dense

    model(make_inputs("bert"), training=False)

    with pytest.raises(RuntimeError, match="branch input is unknown"):
        tap.branch_input.read("reader")


def test_parallel_needs_registered_input():
    model = make_classifier("bert")
    points = registry.get_insertion_points(TransformerEncoder)
    try:
        keras_adapters.register_block(
            TransformerEncoder,
            attention=points.attention,
            feedforward=points.feedforward,
        )
        with pytest.raises(ValueError, match="feedforward_input"):
            keras_adapters.add_adapters(model, config="parallel")
    finally:
        keras_adapters.register_block(
            TransformerEncoder,
            attention=points.attention,
            feedforward=points.feedforward,
            feedforward_input=points.feedforward_input,
        )


def _backward_op_names(model):
    """Return the names of the backward ops that the gradients depend on."""
    import tensorflow as tf

    inputs = make_inputs("bert")
    labels = np.arange(inputs["token_ids"].shape[0]) % 2
    loss_function = keras.losses.SparseCategoricalCrossentropy(from_logits=True)

    @tf.function
    def gradients(inputs, labels):
        with tf.GradientTape() as tape:
            loss = loss_function(labels, model(inputs, training=True))
        return tape.gradient(loss, model.trainable_weights)

    graph = gradients.get_concrete_function(inputs, labels).graph
    # The tape also records ops of frozen layers, but TensorFlow prunes the
    # gradient ops that no returned gradient depends on before running the
    # function, so only the outputs' ancestors count.
    needed = set()
    pending = [tensor.op for tensor in graph.outputs]
    while pending:
        op = pending.pop()
        if op.name in needed:
            continue
        needed.add(op.name)
        pending.extend(tensor.op for tensor in op.inputs)
        pending.extend(op.control_inputs)
    return [name for name in needed if name.startswith("gradient_tape/")]


@pytest.mark.parametrize("skip_blocks, reaches_first_block", [(0, True), (1, False)])
def test_adapter_drop_stops_backpropagation(skip_blocks, reaches_first_block):
    model = make_classifier("bert")
    keras_adapters.add_adapters(
        model, bottleneck_size=BOTTLENECK_SIZE, skip_blocks=skip_blocks
    )

    names = _backward_op_names(model)

    assert any("transformer_layer_1" in name for name in names)
    in_first_block = any("transformer_layer_0" in name for name in names)
    assert in_first_block == reaches_first_block


@pytest.mark.parametrize("train_embeddings_norm", [False, True])
def test_backpropagation_stops_at_the_first_adapter(train_embeddings_norm):
    model = make_classifier("bert")
    keras_adapters.add_adapters(model, bottleneck_size=BOTTLENECK_SIZE)
    embeddings_norm = model.backbone.get_layer("embeddings_layer_norm")
    assert not any(weight.trainable for weight in embeddings_norm.weights)
    if train_embeddings_norm:
        # What training the embeddings' layer norm would cost.
        for weight in embeddings_norm.weights:
            weight.trainable = True

    names = _backward_op_names(model)

    in_first_attention = any(
        "transformer_layer_0" in name and "/self_attention_layer" in name
        and "/self_attention_layer_norm" not in name
        for name in names
    )
    assert in_first_attention == train_embeddings_norm
    assert any("transformer_layer_0" in name for name in names)
