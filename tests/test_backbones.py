"""The adapter contract, run on a tiny instance of every supported backbone.

`tools/support_table.py` reads this module's JUnit results, so a backbone
counts as tested only when all of its tests here pass.
"""

import inspect

import keras
import numpy as np
import pytest
from backbones import BACKBONES
from backbones import CAUSAL_LMS
from backbones import HIDDEN_SIZE
from backbones import NUM_LAYERS
from backbones import SEQUENCE_LENGTH
from backbones import backbone_outputs
from backbones import case_id
from backbones import make_backbone
from backbones import make_inputs
from conftest import changed_weight_groups
from conftest import layers_from_first_block

import keras_adapters
from keras_adapters import rewriting

BOTTLENECK_SIZE = 4
PER_ADAPTER = 2 * HIDDEN_SIZE * BOTTLENECK_SIZE + HIDDEN_SIZE + BOTTLENECK_SIZE

# An up-projection bias that moves each branch's output visibly, so a test
# can tell whether an adapter ran.
_LARGE_BIAS = keras.initializers.RandomNormal(stddev=1.0, seed=1)


@pytest.fixture(params=BACKBONES, ids=case_id)
def case(request):
    return request.param


@pytest.fixture(params=CAUSAL_LMS, ids=case_id)
def causal_case(request):
    return request.param


def _size(weights):
    return sum(int(np.prod(weight.shape)) for weight in weights)


def _add(model, case, **kwargs):
    return keras_adapters.add_adapters(
        model,
        bottleneck_size=BOTTLENECK_SIZE,
        placement=list(case.placements),
        **kwargs,
    )


def _expected_num_adapters(case):
    # Cross-attention exists in the decoder half of the blocks only.
    count = case.num_blocks * 2
    if "cross_attention" in case.placements:
        count += NUM_LAYERS
    return count


def _norm_weights(backbone):
    """Return the weights of the norms in and after the first block."""
    # Found by class name, independently of the registry's list of classes:
    # every keras-hub text backbone names its norm classes "...Norm...".
    return [
        weight
        for top_layer in layers_from_first_block(backbone)
        for layer in top_layer._flatten_layers()
        if "Norm" in type(layer).__name__
        for weight in layer.weights
    ]


def _pooler_weights(backbone):
    return [
        weight
        for layer in backbone.layers
        if layer.name in rewriting.POOLER_LAYER_NAMES
        for weight in layer.weights
    ]


def test_identity_at_initialisation(case):
    model = make_backbone(case)
    inputs = make_inputs(case)
    expected = backbone_outputs(model, inputs)

    _add(model, case)
    received = backbone_outputs(model, inputs)

    # Near-zero adapters move the outputs by about 1e-5 of their scale. The
    # bound leaves room for the RMS norms of the decoders.
    scale = np.abs(expected).max()
    assert np.abs(received - expected).max() <= 1e-3 * scale


def test_each_placement_runs(case):
    # Guards the identity test: an adapter on a sublayer that the block
    # never calls would pass it too.
    for placement in case.placements:
        model = make_backbone(case)
        inputs = make_inputs(case)
        expected = backbone_outputs(model, inputs)
        keras_adapters.add_adapters(
            model,
            bottleneck_size=BOTTLENECK_SIZE,
            placement=[placement],
            up_bias_initializer=_LARGE_BIAS,
        )

        scale = np.abs(expected).max()
        moved = np.abs(backbone_outputs(model, inputs) - expected).max()
        assert moved > 0.1 * scale, placement


def test_adapter_and_parameter_counts(case):
    model = make_backbone(case)
    total_before = _size(model.weights)
    _add(model, case)
    counts = keras_adapters.count_parameters(model)

    num_adapters = _expected_num_adapters(case)
    adapters = num_adapters * PER_ADAPTER
    layer_norms = _size(_norm_weights(model))
    head = _size(_pooler_weights(model))
    assert len(list(rewriting.iter_adapters(model))) == num_adapters
    assert layer_norms > 0
    assert counts.adapters == adapters
    assert counts.layer_norms == layer_norms
    assert counts.head == head
    assert _size(model.trainable_weights) == adapters + layer_norms + head
    assert counts.total == total_before + adapters


def test_fit_step_changes_only_trainable_weights(case):
    model = make_backbone(case)
    inputs = make_inputs(case)
    _add(model, case, up_bias_initializer=_LARGE_BIAS)
    before = [keras.ops.convert_to_numpy(weight).copy() for weight in model.weights]

    # A backbone has no task loss, so pull its outputs towards ones. One
    # eager step avoids tracing a train function per backbone.
    targets = keras.tree.map_structure(
        lambda value: np.ones(tuple(value.shape), "float32"), model(inputs)
    )
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss="mse", run_eagerly=True)
    model.train_on_batch(inputs, targets)

    changed_groups = changed_weight_groups(model, before)
    assert changed_groups >= {"adapters", "layer_norms"}


def test_saved_adapters_reproduce_outputs(case, tmp_path):
    model = make_backbone(case)
    inputs = make_inputs(case)
    _add(model, case)
    # Stand-in for training: random values in every trainable weight.
    rng = np.random.default_rng(0)
    for weight in model.trainable_weights:
        weight.assign(rng.normal(scale=0.1, size=tuple(weight.shape)).astype("float32"))
    expected = backbone_outputs(model, inputs)
    path = keras_adapters.save_adapters(model, tmp_path / "adapters.safetensors")

    fresh = make_backbone(case)
    assert np.abs(backbone_outputs(fresh, inputs) - expected).max() > 1e-4
    keras_adapters.load_adapters(fresh, path)

    np.testing.assert_allclose(backbone_outputs(fresh, inputs), expected, atol=1e-5)


