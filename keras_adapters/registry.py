"""Insertion points of adapters in keras-hub transformer blocks.

This module is the one place that depends on keras-hub's block internals. For each
block class it records which sublayer ends each branch of the block, so that
an adapter wrapped around that sublayer runs after the branch's output
projection and dropout and before the block's residual add, where Houlsby et
al. (2019) put it.

The attribute names below were read from keras-hub 0.32 and are private to
keras-hub, so they can change between releases. `register_block` lets users
add or override a block class without editing this package, and
`register_layer_norm` adds a normalization class to the "layer norms"
training group.
"""

import dataclasses

import keras

PLACEMENTS = ("attention", "feedforward", "cross_attention")

# Named choices of placements. "houlsby" follows Houlsby et al. (2019), with
# adapters on both branches. "pfeiffer" follows Pfeiffer et al. (2021), with
# one adapter on the feed-forward branch.
PLACEMENT_PRESETS = {
    "houlsby": ("attention", "feedforward"),
    "pfeiffer": ("feedforward",),
}


@dataclasses.dataclass(frozen=True)
class InsertionPoints:
    """Candidate attribute names of the sublayers that end each branch.

    Each field is a tuple of attribute names of the block, last in call
    order first, or empty when the block has no such branch. The first
    candidate that the block has and that is not `None` is the insertion
    point. So when a branch's last sublayer exists only under some settings,
    such as a dropout created only when `dropout > 0`, the sublayer before it
    is used. An adapter wraps that attribute's layer and acts on
    its output.

    Args:
        attention: candidates for the sublayer that ends the self-attention
            branch.
        feedforward: candidates for the sublayer that ends the feed-forward
            branch.
        cross_attention: candidates for the sublayer that ends the
            cross-attention branch.
        feedforward_input: candidates for the first sublayer of the
            feed-forward branch, whose input parallel adapters read.
        prepare: callable or `None`. Called with the block before adapters
            are inserted, for blocks that need a sublayer created first, such
            as an identity layer at an output that the block computes
            inline.
    """

    attention: tuple = ()
    feedforward: tuple = ()
    cross_attention: tuple = ()
    feedforward_input: tuple = ()
    prepare: object = None

    def candidates(self, placement):
        """Return the candidate attribute names for `placement`."""
        return getattr(self, placement)

    def attribute(self, block, placement):
        """Return the attribute of `block` that ends `placement`, or `None`.

        The result is the first candidate that `block` has and that is not
        `None`.
        """
        for name in self.candidates(placement):
            if getattr(block, name, None) is not None:
                return name
        return None


_REGISTRY = {}

_LAYER_NORM_CLASSES = []


def register_block(
    block_class,
    attention=None,
    feedforward=None,
    cross_attention=None,
    feedforward_input=None,
    prepare=None,
):
    """Register where adapters go in blocks of `block_class`.

    Each branch argument names the attribute that contains the last sublayer of
    the branch before the block's residual add, or lists candidate
    attributes, last in call order first. The first candidate that a block
    has and that is not `None` is used. Registering a class again replaces
    its entry.

    Nothing checks how the block calls the named sublayer. The adapter lands
    in the Houlsby position only if the block calls that sublayer exactly
    once per call, on the branch's output. A sublayer that the block creates
    but never calls, or calls on several branches, puts the adapter in the
    wrong place.

    Args:
        block_class: the block's class, such as
            `keras_hub.layers.TransformerEncoder`.
        attention: string, list of strings or `None`. Attribute ending the
            self-attention branch.
        feedforward: string, list of strings or `None`. Attribute ending
            the feed-forward branch.
        cross_attention: string, list of strings or `None`. Attribute ending
            the cross-attention branch.
        feedforward_input: string, list of strings or `None`. Attribute of
            the first sublayer that the feed-forward branch calls on its
            input. Parallel adapters need it, because they read that input.
        prepare: callable or `None`. Called as `prepare(block)` before
            adapters are inserted into a block of this class. Use it to
            create a sublayer that the branch arguments can name, where the
            block computes a branch's output inline.

    Example:

    ```python
    keras_adapters.register_block(
        MyBlock,
        attention="attention_dropout",
        feedforward=["ffn_dropout", "ffn_output_dense"],
    )
    ```
    """
    if not isinstance(block_class, type):
        raise ValueError(
            "`block_class` must be a class. Received: "
            f"block_class={block_class!r}"
        )
    branches = {
        "attention": _candidate_tuple("attention", attention),
        "feedforward": _candidate_tuple("feedforward", feedforward),
        "cross_attention": _candidate_tuple("cross_attention", cross_attention),
    }
    if not any(branches.values()):
        raise ValueError(
            "Give at least one of `attention`, `feedforward` or "
            f"`cross_attention` when registering {block_class.__name__}."
        )
    if prepare is not None and not callable(prepare):
        raise ValueError(
            f"`prepare` must be callable or `None`. Received: prepare={prepare!r}"
        )
    _REGISTRY[block_class] = InsertionPoints(
        feedforward_input=_candidate_tuple(
            "feedforward_input", feedforward_input
        ),
        prepare=prepare,
        **branches,
    )


