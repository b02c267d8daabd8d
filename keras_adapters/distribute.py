"""`tf.distribute` support for adapted models.

`add_adapters` gives the model a subclass of its class (see
`keras_adapters.serialization`), and `strategy_methods` returns the methods
that subclass adds for distributed training. They do two things.

They check that the strategy that trains the model owns its weights.
A `tf.distribute` strategy can only update variables that were created inside
its `scope()`, because it keeps one copy of each on every replica. Take a model
whose weights were created outside the scope, compiled or fit inside it. With
Keras 3.15 and TensorFlow 2.21, its first training step fails with a bare
`AssertionError` from `MirroredStrategy`'s variable update, which names
neither the weights nor the fix. `compile`, `fit` and `train_on_batch` raise a
`ValueError` before that.

They also work around two failures of Keras 3.15.1's `fit` and `evaluate`
under `MultiWorkerMirroredStrategy` with more than one worker, which occur
with any keras-hub model:

- Before the first step, Keras reduces a whole input batch with
  `strategy.reduce`, which TensorFlow 2.21's collective strategy accepts only
  for a single value, not for the `(features, labels)` structure of a batch.
  The batch only serves to build the model symbolically, so this worker's own
  replica batch is used instead.
- After each step, Keras averages every scalar log, such as the loss, with
  `strategy.reduce("MEAN", value, axis=0)`, which fails on a scalar. Each log
  is given a batch axis of length 1 first, so the average runs across the
  workers as Keras intends.
"""

import functools

import keras

# How many weight paths an error message lists.
_MAX_LISTED_PATHS = 3


def strategy_methods(cls):
    """Return the `tf.distribute` methods of the adapted subclass of `cls`.

    Each method does its check or workaround and then calls the method of
    `cls`.
    """

    @functools.wraps(cls.compile)
    def compile(self, *args, **kwargs):
        check_compile_strategy(self)
        return cls.compile(self, *args, **kwargs)

    @functools.wraps(cls.fit)
    def fit(self, *args, **kwargs):
        check_training_strategy(self)
        return cls.fit(self, *args, **kwargs)

    @functools.wraps(cls.train_on_batch)
    def train_on_batch(self, *args, **kwargs):
        check_training_strategy(self)
        return cls.train_on_batch(self, *args, **kwargs)

    @functools.wraps(cls.train_step)
    def train_step(self, data):
        logs = cls.train_step(self, data)
        return _add_batch_axis_if_multi_worker(self, logs)

    @functools.wraps(cls.test_step)
    def test_step(self, data):
        logs = cls.test_step(self, data)
        return _add_batch_axis_if_multi_worker(self, logs)

    # NOTE: `_maybe_symbolic_build` is private to Keras's TensorFlow trainer,
    # and this override matches its signature in Keras 3.15.1.
    def _maybe_symbolic_build(self, iterator=None, data_batch=None):
        strategy = self.distribute_strategy
        if iterator is not None and _is_multi_worker(strategy):
            data_batch = _first_local_batch(iterator, strategy)
            iterator = None
        return cls._maybe_symbolic_build(
            self, iterator=iterator, data_batch=data_batch
        )

    methods = {
        "compile": compile,
        "fit": fit,
        "train_on_batch": train_on_batch,
        "train_step": train_step,
        "test_step": test_step,
    }
    if hasattr(cls, "_maybe_symbolic_build"):
        methods["_maybe_symbolic_build"] = _maybe_symbolic_build
    return methods


def check_compile_strategy(model):
    """Raise if `model` is compiled for a strategy that does not own its weights.

    Two strategies are checked: the one whose `scope()` is active during
    `compile`, whose optimizer Keras then creates, and the one `fit` will run
    under (`model.distribute_strategy`).
    """
    if keras.backend.backend() != "tensorflow":
        return
    import tensorflow as tf

    strategies = [model.distribute_strategy]
    if tf.distribute.has_strategy():
        strategies.append(tf.distribute.get_strategy())
    for strategy in strategies:
        _check_weights_in_scope(model, strategy)


def check_training_strategy(model):
    """Raise if `model` trains under a strategy that does not own its weights.

    Keras trains under the strategy that was active when the model was
    created, or else under the one whose `scope()` is active during `fit`.
    """
    if keras.backend.backend() != "tensorflow":
        return
    _check_weights_in_scope(model, model.distribute_strategy)


def _check_weights_in_scope(model, strategy):
    import tensorflow as tf

    from keras_adapters import rewriting

    # An unbuilt weight has a placeholder value and no variable yet, so only
    # `tf.Variable` values are checked.
    outside = [
        weight
        for weight in model.weights
        if isinstance(weight.value, tf.Variable)
        and not strategy.extended.variable_created_in_scope(weight.value)
    ]
    if not outside:
        return

    adapter_ids = {
        id(weight)
        for _, adapter in rewriting.iter_adapters(model)
        for weight in adapter.weights
    }
    num_adapter_weights = sum(id(weight) in adapter_ids for weight in outside)
    if num_adapter_weights == len(outside):
        weight_kind = "adapter weights"
    elif num_adapter_weights == 0:
        weight_kind = "base model's weights"
    else:
        weight_kind = "weights"
    paths = ", ".join(
        f"'{weight.path}'" for weight in outside[:_MAX_LISTED_PATHS]
    )
    raise ValueError(
        f"The model's {weight_kind} were created outside the scope of the "
        f"distribution strategy that trains it, {type(strategy).__name__}, "
        "so the strategy cannot update them on its replicas. Received: "
        f"{len(outside)} of {len(model.weights)} weights created outside "
        f"that scope, such as {paths}. Create the model and call "
        "`keras_adapters.add_adapters` inside `with strategy.scope():`, and "
        "compile and fit the model with the same strategy."
    )


def _is_multi_worker(strategy):
    """Return whether Keras 3.15.1 treats `strategy` as multi-worker."""
    if keras.backend.backend() != "tensorflow":
        return False
    import tensorflow as tf

    # The same test as Keras's TensorFlow trainer, which decides with it
    # how to reduce the logs of each step.
    return isinstance(
        strategy, tf.distribute.MultiWorkerMirroredStrategy
    ) and strategy.extended._in_multi_worker_mode()


def _first_local_batch(iterator, strategy):
    """Take the next batch of a Keras epoch iterator, as this worker's values."""
    import tensorflow as tf

    batch = None
    for _, _, distributed_iterator in iterator:
        batch = next(distributed_iterator)
        break
    return keras.tree.map_structure(
        lambda value: (
            strategy.experimental_local_results(value)[0]
            if isinstance(value, tf.distribute.DistributedValues)
            else value
        ),
        batch,
    )


def _add_batch_axis_if_multi_worker(model, logs):
    if not _is_multi_worker(model.distribute_strategy):
        return logs
    from keras import ops

    return keras.tree.map_structure(
        lambda value: (
            ops.reshape(value, (1,)) if len(ops.shape(value)) == 0 else value
        ),
        logs,
    )
