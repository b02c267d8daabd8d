"""Save and load adapters as small files, apart from the frozen backbone.

An adapter file is a safetensors file. Its tensors are the trained weights,
stored as float32 and keyed by stable layer paths such as
`adapters/backbone/transformer_layer_0/attention/down_kernel`. Its metadata
contains one JSON config, under the key `keras_adapters`, with what
`load_adapters` needs to rebuild the adapters on a fresh model of the same
preset.
"""

import json
import os
import tempfile

import keras
import numpy as np

from keras_adapters import composition
from keras_adapters import configs
from keras_adapters import registry
from keras_adapters import rewriting
from keras_adapters import serialization
from keras_adapters.version import __version__

FORMAT_VERSION = 1
METADATA_KEY = "keras_adapters"

ADAPTERS_GROUP = "adapters"
LAYER_NORMS_GROUP = "layer_norms"
HEAD_GROUP = "head"

# The first bytes of every HDF5 file, such as Keras `.weights.h5` files.
HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"


def save_adapters(model, path, name=None, preset=None):
    """Save the adapters called `name`, and what else trained, to `path`.

    The file contains the adapters' weights and, when they were trained, the
    backbone's layer norms and the task head. It contains every layer norm
    of the backbone, also the frozen ones below the lowest adapted block,
    so that it loads the same whichever other adapters are active. The
    other frozen backbone weights are not saved. The file is written to a
    temporary file beside `path` and then renamed, so a failed save never
    leaves a partial file at `path` or replaces a good one.

    Args:
        model: a model adapted with `keras_adapters.add_adapters`.
        path: string or path-like. Destination, by convention ending in
            `.safetensors`.
        name: string or `None`. Adapters or fusion to save. May be left out
            when the model has one set of adapters. A fusion's file contains
            the fusion weights only, and loads into a model that has the
            fused adapters.
        preset: string or `None`. The keras-hub preset the base model was
            loaded from, recorded in the file's config for readers. keras-hub
            0.32 does not record on a model which preset built it, so it
            cannot be found out here. `load_adapters` does not check it.

    Returns:
        The path written, as a string.
    """
    from safetensors.numpy import save_file

    path = os.fspath(path)
    name = _pick_name(model, name)
    state = rewriting._get_state(model) or rewriting._AdapterState()

    tensors = {}
    is_fusion = name in state.fusions
    for key, variable in _saved_variables(model, name, state, is_fusion).items():
        tensors[key] = np.ascontiguousarray(
            keras.ops.convert_to_numpy(variable).astype(np.float32)
        )
    config = _file_config(model, name, state, preset)
    metadata = {METADATA_KEY: json.dumps(config, sort_keys=True)}

    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise FileNotFoundError(
            f"Cannot save adapters: the folder {directory!r} does not exist."
        )
    descriptor, temporary_path = tempfile.mkstemp(
        dir=directory, prefix=f".{os.path.basename(path)}.", suffix=".tmp"
    )
    os.close(descriptor)
    try:
        save_file(tensors, temporary_path, metadata=metadata)
        os.replace(temporary_path, path)
    except BaseException:
        if os.path.exists(temporary_path):
            os.remove(temporary_path)
        raise
    return path


def read_adapter_config(path):
    """Return the JSON config stored in the adapter file at `path`.

    Raises:
        FileNotFoundError: if `path` does not exist.
        ValueError: if the file is not a readable adapter file of a
            supported format version.
    """
    config, _ = _open(path, read_tensors=False)
    return config


