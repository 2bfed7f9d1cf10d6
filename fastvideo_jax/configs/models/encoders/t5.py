"""T5 / UMT5 text-encoder configuration: Transformers ``config.json`` fields, name mappings and presets.

Both encoders share one module tree (``fastvideo_jax.models.encoders.t5``). They differ in where the relative
position bias lives: UMT5 has one table per block (stacked with the blocks), T5 only in block 0, shared by every
layer, so its mapping moves that table out of the scanned stack to ``encoder.relative_attention_bias``.
"""

from __future__ import annotations

import dataclasses
from types import MappingProxyType
from typing import Any

from fastvideo_jax.configs.models.base import derived, internal
from fastvideo_jax.configs.models.dits.base import NameMapping
from fastvideo_jax.configs.models.encoders.base import EncoderConfig, TextEncoderArchConfig

_BIAS0 = r"^encoder\.block\.0\.layer\.0\.SelfAttention\.relative_attention_bias\.(.*)$"

# The embedding is tied: Transformers saves it once, as ``shared.weight``. A checkpoint that names it
# ``encoder.embed_tokens.weight`` instead loads too; one holding both keeps ``shared.weight`` and drops the
# tied copy, as Transformers' weight tying does (``tied_param_names``).
_EMBED_ALIAS = (r"^encoder\.embed_tokens\.(.*)$", r"shared.\1")

# Transformers name -> our module name. Block attributes carry the checkpoint's names (``layer.0.SelfAttention``,
# ``layer.1.DenseReluDense``), so the blocks map onto the scanned stack ``encoder.block`` unchanged.
UMT5_PARAM_NAMES_MAPPING: NameMapping = (_EMBED_ALIAS,)
T5_PARAM_NAMES_MAPPING: NameMapping = (_EMBED_ALIAS, (_BIAS0, r"encoder.relative_attention_bias.\1"))

# Our module name -> Transformers name, for export.
UMT5_REVERSE_PARAM_NAMES_MAPPING: NameMapping = ()
T5_REVERSE_PARAM_NAMES_MAPPING: NameMapping = (
    (r"^encoder\.relative_attention_bias\.(.*)$", r"encoder.block.0.layer.0.SelfAttention.relative_attention_bias.\1"),
)

# feed_forward_proj activations we run (Transformers' ACT2FN names).
SUPPORTED_ACTIVATIONS = ("gelu_new", "gelu_pytorch_tanh", "gelu", "relu", "silu")


@dataclasses.dataclass(frozen=True)
class T5ArchConfig(TextEncoderArchConfig):
    """``T5EncoderModel`` config.json fields; defaults are Transformers' ``T5Config`` defaults."""

    vocab_size: int = 32128
    d_model: int = 512
    d_kv: int = 64
    d_ff: int = 2048
    num_layers: int = 6
    num_decoder_layers: int | None = None
    num_heads: int = 8
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    dropout_rate: float = 0.1
    layer_norm_epsilon: float = 1e-6
    initializer_factor: float = 1.0
    feed_forward_proj: str = "relu"
    # Written to config.json by Transformers but always re-derived from feed_forward_proj, as Transformers does.
    dense_act_fn: str = ""
    is_gated_act: bool = False
    is_encoder_decoder: bool = True
    is_decoder: bool = False
    pad_token_id: int = 0
    eos_token_id: int = 1
    decoder_start_token_id: int = 0
    classifier_dropout: float = 0.0
    tie_word_embeddings: bool = True
    scale_decoder_outputs: bool = True
    # Other Transformers T5 keys seen in hub configs; they describe nothing the encoder runs.
    n_positions: int | None = None
    output_past: bool | None = None
    task_specific_params: Any = dataclasses.field(default=None, compare=False)  # a dict: kept out of the hash
    tokenizer_class: str | None = None
    initializer_range: float | None = None

    param_names_mapping: NameMapping = internal(T5_PARAM_NAMES_MAPPING)
    reverse_param_names_mapping: NameMapping = internal(T5_REVERSE_PARAM_NAMES_MAPPING)
    tied_param_names: tuple[str, ...] = internal(("encoder.embed_tokens.weight",))
    scanned_prefixes: tuple[str, ...] = internal(("encoder.block",))

    hidden_size: int = derived(0)
    num_hidden_layers: int = derived(0)
    num_attention_heads: int = derived(0)
    inner_dim: int = derived(0)

    # Per-layer relative bias (UMT5) or one table in block 0 shared by all layers (T5).
    per_layer_relative_bias = False

    def __post_init__(self) -> None:
        parts = self.feed_forward_proj.split("-")
        if len(parts) > 2 or (len(parts) == 2 and parts[0] != "gated"):
            raise ValueError(
                f"{type(self).__name__}: feed_forward_proj={self.feed_forward_proj!r} must be 'ACT' or 'gated-ACT'"
            )
        act = "gelu_new" if self.feed_forward_proj == "gated-gelu" else parts[-1]
        if act not in SUPPORTED_ACTIVATIONS:
            raise ValueError(f"{type(self).__name__}: activation {act!r} unsupported; use {SUPPORTED_ACTIVATIONS}")
        object.__setattr__(self, "dense_act_fn", act)
        object.__setattr__(self, "is_gated_act", parts[0] == "gated")
        object.__setattr__(self, "hidden_size", self.d_model)
        object.__setattr__(self, "num_hidden_layers", self.num_layers)
        object.__setattr__(self, "num_attention_heads", self.num_heads)
        object.__setattr__(self, "inner_dim", self.num_heads * self.d_kv)
        # Bidirectional buckets: half per direction, a quarter exact; the log-spaced rest needs room.
        exact = self.relative_attention_num_buckets // 4
        if exact < 1 or self.relative_attention_max_distance <= exact:
            raise ValueError(
                f"{type(self).__name__}: relative_attention_num_buckets={self.relative_attention_num_buckets} needs "
                f">= 4 buckets and relative_attention_max_distance > {exact}, got "
                f"{self.relative_attention_max_distance}"
            )


