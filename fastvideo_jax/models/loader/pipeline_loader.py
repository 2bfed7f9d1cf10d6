"""Whole pipelines: ``model_index.json`` -> one loader per component.

A pipeline directory (Diffusers layout, or one converted by ``fastvideo-jax convert``) holds
``model_index.json`` mapping each component name to ``[library, ClassName]``. Model components (DiT, text
encoder, VAE) load through the component loaders; tokenizers through ``AutoTokenizer``; schedulers through
the registry and their ``from_config``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from jax.sharding import Mesh

from fastvideo_jax.models.loader.component_loader import (
    TextEncoderLoader,
    TokenizerLoader,
    TransformerLoader,
    VAELoader,
    read_config,
)
from fastvideo_jax.models.loader.safetensors_io import CheckpointError
from fastvideo_jax.models.registry import resolve_model_cls

__all__ = [
    "MODEL_LOADERS",
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
}
_INDEX_METADATA = {"_class_name", "_diffusers_version", "_name_or_path", "_fastvideo_jax"}


class SchedulerLoader:
    """A scheduler from ``scheduler/scheduler_config.json`` (class from ``_class_name``)."""

    def load(self, component_dir: str | Path, **overrides: Any):
        config = read_config(component_dir, "scheduler_config.json")
        cls, _ = resolve_model_cls(config, str(Path(component_dir) / "scheduler_config.json"))
        return cls.from_config({**config, **overrides})


def component_kind(name: str) -> str:
    """"model", "tokenizer", "scheduler" or "other" for a model_index.json component name."""
    if name in MODEL_LOADERS:
        return "model"
    if name.startswith("tokenizer"):
        return "tokenizer"
    if name == "scheduler":
        return "scheduler"
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


def load_components(
    root: str | Path,
    names: list[str] | None = None,
    *,
    mesh: Mesh | None = None,
    precisions: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Load the named (default: all loadable) components of a pipeline directory."""
    root = Path(root)
    index = read_model_index(root)
    names = names or [n for n, (lib, cls) in index.items() if lib is not None and component_kind(n) != "other"]
    precisions = precisions or {}
    out: dict[str, Any] = {}
    for name in names:
        if name not in index:
            raise CheckpointError(f"{root}/model_index.json: has no component {name!r} (has {sorted(index)})")
        directory = root / name
        kind = component_kind(name)
        if kind == "model":
            kwargs = {"precision": precisions[name]} if name in precisions else {}
            out[name] = MODEL_LOADERS[name]().load(directory, mesh=mesh, **kwargs)
        elif kind == "tokenizer":
            out[name] = TokenizerLoader().load(directory)
        elif kind == "scheduler":
            out[name] = SchedulerLoader().load(directory)
        else:
            raise CheckpointError(f"{root}: component {name!r} has no loader")
    return out
