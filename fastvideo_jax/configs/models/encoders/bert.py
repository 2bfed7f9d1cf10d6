"""BERT text-encoder configuration (``BertModel``: StepVideo's bilingual "HunyuanClip", the HunyuanDiT CLIP text
encoder): Transformers ``config.json`` fields, name mappings and presets.

StepVideo feeds the DiT BERT's ``last_hidden_state`` (77 tokens, 1024-d; FastVideo 0.1.7's ``HunyuanClip`` and
diffsynth 1.1.9's ``HunyuanDiTCLIPTextEncoder`` both take the last layer's output, never the pooled vector), so
the pooler is not built: its tensors, present when the checkpoint was saved with ``add_pooling_layer=True``, are
dropped on load, and ``pooler_output`` is None. Checkpoints of the pre-training wrappers (``BertForMaskedLM``,
``BertForPreTraining``) load too: the ``bert.`` prefix is stripped and the ``cls.`` heads dropped.
"""

from __future__ import annotations

import dataclasses
from types import MappingProxyType
from typing import Any

from fastvideo_jax.configs.models.base import NameMapping, derived, internal
from fastvideo_jax.configs.models.encoders.base import EncoderConfig, TextEncoderArchConfig

# hidden_act values the MLP runs (Transformers' ACT2FN names).
SUPPORTED_ACTIVATIONS = ("gelu", "gelu_new", "gelu_pytorch_tanh", "relu", "silu")

BERT_PARAM_NAMES_MAPPING: NameMapping = ((r"^bert\.(.*)$", r"\1"),)
# Dropped on load: the pooler (never used by StepVideo), the pre-training heads, and the position/token-type id
# buffers old Transformers versions saved (``arange`` and zeros, recomputed).
BERT_IGNORED = (
    r"^(bert\.)?pooler\..*$",
    r"^cls\..*$",
    r"^(bert\.)?embeddings\.(position_ids|token_type_ids)$",
)


@dataclasses.dataclass(frozen=True)
class BertArchConfig(TextEncoderArchConfig):
    """``BertModel`` config.json fields; defaults are Transformers' ``BertConfig`` defaults."""

    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1  # dropout: inactive at inference
    attention_probs_dropout_prob: float = 0.1
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    initializer_range: float = 0.02
    layer_norm_eps: float = 1e-12
    pad_token_id: int = 0
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    position_embedding_type: str = "absolute"
    is_decoder: bool = False
    add_cross_attention: bool = False
    classifier_dropout: float | None = None
    tie_word_embeddings: bool = True  # Transformers 5 writes it; only the masked-LM head ties
    # Keys the HunyuanDiT checkpoint writes that change nothing here (pooler settings of the original BERT code).
    directionality: str = "bidi"
    output_past: bool = True
    pooler_fc_size: int = 768
    pooler_num_attention_heads: int = 12
    pooler_num_fc_layers: int = 3
    pooler_size_per_head: int = 128
    pooler_type: str = "first_token_transform"
    text_len: int = internal(77)

    param_names_mapping: NameMapping = internal(BERT_PARAM_NAMES_MAPPING)
    reverse_param_names_mapping: NameMapping = internal(())
    scanned_prefixes: tuple[str, ...] = internal(("encoder.layer",))
    ignored_param_patterns: tuple[str, ...] = internal(BERT_IGNORED)

    head_dim: int = derived(0)

    def __post_init__(self) -> None:
        name = type(self).__name__
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"{name}: hidden_size={self.hidden_size} is not a multiple of "
                             f"num_attention_heads={self.num_attention_heads}")
        if self.hidden_act not in SUPPORTED_ACTIVATIONS:
            raise ValueError(f"{name}: hidden_act {self.hidden_act!r} unsupported; use one of {SUPPORTED_ACTIVATIONS}")
        if self.position_embedding_type != "absolute":
            raise ValueError(f"{name}: position_embedding_type {self.position_embedding_type!r} is not implemented "
                             "(only 'absolute', as StepVideo's BERT)")
        if self.is_decoder or self.add_cross_attention:
            raise ValueError(f"{name}: a decoder BERT (is_decoder / add_cross_attention) is not a text encoder")
        object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)


@dataclasses.dataclass(frozen=True)
class BertEncoderConfig(EncoderConfig):
    """Our knobs: parameter precision "fp32" (FastVideo runs StepVideo's BERT in fp32), "bf16" or "fp16"."""

    arch_config: BertArchConfig = dataclasses.field(default_factory=BertArchConfig)
    prefix: str = "bert"
    precision: str = "fp32"


# Presets as data: config.json contents. ``tiny`` builds in milliseconds (tests: odd sizes); ``hunyuan-clip`` is
# the HunyuanDiT CLIP text encoder StepVideo ships as ``hunyuan_clip/clip_text_encoder`` (as diffsynth 1.1.9's
# ``HunyuanDiTCLIPTextEncoder`` writes it; hub metadata left out).
BERT_PRESETS: MappingProxyType[str, dict[str, Any]] = MappingProxyType(
    {
        "tiny": dict(
            vocab_size=97, hidden_size=24, num_hidden_layers=3, num_attention_heads=4, intermediate_size=37,
            max_position_embeddings=23, type_vocab_size=2, layer_norm_eps=1e-12, pad_token_id=0,
        ),
        "hunyuan-clip": dict(
            architectures=["BertModel"], attention_probs_dropout_prob=0.1, bos_token_id=0, classifier_dropout=None,
            directionality="bidi", eos_token_id=2, hidden_act="gelu", hidden_dropout_prob=0.1, hidden_size=1024,
            initializer_range=0.02, intermediate_size=4096, layer_norm_eps=1e-12, max_position_embeddings=512,
            num_attention_heads=16, num_hidden_layers=24, output_past=True, pad_token_id=0, pooler_fc_size=768,
            pooler_num_attention_heads=12, pooler_num_fc_layers=3, pooler_size_per_head=128,
            pooler_type="first_token_transform", position_embedding_type="absolute", type_vocab_size=2,
            vocab_size=47020,
        ),
    }
)


def bert_preset(name: str) -> BertArchConfig:
    """The ArchConfig of a preset; an unknown name lists the presets."""
    if name not in BERT_PRESETS:
        raise KeyError(f"unknown BERT preset {name!r}; presets: {sorted(BERT_PRESETS)}")
    return BertArchConfig().update_model_arch(BERT_PRESETS[name])