@dataclasses.dataclass(frozen=True)
class UMT5ArchConfig(T5ArchConfig):
    """``UMT5EncoderModel`` config.json fields; defaults are Transformers' ``UMT5Config`` defaults."""

    vocab_size: int = 250112
    d_model: int = 512
    d_kv: int = 64
    d_ff: int = 1024
    num_layers: int = 8
    num_heads: int = 6
    feed_forward_proj: str = "gated-gelu"

    param_names_mapping: NameMapping = internal(UMT5_PARAM_NAMES_MAPPING)
    reverse_param_names_mapping: NameMapping = internal(UMT5_REVERSE_PARAM_NAMES_MAPPING)

    per_layer_relative_bias = True


@dataclasses.dataclass(frozen=True)
class T5EncoderConfig(EncoderConfig):
    """Our knobs: parameter precision, "fp32" (as Wan runs its text encoder) or "bf16"."""

    arch_config: T5ArchConfig = dataclasses.field(default_factory=T5ArchConfig)
    prefix: str = "t5"
    precision: str = "fp32"


@dataclasses.dataclass(frozen=True)
class UMT5EncoderConfig(T5EncoderConfig):
    arch_config: T5ArchConfig = dataclasses.field(default_factory=UMT5ArchConfig)
    prefix: str = "umt5"


# Presets as data: config.json contents. ``tiny`` builds in milliseconds (tests); ``umt5-xxl`` is Wan's encoder.
T5_PRESETS = MappingProxyType(
    {
        "tiny": dict(
            vocab_size=256, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
            relative_attention_num_buckets=8, relative_attention_max_distance=16, feed_forward_proj="gated-gelu",
            dropout_rate=0.0,
        ),
        "umt5-xxl": dict(
            vocab_size=256384, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
            relative_attention_num_buckets=32, relative_attention_max_distance=128, feed_forward_proj="gated-gelu",
            layer_norm_epsilon=1e-6, dropout_rate=0.1, tokenizer_class="T5Tokenizer",
        ),
    }
)


def t5_preset(name: str, umt5: bool = True) -> T5ArchConfig:
    """The ArchConfig of a preset (UMT5 by default); an unknown name lists the presets."""
    if name not in T5_PRESETS:
        raise KeyError(f"unknown T5 preset {name!r}; presets: {sorted(T5_PRESETS)}")
    base = UMT5ArchConfig() if umt5 else T5ArchConfig()
    return base.update_model_arch(T5_PRESETS[name])
