"""Model-class registry: a checkpoint's class name -> our Flax class, imported only when asked for.

Entries follow FastVideo: ``"HFClassName": (component_dir, module_name, class_name)`` meaning
``fastvideo_jax.models.<component_dir>.<module_name>.<class_name>``. Diffusers components are resolved from
``config.json["_class_name"]``, Transformers components from ``config.json["architectures"]``.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterable, Mapping
from typing import Any

from fastvideo_jax.errors import UserError

__all__ = [
    "ModelRegistry",
    "UnknownModelError",
    "register_model",
    "resolve_model_cls",
    "class_names_from_config",
    "class_names",
]

_TEXT_TO_VIDEO_DIT_MODELS = {
    "WanTransformer3DModel": ("dits", "wanvideo", "WanTransformer3DModel"),
    "HunyuanVideoTransformer3DModel": ("dits", "hunyuanvideo", "HunyuanVideoTransformer3DModel"),
    "StepVideoModel": ("dits", "stepvideo", "StepVideoModel"),
}
_IMAGE_TO_VIDEO_DIT_MODELS: dict[str, tuple[str, str, str]] = {
    # Wan I2V checkpoints carry the same class name; image conditioning is a config switch.
}
_TEXT_ENCODER_MODELS = {
    "UMT5EncoderModel": ("encoders", "t5", "UMT5EncoderModel"),
    "T5EncoderModel": ("encoders", "t5", "T5EncoderModel"),
    "CLIPTextModel": ("encoders", "clip", "CLIPTextModel"),
    "CLIPTextModelWithProjection": ("encoders", "clip", "CLIPTextModelWithProjection"),
    "LlamaModel": ("encoders", "llama", "LlamaModel"),
    # The causal-LM checkpoint loads as its decoder stack (``model.`` prefix stripped, ``lm_head`` dropped).
    "LlamaForCausalLM": ("encoders", "llama", "LlamaModel"),
    # StepVideo's bilingual "HunyuanClip" (HunyuanDiT's CLIP text encoder).
    "BertModel": ("encoders", "bert", "BertModel"),
    # StepVideo's Step-LLM (``step_llm/``): causal square-root-ALiBi decoder stack, fused wqkv.
    "Step1Model": ("encoders", "stepllm", "Step1Model"),
}
_IMAGE_ENCODER_MODELS = {
    "CLIPVisionModel": ("encoders", "clip", "CLIPVisionModel"),
    "CLIPVisionModelWithProjection": ("encoders", "clip", "CLIPVisionModelWithProjection"),
}
_VAE_MODELS = {
    "AutoencoderKLWan": ("vaes", "wanvae", "AutoencoderKLWan"),
    "AutoencoderKLHunyuanVideo": ("vaes", "hunyuanvae", "AutoencoderKLHunyuanVideo"),
    "AutoencoderKLStepvideo": ("vaes", "stepvideovae", "AutoencoderKLStepvideo"),
}
_SCHEDULERS = {
    "FlowMatchEulerDiscreteScheduler": ("schedulers", "flow_match_euler", "FlowMatchEulerScheduler"),
    "UniPCMultistepScheduler": ("schedulers", "flow_unipc", "FlowUniPCMultistepScheduler"),
    "FlowUniPCMultistepScheduler": ("schedulers", "flow_unipc", "FlowUniPCMultistepScheduler"),
}

_FAST_VIDEO_MODELS = {
    **_TEXT_TO_VIDEO_DIT_MODELS,
    **_IMAGE_TO_VIDEO_DIT_MODELS,
    **_TEXT_ENCODER_MODELS,
    **_IMAGE_ENCODER_MODELS,
    **_VAE_MODELS,
    **_SCHEDULERS,
}


_KINDS = {
    "dit": {**_TEXT_TO_VIDEO_DIT_MODELS, **_IMAGE_TO_VIDEO_DIT_MODELS},
    "text_encoder": _TEXT_ENCODER_MODELS,
    "image_encoder": _IMAGE_ENCODER_MODELS,
    "vae": _VAE_MODELS,
    "scheduler": _SCHEDULERS,
}


def class_names(kind: str) -> frozenset[str]:
    """The checkpoint class names of one component kind (``dit``, ``text_encoder``, ``image_encoder``, ``vae``,
    ``scheduler``) that ship with fastvideo_jax."""
    try:
        return frozenset(_KINDS[kind])
    except KeyError:
        raise ValueError(f"unknown component kind {kind!r}; kinds: {sorted(_KINDS)}") from None


class UnknownModelError(UserError):
    """A class name the registry does not know; the message lists what is registered."""


def _module_path(component_dir: str, module_name: str) -> str:
    if component_dir == "schedulers":
        return f"fastvideo_jax.schedulers.{module_name}"
    return f"fastvideo_jax.models.{component_dir}.{module_name}"


class _ModelRegistry:
    def __init__(self, entries: Mapping[str, tuple[str, str, str]]):
        # name -> "module:Class" (lazy) or a class object (registered out of tree)
        self._entries: dict[str, Any] = {
            name: f"{_module_path(d, m)}:{c}" for name, (d, m, c) in entries.items()
        }

    def get_supported_archs(self) -> list[str]:
        return sorted(self._entries)

    def register(self, name: str, target: Any) -> None:
        """``target``: a class, or ``"package.module:ClassName"`` imported on first use."""
        if isinstance(target, str) and ":" not in target:
            raise ValueError(f"register_model({name!r}, {target!r}): a string target must look like 'module:Class'")
        self._entries[name] = target

    def is_registered(self, name: str) -> bool:
        return name in self._entries

    def load_model_cls(self, name: str) -> type:
        target = self._entries.get(name)
        if target is None:
            raise UnknownModelError(self._unknown_message([name]))
        if not isinstance(target, str):
            return target
        module_name, _, cls_name = target.partition(":")
        module = importlib.import_module(module_name)
        try:
            return getattr(module, cls_name)
        except AttributeError:
            raise ImportError(f"registry entry {name!r}: module {module_name} has no class {cls_name}") from None

    def resolve_model_cls(self, architectures: str | Iterable[str]) -> tuple[type, str]:
        """The first registered name of ``architectures`` and its class."""
        names = [architectures] if isinstance(architectures, str) else list(architectures)
        for name in names:
            if name in self._entries:
                return self.load_model_cls(name), name
        raise UnknownModelError(self._unknown_message(names))

    def _unknown_message(self, names: list[str]) -> str:
        return f"model class {names} is not registered; registered classes: {', '.join(self.get_supported_archs())}"


ModelRegistry = _ModelRegistry(_FAST_VIDEO_MODELS)


def _kind_of(target: Any) -> str | None:
    """The component kind a model class declares through its base class (DiT, text or image encoder)."""
    from fastvideo_jax.models.dits.base import BaseDiT
    from fastvideo_jax.models.encoders.base import ImageEncoder, TextEncoder

    for base, kind in ((BaseDiT, "dit"), (TextEncoder, "text_encoder"), (ImageEncoder, "image_encoder")):
        if isinstance(target, type) and issubclass(target, base):
            return kind
    return None


def register_model(name: str, target: Any, kind: str | None = None) -> None:
    """Register an out-of-tree class (or ``"module:Class"``) under a checkpoint class name, as a component of
    ``kind`` (``dit``, ``text_encoder``, ``image_encoder``, ``vae``, ``scheduler``), which a class subclassing
    ``BaseDiT`` / ``TextEncoder`` / ``ImageEncoder`` implies; the loaders take only classes of their kind."""
    kind = kind or _kind_of(target)
    if kind is None:
        raise ValueError(f"register_model({name!r}, {target!r}): pass kind= (one of {sorted(_KINDS)}); only a class "
                         "subclassing BaseDiT, TextEncoder or ImageEncoder implies its kind")
    if kind not in _KINDS:
        raise ValueError(f"register_model({name!r}, ...): unknown kind {kind!r}; kinds: {sorted(_KINDS)}")
    ModelRegistry.register(name, target)
    _KINDS[kind][name] = target


def class_names_from_config(config: Mapping[str, Any], source: str = "config.json") -> list[str]:
    """``_class_name`` (Diffusers) or ``architectures`` (Transformers) of a config; an error if neither."""
    if "_class_name" in config:
        return [config["_class_name"]]
    archs = config.get("architectures")
    if archs:
        return [archs] if isinstance(archs, str) else list(archs)
    raise UnknownModelError(f"{source}: has neither '_class_name' (Diffusers) nor 'architectures' (Transformers)")


def resolve_model_cls(config: Mapping[str, Any], source: str = "config.json") -> tuple[type, str]:
    return ModelRegistry.resolve_model_cls(class_names_from_config(config, source))
