"""Load and export bottleneck adapters in the folder layout of AdapterHub.

AdapterHub's `adapters` library (PyTorch) saves an adapter with
`model.save_adapter(directory, name, with_head=True)` as a folder:

- `adapter_config.json`: the model type, hidden size, adapter name and the
  `BnConfig` fields under `"config"`;
- `pytorch_adapter.bin` (`torch.save` format) or, with
  `use_safetensors=True`, `adapter.safetensors`: the adapter weights, keyed
  by module path, such as
  `bert.encoder.layer.3.output.adapters.<name>.adapter_up.weight`;
- `head_config.json` and `pytorch_model_head.bin` or `model_head.safetensors`:
  the prediction head, when the model has one.

This module reads and writes that layout for BERT models, the keras-hub
`BertBackbone` and the task models built on it, such as
`BertTextClassifier`. Config fields map as `keras_adapters.adapterhub_config`
describes. Reading a `.bin` file does not need PyTorch, because
`keras_adapters.torch_checkpoint` reads it.
"""

import json
import logging
import os
import re
import tempfile

import keras
import numpy as np

from keras_adapters import configs
from keras_adapters import persistence
from keras_adapters import rewriting
from keras_adapters.adapterhub_config import config_from_adapterhub
from keras_adapters.adapterhub_config import config_to_adapterhub
from keras_adapters.torch_checkpoint import read_torch_checkpoint
from keras_adapters.version import __version__

logger = logging.getLogger(__name__)

# File names, as in `adapters/utils.py` of adapters 1.3.0.
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "pytorch_adapter.bin"
SAFE_WEIGHTS_NAME = "adapter.safetensors"
HEAD_CONFIG_NAME = "head_config.json"
HEAD_WEIGHTS_NAME = "pytorch_model_head.bin"
SAFE_HEAD_WEIGHTS_NAME = "model_head.safetensors"
LAYOUT_FILES = (
    CONFIG_NAME,
    WEIGHTS_NAME,
    SAFE_WEIGHTS_NAME,
    HEAD_CONFIG_NAME,
    HEAD_WEIGHTS_NAME,
    SAFE_HEAD_WEIGHTS_NAME,
)
WEIGHTS_FORMATS = ("safetensors", "bin", "both")

SUPPORTED_MODEL_TYPES = ("bert",)
# The attribute of `BertAdapterModel` that contains the `BertModel`. Weight
# keys start with it, unless the adapter was saved from a bare `BertModel`.
BASE_MODEL_PREFIX = "bert."
EXPORT_MODEL_CLASS = "BertAdapterModel"

# Placement -> AdapterHub module of BERT layer `index` whose adapters it runs:
# `BertSelfOutput` ends the attention branch and `BertOutput` the
# feed-forward branch. Both add the adapters after their dropout and before
# the residual add and layer norm, as keras-hub's `TransformerEncoder` does.
_PLACEMENT_MODULES = {
    "attention": "encoder.layer.{index}.attention.output",
    "feedforward": "encoder.layer.{index}.output",
}
_ADAPTER_KEY = re.compile(
    r"encoder\.layer\.(?P<index>\d+)\.(?P<module>attention\.output|output)"
    r"\.adapters\.(?P<name>[^.]+)\.(?P<weight>.+)"
)
_MODULE_PLACEMENTS = {"attention.output": "attention", "output": "feedforward"}


