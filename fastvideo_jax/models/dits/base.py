"""The DiT contract: what every video DiT declares so the loaders and pipelines take it without edits.

A DiT family subclasses ``BaseDiT`` (or ``CachableDiT`` for TeaCache) and declares, as class data:

- ``config_class``: its ``DiTConfig`` subclass (ArchConfig = the checkpoint's config.json keys; the name
  mappings ``param_names_mapping`` / ``reverse_param_names_mapping`` / ``lora_param_names_mapping`` and the
  stacked ``scanned_prefixes`` live on the ArchConfig, and are readable here as attributes);
- ``_supported_attention_backends``: the ``AttentionBackend`` members it can run. A config asking for any
  other one is refused when the model is built (before a weight is read), naming the supported ones.

Every DiT is called by keyword with one signature::

    model(hidden_states=x, encoder_hidden_states=ctx, timestep=t, encoder_hidden_states_image=None,
          guidance=None, **model_specific)

(``hidden_states`` (B, C, F, H, W); ``timestep`` (B,) or, for per-token timesteps, (B, L); model-specific
extras by their diffusers names, e.g. ``encoder_attention_mask`` or ``pooled_projections``). A DiT that has
no use for ``guidance`` or an image embedding refuses one rather than ignoring it.
"""

from __future__ import annotations

import inspect
from typing import Any, ClassVar

from flax import nnx

from fastvideo_jax.attention.api import AttentionBackend
from fastvideo_jax.configs.models.dits.base import DiTConfig
from fastvideo_jax.models.backends import UnsupportedBackendError, check_attention_backend

__all__ = ["BaseDiT", "UnsupportedBackendError", "DENSE_BACKENDS", "check_attention_backend"]

# The dense backends a DiT that only calls ``attention(...)`` can run: everything but the sparse ones.
DENSE_BACKENDS = frozenset({
    AttentionBackend.REFERENCE, AttentionBackend.TORCH_SDPA, AttentionBackend.CUDNN, AttentionBackend.FLASH_ATTN,
    AttentionBackend.SPLASH_TPU, AttentionBackend.PALLAS_GPU_TRITON, AttentionBackend.PALLAS_GPU_MOSAIC,
    AttentionBackend.TOKAMAX,
})


_CALL_INPUTS = ("hidden_states", "encoder_hidden_states", "timestep", "encoder_hidden_states_image", "guidance")


def _check_call_signature(cls: type) -> None:
    """Pipelines call every DiT by keyword: ``__call__`` must take the common inputs by those names."""
    params = inspect.signature(cls.__call__).parameters
    keyword = {n for n, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    missing = [n for n in _CALL_INPUTS if n not in keyword]
    if missing:
        raise TypeError(f"{cls.__name__}.__call__ must take hidden_states, encoder_hidden_states, timestep, "
                        f"encoder_hidden_states_image=None, guidance=None by keyword (missing: {missing})")


class BaseDiT(nnx.Module):
    """Base of every video DiT (see the module docstring for the contract)."""

    config_class: ClassVar[type[DiTConfig]]
    _supported_attention_backends: ClassVar[frozenset[AttentionBackend]] = DENSE_BACKENDS
    # Keyword inputs beyond the common ones that this DiT takes (by their diffusers names).
    extra_inputs: ClassVar[frozenset[str]] = frozenset()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.__dict__.get("_abstract", False):
            return
        config_class = getattr(cls, "config_class", None)
        if not (isinstance(config_class, type) and issubclass(config_class, DiTConfig)):
            raise TypeError(f"{cls.__name__}: a BaseDiT subclass must set config_class to a DiTConfig subclass "
                            f"(got {config_class!r})")
        bad = [b for b in cls._supported_attention_backends if not isinstance(b, AttentionBackend)]
        if bad:
            raise TypeError(f"{cls.__name__}._supported_attention_backends must hold AttentionBackend members, "
                            f"got {bad}")
        _check_call_signature(cls)

    def __init__(self, config: DiTConfig) -> None:
        """Subclasses call this first: it stores the config and checks the requested attention backend."""
        if not isinstance(config, self.config_class):
            raise TypeError(f"{type(self).__name__} takes a {self.config_class.__name__}, got {type(config).__name__}")
        self.config = config
        self.attention_backend = check_attention_backend(type(self), config.attention_backend)

    # ---- what loaders and pipelines read ------------------------------------------------------------------
    @property
    def arch_config(self):
        return self.config.arch_config

    @property
    def hidden_size(self) -> int:
        return self.arch_config.hidden_size

    @property
    def num_attention_heads(self) -> int:
        return self.arch_config.num_attention_heads

    @property
    def num_channels_latents(self) -> int:
        return self.arch_config.num_channels_latents

    @property
    def param_names_mapping(self):
        return self.arch_config.param_names_mapping

    @property
    def reverse_param_names_mapping(self):
        return self.arch_config.reverse_param_names_mapping

    @property
    def lora_param_names_mapping(self):
        return self.arch_config.lora_param_names_mapping

    def check_extra_inputs(self, kwargs: dict[str, Any]) -> None:
        """``TypeError`` naming keyword inputs this DiT does not take (a typo must not be ignored)."""
        unknown = sorted(set(kwargs) - self.extra_inputs)
        if unknown:
            raise TypeError(f"{type(self).__name__} got unexpected input(s) {unknown}; besides hidden_states, "
                            f"encoder_hidden_states, timestep, encoder_hidden_states_image and guidance it takes "
                            f"{sorted(self.extra_inputs) or 'nothing'}")

    def __call__(self, hidden_states, encoder_hidden_states, timestep, encoder_hidden_states_image=None,
                 guidance=None, **kwargs):
        raise NotImplementedError(f"{type(self).__name__} must implement __call__")

    _abstract = True