def _candidate_tuple(argument, value):
    if value is None:
        return ()
    if isinstance(value, str):
        value = (value,)
    if not isinstance(value, (list, tuple)) or not all(
        isinstance(name, str) and name for name in value
    ):
        raise ValueError(
            f"`{argument}` must be an attribute name or a list of attribute "
            f"names. Received: {argument}={value!r}"
        )
    return tuple(value)


def get_insertion_points(block_class):
    """Return the `InsertionPoints` of `block_class`, or `None`.

    Only the exact class is looked up, because a subclass may call its
    sublayers in another order.
    """
    return _REGISTRY.get(block_class)


def registered_blocks():
    """Return a dict of all registered block classes and their points."""
    return dict(_REGISTRY)


def register_layer_norm(layer_class):
    """Count layers of `layer_class` in the "layer norms" training group.

    `add_adapters(..., train_layer_norms=True)` trains the backbone's layers
    of every registered normalization class. `keras.layers.LayerNormalization`
    and the RMS-style norms of keras-hub's text backbones are registered
    already. Subclasses of a registered class count too.

    Args:
        layer_class: a `keras.layers.Layer` subclass.
    """
    if not (isinstance(layer_class, type) and issubclass(layer_class, keras.layers.Layer)):
        raise ValueError(
            "`layer_class` must be a subclass of `keras.layers.Layer`. "
            f"Received: layer_class={layer_class!r}"
        )
    if layer_class not in _LAYER_NORM_CLASSES:
        _LAYER_NORM_CLASSES.append(layer_class)


def layer_norm_classes():
    """Return the registered normalization classes, as a tuple."""
    return tuple(_LAYER_NORM_CLASSES)


def is_layer_norm(layer):
    """Return whether `layer` is an instance of a registered norm class."""
    return isinstance(layer, tuple(_LAYER_NORM_CLASSES))


def resolve_placements(placement):
    """Turn a placement preset name or a list of placements into a tuple."""
    if isinstance(placement, str):
        if placement in PLACEMENT_PRESETS:
            return PLACEMENT_PRESETS[placement]
        if placement in PLACEMENTS:
            return (placement,)
        raise ValueError(
            f"Unknown `placement`. Expected one of "
            f"{sorted(PLACEMENT_PRESETS)} or a list drawn from {PLACEMENTS}. "
            f"Received: placement={placement!r}"
        )

    placements = tuple(placement)
    unknown = [name for name in placements if name not in PLACEMENTS]
    if unknown or not placements or len(set(placements)) != len(placements):
        raise ValueError(
            "`placement` must be a preset name or a non-empty list of "
            f"distinct names from {PLACEMENTS}. Received: "
            f"placement={placement!r}"
        )
    return placements


# The name of the identity sublayer that `_prepare_f_net_encoder` creates at
# the output of F-Net's Fourier mixing.
F_NET_MIXING_ATTRIBUTE = "_keras_adapters_fourier_mixing"


