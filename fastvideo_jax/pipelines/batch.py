"""``ForwardBatch``: the one pytree every pipeline stage reads and returns (FastVideo's ForwardBatch, functional).

Stages never mutate it: each returns ``batch.replace(...)``. The request (``param``) and the CFG switch are
static; arrays are leaves. ``conditioning`` holds the DiT's keyword inputs besides ``hidden_states`` and
``timestep``, by their diffusers names (``encoder_hidden_states``, ``encoder_hidden_states_image``,
``encoder_attention_mask``, ``pooled_projections``, ...), each with the cond rows first and, under CFG, the
uncond rows after them: the denoising stage passes them to the DiT as they are, so a new model's inputs need no
change there.
"""

from __future__ import annotations

from typing import Any

import jax
from flax import struct

from fastvideo_jax.configs.sample import SamplingParam

__all__ = ["ForwardBatch"]


@struct.dataclass
class ForwardBatch:
    param: SamplingParam = struct.field(pytree_node=False)
    do_cfg: bool = struct.field(pytree_node=False, default=False)
    # DiT keyword inputs, (2B, ...) under CFG: cond rows, then uncond rows.
    conditioning: dict[str, jax.Array] = struct.field(default_factory=dict)
    # Latents concatenated to the noisy latents on the channel axis at every step (image-to-video), (B, C', F, H, W).
    latent_condition: jax.Array | None = None
    # Wan2.2 TI2V image-to-video: the clean first-frame latent (B, C, 1, H, W), kept in place while denoising.
    first_frame_latent: jax.Array | None = None
    # The request's conditioning image (image-to-video), a uint8 (H, W, 3) RGB array once the pipeline's
    # check_image has read it (the stages resize it). A leaf, not static: arrays do not compare as treedefs do.
    image: Any = None
    # Scheduler tables padded to a fixed length, and the number of real steps (static: it sizes the loop).
    tables: Any = None
    num_steps: int = struct.field(pytree_node=False, default=0)
    latents: jax.Array | None = None  # (B, C, F, H, W) fp32
    frames: Any = None  # (B, F, H, W, 3) uint8 on the host, after decoding
    teacache: dict | None = None  # what TeaCache skipped (host numbers)

    @property
    def batch_size(self) -> int:
        return self.param.num_videos_per_prompt