def load_adapterhub_adapter(model, directory, name=None, load_head=True):
    """Load an adapter saved by AdapterHub's `adapters` library into `model`.

    The folder is what `model.save_adapter(directory, name)` writes in
    AdapterHub. The weights are read from `adapter.safetensors` when present,
    and otherwise from `pytorch_adapter.bin`, without PyTorch. Everything is
    checked against the model before any weight is assigned, so a failed
    load leaves the model as it was.

    The adapters are added with `train_layer_norms=False`, because
    AdapterHub's `train_adapter` trains no backbone layer norms, so they are
    not in the folder. keras-hub's BERT blocks use the tanh approximation of
    GELU and PyTorch's BERT the exact GELU, so the loaded model's outputs
    differ from PyTorch's by that approximation. docs/adapterhub.md gives
    the measured difference.

    Args:
        model: a keras-hub `BertBackbone`, or a task model built on one, such
            as `keras_hub.models.BertTextClassifier`, of the checkpoint that
            the adapter was trained on.
        directory: string or path-like. The adapter folder.
        name: string or `None`. Name to add the adapters under. Defaults to
            the name they were saved with.
        load_head: bool. Whether to load `head_config.json` and its weights,
            when present, into the classifier head: the first dense layer of
            a two-layer AdapterHub classification head into the backbone's
            `pooled_dense`, and the last into the task model's
            `output_dense`. Defaults to `True`.

    Returns:
        The name the adapters were loaded under.

    Raises:
        FileNotFoundError: if the folder, its config or its weights are
            missing.
        ValueError: if the adapter does not fit the model, for example
            another model type, hidden size or number of layers, a weight of
            the wrong shape, or a config that keras_adapters cannot compute.
    """
    directory = _check_directory(directory)
    file_config = _read_json(os.path.join(directory, CONFIG_NAME))
    backbone = _bert_backbone(model)
    _check_model_type(file_config, directory)
    hidden_size = int(backbone.hidden_dim)
    _check_hidden_size(file_config.get("hidden_size"), hidden_size, directory)

    config = config_from_adapterhub(file_config, hidden_size=hidden_size)
    saved_name = file_config.get("name")
    if not isinstance(saved_name, str) or not saved_name:
        raise ValueError(
            f"{CONFIG_NAME} in {directory!r} has no adapter name. Received: "
            f"name={saved_name!r}"
        )
    name = name or saved_name
    if name in rewriting.adapter_names(model) or name in rewriting.fusion_names(
        model
    ):
        raise ValueError(
            f"The model already has adapters or a fusion named '{name}'. "
            "Pass another `name`, or remove them first with "
            f"`keras_adapters.remove_adapters(model, '{name}')`."
        )

    tensors = _read_tensors(directory, SAFE_WEIGHTS_NAME, WEIGHTS_NAME)
    values = _adapter_values(
        tensors, saved_name, config, backbone.num_layers, hidden_size, directory
    )
    head_values = []
    if load_head:
        head_values = _read_head(model, directory)

    state = rewriting._get_state(model)
    flags = None if state is None else _training_flags(state)
    rewriting.add_adapters(
        model, name=name, config=config, train_layer_norms=False
    )
    try:
        targets = _adapter_variables(model, name, backbone)
        _check_shapes(targets, values, directory)
    except ValueError:
        rewriting.remove_adapters(model, name)
        if flags is not None:
            # Adapters added before keep training what they trained.
            _restore_training_flags(model, flags)
        raise

    for key, variable in targets.items():
        variable.assign(values[key].astype(variable.dtype))
    for variable, value in head_values:
        variable.assign(value.astype(variable.dtype))
    rewriting.reset_compiled_functions(model)
    logger.info(
        "Loaded AdapterHub adapter '%s' from %s as '%s'%s",
        saved_name,
        directory,
        name,
        " with its head" if head_values else "",
    )
    return name