def _prepare_f_net_encoder(block):
    """Give an `FNetEncoder` an identity sublayer after its Fourier mixing.

    keras-hub 0.32's `FNetEncoder.call` computes the Fourier mixing inline,
    so no sublayer ends that branch. This hook adds an identity layer and
    replaces the block's `call` with a copy of keras-hub's that runs the
    identity layer on the mixing output, before the residual add. The
    identity layer changes nothing until adapters wrap it.
    """
    import types

    from keras import ops

    if getattr(block, F_NET_MIXING_ATTRIBUTE, None) is not None:
        return

    def call(self, inputs, training=None):
        input_dtype = inputs.dtype
        real = ops.cast(inputs, "float32")
        mixing_output, _ = ops.fft2((real, ops.zeros_like(real)))
        mixing_output = ops.cast(mixing_output, input_dtype)
        mixing_output = getattr(self, F_NET_MIXING_ATTRIBUTE)(
            mixing_output, training=training
        )
        mixing_output = self._mixing_layer_norm(inputs + mixing_output)

        x = self._intermediate_dense(mixing_output)
        x = self._output_dense(x)
        feed_forward_output = self._output_dropout(x, training=training)
        return self._output_layer_norm(mixing_output + feed_forward_output)

    identity = keras.layers.Identity(
        name="fourier_mixing_output", dtype=block.dtype_policy
    )
    identity.build(None)
    was_locked = block._tracker.locked
    block._tracker.unlock()
    try:
        setattr(block, F_NET_MIXING_ATTRIBUTE, identity)
    finally:
        if was_locked:
            block._tracker.lock()
    block.call = types.MethodType(call, block)


