"""What a pipeline directory is, learned without reading a weight: its path, configs, defaults and geometry.

``ModelSpec.open`` checks everything that can fail cheaply (overrides, the model path, ``model_index.json``,
each component's folder and class, the scheduler class) and picks the model's defaults from its DiT config.
``check_request`` (pipelines.stages.validation) then rejects a request the model cannot run (sizes, frame counts, a token grid larger than
the DiT's RoPE table) before minutes go into loading weights.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

from fastvideo_jax.configs.pipelines.base import PipelineConfig
from fastvideo_jax.configs.pipelines.registry import TINY_MODEL_IDS, get_model_defaults
from fastvideo_jax.configs.sample import SamplingParam
from fastvideo_jax.errors import CheckpointError, UserError
from fastvideo_jax.models.loader.component_loader import read_config
from fastvideo_jax.models.loader.pipeline_loader import check_components, read_model_index, resolve_model_path
from fastvideo_jax.models.registry import resolve_model_cls
from fastvideo_jax.pipelines.registry import resolve_pipeline_cls
from fastvideo_jax.pipelines.stages.validation import check_request

__all__ = ["ModelSpec", "check_request"]


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    path: Path
    config: PipelineConfig
    defaults: SamplingParam
    dit_arch: Any
    vae_arch: Any
    pipeline_cls: type = None  # resolved from model_index.json's _class_name by the pipeline registry
    components: tuple[str, ...] = ()  # the components the pipeline loads
    folders: tuple[tuple[str, str], ...] = ()  # (component, folder) for components model_index.json does not list

    @classmethod
    def open(cls, model: str | Path, *, pipeline_config: PipelineConfig | None = None, **overrides: Any) -> "ModelSpec":
        """``model``: a pipeline directory, a Hugging Face repo id (through the hub cache) or ``"tiny-wan"``.
        ``overrides`` replace PipelineConfig fields and are checked before the model is looked up."""
        (pipeline_config or PipelineConfig()).replace(**overrides).validate()
        if str(model) in TINY_MODEL_IDS:
            from fastvideo_jax.testing.tiny_pipeline import ensure_tiny  # written on first use

            path = ensure_tiny(str(model))
        else:
            path = resolve_model_path(model)
        index = read_model_index(path)
        raw_index = read_config(path, "model_index.json")
        pipeline_name = raw_index.get("_class_name")
        pipeline_cls = resolve_pipeline_cls(pipeline_name, str(path / "model_index.json"))
        folders = pipeline_cls.component_folders(path, index)  # components kept outside the index's listing
        available = {**index, **{name: ("folder", folder) for name, folder in folders.items()}}
        missing = [n for n in pipeline_cls._required_components if n not in available or available[n][0] is None]
        if missing:
            raise CheckpointError(f"{path}/model_index.json: {pipeline_name} needs the components {missing}")
        names = pipeline_cls.components_to_load(available)
        configs = check_components(path, names, folders)
        defaults_config, sampling = get_model_defaults(model, configs.get("transformer"), raw_index,
                                                       fallback=_family_defaults(pipeline_cls), family=pipeline_name)
        config = (pipeline_config or _with_index_fields(defaults_config, raw_index, path)).replace(**overrides)
        config = config.validate()
        pipeline_cls.check_config(config, names)
        return cls(path, config, sampling, _arch(configs["transformer"]), _arch(configs["vae"]), pipeline_cls,
                   tuple(names), tuple(sorted(folders.items())))

    def sampling_param(self, **overrides: Any) -> SamplingParam:
        """This model's defaults with ``overrides`` (None keeps a default), checked against the model."""
        param = self.defaults.replace(**overrides)
        check_request(param, self.dit_arch, self.vae_arch, self.config)
        return param


# model_index.json fields that are PipelineConfig fields (diffusers' WanPipeline registers them to its config):
# the checkpoint's own statement wins over a preset's; the caller's overrides win over both.
_INDEX_CONFIG_FIELDS = ("boundary_ratio", "expand_timesteps")


def _with_index_fields(config: PipelineConfig, raw_index: dict[str, Any], path: Path) -> PipelineConfig:
    fields = {k: raw_index[k] for k in _INDEX_CONFIG_FIELDS if k in raw_index}
    if not fields:
        return config
    try:
        return config.replace(**fields).validate()
    except UserError as e:
        raise CheckpointError(f"{path}/model_index.json: {e}") from None


def _family_defaults(pipeline_cls: type) -> tuple[PipelineConfig, SamplingParam] | None:
    try:
        return pipeline_cls.default_config()
    except NotImplementedError:
        return None


def _arch(raw: dict[str, Any]) -> Any:
    """A component's architecture config from its config.json (unused-key warnings are the loader's to give)."""
    model_cls, _ = resolve_model_cls(raw)
    base = logging.getLogger("fastvideo_jax.configs.models.base")
    level = base.level
    base.setLevel(logging.ERROR)
    try:
        return model_cls.config_class().update_model_arch(raw).arch_config
    finally:
        base.setLevel(level)
