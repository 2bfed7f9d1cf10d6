"""Composable pipeline stages over one ``ForwardBatch``: a new pipeline lists the ones it needs."""

from fastvideo_jax.pipelines.stages.base import PipelineStage
from fastvideo_jax.pipelines.stages.decoding import DecodingStage
from fastvideo_jax.pipelines.stages.denoising import DenoisingStage
from fastvideo_jax.pipelines.stages.image import ImageEncodingStage, ImageVAEEncodingStage
from fastvideo_jax.pipelines.stages.image_latent import FirstFrameLatentStage
from fastvideo_jax.pipelines.stages.latents import LatentPreparationStage
from fastvideo_jax.pipelines.stages.text import TextEncodingStage
from fastvideo_jax.pipelines.stages.timesteps import TimestepPreparationStage
from fastvideo_jax.pipelines.stages.validation import InputValidationStage, check_request

__all__ = [
    "DecodingStage",
    "DenoisingStage",
    "FirstFrameLatentStage",
    "ImageEncodingStage",
    "ImageVAEEncodingStage",
    "InputValidationStage",
    "LatentPreparationStage",
    "PipelineStage",
    "TextEncodingStage",
    "TimestepPreparationStage",
    "check_request",
]
