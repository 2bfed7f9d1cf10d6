"""``ComposedPipeline``: a pipeline is its components, its config and a list of stages over one batch.

A pipeline class declares the ``model_index.json`` components it needs (``_required_components``) and may use
(``_optional_components``), its family defaults (``default_config``), and builds its stages in
``create_stages``. Running it threads one ``ForwardBatch`` through the stages. Components are reachable as
attributes (``pipeline.transformer``, ``pipeline.vae``, ...). Whether a request takes an input image is the
class's ``image_input`` (``"none"``, ``"optional"`` or ``"required"``, per config): ``check_image`` turns the image
given (a path, a ``PIL.Image`` or a uint8 (H, W, 3) array) into the batch's uint8 array, or refuses it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from fastvideo_jax.configs.pipelines.base import PipelineConfig
from fastvideo_jax.configs.sample import SamplingParam
from fastvideo_jax.errors import CheckpointError, UserError
from fastvideo_jax.models.encoders.image_processor import load_rgb
from fastvideo_jax.pipelines.batch import ForwardBatch
from fastvideo_jax.pipelines.lora import LoRASlot, rescale_lora, switch_lora
from fastvideo_jax.pipelines.stages.base import PipelineStage

__all__ = ["ComposedPipeline"]

S = TypeVar("S", bound=PipelineStage)


class ComposedPipeline:
    _required_components: ClassVar[tuple[str, ...]] = ()
    _optional_components: ClassVar[tuple[str, ...]] = ()

    def __init__(self, components: Mapping[str, Any], config: PipelineConfig):
        name = type(self).__name__
        missing = [c for c in self._required_components if components.get(c) is None]
        if missing:
            raise CheckpointError(f"{name} needs the component(s) {missing} (given: {sorted(components)})")
        unknown = sorted(set(components) - set(self._required_components) - set(self._optional_components))
        if unknown:
            raise ValueError(f"{name} takes the components {list(self._required_components)} and optionally "
                             f"{list(self._optional_components)}; got unknown {unknown}")
        self.components = dict(components)
        self.config = config
        self.stages: tuple[PipelineStage, ...] = tuple(self.create_stages())

    @classmethod
    def components_to_load(cls, available: Mapping[str, Any]) -> list[str]:
        """The components to load from a ``model_index.json`` listing ``available`` (name -> entry; an entry
        of None is an absent component): every required one and the optional ones present."""
        return [*cls._required_components,
                *(c for c in cls._optional_components if available.get(c) not in (None, (None, None)))]

    @classmethod
    def component_folders(cls, root: Path, index: Mapping[str, Any]) -> dict[str, str]:
        """Components this layout keeps in folders ``model_index.json`` (``index``) does not list: name -> folder
        under ``root`` (StepVideo's ``step_llm/``, ...). Default: none, every component is in the index."""
        return {}

    @classmethod
    def default_config(cls) -> tuple[PipelineConfig, SamplingParam]:
        """The family's defaults for a checkpoint of this pipeline class that no preset names."""
        raise NotImplementedError(f"{cls.__name__} has no family defaults: register a preset for the model")

    @classmethod
    def check_config(cls, config: PipelineConfig, components: Sequence[str]) -> None:
        """Raise ``CheckpointError`` when ``config`` cannot drive this pipeline with ``components`` (names);
        called before any weight is read. Default: nothing to check."""

    @classmethod
    def image_input(cls, config: PipelineConfig) -> str:
        """Whether a request with ``config`` takes an input image: ``"none"``, ``"optional"`` or ``"required"``."""
        return "none"

    @classmethod
    def check_image(cls, image: Any, config: PipelineConfig) -> Any:
        """The request's image as a uint8 (H, W, 3) RGB array (None without one); a ``UserError`` for an image this
        pipeline does not take, a missing one it needs, an unreadable path or an array of the wrong shape/dtype.
        Cheap: run it before any weight is loaded."""
        policy = cls.image_input(config)
        if image is None:
            if policy == "required":
                raise UserError(f"{cls.__name__} is image-to-video: give the first frame as image=<path | PIL.Image "
                                "| uint8 (H, W, 3) array> (CLI: --image PATH)")
            return None
        if policy == "none":
            raise UserError(f"this model ({cls.__name__}) is text-to-video only: it takes no image (image-to-video "
                            "needs an I2V or TI2V checkpoint, e.g. Wan-AI/Wan2.1-I2V-14B-480P-Diffusers)")
        return load_rgb(image)

    def create_stages(self) -> list[PipelineStage]:
        raise NotImplementedError(f"{type(self).__name__} must implement create_stages")

    def __getattr__(self, name: str) -> Any:
        if name == "components":  # not set yet (inside __init__): no recursion
            raise AttributeError(name)
        if name in self._required_components or name in self._optional_components:
            return self.components.get(name)
        raise AttributeError(f"{type(self).__name__} has no attribute or component {name!r}")

    # ---- LoRA on the DiT (pipelines/lora.py) ---------------------------------------------------------------
    @property
    def lora(self) -> LoRASlot:
        """The LoRA attached to ``transformer`` (``path`` None: none)."""
        return self.loras.get("transformer", LoRASlot())

    @property
    def loras(self) -> dict[str, LoRASlot]:
        """The LoRA of each DiT component that has one (``transformer``, Wan2.2's ``transformer_2``)."""
        return dict(self.__dict__.get("_loras", {}))

    def set_lora(self, path, scale: float = 1.0, *, merge: bool = True, component: str = "transformer") -> None:
        """Attach the LoRA file ``path`` to the DiT ``component`` (``transformer``; ``transformer_2``: Wan2.2
        A14B's low-noise expert) at ``scale`` (None: drop the current one), replacing any other without reloading
        the model: ``merge`` folds it into the weights (fastest steps), else it is kept separate (another adapter
        of the same ranks then runs on the compiled steps). The file is checked against the DiT before anything
        changes."""
        dit = self._lora_dit(component)
        loras = self.loras
        loras[component] = switch_lora(dit, loras.get(component, LoRASlot()), path, scale, merge=merge)
        self._loras = {c: slot for c, slot in loras.items() if slot.path is not None}
        self._refresh_stages()

    def set_lora_scale(self, scale: float, *, component: str = "transformer") -> None:
        """The attached LoRA at another scale (its file is not read again)."""
        dit = self._lora_dit(component)
        loras = self.loras
        loras[component] = rescale_lora(dit, loras.get(component, LoRASlot()), scale)
        self._loras = loras
        self._refresh_stages()

    def _lora_dit(self, component: str):
        dits = [c for c in ("transformer", "transformer_2") if self.components.get(c) is not None]
        if component not in dits:
            raise UserError(f"{type(self).__name__}: a LoRA goes on a DiT component, one of {dits}; got {component!r}")
        return self.components[component]

    def _refresh_stages(self) -> None:
        for s in self.stages:
            refresh = getattr(s, "refresh", None)
            if refresh is not None:
                refresh()

    def stage(self, kind: type[S]) -> S:
        """This pipeline's first stage of type ``kind``."""
        for s in self.stages:
            if isinstance(s, kind):
                return s
        raise LookupError(f"{type(self).__name__} has no {kind.__name__} (stages: {list(self.stages)})")

    def initial_batch(self, param: SamplingParam, latents: Any | None = None, image: Any | None = None) -> ForwardBatch:
        return ForwardBatch(param=param, do_cfg=param.guidance_scale > 1.0, latents=latents,
                            image=self.check_image(image, self.config))

    def run(self, batch: ForwardBatch) -> ForwardBatch:
        for stage in self.stages:
            batch = stage(batch)
        return batch

    def __call__(self, param: SamplingParam, latents: Any | None = None, progress: bool = True,
                 image: Any | None = None) -> dict[str, Any]:
        """One request: ``latents`` (the final latents, on the devices), ``frames`` (B, F, H, W, 3) uint8 and,
        under TeaCache, ``teacache`` (the steps it skipped). ``image``: the input image of an image-to-video
        pipeline (see ``check_image``)."""
        batch = self.initial_batch(param, latents, image)  # the image is checked before any work
        for s in self.stages:
            if hasattr(s, "progress"):
                s.progress = progress
        batch = self.run(batch)
        out = {"latents": batch.latents, "frames": batch.frames}
        if batch.teacache is not None:
            out["teacache"] = batch.teacache
        return out
