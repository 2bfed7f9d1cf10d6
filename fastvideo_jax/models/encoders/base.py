"""The encoder contract: ``TextEncoder`` / ``ImageEncoder`` base classes and their one output type.

A text encoder is called as ``encoder(input_ids, attention_mask=None, *, output_hidden_states=False)``, an image
encoder as ``encoder(pixel_values, *, output_hidden_states=False)``; both return a ``BaseEncoderOutput``, a
pytree, so it passes through ``jax.jit`` and ``compiled_call`` as it is. ``output_hidden_states`` is static (it
changes the output's structure): each value compiles once.

A subclass declares two class variables:

- ``config_class``: its ``EncoderConfig`` subclass (the loader builds ``config_class().update_model_arch(...)``);
- ``_supported_attention_backends``: the ``AttentionBackend`` values its attention can run. A config that asks
  for another (``EncoderConfig.attention_backend``) is a ``UserError`` when the model is built, not a silent
  fallback.
"""

from __future__ import annotations

from typing import ClassVar

import jax
import jax.numpy as jnp
from flax import nnx, struct

from fastvideo_jax.attention.api import AttentionBackend
from fastvideo_jax.configs.models.encoders.base import EncoderConfig
from fastvideo_jax.errors import UserError
from fastvideo_jax.models.backends import check_attention_backend as check_backend

__all__ = ["BaseEncoderOutput", "TextEncoder", "ImageEncoder", "check_attention_backend"]


@struct.dataclass
class BaseEncoderOutput:
    """What every encoder returns (Transformers' field names).

    ``last_hidden_state`` (B, L, D); ``hidden_states``: with ``output_hidden_states``, the input of the first
    layer followed by every layer's output, as Transformers collects them (so ``hidden_states[-2]`` is the
    penultimate layer's output), else None; ``attention_mask`` (B, L) when the encoder took one, else None;
    ``pooler_output`` (B, D') when the model pools, else None.
    """

    last_hidden_state: jax.Array
    hidden_states: tuple[jax.Array, ...] | None = None
    attention_mask: jax.Array | None = None
    pooler_output: jax.Array | None = None


def check_attention_backend(model_cls: type, config: EncoderConfig) -> AttentionBackend | None:
    """The backend ``config.attention_backend`` asks for (None: the model's default), refused with an
    ``UnsupportedBackendError`` naming the supported ones when ``model_cls`` cannot run it."""
    return check_backend(model_cls, getattr(config, "attention_backend", None))


class _Encoder(nnx.Module):
    config_class: ClassVar[type[EncoderConfig]] = EncoderConfig
    _supported_attention_backends: ClassVar[tuple[AttentionBackend, ...]] = ()

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        backends = cls.__dict__.get("_supported_attention_backends", cls._supported_attention_backends)
        if cls.__module__ != __name__ and not backends:
            raise TypeError(f"{cls.__name__} must declare _supported_attention_backends (a tuple of AttentionBackend)")
        bad = [b for b in backends if not isinstance(b, AttentionBackend)]
        if bad:
            raise TypeError(f"{cls.__name__}._supported_attention_backends must hold AttentionBackend members, got {bad}")

    @property
    def supported_attention_backends(self) -> tuple[AttentionBackend, ...]:
        return self._supported_attention_backends


class TextEncoder(_Encoder):
    """Base of text encoders: ``__call__(input_ids (B, L) int, attention_mask (B, L) 1/0 or None, *,
    output_hidden_states=False) -> BaseEncoderOutput``."""

    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None, *,
                 output_hidden_states: bool = False) -> BaseEncoderOutput:
        raise NotImplementedError(f"{type(self).__name__} must implement __call__")

    def check_tokens(self, input_ids, attention_mask, max_length: int | None = None) -> tuple[int, ...]:
        """``input_ids``' shape, after a ``UserError`` naming the model unless it is (batch, length) with
        1 <= length (<= ``max_length``) and ``attention_mask`` is None or of the same shape."""
        shape, name = tuple(jnp.shape(input_ids)), type(self).__name__
        if len(shape) != 2 or shape[1] < 1 or (max_length is not None and shape[1] > max_length):
            limit = "" if max_length is None else f" <= {max_length}"
            raise UserError(f"{name}: input_ids must be (batch, length{limit}), got {shape}")
        if attention_mask is not None and tuple(jnp.shape(attention_mask)) != shape:
            raise UserError(f"{name}: attention_mask {tuple(jnp.shape(attention_mask))} must have input_ids' "
                            f"shape {shape}")
        return shape


class ImageEncoder(_Encoder):
    """Base of image encoders: ``__call__(pixel_values (B, C, H, W) float, *, output_hidden_states=False)
    -> BaseEncoderOutput``."""

    def __call__(self, pixel_values: jax.Array, *, output_hidden_states: bool = False) -> BaseEncoderOutput:
        raise NotImplementedError(f"{type(self).__name__} must implement __call__")