def load_adapters(model, path, name=None):
    """Load adapters saved by `save_adapters` into `model`.

    When `model` has no adapters of that name yet, they are added first
    with the settings recorded in the file, so a freshly built model of the
    same preset can take the file directly. The whole file is checked
    against the model before any weight is assigned, so a failed load
    leaves the model as it was.

    Args:
        model: a keras-hub backbone or task model of the architecture the
            file was saved from.
        path: string or path-like. An adapter file.
        name: string or `None`. Name to load the adapters under. Defaults to
            the name they were saved with.

    Returns:
        The name the adapters were loaded under.
    """
    config, tensors = _open(path, read_tensors=True)
    _check_base_model(model, config, path)
    name = name or config["adapter_name"]
    is_fusion = config.get("kind", "adapters") == "fusion"

    added = False
    if is_fusion:
        if name not in rewriting.fusion_names(model):
            _check_fused_adapters_present(model, config, path)
            composition.add_fusion(
                model,
                config["fusion"]["adapter_names"],
                name=name,
                temperature=config["fusion"]["temperature"],
            )
            added = True
    elif name not in rewriting.adapter_names(model):
        adapter_config, layer_kwargs = configs.config_from_settings(config)
        rewriting.add_adapters(
            model,
            name=name,
            config=adapter_config,
            train_layer_norms=config["trained"]["layer_norms"],
            train_head=config["trained"]["head"],
            **layer_kwargs,
        )
        added = True

    try:
        state = rewriting._AdapterState(
            train_layer_norms=config["trained"]["layer_norms"],
            train_head=config["trained"]["head"],
        )
        targets = _saved_variables(model, name, state, is_fusion)
        _check_tensors(targets, tensors, path)
    except ValueError:
        if added and is_fusion:
            composition.remove_fusion(model, name)
        elif added:
            rewriting.remove_adapters(model, name)
        raise

    for key, variable in targets.items():
        variable.assign(tensors[key].astype(variable.dtype))
    rewriting.reset_compiled_functions(model)
    return name


def _check_fused_adapters_present(model, config, path):
    fused = config["fusion"]["adapter_names"]
    missing = [n for n in fused if n not in rewriting.adapter_names(model)]
    if missing:
        raise ValueError(
            f"The fusion file {path!r} fuses the adapters {fused}, but the "
            f"model has no adapters named {missing}. Load their adapter "
            "files first, with `keras_adapters.load_adapters`."
        )


def _saved_variables(model, name, state, is_fusion=False):
    """Return `{key: variable}` for what `save_adapters` writes."""
    variables = {}
    if is_fusion:
        layers = composition.iter_fusions(model, name)
    else:
        layers = rewriting.iter_adapters(model, name)
    for key, adapter in layers:
        for variable in adapter.weights:
            variables[f"{ADAPTERS_GROUP}/{key}/{variable.name}"] = variable

    backbone = rewriting.find_backbone(model)
    head_ids = {id(layer) for layer in rewriting.head_layers(model)}
    for path, layer in rewriting.named_layers(model):
        if state.train_layer_norms and _is_backbone_layer_norm(
            path, layer, backbone
        ):
            group = LAYER_NORMS_GROUP
        elif state.train_head and id(layer) in head_ids:
            group = HEAD_GROUP
        else:
            continue
        for variable in layer.weights:
            variables[f"{group}/{path}/{variable.name}"] = variable
    return variables


def _is_backbone_layer_norm(path, layer, backbone):
    if not registry.is_layer_norm(layer):
        return False
    return backbone is None or path.startswith(rewriting.BACKBONE_PATH + "/")


def _file_config(model, name, state, preset):
    if name in state.fusions:
        entries = {"kind": "fusion", "fusion": state.fusions[name]}
    elif name in state.settings:
        entries = {"kind": "adapters", **state.settings[name]}
    else:
        raise ValueError(
            f"The model has adapters named '{name}' but no record of their "
            "settings. Add adapters with `keras_adapters.add_adapters` "
            "before saving them."
        )
    return {
        "format_version": FORMAT_VERSION,
        "keras_adapters_version": __version__,
        "adapter_name": name,
        **entries,
        "trained": {
            "adapters": state.train_adapters,
            "layer_norms": state.train_layer_norms,
            "head": state.train_head,
        },
        "base_model": {**base_model_identity(model), "preset": preset},
    }


def base_model_identity(model):
    """Return the facts that an adapter file must match to load."""
    blocks = rewriting.find_blocks(model)
    backbone = rewriting.find_backbone(model)
    return {
        "backbone_class": _class_name(backbone) if backbone else None,
        "task_class": _class_name(model) if backbone is not model else None,
        "block_class": type(blocks[0][1]).__name__,
        "hidden_size": rewriting._hidden_size(blocks[0][1]),
        "num_blocks": len(blocks),
    }