def _causal_lm(case, seed=0):
    model = case.causal_lm(backbone=make_backbone(case, seed), preprocessor=None)
    # Eager generation keeps the suite from tracing one function per model.
    model.compile(sampler="greedy", run_eagerly=True)
    return model


def _build_cache(model, token_ids):
    """Call the model's `_build_cache`, which differs between families."""
    parameters = list(inspect.signature(model._build_cache).parameters)
    arguments = {"token_ids": token_ids}
    for name in parameters[1:]:
        if name == "padding_mask":
            arguments[name] = np.ones(token_ids.shape, bool)
        else:
            arguments[name] = None
    return model._build_cache(**arguments)


def _prompt_batch(seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(1, 64, (2, SEQUENCE_LENGTH)).astype("int32")


def _supports_parallel(model):
    return all(
        rewriting._attribute_of(block, "feedforward_input") is not None
        for _, block in rewriting.find_blocks(model)
    )


def _add_parallel(model):
    return keras_adapters.add_adapters(
        model,
        config="parallel",
        bottleneck_size=BOTTLENECK_SIZE,
        up_bias_initializer=_LARGE_BIAS,
    )


def test_parallel_adapters(case):
    model = make_backbone(case)
    inputs = make_inputs(case)
    expected = backbone_outputs(model, inputs)
    if not _supports_parallel(model):
        with pytest.raises(ValueError, match="feedforward_input"):
            _add_parallel(model)
        assert not rewriting.adapter_names(model)
        return

    _add_parallel(model)
    scale = np.abs(expected).max()
    moved = np.abs(backbone_outputs(model, inputs) - expected).max()
    keras_adapters.remove_adapters(model, "adapter")

    assert moved > 0.1 * scale
    np.testing.assert_array_equal(backbone_outputs(model, inputs), expected)


def test_cached_logits_match_full_forward(causal_case):
    model = _causal_lm(causal_case)
    _add(model, causal_case, up_bias_initializer=_LARGE_BIAS)
    _check_cached_logits(model)


def test_cached_logits_with_parallel_adapters(causal_case):
    model = _causal_lm(causal_case)
    if not _supports_parallel(model):
        with pytest.raises(ValueError, match="feedforward_input"):
            _add_parallel(model)
        return
    _add_parallel(model)
    _check_cached_logits(model)


def _check_cached_logits(model):
    token_ids = _prompt_batch()
    padding_mask = np.ones(token_ids.shape, bool)
    full = keras.ops.convert_to_numpy(
        model({"token_ids": token_ids, "padding_mask": padding_mask})
    )

    # Fill the cache from the first half only, then decode the second half
    # token by token, as `generate()` does.
    prompt_length = SEQUENCE_LENGTH // 2
    prompt = token_ids.copy()
    prompt[:, prompt_length:] = 0
    hidden_states, cache = _build_cache(model, prompt)
    scale = np.abs(full).max()
    for index in range(prompt_length, SEQUENCE_LENGTH):
        # A tensor index, as generate() passes: SmolLM3's decoder layers
        # reject a Python int mixed with the cache tensor in their kwargs.
        logits, hidden_states, cache = model.call_with_cache(
            token_ids[:, index : index + 1],
            cache,
            keras.ops.convert_to_tensor(index, "int32"),
        )
        cached = keras.ops.convert_to_numpy(logits)[:, 0]
        assert np.abs(cached - full[:, index]).max() <= 1e-4 * scale, index


def _generate(model, prompt_length=3):
    token_ids = _prompt_batch()
    padding_mask = np.zeros(token_ids.shape, bool)
    padding_mask[:, :prompt_length] = True
    token_ids[~padding_mask] = 0
    inputs = {"token_ids": token_ids, "padding_mask": padding_mask}
    if type(model).__name__ == "Gemma3CausalLM":
        # NOTE: keras-hub 0.32's Gemma3CausalLM.generate() without a
        # preprocessor fails after decoding, when it concatenates its `None`
        # image outputs, so the test calls the decoding function that
        # generate() wraps.
        outputs = model.make_generate_function()(inputs, stop_token_ids=None)
    else:
        outputs = model.generate(inputs, stop_token_ids=None)
    return keras.ops.convert_to_numpy(outputs["token_ids"])


def test_generate_runs_with_adapters(causal_case):
    model = _causal_lm(causal_case)
    _add(model, causal_case, up_bias_initializer=_LARGE_BIAS)

    outputs = _generate(model)

    assert outputs.shape == (2, SEQUENCE_LENGTH)
    assert (outputs[:, 3:] != 0).any()


def test_generate_with_adapters_off_matches_base(causal_case):
    base = _generate(_causal_lm(causal_case))
    model = _causal_lm(causal_case)
    _add(model, causal_case, up_bias_initializer=_LARGE_BIAS)

    keras_adapters.set_active_adapters(model, None)

    np.testing.assert_array_equal(_generate(model), base)


def test_compiled_generate_follows_active_adapters():
    # Graph mode, on one family: the traced generate function must be
    # rebuilt when adapters change, or it keeps the old graph.
    case = CAUSAL_LMS[0]
    model = case.causal_lm(backbone=make_backbone(case), preprocessor=None)
    model.compile(sampler="greedy", jit_compile=False)
    base = _generate(model)
    _add(model, case, up_bias_initializer=_LARGE_BIAS)
    adapted = _generate(model)

    keras_adapters.set_active_adapters(model, None)

    assert not np.array_equal(adapted, base)
    np.testing.assert_array_equal(_generate(model), base)
