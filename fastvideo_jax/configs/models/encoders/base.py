"""Encoder config bases (text and image encoders in Transformers format)."""

from __future__ import annotations

import dataclasses

from fastvideo_jax.configs.models.base import MappedArchConfig, ModelConfig, internal


@dataclasses.dataclass(frozen=True)
class EncoderArchConfig(MappedArchConfig):
    architectures: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class TextEncoderArchConfig(EncoderArchConfig):
    vocab_size: int = 0
    pad_token_id: int = 0
    eos_token_id: int = 1
    # Length prompts are padded / truncated to (Wan: 512).
    text_len: int = internal(512)


@dataclasses.dataclass(frozen=True)
class EncoderConfig(ModelConfig):
    arch_config: EncoderArchConfig = dataclasses.field(default_factory=EncoderArchConfig)
    precision: str = "fp32"
    # Dense attention backend (an ``AttentionBackend`` value) or None for the model's default; one the model
    # does not list in ``_supported_attention_backends`` is refused when it is built.
    attention_backend: str | None = None


@dataclasses.dataclass(frozen=True)
class ImageEncoderArchConfig(EncoderArchConfig):
    """Image encoders (CLIP vision): the input resolution and channel count their embeddings fix."""

    image_size: int = 224
    num_channels: int = 3
