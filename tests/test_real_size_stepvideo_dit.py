"""StepVideo's 30B DiT at its real size maps completely: the PyTorch ``StepVideoModel``'s parameter names and
shapes (built on the meta device, no memory) convert onto our abstract model with no unknown, missing or
mis-shaped tensor, and in the same total size (the helper is tests/test_real_size_plans.py's)."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import torch

from tests.stepvideo_oracle import diffsynth_module
from tests.test_real_size_plans import _plan

D = 48 * 128  # hidden size
# per block: wqkv 3D^2 + wo D^2 + wq D^2 + wkv 2D^2 + wo D^2 + FFN 8D^2, two affine LayerNorms (4D), the
# (6, D) modulation table and four q/k RMSNorms of 128
PER_BLOCK = 16 * D * D + 4 * D + 6 * D + 4 * 128
OUTSIDE = ((64 * D + D) + 2 * D + (D * 64 + 64)  # patch embedding, output table, proj_out
           + (256 * D + D) + (D * D + D) + (D * 6 * D + 6 * D)  # adaLN-single: timestep MLP, 6-way projection
           + (1024 * D + D) + (6144 * D + D) + (D * D + D))  # clip_projection, caption_projection


def test_stepvideo_dit_real_size():
    from fastvideo_jax.configs.models.dits.stepvideo import STEPVIDEO_PRESETS
    from fastvideo_jax.models.dits.stepvideo import StepVideoModel as Ours

    arch = dict(STEPVIDEO_PRESETS["stepvideo-t2v"])
    with torch.device("meta"):
        ref = diffsynth_module("stepvideo_dit").StepVideoModel(**{**arch, "caption_channels": [6144, 1024]})
    n, specs = _plan(ref, Ours, arch, precision="bf16")  # every tensor mapped, same total
    print(f"StepVideo DiT parameters: {n:,}")
    assert n == sum(p.numel() for p in ref.parameters()) == 48 * PER_BLOCK + OUTSIDE == 29_342_478_400, n
    assert specs[("transformer_blocks", "attn1", "wqkv", "kernel")].shape == (48, D, 3 * D)
    assert specs[("transformer_blocks", "attn2", "wkv", "kernel")].shape == (48, D, 2 * D)
    assert specs[("transformer_blocks", "ff", "fc_in", "kernel")].shape == (48, D, 4 * D)
    assert specs[("pos_embed", "proj", "kernel")].shape == (1, 1, 64, D)
    assert specs[("caption_projection", "linear_1", "kernel")].shape == (6144, D)
    assert specs[("clip_projection", "kernel")].shape == (1024, D)
    assert specs[("proj_out", "kernel")].shape == (D, 64)
    assert specs[("transformer_blocks", "attn1", "wqkv", "kernel")].dtype == np.dtype(jnp.bfloat16)
    assert specs[("transformer_blocks", "scale_shift_table")].dtype == np.dtype(np.float32)  # kept in fp32
