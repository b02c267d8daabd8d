"""AdapterFusion, stacking and averaging of trained adapters."""

import keras
import numpy as np
import pytest
from conftest import HIDDEN_SIZE
from conftest import changed_weight_groups
from conftest import fit_briefly
from conftest import make_classifier
from conftest import make_inputs
from conftest import model_outputs

import keras_adapters
from keras_adapters import AdapterFusion

BOTTLENECK_SIZE = 4
FUSION_PARAMETERS = 3 * (HIDDEN_SIZE * HIDDEN_SIZE + HIDDEN_SIZE)


def _two_trained_adapters(config="houlsby"):
    """Return a model with adapters "a" and "b", each trained on its own."""
    model = make_classifier("bert")
    inputs = make_inputs("bert")
    for name, seed in (("a", 1), ("b", 2)):
        keras_adapters.add_adapters(
            model, name=name, config=config, bottleneck_size=BOTTLENECK_SIZE
        )
        keras_adapters.set_active_adapters(model, name)
        keras.utils.set_random_seed(seed)
        fit_briefly(model, make_inputs("bert", seed=seed), learning_rate=1e-2)
    keras_adapters.set_active_adapters(model, [])
    model_outputs(model, inputs)
    return model


def test_fusion_layer_starts_as_mean():
    fusion = AdapterFusion(["a", "b"])
    rng = np.random.default_rng(0)
    hidden = rng.normal(size=(2, 3, HIDDEN_SIZE)).astype("float32")
    outputs = [rng.normal(size=hidden.shape).astype("float32") for _ in range(2)]
    fusion.build(hidden.shape)
    # With zero query and key kernels every adapter gets the same weight.
    fusion.query_kernel.assign(np.zeros((HIDDEN_SIZE, HIDDEN_SIZE)))

    fused = keras.ops.convert_to_numpy(fusion(hidden, outputs))

    np.testing.assert_allclose(fused, hidden + (outputs[0] + outputs[1]) / 2, atol=1e-5)


def test_fusion_layer_attends_to_matching_adapter():
    fusion = AdapterFusion(["a", "b"], temperature=0.01)
    hidden = np.ones((1, 1, HIDDEN_SIZE), "float32")
    outputs = [hidden * 1.0, -hidden * 1.0]
    fusion.build(hidden.shape)
    for kernel in (fusion.query_kernel, fusion.key_kernel):
        kernel.assign(np.eye(HIDDEN_SIZE))

    fused = keras.ops.convert_to_numpy(fusion(hidden, outputs))

    # The query matches adapter "a"'s output, so its output dominates.
    np.testing.assert_allclose(fused, hidden + outputs[0], atol=1e-4)


def test_fusion_trains_only_fusion_weights():
    model = _two_trained_adapters()
    keras_adapters.add_fusion(model, ["a", "b"], name="fused")
    before = [keras.ops.convert_to_numpy(w) for w in model.weights]

    fit_briefly(model, make_inputs("bert"), learning_rate=1e-2)

    fusions = [
        fusion
        for _, block in keras_adapters.rewriting.find_blocks(model)
        for _, wrapper in keras_adapters.rewriting._wrappers_of(block)
        for fusion in wrapper.fusions.values()
    ]
    fusion_ids = {id(w) for fusion in fusions for w in fusion.weights}
    adapter_weights = [
        w
        for name in ("a", "b")
        for _, adapter in keras_adapters.rewriting.iter_adapters(model, name)
        for w in adapter.weights
    ]
    assert changed_weight_groups(model, before) == {
        "adapters",
        "layer_norms",
        "head",
    }
    assert not any(w.trainable for w in adapter_weights)
    assert all(w.trainable for w in model.weights if id(w) in fusion_ids)


def test_fusion_parameter_count():
    model = _two_trained_adapters()

    keras_adapters.add_fusion(model, ["a", "b"])

    counts = keras_adapters.count_parameters(model)
    # Houlsby places adapters, and so fusions, on two branches per block.
    assert counts.adapters == 2 * 2 * FUSION_PARAMETERS
    assert keras_adapters.active_adapters(model) == ["fusion_a_b"]


def test_fusion_file_round_trip(tmp_path):
    trained = _two_trained_adapters()
    keras_adapters.add_fusion(trained, ["a", "b"], name="fused")
    fit_briefly(trained, make_inputs("bert"), learning_rate=1e-2)
    paths = {}
    for name in ("a", "b", "fused"):
        paths[name] = keras_adapters.save_adapters(
            trained, tmp_path / f"{name}.safetensors", name=name
        )
    model = make_classifier("bert")

    for name in ("a", "b", "fused"):
        keras_adapters.load_adapters(model, paths[name])
    keras_adapters.set_active_adapters(model, "fused")

    config = keras_adapters.read_adapter_config(paths["fused"])
    assert config["kind"] == "fusion"
    assert config["fusion"]["adapter_names"] == ["a", "b"]
    inputs = make_inputs("bert")
    np.testing.assert_array_equal(
        model_outputs(model, inputs), model_outputs(trained, inputs)
    )


def test_fusion_file_needs_its_adapters(tmp_path):
    trained = _two_trained_adapters()
    keras_adapters.add_fusion(trained, ["a", "b"], name="fused")
    path = keras_adapters.save_adapters(
        trained, tmp_path / "fused.safetensors", name="fused"
    )
    a_path = keras_adapters.save_adapters(trained, tmp_path / "a.safetensors", name="a")
    model = make_classifier("bert")
    keras_adapters.load_adapters(model, a_path)

    with pytest.raises(ValueError, match=r"no adapters named \['b'\]"):
        keras_adapters.load_adapters(model, path)

    assert keras_adapters.fusion_names(model) == []


