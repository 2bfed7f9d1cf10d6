"""Step-LLM text-encoder configuration (StepVideo's ``step_llm/``: the ``Step1Model`` decoder stack): its
Megatron-style ``config.json`` fields, name mapping and presets.

The checkpoint's names are ours (``tok_embeddings.word_embeddings``, ``transformer.layers.N.attention.wqkv``,
``attention.wo``, ``feed_forward.w1`` / ``w2``, ``attention_norm``, ``ffn_norm``), so the mapping is the identity;
the layers are stacked under ``transformer.layers``.

The MLP width is ``ffn_hidden_size`` rounded up to a multiple of 256, as the original ``FeedForward`` rounds it
(``ffn_size`` below); ``w1`` holds the gate and the up projection side by side (2 x ffn_size outputs).
"""

from __future__ import annotations

import dataclasses
from types import MappingProxyType
from typing import Any

from fastvideo_jax.configs.models.base import NameMapping, derived, internal
from fastvideo_jax.configs.models.encoders.base import EncoderConfig, TextEncoderArchConfig

FFN_MULTIPLE = 256  # the original FeedForward's ``multiple_of``


@dataclasses.dataclass(frozen=True)
class StepLLMArchConfig(TextEncoderArchConfig):
    """``Step1Model`` config.json fields (the original reads them as attributes of a ``PretrainedConfig``)."""

    hidden_size: int = 6144
    num_attention_heads: int = 48
    num_attention_groups: int = 4  # key/value heads (grouped-query attention)
    num_layers: int = 48
    ffn_hidden_size: int = 16384
    padded_vocab_size: int = 65536
    seq_length: int = 4096
    layernorm_epsilon: float = 1e-5
    # Read and kept; they change nothing at inference in fp32 / bf16 here (dropout is off, the flash kernel is
    # replaced by the attention it computes, embeddings are looked up exactly in any dtype).
    use_flash_attn: bool = True
    attention_dropout: float = 0.0
    hidden_dropout: float = 0.0
    params_dtype: Any = dataclasses.field(default=None, compare=False)
    fp32_residual_connection: bool = False
    embedding_weights_in_fp32: bool = False
    pad_token_id: int = 2  # the wrapped tokenizer pads with EOS
    bos_token_id: int = 1
    eos_token_id: int = 2
    text_len: int = internal(320)

    param_names_mapping: NameMapping = internal(())
    reverse_param_names_mapping: NameMapping = internal(())
    scanned_prefixes: tuple[str, ...] = internal(("transformer.layers",))

    vocab_size: int = derived(0)  # the embedding table's rows (padded_vocab_size): what token ids must stay below
    head_dim: int = derived(0)
    ffn_size: int = derived(0)  # ffn_hidden_size rounded up to FFN_MULTIPLE

    def __post_init__(self) -> None:
        name = type(self).__name__
        heads, groups = self.num_attention_heads, self.num_attention_groups
        if self.hidden_size % heads:
            raise ValueError(f"{name}: hidden_size={self.hidden_size} is not a multiple of num_attention_heads={heads}")
        if groups < 1 or heads % groups:
            raise ValueError(f"{name}: num_attention_heads={heads} is not a multiple of num_attention_groups={groups}")
        object.__setattr__(self, "vocab_size", self.padded_vocab_size)
        object.__setattr__(self, "head_dim", self.hidden_size // heads)
        object.__setattr__(self, "ffn_size", -(-self.ffn_hidden_size // FFN_MULTIPLE) * FFN_MULTIPLE)


@dataclasses.dataclass(frozen=True)
class StepLLMEncoderConfig(EncoderConfig):
    """Our knobs: parameter precision "bf16" (as StepVideo ships and runs Step-LLM), "fp16" or "fp32"."""

    arch_config: StepLLMArchConfig = dataclasses.field(default_factory=StepLLMArchConfig)
    prefix: str = "stepllm"
    precision: str = "bf16"


# Presets as data: config.json contents. ``tiny`` builds in milliseconds (tests: odd sizes, 3 KV groups, an MLP
# width the rounding changes). ``step-llm``: the width (6144) is the DiT's ``caption_channels[0]``, the 128-wide
# heads are what the original's flash kernel takes; the depth, KV groups, MLP width and vocabulary are NOT read
# from the released ``step_llm/config.json`` (not available to this port) but are consistent with its nine
# ~5 GB safetensors shards (about 18.8B bf16 parameters). Check them against the file before relying on them.
STEPLLM_PRESETS: MappingProxyType[str, dict[str, Any]] = MappingProxyType(
    {
        "tiny": dict(
            hidden_size=48, num_attention_heads=6, num_attention_groups=3, num_layers=3, ffn_hidden_size=300,
            padded_vocab_size=101, seq_length=64, layernorm_epsilon=1e-5,
        ),
        "step-llm": dict(
            architectures=["Step1Model"], hidden_size=6144, num_attention_heads=48, num_attention_groups=4,
            num_layers=48, ffn_hidden_size=16384, padded_vocab_size=65536, seq_length=4096, layernorm_epsilon=1e-5,
            use_flash_attn=True,
        ),
    }
)


def stepllm_preset(name: str) -> StepLLMArchConfig:
    """The ArchConfig of a preset; an unknown name lists the presets."""
    if name not in STEPLLM_PRESETS:
        raise KeyError(f"unknown Step-LLM preset {name!r}; presets: {sorted(STEPLLM_PRESETS)}")
    return StepLLMArchConfig().update_model_arch(STEPLLM_PRESETS[name])
