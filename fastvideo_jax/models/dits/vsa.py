"""Video sparse attention in a DiT (Wan / FastWan): the per-call sparsity checked on the host, the static top-k
width, and the self-attention function a block hands to Ulysses.

The model's ``vsa_sparsity`` (config) fixes the compiled top-k width per latent grid; the sparsity a call runs at
is data (a traced fp32 scalar), so a pipeline or a training loop that changes it (FastVideo decays it during
training) does not recompile, as long as it does not go below the config's value (that would need more cubes
than the compiled width holds).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from fastvideo_jax.attention.api import AttentionBackend
from fastvideo_jax.attention.video_sparse import video_sparse_attention
from fastvideo_jax.attention.video_sparse_layout import check_sparsity, cube_layout, topk_count
from fastvideo_jax.errors import UserError

__all__ = ["VsaLayer", "uses_vsa", "video_sparse_attend", "vsa_layer", "vsa_sparsity_input"]


def uses_vsa(config) -> bool:
    """Whether a DiT config asks for video sparse attention (``attention_backend`` VIDEO_SPARSE_ATTN)."""
    return AttentionBackend.parse(config.attention_backend) is AttentionBackend.VIDEO_SPARSE_ATTN


def vsa_sparsity_input(config, value, model_name: str):
    """The sparsity one call runs at: ``value`` (host number or traced scalar) or the config's, as fp32 data;
    None for a model without VSA (which refuses a value). ``UserError`` for a value outside [0, 1) or below the
    config's ``vsa_sparsity`` (the compiled top-k width)."""
    if not uses_vsa(config):
        if value is not None:
            raise UserError(f"{model_name}: vsa_sparsity needs attention_backend='video_sparse_attn' "
                            f"(this model runs {config.attention_backend or 'dense'} attention)")
        return None
    if value is None:
        value = config.vsa_sparsity
    if isinstance(value, jax.core.Tracer):
        return value.astype(jnp.float32)
    try:
        s = check_sparsity(np.asarray(value).item())
    except ValueError as e:
        raise UserError(f"{model_name}: {e}") from None
    if s < config.vsa_sparsity:
        raise UserError(f"{model_name}: vsa_sparsity={s} is below the model's vsa_sparsity={config.vsa_sparsity}, "
                        f"which fixes the compiled top-k width; load the model with the lower value instead")
    return np.float32(s)


@dataclasses.dataclass(frozen=True)
class VsaLayer:
    """What a block's self-attention needs: the static token grid and top-k width, and the traced sparsity."""

    grid: tuple[int, int, int]
    width: int
    sparsity: jax.Array


def vsa_layer(config, grid, sparsity) -> VsaLayer:
    """The layer inputs for a latent token ``grid``; the width is the top-k at the config's sparsity."""
    width = topk_count(config.vsa_sparsity, cube_layout(tuple(grid)).num_cubes)
    return VsaLayer(tuple(int(g) for g in grid), width, sparsity)


def video_sparse_attend(vsa: VsaLayer, head_dim: int, backend=None):
    """``attend(q, k, v_and_gate, kv_mask)`` for ``ulysses_attention``: the gate rides with v on its last axis
    (so it goes through the same all-to-all), split here; sequence padding (a suffix) is cut off before the op
    and given zero output."""
    n = math.prod(vsa.grid)

    def attend(q, k, vg, kv_mask):
        v, gate = vg[..., :head_dim], vg[..., head_dim:]
        L = q.shape[1]
        if L != n:
            q, k, v, gate = (x[:, :n] for x in (q, k, v, gate))
        out = video_sparse_attention(q, k, v, gate, grid=vsa.grid, sparsity=vsa.sparsity, max_topk=vsa.width,
                                     backend=backend)
        if L != n:
            out = jnp.pad(out, ((0, 0), (0, L - n), (0, 0), (0, 0)))
        return out

    return attend
