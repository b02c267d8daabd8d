"""Export adapted models as TensorFlow SavedModels for serving."""

import logging

import keras

logger = logging.getLogger(__name__)

SERVING_ENDPOINT = "serve"


def export_saved_model(model, path, preprocessor=None):
    """Export `model`, with its active adapters, as a TensorFlow SavedModel.

    Without `preprocessor` this is `model.export(path,
    format="tf_saved_model")`: the `serve` endpoint takes the model's own
    inputs, such as `token_ids` and `padding_mask`, in the dtypes of the
    model's inputs. keras-hub's BERT takes both as int32, so a boolean
    mask must be cast first. With `preprocessor`, the
    `serve` endpoint takes a 1-D `tf.string` tensor of raw texts and runs the
    preprocessor inside the SavedModel. keras-hub's BERT-family tokenizers
    are TensorFlow Text ops, so a process that loads such an export must
    `import tensorflow_text` first, or TensorFlow cannot find those ops.

    The adapters active at export time are fixed into the graph, so call
    `keras_adapters.set_active_adapters` before exporting.

    Args:
        model: a Keras model, such as an adapted keras-hub task model built
            with `preprocessor=None`.
        path: string or path-like. Folder to write the SavedModel to.
        preprocessor: a keras-hub preprocessor layer that maps a batch of
            strings to the model's inputs, or `None`.

    Returns:
        The path written, as a string.

    Example:

    ```python
    keras_adapters.export_saved_model(classifier, "served", preprocessor)
    reloaded = tf.saved_model.load("served")
    logits = reloaded.serve(tf.constant(["a fine film"]))
    ```
    """
    import tensorflow as tf

    path = str(path)
    if preprocessor is None:
        model.export(path, format="tf_saved_model", verbose=False)
        logger.info("Exported %s to %s", model.name, path)
        return path

    if not preprocessor.built:
        # ExportArchive rejects layers that are not built, and one call on a
        # string builds the preprocessor.
        preprocessor(tf.constant([""]))

    def serve(texts):
        return model(preprocessor(texts), training=False)

    archive = keras.export.ExportArchive()
    archive.track(model)
    archive.track(preprocessor)
    archive.add_endpoint(
        SERVING_ENDPOINT,
        serve,
        input_signature=[tf.TensorSpec(shape=(None,), dtype=tf.string)],
    )
    archive.write_out(path, verbose=False)
    logger.info("Exported %s with its preprocessor to %s", model.name, path)
    return path