def test_fusion_keras_file_round_trip(tmp_path):
    trained = _two_trained_adapters()
    keras_adapters.add_fusion(trained, ["a", "b"])
    trained.save(tmp_path / "model.keras")

    model = keras.models.load_model(tmp_path / "model.keras")

    assert keras_adapters.fusion_names(model) == ["fusion_a_b"]
    inputs = make_inputs("bert")
    np.testing.assert_array_equal(
        model_outputs(model, inputs), model_outputs(trained, inputs)
    )


def test_fusion_of_parallel_and_sequential_adapters():
    model = make_classifier("bert")
    keras_adapters.add_adapters(
        model, name="a", config="pfeiffer", bottleneck_size=BOTTLENECK_SIZE
    )
    keras_adapters.add_adapters(
        model, name="b", config="parallel", bottleneck_size=BOTTLENECK_SIZE
    )

    keras_adapters.add_fusion(model, ["a", "b"])

    fit_briefly(model, make_inputs("bert"), learning_rate=1e-2)
    assert np.isfinite(model_outputs(model, make_inputs("bert"))).all()


def test_fusion_across_branches_raises():
    model = make_classifier("bert")
    keras_adapters.add_adapters(model, name="a", bottleneck_size=BOTTLENECK_SIZE)
    keras_adapters.add_adapters(
        model, name="b", config="pfeiffer", bottleneck_size=BOTTLENECK_SIZE
    )

    with pytest.raises(ValueError, match="same branches"):
        keras_adapters.add_fusion(model, ["a", "b"])

    assert keras_adapters.fusion_names(model) == []


def test_fused_adapters_cannot_be_removed():
    model = _two_trained_adapters()
    keras_adapters.add_fusion(model, ["a", "b"])

    with pytest.raises(ValueError, match="remove_fusion"):
        keras_adapters.remove_adapters(model, "a")


def test_remove_fusion_keeps_adapters():
    model = _two_trained_adapters()
    inputs = make_inputs("bert")
    keras_adapters.set_active_adapters(model, "a")
    expected = model_outputs(model, inputs)
    keras_adapters.add_fusion(model, ["a", "b"])

    keras_adapters.remove_fusion(model, "fusion_a_b")
    keras_adapters.set_active_adapters(model, "a")

    assert keras_adapters.adapter_names(model) == ["a", "b"]
    np.testing.assert_array_equal(model_outputs(model, inputs), expected)


def test_stack_saves_as_its_adapters(tmp_path):
    trained = _two_trained_adapters()
    keras_adapters.set_active_adapters(trained, ["a", "b"])
    model = make_classifier("bert")

    for name in ("a", "b"):
        path = keras_adapters.save_adapters(
            trained, tmp_path / f"{name}.safetensors", name=name
        )
        keras_adapters.load_adapters(model, path)
    keras_adapters.set_active_adapters(model, ["a", "b"])

    inputs = make_inputs("bert")
    stacked = model_outputs(model, inputs)
    np.testing.assert_array_equal(stacked, model_outputs(trained, inputs))
    keras_adapters.set_active_adapters(model, "a")
    assert np.abs(model_outputs(model, inputs) - stacked).max() > 0


def test_average_of_weights():
    model = _two_trained_adapters()

    keras_adapters.average_adapters(model, ["a", "b"], "mean", weights=[0.25, 0.75])

    a = dict(keras_adapters.rewriting.iter_adapters(model, "a"))
    b = dict(keras_adapters.rewriting.iter_adapters(model, "b"))
    for key, adapter in keras_adapters.rewriting.iter_adapters(model, "mean"):
        for index, weight in enumerate(adapter.weights):
            expected = 0.25 * keras.ops.convert_to_numpy(
                a[key].weights[index]
            ) + 0.75 * keras.ops.convert_to_numpy(b[key].weights[index])
            np.testing.assert_allclose(
                keras.ops.convert_to_numpy(weight), expected, rtol=1e-6
            )
    assert keras_adapters.active_adapters(model) == []


def test_average_saves_like_any_adapter(tmp_path):
    trained = _two_trained_adapters()
    keras_adapters.average_adapters(trained, ["a", "b"], "mean")
    keras_adapters.set_active_adapters(trained, "mean")
    path = keras_adapters.save_adapters(
        trained, tmp_path / "mean.safetensors", name="mean"
    )
    model = make_classifier("bert")

    keras_adapters.load_adapters(model, path)

    inputs = make_inputs("bert")
    np.testing.assert_array_equal(
        model_outputs(model, inputs), model_outputs(trained, inputs)
    )


def test_average_of_different_settings_raises():
    model = make_classifier("bert")
    keras_adapters.add_adapters(model, name="a", bottleneck_size=4)
    keras_adapters.add_adapters(model, name="b", bottleneck_size=2)

    with pytest.raises(ValueError, match="different settings"):
        keras_adapters.average_adapters(model, ["a", "b"], "mean")

    assert keras_adapters.adapter_names(model) == ["a", "b"]


@pytest.mark.parametrize("weights", [[0.5], [0.5, 0.6], ["a", "b"]])
def test_average_bad_weights_raise(weights):
    model = make_classifier("bert")
    keras_adapters.add_adapters(model, name="a", bottleneck_size=4)
    keras_adapters.add_adapters(model, name="b", bottleneck_size=4)

    with pytest.raises(ValueError, match="weights"):
        keras_adapters.average_adapters(model, ["a", "b"], "mean", weights=weights)