def save_adapterhub_adapter(
    model,
    directory,
    name=None,
    with_head=True,
    weights_format="safetensors",
    model_name=None,
    allow_trained_layer_norms=False,
):
    """Export the adapters called `name` in the folder layout of AdapterHub.

    AdapterHub's `adapters` library loads the folder into a
    `BertAdapterModel` of the same checkpoint with
    `model.load_adapter(directory, use_safetensors=True)`. Each file is
    written to a temporary file in `directory` first, and all are renamed
    once every write succeeded, so a failed export replaces no file.

    Args:
        model: a keras-hub `BertBackbone`, or a task model built on one, with
            adapters added by `keras_adapters.add_adapters`.
        directory: string or path-like. The folder to write, created if
            missing.
        name: string or `None`. The adapters to export. May be left out when
            the model has one set of adapters.
        with_head: bool. Whether to write the classifier head, the
            backbone's `pooled_dense` and the task model's `output_dense`, as
            a two-layer AdapterHub classification head. Ignored for a model
            without one. Defaults to `True`.
        weights_format: string. `"safetensors"` (the default) writes
            `adapter.safetensors` and `model_head.safetensors`. `"bin"`
            writes `pytorch_adapter.bin` and `pytorch_model_head.bin`, which
            AdapterHub loads without `use_safetensors=True`. `"both"` writes
            both. The `.bin` files need PyTorch installed.
        model_name: string or `None`. The checkpoint name to record as
            `model_name`, such as `"sentence-transformers/all-MiniLM-L6-v2"`.
            AdapterHub records it but does not check it when loading from a
            folder.
        allow_trained_layer_norms: bool. AdapterHub adapter files contain no
            backbone weights. When the backbone's layer norms trained with
            these adapters (`train_layer_norms=True`, the default of
            `add_adapters`), AdapterHub would run the adapters with the
            original layer norms and compute something else, so the export
            raises an error unless this is `True`. Defaults to `False`.

    Returns:
        The folder written, as a string.

    Raises:
        ValueError: if the adapters cannot be expressed in AdapterHub, if the
            folder contains AdapterHub files that this export would not
            replace, or if the layer norms trained (see
            `allow_trained_layer_norms`).
        ImportError: if `weights_format` requests `.bin` files and PyTorch
            is not installed.
    """
    if weights_format not in WEIGHTS_FORMATS:
        raise ValueError(
            f"`weights_format` must be one of {WEIGHTS_FORMATS}. Received: "
            f"weights_format={weights_format!r}"
        )
    directory = os.fspath(directory)
    backbone = _bert_backbone(model)
    name = persistence._pick_name(model, name)
    state = rewriting._get_state(model)
    if state is None or name not in state.settings:
        raise ValueError(
            f"The model has adapters named '{name}' but no record of their "
            "settings. Add adapters with `keras_adapters.add_adapters` "
            "before exporting them."
        )
    if state.train_layer_norms and not allow_trained_layer_norms:
        raise ValueError(
            "The backbone's layer norms trained with these adapters, but "
            "AdapterHub adapter files contain no backbone weights, so the "
            "`adapters` library would run the adapters with the original "
            "layer norms. Add the adapters with `train_layer_norms=False` "
            "before training, as AdapterHub's `train_adapter` does, or pass "
            "`allow_trained_layer_norms=True` to export anyway. Received: "
            "train_layer_norms=True"
        )

    hidden_size = int(backbone.hidden_dim)
    config, layer_kwargs = configs.config_from_settings(state.settings[name])
    _check_layer_norm_epsilon(config, layer_kwargs)
    files = {
        CONFIG_NAME: _json_bytes(
            _file_config(
                config_to_adapterhub(config, hidden_size=hidden_size),
                hidden_size,
                name,
                model_name,
            )
        )
    }
    tensors = _export_adapter_tensors(model, name, backbone)
    head_tensors, head_config = {}, None
    if with_head:
        head_tensors, head_config = _export_head(model, name, hidden_size)
    if head_config is not None:
        files[HEAD_CONFIG_NAME] = _json_bytes(
            _file_config(head_config, hidden_size, name, model_name)
        )

    weight_files = [(SAFE_WEIGHTS_NAME, WEIGHTS_NAME, tensors)]
    if head_tensors:
        weight_files.append(
            (SAFE_HEAD_WEIGHTS_NAME, HEAD_WEIGHTS_NAME, head_tensors)
        )
    writers = {}
    for safe_name, bin_name, values in weight_files:
        if weights_format in ("safetensors", "both"):
            writers[safe_name] = _safetensors_writer(values)
        if weights_format in ("bin", "both"):
            writers[bin_name] = _torch_writer(values)

    os.makedirs(directory, exist_ok=True)
    _check_no_stale_files(directory, set(files) | set(writers))
    _write_files_atomically(directory, files, writers)
    logger.info("Exported adapters '%s' to %s for AdapterHub", name, directory)
    return directory


def _training_flags(state):
    return (state.train_adapters, state.train_layer_norms, state.train_head)


