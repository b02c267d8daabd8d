"""Tiny randomly initialised instances of every supported keras-hub backbone.

Each entry of `BACKBONES` builds a backbone with hidden size 16, 2 layers and
a vocabulary of 64, so the whole contract suite runs in minutes on a CPU.
"""

import dataclasses

import keras
import keras_hub
import numpy as np

VOCABULARY_SIZE = 64
HIDDEN_SIZE = 16
NUM_LAYERS = 2
SEQUENCE_LENGTH = 8
BATCH_SIZE = 2

_SIZES = dict(
    vocabulary_size=VOCABULARY_SIZE,
    num_layers=NUM_LAYERS,
    hidden_dim=HIDDEN_SIZE,
    intermediate_dim=32,
)
_LLAMA_STYLE = dict(_SIZES, num_query_heads=2, num_key_value_heads=1)


@dataclasses.dataclass(frozen=True)
class BackboneCase:
    """How to build and feed one tiny backbone.

    Args:
        name: the backbone's name in the support table.
        build: callable returning the backbone.
        inputs: the backbone's inputs: "encoder" (token ids and padding
            mask), "segments" (with segment ids too), "tokens_and_segments"
            (no padding mask), "tokens" or "seq2seq".
        causal_lm: the causal LM task class, or `None`.
        num_blocks: distinct registered blocks in the backbone.
        placements: the placements that the test inserts.
    """

    name: str
    build: object
    inputs: str = "encoder"
    causal_lm: object = None
    num_blocks: int = NUM_LAYERS
    placements: tuple = ("attention", "feedforward")


def _case(name, build, **kwargs):
    return BackboneCase(name=name, build=build, **kwargs)


models = keras_hub.models

BACKBONES = [
    # Encoders.
    _case(
        "BERT",
        lambda: models.BertBackbone(
            num_heads=2, max_sequence_length=SEQUENCE_LENGTH, **_SIZES
        ),
        inputs="segments",
    ),
    _case(
        "RoBERTa",
        lambda: models.RobertaBackbone(
            num_heads=2, max_sequence_length=SEQUENCE_LENGTH, **_SIZES
        ),
    ),
    _case(
        "XLM-RoBERTa",
        lambda: models.XLMRobertaBackbone(
            num_heads=2, max_sequence_length=SEQUENCE_LENGTH, **_SIZES
        ),
    ),
    _case(
        "DistilBERT",
        lambda: models.DistilBertBackbone(
            num_heads=2, max_sequence_length=SEQUENCE_LENGTH, **_SIZES
        ),
    ),
    _case(
        "ALBERT",
        # One shared TransformerEncoder runs at both depths.
        lambda: models.AlbertBackbone(
            num_heads=2,
            embedding_dim=8,
            num_groups=1,
            num_inner_repetitions=1,
            max_sequence_length=SEQUENCE_LENGTH,
            **_SIZES,
        ),
        inputs="segments",
        num_blocks=1,
    ),
    _case(
        "ELECTRA",
        lambda: models.ElectraBackbone(
            vocab_size=VOCABULARY_SIZE,
            num_layers=NUM_LAYERS,
            num_heads=2,
            hidden_dim=HIDDEN_SIZE,
            intermediate_dim=32,
            embedding_dim=8,
            max_sequence_length=SEQUENCE_LENGTH,
        ),
        inputs="segments",
    ),
    _case(
        "DeBERTa-v3",
        lambda: models.DebertaV3Backbone(
            num_heads=2,
            max_sequence_length=SEQUENCE_LENGTH,
            bucket_size=4,
            **_SIZES,
        ),
    ),
    _case(
        "RoFormer-v2",
        lambda: models.RoformerV2Backbone(
            num_heads=2, head_size=8, **_SIZES
        ),
        inputs="tokens_and_segments",
    ),
    _case(
        "ESM", lambda: models.ESMBackbone(num_heads=2, **_SIZES), inputs="tokens"
    ),
    _case(
        "F-Net",
        lambda: models.FNetBackbone(
            max_sequence_length=SEQUENCE_LENGTH, **_SIZES
        ),
        inputs="segments",
    ),
    # Decoders.
    _case(
        "GPT-2",
        lambda: models.GPT2Backbone(
            num_heads=2, max_sequence_length=SEQUENCE_LENGTH, **_SIZES
        ),
        causal_lm=models.GPT2CausalLM,
    ),
    _case(
        "OPT",
        lambda: models.OPTBackbone(
            num_heads=2, max_sequence_length=SEQUENCE_LENGTH, **_SIZES
        ),
        causal_lm=models.OPTCausalLM,
    ),
    _case(
        "GPT-NeoX",
        lambda: models.GPTNeoXBackbone(
            num_heads=2, max_sequence_length=SEQUENCE_LENGTH, **_SIZES
        ),
        causal_lm=models.GPTNeoXCausalLM,
    ),
    _case(
        "Bloom",
        lambda: models.BloomBackbone(num_heads=2, **_SIZES),
        causal_lm=models.BloomCausalLM,
    ),
    _case(
        "Falcon",
        lambda: models.FalconBackbone(num_attention_heads=2, **_SIZES),
        causal_lm=models.FalconCausalLM,
    ),
    _case(
        "Gemma",
        lambda: models.GemmaBackbone(
            num_query_heads=2, num_key_value_heads=1, head_dim=8, **_SIZES
        ),
        causal_lm=models.GemmaCausalLM,
    ),
    _case(
        "Gemma 3",
        # Post-norms on, so the adapters land after them.
        lambda: models.Gemma3Backbone(
            image_size=16,
            num_query_heads=2,
            num_key_value_heads=1,
            head_dim=8,
            use_post_ffw_norm=True,
            use_post_attention_norm=True,
            **_SIZES,
        ),
        causal_lm=models.Gemma3CausalLM,
    ),
    _case(
        "Llama",
        lambda: models.LlamaBackbone(**_LLAMA_STYLE),
        causal_lm=models.LlamaCausalLM,
    ),
    _case(
        "Llama 3",
        lambda: models.Llama3Backbone(**_LLAMA_STYLE),
        causal_lm=models.Llama3CausalLM,
    ),
    _case(
        "Mistral",
        lambda: models.MistralBackbone(**_LLAMA_STYLE),
        causal_lm=models.MistralCausalLM,
    ),
    _case(
        "Mixtral",
        lambda: models.MixtralBackbone(num_experts=2, top_k=1, **_LLAMA_STYLE),
        causal_lm=models.MixtralCausalLM,
    ),
    _case(
        "Qwen",
        lambda: models.QwenBackbone(**_LLAMA_STYLE),
        causal_lm=models.QwenCausalLM,
    ),
    _case(
        "Qwen 3",
        lambda: models.Qwen3Backbone(head_dim=8, **_LLAMA_STYLE),
        causal_lm=models.Qwen3CausalLM,
    ),
    _case(
        "Qwen-MoE",
        lambda: models.QwenMoeBackbone(
            moe_intermediate_dim=16,
            shared_expert_intermediate_dim=16,
            num_experts=2,
            top_k=1,
            **_LLAMA_STYLE,
        ),
        causal_lm=models.QwenMoeCausalLM,
    ),
    _case(
        "Phi-3",
        lambda: models.Phi3Backbone(
            max_sequence_length=SEQUENCE_LENGTH,
            pretraining_sequence_length=SEQUENCE_LENGTH,
            **_LLAMA_STYLE,
        ),
        causal_lm=models.Phi3CausalLM,
    ),
    _case(
        "SmolLM3",
        lambda: models.SmolLM3Backbone(
            num_attention_heads=2,
            num_key_value_heads=1,
            attention_bias=False,
            attention_dropout=0.0,
            rope_layer_enabled_list=[True] * NUM_LAYERS,
            layer_types=["attention"] * NUM_LAYERS,
            mlp_bias=False,
            layer_norm_epsilon=1e-6,
            max_position_embeddings=SEQUENCE_LENGTH,
            rope_theta=10000.0,
            partial_rotary_factor=1.0,
            **_SIZES,
        ),
        causal_lm=models.SmolLM3CausalLM,
    ),
    # Encoder-decoders.
    _case(
        "BART",
        lambda: models.BartBackbone(
            num_heads=2, max_sequence_length=SEQUENCE_LENGTH, **_SIZES
        ),
        inputs="seq2seq",
        # Encoder and decoder blocks.
        num_blocks=2 * NUM_LAYERS,
        placements=("attention", "feedforward", "cross_attention"),
    ),
    _case(
        "T5",
        lambda: models.T5Backbone(num_heads=2, **_SIZES),
        inputs="seq2seq",
        num_blocks=2 * NUM_LAYERS,
        placements=("attention", "feedforward", "cross_attention"),
    ),
]

