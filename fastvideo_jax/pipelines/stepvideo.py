"""StepVideo-T2V text-to-video (``StepVideoPipeline``): Step-LLM + bilingual CLIP (BERT) prompts with the
original's magic suffixes -> CFG over the shifted flow schedule, in the original's time direction -> chunked VAE
decode.

The schedule, as Step-Video-T2V's ``FlowMatchDiscreteScheduler`` (and diffsynth's ``FlowMatchScheduler(shift=13,
reverse_sigmas=True, num_train_timesteps=1)``) runs it: ``s = shift(linspace(1, 0, n + 1))`` (``s`` = the noise
level, 1 -> 0), the DiT is conditioned on ``t = 1 - s`` (in [0, 1), 0 = pure noise; the DiT multiplies by 1000
itself) and the Euler update is ``x + (t_next - t) * v``. Those are the tables of the shared
``FlowMatchEulerScheduler`` with its sigmas replaced by ``1 - s``, so its step runs unchanged. CFG is
``uncond + scale * (cond - uncond)`` (the shared denoising stage), conditioning passed to the DiT by keyword:
``encoder_hidden_states`` (Step-LLM), ``encoder_hidden_states_2`` (BERT), ``encoder_attention_mask`` (77 ones,
then the LLM mask).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from fastvideo_jax.configs.pipelines.stepvideo import StepVideoT2VConfig
from fastvideo_jax.configs.sample import SamplingParam
from fastvideo_jax.dtypes import to_dtype
from fastvideo_jax.errors import CheckpointError
from fastvideo_jax.models.encoders.stepvideo_prompt import encode_stepvideo_prompts
from fastvideo_jax.parallel.memory import move_params
from fastvideo_jax.pipelines.base import ComposedPipeline
from fastvideo_jax.pipelines.batch import ForwardBatch
from fastvideo_jax.pipelines.stages import (
    DecodingStage,
    DenoisingStage,
    InputValidationStage,
    LatentPreparationStage,
    PipelineStage,
    TimestepPreparationStage,
)
from fastvideo_jax.pipelines.stages.timesteps import pad_tables
from fastvideo_jax.pipelines.stages.validation import latent_frames
from fastvideo_jax.schedulers._common import host_table
from fastvideo_jax.schedulers.flow_match_euler import EulerTables, FlowMatchEulerScheduler

__all__ = ["StepVideoPipeline", "StepVideoTextEncodingStage", "stepvideo_tables"]


def stepvideo_tables(scheduler: FlowMatchEulerScheduler, num_steps: int) -> EulerTables:
    """The original's schedule for ``num_steps``: timesteps ``1 - s[:-1]``, Euler "sigmas" ``1 - s`` (0 -> 1),
    ``s`` the shifted noise levels of ``linspace(1, 0, n + 1)`` (the scheduler's shift)."""
    shifted = np.asarray(scheduler.set_sigmas(np.linspace(1.0, 0.0, num_steps + 1)[:-1]).sigmas, np.float32)
    t = np.float32(1.0) - shifted  # (n + 1,), ends at 1 (clean)
    return EulerTables(host_table(t[:-1]), host_table(t))


class StepVideoTimestepStage(TimestepPreparationStage):
    def tables(self, num_steps: int) -> Any:
        return pad_tables(stepvideo_tables(self.scheduler, num_steps), num_steps)


class StepVideoLatentStage(LatentPreparationStage):
    """(B, 64, num_frames / 17 x 3, H / 16, W / 16): the VAE's 17-frame chunks of 3 latent frames."""

    def __init__(self, num_channels: int, temporal: int, spatial: int, frame_chunk: int):
        super().__init__(num_channels, temporal, spatial)
        self.frame_chunk = frame_chunk

    def latent_shape(self, batch: int, num_frames: int, height: int, width: int) -> tuple[int, ...]:
        frames = latent_frames(num_frames, self.temporal, self.frame_chunk)
        return (batch, self.num_channels, frames, height // self.spatial, width // self.spatial)


class StepVideoTextEncodingStage(PipelineStage):
    """``prompt + pos_magic`` (and, under CFG, ``negative_prompt + neg_magic``) through both encoders -> the DiT's
    ``encoder_hidden_states`` (Step-LLM), ``encoder_hidden_states_2`` (BERT), ``encoder_attention_mask``.

    ``config.text_encoder_offload`` keeps both encoders' parameters in host memory between prompts (moved to the
    devices to encode, in their mesh layout), so denoising has the device memory: Step-LLM is 18.8B parameters
    (35 GiB in bf16)."""

    def __init__(self, tokenizer: Any, text_encoder: Any, tokenizer_2: Any, text_encoder_2: Any, *,
                 config: StepVideoT2VConfig, dtype: Any):
        self.tokenizer, self.text_encoder = tokenizer, text_encoder
        self.tokenizer_2, self.text_encoder_2 = tokenizer_2, text_encoder_2
        self.config, self.dtype = config, dtype

    def _place_encoders(self, memory_kind: str | None) -> None:
        for encoder in (self.text_encoder, self.text_encoder_2):
            move_params(encoder, memory_kind)

    def texts(self, param: SamplingParam, n: int, do_cfg: bool) -> list[str]:
        c = self.config
        texts = [param.prompt + c.pos_magic] * n
        return texts + [(param.negative_prompt or "") + c.neg_magic] * n if do_cfg else texts

    def __call__(self, batch: ForwardBatch) -> ForwardBatch:
        c = self.config
        if c.text_encoder_offload:
            self._place_encoders(None)
        try:
            llm, clip, mask = encode_stepvideo_prompts(
                self.tokenizer, self.text_encoder, self.tokenizer_2, self.text_encoder_2,
                self.texts(batch.param, batch.batch_size, batch.do_cfg), text_len=c.text_len, clip_len=c.clip_len,
                dtype=self.dtype)
        finally:
            if c.text_encoder_offload:
                self._place_encoders("pinned_host")
        return batch.replace(conditioning={**batch.conditioning, "encoder_hidden_states": llm,
                                           "encoder_hidden_states_2": clip, "encoder_attention_mask": mask})


class StepVideoPipeline(ComposedPipeline):
    _required_components = ("tokenizer", "text_encoder", "tokenizer_2", "text_encoder_2", "transformer", "vae",
                            "scheduler")

    def __init__(self, components: Mapping[str, Any], config: StepVideoT2VConfig):
        if not isinstance(config, StepVideoT2VConfig):
            raise TypeError(f"StepVideoPipeline needs a StepVideoT2VConfig (magic suffixes, frame chunk), got "
                            f"{type(config).__name__}")
        components = dict(components)
        vae_arch = getattr(getattr(components.get("vae"), "config", None), "arch_config", None)
        frame_len = getattr(vae_arch, "frame_len", None)
        if frame_len is not None and frame_len != config.frame_chunk:
            raise CheckpointError(f"StepVideoPipeline: the VAE decodes {frame_len}-frame chunks, the config says "
                                  f"frame_chunk={config.frame_chunk}")
        scheduler = components.get("scheduler")
        if scheduler is not None:
            if not isinstance(scheduler, FlowMatchEulerScheduler):
                raise CheckpointError(f"StepVideoPipeline samples with the flow-match Euler scheduler "
                                      f"(FlowMatchEulerDiscreteScheduler), got {type(scheduler).__name__}")
            if config.flow_shift is not None:
                components["scheduler"] = dataclasses.replace(scheduler, shift=float(config.flow_shift))
        super().__init__(components, config)

    @classmethod
    def component_folders(cls, root: Path, index: Mapping[str, Any]) -> dict[str, str]:
        """The release's / FastVideo's layout: the text encoders and their tokenizers in ``step_llm/`` and
        ``hunyuan_clip/{clip_text_encoder,tokenizer}/``, outside ``model_index.json`` (used when it does not list
        them and those folders exist)."""
        candidates = {"text_encoder": "step_llm", "tokenizer": "step_llm",
                      "text_encoder_2": "hunyuan_clip/clip_text_encoder", "tokenizer_2": "hunyuan_clip/tokenizer"}
        return {name: folder for name, folder in candidates.items()
                if name not in index and (Path(root) / folder).is_dir()}

    @classmethod
    def default_config(cls) -> tuple[StepVideoT2VConfig, SamplingParam]:
        return StepVideoT2VConfig(), SamplingParam(height=544, width=992, num_frames=204, num_inference_steps=50,
                                                guidance_scale=9.0, fps=25)

    def create_stages(self) -> list[PipelineStage]:
        c, dit, vae = self.config, self.transformer, self.vae
        dit_arch, vae_arch = dit.config.arch_config, vae.config.arch_config
        return [
            InputValidationStage(dit_arch, vae_arch, c),
            StepVideoTextEncodingStage(self.tokenizer, self.text_encoder, self.tokenizer_2, self.text_encoder_2,
                                       config=c, dtype=to_dtype(dit.config.precision)),
            StepVideoTimestepStage(self.scheduler),
            StepVideoLatentStage(dit_arch.in_channels, vae_arch.temporal_compression_ratio,
                                 vae_arch.spatial_compression_ratio, c.frame_chunk),
            DenoisingStage(dit, self.scheduler),
            DecodingStage(vae, tiled=c.vae_tiling),
        ]
