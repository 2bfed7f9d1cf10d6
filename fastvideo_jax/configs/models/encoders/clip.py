"""CLIP text and vision encoder configuration: Transformers ``config.json`` fields, name mappings, presets.

Transformers 5 saves ``CLIPTextModel`` / ``CLIPVisionModel`` without a prefix (``embeddings.*``,
``encoder.layers.N.*``) and the ``...WithProjection`` models under ``text_model.`` / ``vision_model.`` next to
``text_projection`` / ``visual_projection``; hub checkpoints written by older versions carry the prefix in
every case, and some a ``position_ids`` buffer. The mapping strips the prefix, so one module tree loads all of
them; the buffer is consumed and dropped (it is ``arange``, recomputed).
"""

from __future__ import annotations

import dataclasses
from types import MappingProxyType

from fastvideo_jax.configs.models.base import NameMapping, derived, internal
from fastvideo_jax.configs.models.encoders.base import (
    EncoderConfig,
    ImageEncoderArchConfig,
    TextEncoderArchConfig,
)

# Transformers' ACT2FN names that the CLIP MLP runs.
SUPPORTED_ACTIVATIONS = ("quick_gelu", "gelu", "gelu_new", "gelu_pytorch_tanh", "relu", "silu")

_STRIP = lambda prefix: ((rf"^{prefix}\.(.*)$", r"\1"),)  # noqa: E731
_POSITION_IDS = lambda prefix: (rf"^({prefix}\.)?embeddings\.position_ids$",)  # noqa: E731
# Export (our name -> Transformers 5 name): the projection models keep their tower under a prefix.
_PREFIX_ALL_BUT = lambda prefix, head: ((rf"^(?!{head}\.)(.*)$", rf"{prefix}.\1"),)  # noqa: E731