BACKBONES_BY_NAME = {case.name: case for case in BACKBONES}
CAUSAL_LMS = [case for case in BACKBONES if case.causal_lm is not None]


def make_backbone(case, seed=0):
    keras.utils.set_random_seed(seed)
    return case.build()


def make_inputs(case, seed=0):
    """Return a batch for `case`, with the last example half padded."""
    rng = np.random.default_rng(seed)
    shape = (BATCH_SIZE, SEQUENCE_LENGTH)
    token_ids = rng.integers(1, VOCABULARY_SIZE, shape).astype("int32")
    padding_mask = np.ones(shape, dtype=bool)
    padding_mask[-1, SEQUENCE_LENGTH // 2 :] = False
    token_ids[~padding_mask] = 0

    if case.inputs == "seq2seq":
        return {
            "encoder_token_ids": token_ids,
            "encoder_padding_mask": padding_mask,
            "decoder_token_ids": token_ids[:, ::-1].copy(),
            "decoder_padding_mask": padding_mask[:, ::-1].copy(),
        }
    inputs = {"token_ids": token_ids}
    if case.inputs in ("encoder", "segments"):
        inputs["padding_mask"] = padding_mask
    if case.inputs in ("segments", "tokens_and_segments"):
        inputs["segment_ids"] = np.zeros_like(token_ids)
    return inputs


def case_id(case):
    """Return the pytest id of `case`, such as "gemma_3" for "Gemma 3"."""
    return case.name.lower().replace(" ", "_").replace("-", "_")


def backbone_outputs(model, inputs):
    """Return the model's inference outputs, flattened into one array."""
    outputs = model(inputs, training=False)
    if isinstance(outputs, dict):
        outputs = [outputs[key] for key in sorted(outputs)]
    else:
        outputs = [outputs]
    return np.concatenate(
        [keras.ops.convert_to_numpy(value).astype("float64").ravel() for value in outputs]
    )
