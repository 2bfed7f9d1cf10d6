"""Image conditioning for image-to-video (Wan2.1 I2V), as diffusers' ``WanImageToVideoPipeline`` builds it.

``ImageEncodingStage``: the request image through the CLIP image processor and vision tower; the penultimate
hidden state is the DiT's ``encoder_hidden_states_image``, one row per video and the same rows again for the
uncond half under CFG (diffusers passes the same image embeddings to both calls).

``ImageVAEEncodingStage``: the image resized to the requested (height, width) with Pillow's Lanczos filter and no
crop (diffusers' ``VideoProcessor.preprocess`` in its default resize mode: the aspect ratio follows the request),
scaled to [-1, 1], followed by ``num_frames - 1`` zero frames, VAE-encoded (the posterior mode, diffusers'
``sample_mode="argmax"``), normalised with the VAE's latents mean/std, and preceded by the 4-channel frame mask
(ones on the first latent frame, which stands for the first pixel frame repeated ``temporal`` times, zeros after):
``batch.latent_condition`` (B, 4 + z, F', H', W'), concatenated to the noisy latents at every step.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from fastvideo_jax.dtypes import to_dtype
from fastvideo_jax.errors import NonFiniteError
from fastvideo_jax.models.encoders.image_processor import load_rgb
from fastvideo_jax.parallel.activations import mesh_scope
from fastvideo_jax.parallel.memory import params_mesh
from fastvideo_jax.pipelines.batch import ForwardBatch
from fastvideo_jax.pipelines.stages.base import PipelineStage
from fastvideo_jax.pipelines.stages.image_latent import image_to_pixels

__all__ = ["ImageEncodingStage", "ImageVAEEncodingStage", "frame_mask", "video_condition"]

def _on_mesh(module: Any, x: jax.Array) -> tuple[Any, jax.Array]:
    """The mesh ``module``'s parameters live on (or None) and ``x`` replicated on it."""
    mesh = params_mesh(module)
    if mesh is not None and mesh.devices.size > 1:
        return mesh, jax.device_put(x, NamedSharding(mesh, PartitionSpec()))
    return None, x


class ImageEncodingStage(PipelineStage):
    """``image_processor`` + ``image_encoder`` -> ``conditioning[output_key]`` (B or 2B, L_img, D_img) in ``dtype``
    (the DiT's), from the encoder's hidden state ``hidden_state_index`` (-2: the penultimate layer)."""

    def __init__(self, image_processor: Any, image_encoder: Any, *, dtype: Any, hidden_state_index: int = -2,
                 output_key: str = "encoder_hidden_states_image"):
        self.image_processor, self.image_encoder = image_processor, image_encoder
        self.dtype, self.hidden_state_index, self.output_key = dtype, hidden_state_index, output_key

    def encode(self, image: Any) -> jax.Array:
        """(1, L_img, D_img) of one image (a path, ``PIL.Image`` or uint8 (H, W, 3) array)."""
        pixels = jnp.asarray(self.image_processor(load_rgb(image)))
        mesh, pixels = _on_mesh(self.image_encoder, pixels)
        with mesh_scope(mesh):
            out = self.image_encoder(pixels, output_hidden_states=True)
        embeds = out.hidden_states[self.hidden_state_index]
        if not bool(jnp.all(jnp.isfinite(embeds))):
            raise NonFiniteError("the image encoder produced NaN or Inf features (try image_encoder_precision='fp32')")
        return embeds.astype(self.dtype)

    def __call__(self, batch: ForwardBatch) -> ForwardBatch:
        if batch.image is None:
            raise ValueError("ImageEncodingStage: the batch has no image (the pipeline's check_image requires one)")
        embeds = self.encode(batch.image)
        rows = batch.batch_size * (2 if batch.do_cfg else 1)  # the uncond rows see the same image
        embeds = jnp.repeat(embeds, rows, axis=0)
        return batch.replace(conditioning={**batch.conditioning, self.output_key: embeds})


def video_condition(image: np.ndarray, num_frames: int, height: int, width: int) -> np.ndarray:
    """(1, 3, num_frames, height, width) float32: the uint8 image resized (Lanczos, no crop) and scaled to [-1, 1] as
    diffusers' ``VideoProcessor.preprocess``, then ``num_frames - 1`` zero frames."""
    first = image_to_pixels(image, height, width)[:, :, None]  # (1, 3, 1, H, W)
    return np.concatenate([first, np.zeros((1, 3, num_frames - 1, height, width), np.float32)], axis=2)


def frame_mask(batch: int, latent_frames: int, height: int, width: int, temporal: int) -> jax.Array:
    """(B, temporal, F', H', W') fp32: which pixel frames are given. Pixel frame 0 (given) is repeated ``temporal``
    times so the 1 + temporal * (F' - 1) frames fill F' latent frames of ``temporal`` channels each; with only the
    first frame given that is ones on latent frame 0 and zeros after (diffusers' ``mask_lat_size``)."""
    given = jnp.zeros((batch, 1, 1 + temporal * (latent_frames - 1), height, width), jnp.float32).at[:, :, 0].set(1.0)
    given = jnp.concatenate([jnp.repeat(given[:, :, :1], temporal, axis=2), given[:, :, 1:]], axis=2)
    return given.reshape(batch, latent_frames, temporal, height, width).transpose(0, 2, 1, 3, 4)


class ImageVAEEncodingStage(PipelineStage):
    """``vae``: the request image as the first frame of a video of zeros, encoded and normalised, with the frame
    mask before it on channels -> ``batch.latent_condition`` (B, temporal + z, F', H', W') fp32. ``tiled``: encode
    in the VAE config's spatial tiles (the pipeline's ``vae_tiling``)."""

    def __init__(self, vae: Any, *, tiled: bool = False):
        self.vae, self.tiled = vae, tiled
        arch = vae.config.arch_config
        self.temporal, self.spatial = arch.temporal_compression_ratio, arch.spatial_compression_ratio

    def encode(self, image: Any, num_frames: int, height: int, width: int) -> jax.Array:
        """(1, z, F', H', W') fp32: the normalised posterior mode of the image followed by zero frames."""
        video = jnp.asarray(video_condition(load_rgb(image), num_frames, height, width))
        video = video.astype(to_dtype(self.vae.config.precision))
        mesh, video = _on_mesh(self.vae, video)
        with mesh_scope(mesh):
            latents = self.vae.encode(video, tiled=self.tiled)
        latents = self.vae.normalize_latents(latents.astype(jnp.float32))
        if not bool(jnp.all(jnp.isfinite(latents))):
            raise NonFiniteError(f"the VAE encoded the image to NaN or Inf (VAE precision {self.vae.config.precision}; "
                                 "try vae_decode_precision='fp32')")
        return latents

    def __call__(self, batch: ForwardBatch) -> ForwardBatch:
        if batch.image is None:
            raise ValueError("ImageVAEEncodingStage: the batch has no image (check_image requires one)")
        p, n = batch.param, batch.batch_size
        latents = jnp.repeat(self.encode(batch.image, p.num_frames, p.height, p.width), n, axis=0)
        mask = frame_mask(n, latents.shape[2], latents.shape[3], latents.shape[4], self.temporal)
        return batch.replace(latent_condition=jnp.concatenate([mask, latents], axis=1))
