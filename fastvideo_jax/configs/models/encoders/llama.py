"""LLaMA text-encoder configuration (``LlamaModel``: HunyuanVideo's ``text_encoder``, the llava-llama-3-8b text
tower): Transformers ``config.json`` fields, name mappings and presets.

RoPE is read from either form Transformers writes: ``rope_parameters`` (Transformers 5:
``{"rope_theta": ..., "rope_type": "default"}``) or the legacy ``rope_theta`` + ``rope_scaling`` keys (every hub
checkpoint, HunyuanVideo's included: ``rope_theta`` 500000, ``rope_scaling`` null). Only the plain ("default")
rotary embedding is implemented; another ``rope_type`` (llama3, linear, dynamic, yarn, ...) is refused by name.

``LlamaForCausalLM`` checkpoints load too: the ``model.`` prefix is stripped and ``lm_head.weight`` dropped (a
text encoder never computes logits).
"""

from __future__ import annotations

import dataclasses
from types import MappingProxyType
from typing import Any

from fastvideo_jax.configs.models.base import NameMapping, derived, internal
from fastvideo_jax.configs.models.encoders.base import EncoderConfig, TextEncoderArchConfig

# hidden_act values the SwiGLU MLP runs (Transformers' ACT2FN names).
SUPPORTED_ACTIVATIONS = ("silu", "gelu", "gelu_new", "gelu_pytorch_tanh", "relu")

# Checkpoint name -> our name: the causal-LM wrapper's ``model.`` prefix goes; LlamaModel's names are ours.
LLAMA_PARAM_NAMES_MAPPING: NameMapping = ((r"^model\.(.*)$", r"\1"),)
# Dropped on load: the LM head, and the rotary ``inv_freq`` buffer that old Transformers versions saved.
LLAMA_IGNORED = (r"^lm_head\.weight$", r"^(model\.)?layers\.\d+\.self_attn\.rotary_emb\.inv_freq$")


@dataclasses.dataclass(frozen=True)
class LlamaArchConfig(TextEncoderArchConfig):
    """``LlamaModel`` config.json fields; defaults are Transformers' ``LlamaConfig`` defaults."""

    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None  # None: as many as query heads (no grouping)
    head_dim: int | None = None  # None: hidden_size // num_attention_heads
    hidden_act: str = "silu"
    max_position_embeddings: int = 2048
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-6
    pad_token_id: int | None = None
    bos_token_id: int = 1
    eos_token_id: Any = 2  # an int, or a list in some Llama 3 configs
    pretraining_tp: int = 1  # sliced matmuls in old Transformers; the same numbers
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    attention_dropout: float = 0.0
    mlp_bias: bool = False
    rope_theta: float = 10000.0
    # dicts: kept out of the hash (the config is part of the compile key); what they say is in the derived
    # ``rope_type`` / ``rope_base`` below.
    rope_scaling: Any = dataclasses.field(default=None, compare=False)
    rope_parameters: Any = dataclasses.field(default=None, compare=False)
    text_len: int = internal(256)

    param_names_mapping: NameMapping = internal(LLAMA_PARAM_NAMES_MAPPING)
    reverse_param_names_mapping: NameMapping = internal(())
    scanned_prefixes: tuple[str, ...] = internal(("layers",))
    ignored_param_patterns: tuple[str, ...] = internal(LLAMA_IGNORED)

    kv_heads: int = derived(0)  # num_key_value_heads resolved
    head_size: int = derived(0)  # head_dim resolved
    rope_type: str = derived("default")
    rope_base: float = derived(10000.0)  # the theta RoPE runs with

    def __post_init__(self) -> None:
        name = type(self).__name__
        heads = self.num_attention_heads
        kv = heads if self.num_key_value_heads is None else self.num_key_value_heads
        if kv < 1 or heads % kv:
            raise ValueError(f"{name}: num_attention_heads={heads} is not a multiple of num_key_value_heads={kv}")
        head = self.head_dim if self.head_dim is not None else self.hidden_size // heads
        if self.head_dim is None and self.hidden_size % heads:
            raise ValueError(f"{name}: hidden_size={self.hidden_size} is not a multiple of num_attention_heads={heads} "
                             "(give head_dim)")
        if head % 2:
            raise ValueError(f"{name}: head_dim={head} must be even (RoPE rotates pairs)")
        if self.hidden_act not in SUPPORTED_ACTIVATIONS:
            raise ValueError(f"{name}: hidden_act {self.hidden_act!r} unsupported; use one of {SUPPORTED_ACTIVATIONS}")
        rope = dict(self.rope_parameters or self.rope_scaling or {})
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type != "default":
            raise ValueError(f"{name}: rope_type {rope_type!r} is not implemented (only 'default' RoPE; "
                             f"HunyuanVideo's text encoder has rope_scaling null)")
        base = rope.get("rope_theta", self.rope_theta) if self.rope_parameters else self.rope_theta
        object.__setattr__(self, "kv_heads", kv)
        object.__setattr__(self, "head_size", head)
        object.__setattr__(self, "rope_type", rope_type)
        object.__setattr__(self, "rope_base", float(base))


@dataclasses.dataclass(frozen=True)
class LlamaEncoderConfig(EncoderConfig):
    """Our knobs: parameter precision "fp16" (as HunyuanVideo ships and runs it), "bf16" or "fp32"."""

    arch_config: LlamaArchConfig = dataclasses.field(default_factory=LlamaArchConfig)
    prefix: str = "llama"
    precision: str = "fp16"


# Presets as data: config.json contents. ``tiny`` builds in milliseconds (tests: odd sizes, grouped KV heads);
# ``llava-llama-3-8b`` is hunyuanvideo-community/HunyuanVideo's text_encoder/config.json (hub metadata left out).
LLAMA_PRESETS = MappingProxyType(
    {
        "tiny": dict(
            vocab_size=131, hidden_size=30, intermediate_size=53, num_hidden_layers=3, num_attention_heads=6,
            num_key_value_heads=2, head_dim=8, max_position_embeddings=128, rms_norm_eps=1e-5, rope_theta=500000.0,
            bos_token_id=1, eos_token_id=2, pad_token_id=0,
        ),
        "llava-llama-3-8b": dict(
            architectures=["LlamaModel"], attention_bias=False, attention_dropout=0.0, bos_token_id=128000,
            eos_token_id=128001, head_dim=128, hidden_act="silu", hidden_size=4096, initializer_range=0.02,
            intermediate_size=14336, max_position_embeddings=8192, mlp_bias=False, num_attention_heads=32,
            num_hidden_layers=32, num_key_value_heads=8, pretraining_tp=1, rms_norm_eps=1e-5, rope_scaling=None,
            rope_theta=500000.0, tie_word_embeddings=False, vocab_size=128320,
        ),
    }
)


def llama_preset(name: str) -> LlamaArchConfig:
    """The ArchConfig of a preset; an unknown name lists the presets."""
    if name not in LLAMA_PRESETS:
        raise KeyError(f"unknown LLaMA preset {name!r}; presets: {sorted(LLAMA_PRESETS)}")
    return LlamaArchConfig().update_model_arch(LLAMA_PRESETS[name])
