"""Insertion points of adapters in keras-hub transformer blocks.

This module is the one place that depends on keras-hub's block internals. For each
block class it records which sublayer ends each branch of the block, so that
an adapter wrapped around that sublayer runs after the branch's output
projection and dropout and before the block's residual add, where Houlsby et
al. (2019) put it.

The attribute names below were read from keras-hub 0.32 and are private to
keras-hub, so they can change between releases. `register_block` lets users
add or override a block class without editing this package.
"""

import dataclasses

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
    """Attribute names of the sublayers that end each branch of a block.

    Each field names an attribute of the block, or is `None` when the block
    has no such branch. An adapter wraps that attribute's layer and acts on
    its output.

    Args:
        attention: the sublayer that ends the self-attention branch.
        feedforward: the sublayer that ends the feed-forward branch.
        cross_attention: the sublayer that ends the cross-attention branch.
    """

    attention: str = None
    feedforward: str = None
    cross_attention: str = None

    def attribute(self, placement):
        """Return the attribute name for `placement`, or `None`."""
        return getattr(self, placement)


_REGISTRY = {}


def register_block(
    block_class, attention=None, feedforward=None, cross_attention=None
):
    """Register where adapters go in blocks of `block_class`.

    Each argument names the attribute that contains the last sublayer of a
    branch before the block's residual add. Registering a class again
    replaces its entry.

    Args:
        block_class: the block's class, such as
            `keras_hub.layers.TransformerEncoder`.
        attention: string or `None`. Attribute ending the self-attention
            branch.
        feedforward: string or `None`. Attribute ending the feed-forward
            branch.
        cross_attention: string or `None`. Attribute ending the
            cross-attention branch.

    Example:

    ```python
    keras_adapters.register_block(
        MyBlock, attention="attention_dropout", feedforward="ffn_dropout"
    )
    ```
    """
    if not isinstance(block_class, type):
        raise ValueError(
            "`block_class` must be a class. Received: "
            f"block_class={block_class!r}"
        )
    if attention is None and feedforward is None and cross_attention is None:
        raise ValueError(
            "Give at least one of `attention`, `feedforward` or "
            f"`cross_attention` when registering {block_class.__name__}."
        )
    _REGISTRY[block_class] = InsertionPoints(
        attention=attention,
        feedforward=feedforward,
        cross_attention=cross_attention,
    )


def get_insertion_points(block_class):
    """Return the `InsertionPoints` of `block_class`, or `None`.

    Only the exact class is looked up, because a subclass may call its
    sublayers in another order.
    """
    return _REGISTRY.get(block_class)


def registered_blocks():
    """Return a dict of all registered block classes and their points."""
    return dict(_REGISTRY)


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


def _register_keras_hub_blocks():
    from keras_hub.layers import TransformerEncoder

    # TransformerEncoder (keras-hub 0.32) always creates both dropouts, with
    # rate 0 when dropout is off, and calls each once, right before the
    # residual add.
    register_block(
        TransformerEncoder,
        attention="_self_attention_dropout",
        feedforward="_feedforward_dropout",
    )


_register_keras_hub_blocks()