def _restore_training_flags(model, flags):
    state = rewriting._get_state(model)
    state.train_adapters, state.train_layer_norms, state.train_head = flags
    rewriting.update_trainable(model)


def _check_directory(directory):
    directory = os.fspath(directory)
    if not os.path.isdir(directory):
        raise FileNotFoundError(
            f"AdapterHub adapter folder not found: {directory!r}"
        )
    return directory


def _read_json(path):
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{os.path.basename(path)} not found in "
            f"{os.path.dirname(path)!r}. AdapterHub writes it with "
            "`model.save_adapter(directory, name)`."
        )
    with open(path, encoding="utf-8") as file:
        try:
            return json.load(file)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path!r} is not valid JSON: {error}") from error


def _bert_backbone(model):
    from keras_hub.models import BertBackbone

    backbone = rewriting.find_backbone(model)
    if not isinstance(backbone, BertBackbone):
        found = type(backbone).__name__ if backbone is not None else None
        raise ValueError(
            "AdapterHub adapters load into and export from keras-hub BERT "
            "models only: a `BertBackbone` or a task model built on one. "
            f"Received: a model with backbone {found}"
        )
    return backbone


def _check_model_type(file_config, directory):
    model_type = file_config.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"The adapter in {directory!r} was trained on a model of another "
            f"type. Supported model types: {SUPPORTED_MODEL_TYPES}. Received: "
            f"model_type={model_type!r}"
        )


def _check_hidden_size(saved, hidden_size, directory):
    if saved is not None and saved != hidden_size:
        raise ValueError(
            f"The adapter in {directory!r} was trained on a model with hidden "
            f"size {saved}, but the model it is loaded into has hidden size "
            f"{hidden_size}. Received: hidden_size={saved}"
        )