def _register_keras_hub_blocks():
    from keras_hub.layers import FNetEncoder
    from keras_hub.layers import TransformerDecoder
    from keras_hub.layers import TransformerEncoder
    from keras_hub.src.models.bloom.bloom_decoder import BloomDecoder
    from keras_hub.src.models.deberta_v3.disentangled_attention_encoder import (
        DisentangledAttentionEncoder,
    )
    from keras_hub.src.models.esm.esm_encoder import ESMEncoder
    from keras_hub.src.models.falcon.falcon_transformer_decoder import (
        FalconTransformerDecoder,
    )
    from keras_hub.src.models.gemma.gemma_decoder_block import GemmaDecoderBlock
    from keras_hub.src.models.gemma.rms_normalization import (
        RMSNormalization as GemmaRMSNormalization,
    )
    from keras_hub.src.models.gemma3.gemma3_decoder_block import (
        Gemma3DecoderBlock,
    )
    from keras_hub.src.models.gemma3.gemma3_layers import (
        RMSNormalization as Gemma3RMSNormalization,
    )
    from keras_hub.src.models.gpt_neo_x.gpt_neo_x_decoder import GPTNeoXDecoder
    from keras_hub.src.models.llama.llama_decoder import LlamaTransformerDecoder
    from keras_hub.src.models.llama.llama_layernorm import LlamaLayerNorm
    from keras_hub.src.models.mistral.mistral_layer_norm import (
        MistralLayerNormalization,
    )
    from keras_hub.src.models.mistral.mistral_transformer_decoder import (
        MistralTransformerDecoder,
    )
    from keras_hub.src.models.mixtral.mixtral_decoder import (
        MixtralTransformerDecoder,
    )
    from keras_hub.src.models.mixtral.mixtral_layer_norm import (
        MixtralLayerNormalization,
    )
    from keras_hub.src.models.phi3.phi3_decoder import Phi3Decoder
    from keras_hub.src.models.phi3.phi3_layernorm import Phi3LayerNorm
    from keras_hub.src.models.qwen.qwen_decoder import QwenTransformerDecoder
    from keras_hub.src.models.qwen.qwen_layernorm import QwenLayerNorm
    from keras_hub.src.models.qwen3.qwen3_decoder import Qwen3TransformerDecoder
    from keras_hub.src.models.qwen3.qwen3_layernorm import Qwen3LayerNorm
    from keras_hub.src.models.qwen_moe.qwen_moe_decoder import (
        QwenMoeTransformerDecoder,
    )
    from keras_hub.src.models.qwen_moe.qwen_moe_layernorm import QwenMoeLayerNorm
    from keras_hub.src.models.roformer_v2.roformer_v2_attention import RoformerNorm
    from keras_hub.src.models.roformer_v2.roformer_v2_encoder import (
        RoformerV2Encoder,
    )
    from keras_hub.src.models.smollm3.smollm3_layers import SmolLM3DecoderLayer
    from keras_hub.src.models.t5.t5_layer_norm import T5LayerNorm
    from keras_hub.src.models.t5.t5_transformer_layer import T5TransformerLayer

    # The notes below describe the call order in keras-hub 0.32.

    # BERT, RoBERTa, XLM-RoBERTa, DistilBERT, ALBERT, ELECTRA and the BART
    # encoder. Both dropouts always exist, with rate 0 when dropout is off,
    # and each runs once, right before its residual add.
    register_block(
        TransformerEncoder,
        attention="_self_attention_dropout",
        feedforward="_feedforward_dropout",
        feedforward_input="_feedforward_intermediate_dense",
    )
    # GPT-2, OPT and the BART decoder. The cross-attention sublayers exist
    # only in decoders built with an encoder sequence.
    register_block(
        TransformerDecoder,
        attention="_self_attention_dropout",
        feedforward="_feedforward_dropout",
        cross_attention="_cross_attention_dropout",
        feedforward_input="_feedforward_intermediate_dense",
    )
    # DeBERTa-v3.
    register_block(
        DisentangledAttentionEncoder,
        attention="_self_attention_dropout",
        feedforward="_feedforward_dropout",
        feedforward_input="_feedforward_intermediate_dense",
    )
    # RoFormer-v2 and ESM call one `dropout_layer` on several branches, so
    # the adapter wraps the projection before it.
    register_block(
        RoformerV2Encoder,
        attention="attention_layer",
        feedforward="feedforward_output_dense",
    )
    register_block(
        ESMEncoder,
        attention="attention_layer",
        feedforward="feedforward_output_dense",
    )
    # F-Net mixes tokens with an inline Fourier transform in place of
    # attention, so the "attention" adapter follows the mixing.
    register_block(
        FNetEncoder,
        attention=F_NET_MIXING_ATTRIBUTE,
        feedforward="_output_dropout",
        prepare=_prepare_f_net_encoder,
    )

    # Llama-style decoders have no dropout after the feed-forward output.
    # Their feed-forward branch calls the gate projection first.
    for block_class in (
        LlamaTransformerDecoder,
        MistralTransformerDecoder,
        QwenTransformerDecoder,
        Qwen3TransformerDecoder,
    ):
        register_block(
            block_class,
            attention="_self_attention_dropout",
            feedforward="_feedforward_output_dense",
            feedforward_input="_feedforward_gate_dense",
        )
    # The mixture-of-experts sublayers return `(outputs, router_logits)`.
    register_block(
        MixtralTransformerDecoder,
        attention="_self_attention_dropout",
        feedforward="_sparse_moe_block",
    )
    # NOTE: QwenMoeTransformerDecoder passes `attention_mask` to `mlp` only
    # when `mlp` is a QwenSparseMoeBlock, so once wrapped, the router's
    # load-balancing loss in training also counts padded tokens. Inference
    # outputs are unaffected.
    register_block(
        QwenMoeTransformerDecoder,
        attention="_self_attention_dropout",
        feedforward="mlp",
    )
    # GPT-NeoX adds both branches to the block input in parallel. Its
    # `_feedforward_dropout` is created but never called.
    register_block(
        GPTNeoXDecoder,
        attention="_self_attention_dropout",
        feedforward="_feedforward_output_dense",
    )
    # Bloom adds the attention output to the residual without a dropout.
    register_block(
        BloomDecoder,
        attention="_self_attention_layer",
        feedforward="_dropout_layer",
    )
    register_block(
        FalconTransformerDecoder,
        attention="attention_dropout",
        feedforward="feedforward_dropout",
    )
    register_block(
        Phi3Decoder,
        attention="attention_dropout",
        feedforward="feedforward_dropout",
    )
    # Gemma creates its dropouts only when `dropout > 0` and its post-norms
    # only when asked to, and its `feedforward_dropout` is never called.
    for block_class in (GemmaDecoderBlock, Gemma3DecoderBlock):
        register_block(
            block_class,
            attention=("attention_dropout", "post_attention_norm", "attention"),
            feedforward=("post_ffw_norm", "ffw_linear"),
        )
    register_block(SmolLM3DecoderLayer, attention="self_attn", feedforward="mlp")
    # T5 calls `dropout_layer` twice in the feed-forward branch, so the
    # adapter wraps the output projection between those calls.
    register_block(
        T5TransformerLayer,
        attention="self_attention_dropout",
        feedforward="output_projector",
        cross_attention="cross_attention_dropout",
    )

    for layer_class in (
        keras.layers.LayerNormalization,
        keras.layers.RMSNormalization,
        GemmaRMSNormalization,
        Gemma3RMSNormalization,
        LlamaLayerNorm,
        MistralLayerNormalization,
        MixtralLayerNormalization,
        Phi3LayerNorm,
        QwenLayerNorm,
        Qwen3LayerNorm,
        QwenMoeLayerNorm,
        RoformerNorm,
        T5LayerNorm,
    ):
        register_layer_norm(layer_class)


_register_keras_hub_blocks()
