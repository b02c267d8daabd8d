"""Bottleneck adapters for Keras 3 and keras-hub."""

from keras_adapters.composition import add_fusion
from keras_adapters.composition import average_adapters
from keras_adapters.composition import remove_fusion
from keras_adapters.configs import AdapterConfig
from keras_adapters.configs import get_adapter_config
from keras_adapters.layers import AdaptedSublayer
from keras_adapters.layers import AdapterFusion
from keras_adapters.layers import AdapterLayer
from keras_adapters.layers import BranchInputTap
from keras_adapters.export import export_saved_model
from keras_adapters.persistence import load_adapters
from keras_adapters.persistence import read_adapter_config
from keras_adapters.persistence import save_adapters
from keras_adapters.registry import InsertionPoints
from keras_adapters.registry import register_block
from keras_adapters.registry import register_layer_norm
from keras_adapters.registry import registered_blocks
from keras_adapters.rewriting import ParameterCounts
from keras_adapters.rewriting import active_adapters
from keras_adapters.rewriting import adapter_names
from keras_adapters.rewriting import add_adapters
from keras_adapters.rewriting import count_parameters
from keras_adapters.rewriting import fusion_names
from keras_adapters.rewriting import remove_adapters
from keras_adapters.rewriting import set_active_adapters
from keras_adapters.version import __version__