def _read_tensors(directory, safe_name, bin_name):
    """Return the tensors of the safetensors file, or else the `.bin` file."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    safe_path = os.path.join(directory, safe_name)
    bin_path = os.path.join(directory, bin_name)
    if os.path.isfile(safe_path):
        try:
            return load_file(safe_path)
        except (SafetensorError, OSError, ValueError) as error:
            raise ValueError(
                f"Cannot read {safe_path!r}: it is not a valid safetensors "
                f"file, or it is truncated: {error}"
            ) from error
    if os.path.isfile(bin_path):
        return read_torch_checkpoint(bin_path)
    raise FileNotFoundError(
        f"No weights in {directory!r}: expected {safe_name} or {bin_name}."
    )


def _adapter_values(
    tensors, saved_name, config, num_layers, hidden_size, directory
):
    """Map AdapterHub weights to `{"<index>/<placement>/<weight>": array}`.

    Every tensor of the file must be used, and each is transposed into the
    layout of `AdapterLayer`. Missing and extra keys raise one error that
    lists them all.
    """
    weight_names = _weight_names(config.layer_norm)
    expected_indices = range(config.skip_blocks, num_layers)
    values = {}
    problems = []
    for key, value in tensors.items():
        match = _ADAPTER_KEY.fullmatch(_strip_base_prefix(key))
        mapped = None
        if match and match["name"] == saved_name:
            placement = _MODULE_PLACEMENTS[match["module"]]
            index = int(match["index"])
            weight = weight_names.get(match["weight"])
            if (
                weight is not None
                and placement in config.placements
                and index in expected_indices
            ):
                mapped = f"{index}/{placement}/{weight}"
        if mapped is None:
            problems.append(f"not in the model: {key}")
            continue
        values[mapped] = _to_keras_layout(value)

    for index in expected_indices:
        for placement in config.placements:
            for hub_weight, weight in weight_names.items():
                if f"{index}/{placement}/{weight}" not in values:
                    module = _PLACEMENT_MODULES[placement].format(index=index)
                    problems.append(
                        "missing from the file: "
                        f"{module}.adapters.{saved_name}.{hub_weight}"
                    )
    _raise_problems(problems, directory)
    return values


def _weight_names(layer_norm):
    """Return `{AdapterHub weight suffix: AdapterLayer weight name}`.

    AdapterHub's down-projection is an `nn.Sequential` of the optional
    "before" layer norm, the linear layer and the activation, so the layer
    norm shifts the linear layer from index 0 to index 1.
    """
    down = "adapter_down.1" if layer_norm == "before" else "adapter_down.0"
    names = {
        f"{down}.weight": "down_kernel",
        f"{down}.bias": "down_bias",
        "adapter_up.weight": "up_kernel",
        "adapter_up.bias": "up_bias",
    }
    if layer_norm == "before":
        names["adapter_down.0.weight"] = "layer_norm_gamma"
        names["adapter_down.0.bias"] = "layer_norm_beta"
    elif layer_norm == "after":
        names["adapter_norm_after.weight"] = "layer_norm_gamma"
        names["adapter_norm_after.bias"] = "layer_norm_beta"
    return names


def _strip_base_prefix(key):
    if key.startswith(BASE_MODEL_PREFIX):
        return key[len(BASE_MODEL_PREFIX) :]
    return key


def _to_keras_layout(value):
    """Transpose a PyTorch `nn.Linear` weight, `(out, in)`, to `(in, out)`."""
    value = np.asarray(value)
    if value.ndim == 2:
        return value.T
    return value


def _adapter_variables(model, name, backbone):
    """Return `{"<index>/<placement>/<weight>": variable}` of `name`."""
    indices = {
        id(block): index
        for index, block in enumerate(backbone.transformer_layers)
    }
    blocks = dict(rewriting.find_blocks(model))
    variables = {}
    for key, adapter in rewriting.iter_adapters(model, name):
        block_path, placement = key.rsplit("/", 1)
        index = indices[id(blocks[block_path])]
        for variable in adapter.weights:
            variables[f"{index}/{placement}/{variable.name}"] = variable
    return variables


def _check_shapes(targets, values, directory):
    problems = persistence.tensor_problems(
        targets, values, shape_note=" (transposed to the Keras layout)"
    )
    _raise_problems(problems, directory)


def _raise_problems(problems, directory):
    if not problems:
        return
    shown = "\n  ".join(problems[:10])
    more = len(problems) - 10
    extra = f"\n  ... and {more} more" if more > 0 else ""
    raise ValueError(
        f"The AdapterHub adapter in {directory!r} does not fit the model, so "
        f"nothing was loaded:\n  {shown}{extra}"
    )


def _read_head(model, directory):
    """Return `[(variable, value)]` for the head in `directory`, or `[]`.

    AdapterHub's default classification head (`layers=2`) computes
    `W_2 · tanh(W_1 · h_cls + b_1) + b_2` on the final [CLS] state, with
    dropout before each dense layer, which is keras-hub's BERT pooler
    (`pooled_dense`, tanh) followed by the classifier's `output_dense`. A
    head with `layers=1` and `use_pooler=True`, and the static head of
    `BertForSequenceClassification` (`classifier.weight`), read BERT's pooler
    output, so only `output_dense` is loaded and `pooled_dense` keeps the
    checkpoint's pooler.
    """
    config_path = os.path.join(directory, HEAD_CONFIG_NAME)
    has_weights = any(
        os.path.isfile(os.path.join(directory, file_name))
        for file_name in (SAFE_HEAD_WEIGHTS_NAME, HEAD_WEIGHTS_NAME)
    )
    if not has_weights:
        logger.info("No prediction head in %s, so none was loaded", directory)
        return []

    head_file_config = (
        _read_json(config_path) if os.path.isfile(config_path) else {}
    )
    output_dense = getattr(model, "output_dense", None)
    backbone = rewriting.find_backbone(model)
    if not isinstance(output_dense, keras.layers.Dense):
        raise ValueError(
            f"The folder {directory!r} contains a prediction head, but the "
            f"model ({type(model).__name__}) has no classifier head to load "
            "it into. Load into a `BertTextClassifier`, or pass "
            "`load_head=False`."
        )

    tensors = _read_tensors(
        directory, SAFE_HEAD_WEIGHTS_NAME, HEAD_WEIGHTS_NAME
    )
    layers = _head_layer_keys(head_file_config, tensors, directory)
    targets = {"output": output_dense}
    if "pooler" in layers:
        targets["pooler"] = backbone.pooled_dense

    values, problems = [], []
    for role, prefix in layers.items():
        layer = targets[role]
        for weight, variable in (
            ("weight", layer.kernel),
            ("bias", layer.bias),
        ):
            key = f"{prefix}.{weight}"
            if key not in tensors:
                problems.append(f"missing from the file: {key}")
                continue
            value = _to_keras_layout(tensors[key])
            if tuple(value.shape) != tuple(variable.shape):
                problems.append(
                    f"shape mismatch for {key}: the model's {layer.name} has "
                    f"{tuple(variable.shape)}, the file has "
                    f"{tuple(value.shape)} "
                    "(transposed to the Keras layout)"
                )
            values.append((variable, value))
    used = {
        f"{prefix}.{weight}"
        for prefix in layers.values()
        for weight in ("weight", "bias")
    }
    for key in sorted(set(tensors) - used):
        problems.append(f"not in the model: {key}")
    _raise_problems(problems, directory)
    return values


def _head_layer_keys(head_file_config, tensors, directory):
    """Return `{"pooler" or "output": AdapterHub key prefix}` of the head.

    NOTE: only the two-layer head is compared with PyTorch in the tests. The
    `layers=1, use_pooler=True` and static heads were compared once by hand.
    """
    head_config = head_file_config.get("config")
    if head_config is None:
        # A static transformers head, such as BertForSequenceClassification.
        if "classifier.weight" in tensors:
            return {"output": "classifier"}
        raise ValueError(
            f"The head in {directory!r} has no config and no "
            "'classifier.weight', so its layout is unknown. Pass "
            "`load_head=False` to load the adapter alone."
        )

    head_name = head_file_config.get("name")
    head_type = head_config.get("head_type")
    layers = head_config.get("layers")
    use_pooler = head_config.get("use_pooler", False)
    activation = head_config.get("activation_function")
    if head_type != "classification" or not head_config.get("bias", True):
        raise ValueError(
            "Only AdapterHub classification heads with biases load into "
            "keras-hub's BertTextClassifier. Pass `load_head=False` to load "
            f"the adapter alone. Received: head_type={head_type!r}, "
            f"bias={head_config.get('bias', True)!r}"
        )
    if layers == 2 and not use_pooler and activation == "tanh":
        return {
            "pooler": f"heads.{head_name}.1",
            "output": f"heads.{head_name}.4",
        }
    if layers == 1 and use_pooler:
        return {"output": f"heads.{head_name}.1"}
    raise ValueError(
        "keras-hub's BertTextClassifier computes a tanh dense layer on the "
        "[CLS] state followed by the output dense layer, which matches "
        "AdapterHub heads with layers=2, activation_function='tanh' and "
        "use_pooler=False, or with layers=1 and use_pooler=True. Pass "
        f"`load_head=False` to load the adapter alone. Received: "
        f"layers={layers!r}, activation_function={activation!r}, "
        f"use_pooler={use_pooler!r}"
    )


def _check_layer_norm_epsilon(config, layer_kwargs):
    epsilon = layer_kwargs.get("layer_norm_epsilon", 1e-5)
    if config.layer_norm is not None and epsilon != 1e-5:
        raise ValueError(
            "AdapterHub's adapter layer norms use PyTorch's default epsilon, "
            f"1e-5. Received: layer_norm_epsilon={epsilon}"
        )


def _export_adapter_tensors(model, name, backbone):
    """Return the AdapterHub state dict of adapters `name` as NumPy arrays."""
    config, _ = configs.config_from_settings(
        rewriting._get_state(model).settings[name]
    )
    hub_names = {
        weight: hub_weight
        for hub_weight, weight in _weight_names(config.layer_norm).items()
    }
    tensors = {}
    for key, variable in _adapter_variables(model, name, backbone).items():
        index, placement, weight = key.split("/")
        module = _PLACEMENT_MODULES[placement].format(index=index)
        hub_key = (
            f"{BASE_MODEL_PREFIX}{module}.adapters.{name}.{hub_names[weight]}"
        )
        tensors[hub_key] = _to_torch_layout(variable)
    return tensors


def _to_torch_layout(variable):
    value = keras.ops.convert_to_numpy(variable).astype(np.float32)
    if value.ndim == 2:
        value = value.T
    return np.ascontiguousarray(value)


def _export_head(model, name, hidden_size):
    """Return the head's AdapterHub state dict and config, or `({}, None)`."""
    output_dense = getattr(model, "output_dense", None)
    backbone = rewriting.find_backbone(model)
    if not isinstance(output_dense, keras.layers.Dense):
        logger.info(
            "%s has no classifier head, so only the adapters are exported",
            type(model).__name__,
        )
        return {}, None

    pooled_dense = backbone.pooled_dense
    tensors = {
        f"heads.{name}.1.weight": _to_torch_layout(pooled_dense.kernel),
        f"heads.{name}.1.bias": _to_torch_layout(pooled_dense.bias),
        f"heads.{name}.4.weight": _to_torch_layout(output_dense.kernel),
        f"heads.{name}.4.bias": _to_torch_layout(output_dense.bias),
    }
    num_labels = int(output_dense.units)
    head_config = {
        "activation_function": "tanh",
        "bias": True,
        "dropout_prob": None,
        "head_type": "classification",
        "label2id": {f"LABEL_{index}": index for index in range(num_labels)},
        "layers": 2,
        "num_labels": num_labels,
        "use_pooler": False,
    }
    return tensors, head_config