def _check_common(cfg) -> None:
    name = type(cfg).__name__
    if cfg.hidden_size % cfg.num_attention_heads:
        raise ValueError(f"{name}: hidden_size={cfg.hidden_size} is not a multiple of "
                         f"num_attention_heads={cfg.num_attention_heads}")
    if cfg.hidden_act not in SUPPORTED_ACTIVATIONS:
        raise ValueError(f"{name}: hidden_act {cfg.hidden_act!r} unsupported; use one of {SUPPORTED_ACTIVATIONS}")
    object.__setattr__(cfg, "head_dim", cfg.hidden_size // cfg.num_attention_heads)


@dataclasses.dataclass(frozen=True)
class CLIPTextArchConfig(TextEncoderArchConfig):
    """``CLIPTextModel`` config.json fields; defaults are Transformers' ``CLIPTextConfig`` defaults."""

    vocab_size: int = 49408
    hidden_size: int = 512
    intermediate_size: int = 2048
    projection_dim: int = 512
    num_hidden_layers: int = 12
    num_attention_heads: int = 8
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    attention_dropout: float = 0.0
    dropout: float = 0.0
    initializer_range: float = 0.02
    initializer_factor: float = 1.0
    pad_token_id: int = 1
    bos_token_id: int = 49406
    # Pooling takes the first ``eos_token_id`` of each row; the legacy value 2 (pre-2023 configs, e.g.
    # clip-vit-large-patch14) takes the position of each row's largest token id instead, as Transformers does.
    eos_token_id: int = 49407
    text_len: int = internal(77)

    param_names_mapping: NameMapping = internal(_STRIP("text_model"))
    reverse_param_names_mapping: NameMapping = internal(())
    scanned_prefixes: tuple[str, ...] = internal(("encoder.layers",))
    ignored_param_patterns: tuple[str, ...] = internal(_POSITION_IDS("text_model"))

    head_dim: int = derived(0)

    def __post_init__(self) -> None:
        _check_common(self)


@dataclasses.dataclass(frozen=True)
class CLIPVisionArchConfig(ImageEncoderArchConfig):
    """``CLIPVisionModel`` config.json fields; defaults are Transformers' ``CLIPVisionConfig`` defaults."""

    hidden_size: int = 768
    intermediate_size: int = 3072
    projection_dim: int = 512
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    num_channels: int = 3
    image_size: int = 224
    patch_size: int = 32
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    attention_dropout: float = 0.0
    dropout: float = 0.0
    initializer_range: float = 0.02
    initializer_factor: float = 1.0

    param_names_mapping: NameMapping = internal(_STRIP("vision_model"))
    reverse_param_names_mapping: NameMapping = internal(())
    scanned_prefixes: tuple[str, ...] = internal(("encoder.layers",))
    ignored_param_patterns: tuple[str, ...] = internal(_POSITION_IDS("vision_model"))

    head_dim: int = derived(0)
    grid: int = derived(0)  # patches per side (a remainder of image_size is dropped, as the strided conv does)
    num_positions: int = derived(0)  # grid * grid patches + the class token

    def __post_init__(self) -> None:
        _check_common(self)
        if not 0 < self.patch_size <= self.image_size:
            raise ValueError(f"{type(self).__name__}: patch_size={self.patch_size} must be in [1, image_size="
                             f"{self.image_size}]")
        object.__setattr__(self, "grid", self.image_size // self.patch_size)
        object.__setattr__(self, "num_positions", self.grid * self.grid + 1)


@dataclasses.dataclass(frozen=True)
class CLIPTextEncoderConfig(EncoderConfig):
    arch_config: CLIPTextArchConfig = dataclasses.field(default_factory=CLIPTextArchConfig)
    prefix: str = "clip_text"
    precision: str = "fp32"


@dataclasses.dataclass(frozen=True)
class CLIPTextProjectionEncoderConfig(CLIPTextEncoderConfig):
    """``CLIPTextModelWithProjection``: exported under ``text_model.`` next to ``text_projection``."""

    arch_config: CLIPTextArchConfig = dataclasses.field(default_factory=lambda: CLIPTextArchConfig(
        reverse_param_names_mapping=_PREFIX_ALL_BUT("text_model", "text_projection")))


@dataclasses.dataclass(frozen=True)
class CLIPVisionEncoderConfig(EncoderConfig):
    arch_config: CLIPVisionArchConfig = dataclasses.field(default_factory=CLIPVisionArchConfig)
    prefix: str = "clip_vision"
    precision: str = "fp32"


@dataclasses.dataclass(frozen=True)
class CLIPVisionProjectionEncoderConfig(CLIPVisionEncoderConfig):
    """``CLIPVisionModelWithProjection``: exported under ``vision_model.`` next to ``visual_projection``."""

    arch_config: CLIPVisionArchConfig = dataclasses.field(default_factory=lambda: CLIPVisionArchConfig(
        reverse_param_names_mapping=_PREFIX_ALL_BUT("vision_model", "visual_projection")))


# Presets as data: config.json contents. ``tiny`` builds in milliseconds (tests, odd sizes on purpose).
CLIP_TEXT_PRESETS = MappingProxyType(
    {
        "tiny": dict(
            vocab_size=99, hidden_size=24, intermediate_size=37, projection_dim=10, num_hidden_layers=3,
            num_attention_heads=4, max_position_embeddings=19, hidden_act="quick_gelu", bos_token_id=96,
            eos_token_id=97, pad_token_id=98,
        ),
        # openai/clip-vit-large-patch14's text tower: HunyuanVideo's text_encoder_2 (pooled output).
        "clip-vit-large-patch14": dict(
            vocab_size=49408, hidden_size=768, intermediate_size=3072, projection_dim=768, num_hidden_layers=12,
            num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu", layer_norm_eps=1e-5,
            bos_token_id=0, eos_token_id=2, pad_token_id=1,
        ),
    }
)

CLIP_VISION_PRESETS = MappingProxyType(
    {
        "tiny": dict(
            hidden_size=24, intermediate_size=37, projection_dim=10, num_hidden_layers=3, num_attention_heads=4,
            num_channels=3, image_size=30, patch_size=6, hidden_act="gelu",
        ),
        # open-clip ViT-H/14: Wan2.1 I2V's image_encoder (penultimate hidden state).
        "vit-h-14": dict(
            hidden_size=1280, intermediate_size=5120, projection_dim=1024, num_hidden_layers=32,
            num_attention_heads=16, num_channels=3, image_size=224, patch_size=14, hidden_act="gelu",
            layer_norm_eps=1e-5,
        ),
    }
)


def clip_text_preset(name: str) -> CLIPTextArchConfig:
    if name not in CLIP_TEXT_PRESETS:
        raise KeyError(f"unknown CLIP text preset {name!r}; presets: {sorted(CLIP_TEXT_PRESETS)}")
    return CLIPTextArchConfig().update_model_arch(CLIP_TEXT_PRESETS[name])


def clip_vision_preset(name: str) -> CLIPVisionArchConfig:
    if name not in CLIP_VISION_PRESETS:
        raise KeyError(f"unknown CLIP vision preset {name!r}; presets: {sorted(CLIP_VISION_PRESETS)}")
    return CLIPVisionArchConfig().update_model_arch(CLIP_VISION_PRESETS[name])