def _class_name(model):
    return serialization.base_class(type(model)).__name__


def _check_base_model(model, config, path):
    saved = config["base_model"]
    current = base_model_identity(model)
    for key in ("backbone_class", "block_class", "hidden_size", "num_blocks"):
        if saved.get(key) != current[key]:
            raise ValueError(
                f"The adapter file {path!r} was saved from a model with "
                f"{key}={saved.get(key)!r}, but the model it is loaded into "
                f"has {key}={current[key]!r}."
            )


def tensor_problems(targets, tensors, shape_note=""):
    """Return the problems that keep `tensors` from loading into `targets`.

    `targets` maps keys to model variables and `tensors` keys to arrays
    read from a file. `shape_note` is appended to each shape mismatch.
    """
    problems = []
    for key in sorted(set(targets) - set(tensors)):
        problems.append(f"missing from the file: {key}")
    for key in sorted(set(tensors) - set(targets)):
        problems.append(f"not in the model: {key}")
    for key in sorted(set(targets) & set(tensors)):
        expected = tuple(targets[key].shape)
        received = tuple(tensors[key].shape)
        if expected != received:
            problems.append(
                f"shape mismatch for {key}: the model has {expected}, the "
                f"file has {received}{shape_note}"
            )
    return problems


def _check_tensors(targets, tensors, path):
    problems = tensor_problems(targets, tensors)
    if problems:
        shown = "\n  ".join(problems[:10])
        more = len(problems) - 10
        extra = f"\n  ... and {more} more" if more > 0 else ""
        raise ValueError(
            f"The adapter file {path!r} does not fit the model, so nothing "
            f"was loaded:\n  {shown}{extra}"
        )


def _open(path, read_tensors):
    from safetensors import SafetensorError
    from safetensors import safe_open

    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"Adapter file not found: {path!r}")
    with open(path, "rb") as file:
        signature = file.read(len(HDF5_SIGNATURE))
    if signature == HDF5_SIGNATURE:
        raise ValueError(
            f"Cannot read {path!r} as an adapter file: it is an HDF5 file, "
            "not a valid safetensors file. Keras `.weights.h5` files load "
            "with `model.load_weights`, and keras-hub `.lora.h5` files with "
            "`backbone.load_lora_weights`."
        )

    try:
        with safe_open(path, framework="np") as file:
            metadata = file.metadata() or {}
            tensors = None
            if read_tensors:
                tensors = {key: file.get_tensor(key) for key in file.keys()}
    except (SafetensorError, OSError, ValueError) as error:
        raise ValueError(
            f"Cannot read {path!r} as an adapter file. It is not a valid "
            f"safetensors file, or it is truncated or corrupted: {error}"
        ) from error

    if METADATA_KEY not in metadata:
        raise ValueError(
            f"{path!r} is a safetensors file but not a keras_adapters "
            f"adapter file: its metadata has no '{METADATA_KEY}' entry. "
            "Adapter files are written by `keras_adapters.save_adapters`."
        )
    try:
        config = json.loads(metadata[METADATA_KEY])
    except json.JSONDecodeError as error:
        raise ValueError(
            f"The adapter config in {path!r} is not valid JSON: {error}"
        ) from error

    version = config.get("format_version")
    if version != FORMAT_VERSION:
        raise ValueError(
            f"Unsupported adapter file format version in {path!r}. This "
            f"keras_adapters {__version__} reads version {FORMAT_VERSION}. "
            f"Received: format_version={version!r}"
        )
    return config, tensors


def _pick_name(model, name):
    names = rewriting.adapter_names(model) + rewriting.fusion_names(model)
    if name is None:
        if len(names) != 1:
            raise ValueError(
                "Pass `name` to pick the adapters to save. Adapters present: "
                f"{names}"
            )
        return names[0]
    if name not in names:
        raise ValueError(
            f"The model has no adapters named '{name}'. Adapters present: "
            f"{names}"
        )
    return name
