"""Whole-model saving of adapted models in the `.keras` format.

keras-hub rebuilds a backbone or task model from its constructor arguments
(`Backbone.from_config`), so a plain `.keras` file of an adapted model would
load as the base model, without adapters, and its adapter weights would
have nowhere to go.

To fix this, `add_adapters` swaps the class of the model it changes for a
subclass made here, with the same name and behaviour. That subclass is
saved under the registered name `keras_adapters>AdaptedModel`, and its
config contains two entries: the base class's own serialized config, and the
adapter settings. `AdaptedModel.from_config` first builds the base model
from the first entry, then adds the adapters again with `add_adapters`,
restores which adapters are active and which weights train, and returns the
model. Keras loads the weights only after `from_config` returns, so every
adapter weight in the file finds its variable. `keras.models.load_model`
needs no `custom_objects`, as long as `keras_adapters` has been imported.

The subclass also adds the `tf.distribute` checks and workarounds of
`keras_adapters.distribute` to `compile`, `fit` and the train and test steps.

We chose the class swap over rewriting the blocks' configs because keras-hub
backbones do not serialize their blocks at all. It leaves keras-hub's
classes untouched, and `isinstance` checks against them still hold.
"""

import keras
from keras.src.saving import object_registration

from keras_adapters import distribute

PACKAGE = "keras_adapters"
REGISTERED_NAME = f"{PACKAGE}>AdaptedModel"

# Base class -> its adapted subclass, so each base class gets one subclass.
_ADAPTED_CLASSES = {}


@keras.saving.register_keras_serializable(package=PACKAGE, name="AdaptedModel")
class AdaptedModel:
    """Loader for `.keras` files of adapted models.

    Not instantiated. Keras finds this class by its registered name and
    calls `from_config`, which returns the base model with its adapters.
    """

    def get_config(self):
        raise NotImplementedError(
            "AdaptedModel is a loader only. Adapted models are instances of "
            "their keras-hub class."
        )

    @classmethod
    def from_config(cls, config):
        from keras_adapters import rewriting

        model = keras.saving.deserialize_keras_object(config["model"])
        rewriting.restore_adapters(model, config["adapters"])
        return model


def mark_adapted(model):
    """Give `model` the adapted subclass of its class, so it saves its adapters."""
    if is_adapted_class(type(model)):
        return
    object.__setattr__(model, "__class__", _adapted_class(type(model)))


def unmark_adapted(model):
    """Give `model` back its base class, once it has no adapters left."""
    if is_adapted_class(type(model)):
        object.__setattr__(model, "__class__", base_class(type(model)))


def is_adapted_class(cls):
    return cls in _ADAPTED_CLASSES.values()


def base_class(cls):
    """Return the keras-hub class behind an adapted subclass, or `cls`."""
    return cls.__bases__[0] if is_adapted_class(cls) else cls


def _adapted_class(cls):
    if cls in _ADAPTED_CLASSES:
        return _ADAPTED_CLASSES[cls]

    def get_config(self):
        from keras_adapters import rewriting

        base_config = cls.get_config(self)
        return {
            "model": {
                "module": cls.__module__,
                "class_name": cls.__name__,
                "config": base_config,
                "registered_name": keras.saving.get_registered_name(cls),
            },
            "adapters": rewriting.adapters_config(self),
        }

    # The subclass keeps the base class's name, so `type(model).__name__`,
    # summaries and error messages read as before.
    adapted = type(
        cls.__name__,
        (cls,),
        {
            "__module__": __name__,
            "__qualname__": cls.__qualname__,
            "get_config": get_config,
            **distribute.strategy_methods(cls),
        },
    )
    # NOTE: Keras 3.15 offers no public way to map a class to a registered
    # name that loads another class, so the private map is written directly.
    # Saving reads the name from it, and loading finds `AdaptedModel`.
    object_registration.GLOBAL_CUSTOM_NAMES[adapted] = REGISTERED_NAME
    _ADAPTED_CLASSES[cls] = adapted
    return adapted