def _file_config(config, hidden_size, name, model_name):
    """Return the contents of `adapter_config.json` or `head_config.json`."""
    return {
        "config": config,
        "hidden_size": hidden_size,
        "model_class": EXPORT_MODEL_CLASS,
        "model_name": model_name,
        "model_type": "bert",
        "name": name,
        # With a version, AdapterHub reads "gelu" as the exact GELU and does
        # not apply the renames of its legacy files.
        "version": f"keras_adapters.{__version__}",
    }


def _json_bytes(data):
    return (json.dumps(data, indent=2, sort_keys=True) + "\n").encode("utf-8")


def _safetensors_writer(tensors):
    def write(path):
        from safetensors.numpy import save_file

        save_file(tensors, path)

    return write


def _torch_writer(tensors):
    try:
        import torch
    except ImportError as error:
        raise ImportError(
            "Writing `.bin` files needs PyTorch, which is not installed. "
            "Use weights_format='safetensors' and load with "
            "`model.load_adapter(directory, use_safetensors=True)` in "
            "AdapterHub, or install torch."
        ) from error

    def write(path):
        state_dict = {
            key: torch.from_numpy(value) for key, value in tensors.items()
        }
        torch.save(state_dict, path)

    return write


def _check_no_stale_files(directory, written):
    stale = sorted(
        file_name
        for file_name in LAYOUT_FILES
        if file_name not in written
        and os.path.exists(os.path.join(directory, file_name))
    )
    if stale:
        raise ValueError(
            f"{directory!r} already contains AdapterHub files that this export "
            f"would not replace: {stale}. AdapterHub could load them with the "
            "new files and mix two adapters. Remove them, or export to an "
            "empty folder."
        )


def _write_files_atomically(directory, files, writers):
    """Write every file to a temporary path, then rename them all."""
    temporary_paths = {}
    try:
        for file_name in list(files) + list(writers):
            descriptor, temporary_path = tempfile.mkstemp(
                dir=directory, prefix=f".{file_name}.", suffix=".tmp"
            )
            os.close(descriptor)
            temporary_paths[file_name] = temporary_path
            if file_name in files:
                with open(temporary_path, "wb") as file:
                    file.write(files[file_name])
            else:
                writers[file_name](temporary_path)
        for file_name, temporary_path in temporary_paths.items():
            os.replace(temporary_path, os.path.join(directory, file_name))
    finally:
        for temporary_path in temporary_paths.values():
            if os.path.exists(temporary_path):
                os.remove(temporary_path)
