"""Whole pipelines: ``model_index.json`` -> one loader per component.

A pipeline directory (Diffusers layout, or one converted by ``fastvideo-jax convert``) holds
``model_index.json`` mapping each component name to ``[library, ClassName]``. Model components (DiT, text
encoders, image encoder, VAE) load through the component loaders; tokenizers through ``AutoTokenizer``; the CLIP
image processor from its ``preprocessor_config.json``; schedulers through the registry and their ``from_config``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from jax.sharding import Mesh

from fastvideo_jax.models.loader.component_loader import (
    ImageEncoderLoader,
    ImageProcessorLoader,
    TextEncoderLoader,
    TokenizerLoader,
    TransformerLoader,
    VAELoader,
    read_config,
)
from fastvideo_jax.models.loader import orbax_io
from fastvideo_jax.models.loader.safetensors_io import CheckpointError, find_safetensors
from fastvideo_jax.models.registry import ModelRegistry, class_names, class_names_from_config, resolve_model_cls

__all__ = [
    "MODEL_LOADERS",
    "check_components",
    "SchedulerLoader",
    "component_kind",
    "load_components",
    "read_model_index",
    "resolve_model_path",
]

MODEL_LOADERS = {
    "transformer": TransformerLoader,
    "transformer_2": TransformerLoader,
    "vae": VAELoader,
    "text_encoder": TextEncoderLoader,
    "text_encoder_2": TextEncoderLoader,
    "image_encoder": ImageEncoderLoader,
}
_INDEX_METADATA = {"_class_name", "_diffusers_version", "_name_or_path", "_fastvideo_jax"}
_MODEL_KINDS = {
    "transformer": "dit",
    "transformer_2": "dit",
    "vae": "vae",
    "text_encoder": "text_encoder",
    "text_encoder_2": "text_encoder",
    "image_encoder": "image_encoder",
}


class SchedulerLoader:
    """A scheduler from ``scheduler/scheduler_config.json`` (class from ``_class_name``)."""

    def load(self, component_dir: str | Path, **overrides: Any):
        config = read_config(component_dir, "scheduler_config.json")
        cls, _ = resolve_model_cls(config, str(Path(component_dir) / "scheduler_config.json"))
        return cls.from_config({**config, **overrides})


def component_kind(name: str) -> str:
    """"model", "tokenizer", "scheduler", "image_processor" or "other" for a model_index.json component name."""
    if name in MODEL_LOADERS:
        return "model"
    if name.startswith("tokenizer"):
        return "tokenizer"
    if name == "scheduler":
        return "scheduler"
    if name == "image_processor":
        return "image_processor"
    return "other"


def resolve_model_path(path_or_repo_id: str | os.PathLike) -> Path:
    """A local pipeline directory as is; otherwise a Hugging Face repo id through the hub cache."""
    path = Path(path_or_repo_id).expanduser()
    if path.is_dir():
        return path
    text = str(path_or_repo_id)
    if path.exists() or text.count("/") != 1 or text.startswith((".", "/", "~")):
        raise CheckpointError(f"{text}: not a pipeline directory (and not a Hugging Face repo id 'org/name')")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id=text))
    except Exception as e:  # offline, unknown repo, auth: say which id and why
        raise CheckpointError(
            f"{text}: not a local directory, and the Hugging Face hub could not provide it "
            f"({type(e).__name__}: {e}). Offline? Download it first or pass a local path."
        ) from e


def read_model_index(root: str | Path) -> dict[str, tuple[str | None, str | None]]:
    """Component name -> (library, class name) from ``model_index.json``."""
    path = Path(root) / "model_index.json"
    index = read_config(root, "model_index.json", missing=f"{root}: no model_index.json (is this a Diffusers pipeline directory?)")
    out = {}
    for name, entry in index.items():
        if name in _INDEX_METADATA or name.startswith("_"):
            continue
        if isinstance(entry, list) and len(entry) == 2:
            out[name] = (entry[0], entry[1])
        elif entry is not None and not isinstance(entry, (bool, int, float, str)):
            raise CheckpointError(f"{path}: entry {name!r} is {entry!r}, expected [library, ClassName]")
    return out


def check_components(root: str | Path, names: list[str], folders: Mapping[str, str] | None = None
                     ) -> dict[str, dict[str, Any]]:
    """Everything about the named components that can fail without reading weights, checked up front: each
    is in ``model_index.json`` (or in ``folders``: component -> its folder under ``root``, for a layout whose index
    does not list it, such as StepVideo's ``step_llm/``), has its folder, and its config names a registered class
    of the right kind. Returns each model or scheduler component's config (tokenizers: an empty dict)."""
    root = Path(root)
    index = read_model_index(root)
    folders = dict(folders or {})
    configs: dict[str, dict[str, Any]] = {}
    for name in names:
        if name not in index and name not in folders:
            raise CheckpointError(f"{root}/model_index.json: has no component {name!r} (has {sorted(index)})")
        directory = root / folders.get(name, name)
        if not directory.is_dir():
            raise CheckpointError(f"{directory}: component folder missing (model_index.json lists {name!r})")
        kind = component_kind(name)
        if kind == "model":
            config = read_config(directory)
            names_in = class_names_from_config(config, str(directory / "config.json"))
            expected = class_names(_MODEL_KINDS[name])
            if not any(n in expected for n in names_in):
                if not any(ModelRegistry.is_registered(n) for n in names_in):
                    ModelRegistry.resolve_model_cls(names_in)  # UnknownModelError listing what is registered
                raise CheckpointError(f"{directory / 'config.json'}: class {names_in} is not a {name} class "
                                      f"(expected one of {sorted(expected)})")
            ModelRegistry.resolve_model_cls(names_in)
            if not orbax_io.is_converted(directory):  # weight files present (a listing, nothing read)
                find_safetensors(directory)
            configs[name] = config
        elif kind == "scheduler":
            config = read_config(directory, "scheduler_config.json")
            resolve_model_cls(config, str(directory / "scheduler_config.json"))
            configs[name] = config
        elif kind == "tokenizer":
            configs[name] = {}
        elif kind == "image_processor":
            ImageProcessorLoader().load(directory)  # small: parsed and validated whole
            configs[name] = read_config(directory, "preprocessor_config.json")
        else:
            raise CheckpointError(f"{root}: component {name!r} has no loader")
    return configs


def load_components(
    root: str | Path,
    names: list[str] | None = None,
    *,
    mesh: Mesh | None = None,
    precisions: dict[str, str] | None = None,
    overrides: dict[str, dict[str, Any]] | None = None,
    folders: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """Load the named (default: all loadable) components of a pipeline directory. Configs, tokenizers and
    schedulers are checked and loaded first, so their errors come before any weight is read. ``overrides``: per
    component, further config fields (e.g. a transformer's attention_backend). ``folders``: component -> folder
    under ``root`` for components ``model_index.json`` does not list (see check_components)."""
    root = Path(root)
    index = read_model_index(root)
    names = names or [n for n, (lib, cls) in index.items() if lib is not None and component_kind(n) != "other"]
    folders = dict(folders or {})
    check_components(root, names, folders)
    precisions = precisions or {}
    out: dict[str, Any] = {}
    for name in sorted(names, key=lambda n: component_kind(n) == "model"):  # light components first
        directory = root / folders.get(name, name)
        kind = component_kind(name)
        if kind == "model":
            kwargs = {"precision": precisions[name]} if name in precisions else {}
            kwargs.update((overrides or {}).get(name, {}))
            out[name] = MODEL_LOADERS[name]().load(directory, mesh=mesh, **kwargs)
        elif kind == "tokenizer":
            out[name] = TokenizerLoader().load(directory)
        elif kind == "image_processor":
            out[name] = ImageProcessorLoader().load(directory)
        else:
            out[name] = SchedulerLoader().load(directory)
    return out
