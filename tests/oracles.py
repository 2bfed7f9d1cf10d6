"""PyTorch oracles for parity tests: tiny reference models with noised parameters, saved to disk.

Test-only: imports torch and diffusers. Noise goes into every parameter because many layers are zero- or
one-initialised (adaLN gates, output projections, norm scales) and would hide bugs.
"""

from __future__ import annotations

import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import torch

TINY_WAN = dict(
    patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=16, out_channels=16,
    text_dim=32, freq_dim=256, ffn_dim=32, num_layers=2, cross_attn_norm=True,
    qk_norm="rms_norm_across_heads", rope_max_seq_len=32,
)
TINY_WAN_I2V = dict(TINY_WAN, in_channels=36, image_dim=4, added_kv_proj_dim=24)


def add_noise(module: torch.nn.Module, scale: float = 0.1, seed: int = 1) -> torch.nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=gen, dtype=torch.float32).to(p.dtype) * scale)
    return module


def tiny_wan_dit(directory: Path, seed: int = 0, **overrides) -> torch.nn.Module:
    """A noised tiny diffusers WanTransformer3DModel, saved with save_pretrained into ``directory``."""
    from diffusers import WanTransformer3DModel

    torch.manual_seed(seed)
    model = add_noise(WanTransformer3DModel(**{**TINY_WAN, **overrides}).eval(), seed=seed + 1)
    model.save_pretrained(directory)
    return model


def tiny_wan_parts() -> dict:
    """The noised tiny diffusers/transformers parts of a Wan pipeline besides its DiT: VAE, UMT5 text encoder,
    its tokenizer and a flow UniPC scheduler (shift 3)."""
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler
    from transformers import UMT5Config, UMT5EncoderModel

    from fastvideo_jax.testing.tokenizer import build_t5_tokenizer

    vae = add_noise(AutoencoderKLWan(base_dim=8, z_dim=16, dim_mult=[1, 2, 2, 2], num_res_blocks=1,
                                     temperal_downsample=[False, True, True]).eval(), scale=0.05, seed=2)
    text_encoder = add_noise(UMT5EncoderModel(UMT5Config(
        vocab_size=256, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, relative_attention_num_buckets=8,
        relative_attention_max_distance=16, feed_forward_proj="gated-gelu", dropout_rate=0.0)).eval(), seed=3)
    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)
    return dict(tokenizer=build_t5_tokenizer(), text_encoder=text_encoder, vae=vae, scheduler=scheduler)


def dit_call(model, x, t, ctx, **kwargs):
    """Our DiT called as pipelines call it (by keyword), from the (x, t, ctx) order the tests build inputs in."""
    return model(hidden_states=x, encoder_hidden_states=ctx, timestep=t, **kwargs)


def torch_out(model, *args, **kwargs) -> np.ndarray:
    with torch.no_grad():
        out = model(*args, return_dict=False, **kwargs)[0]
    return out.float().numpy()


def errors(ours, ref) -> tuple[float, float]:
    """(max-abs error, max-abs error relative to max |ref|)."""
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    err = float(np.abs(ours - ref).max())
    return err, err / max(float(np.abs(ref).max()), 1e-30)


def sta_token_mask(grid, tile, window) -> np.ndarray:
    """(L, L) bool from the STA definition: tiles of ``tile`` tokens, a query tile's window of ``window`` tiles
    centred on it and clamped inside the tile grid (even sizes cover w + 1 tiles, as FastVideo)."""
    coords = np.stack(np.unravel_index(np.arange(math.prod(grid)), grid), axis=1) // np.asarray(tile)  # (L, 3)
    allowed = np.ones((len(coords), len(coords)), bool)
    for d in range(3):
        n, half = -(-grid[d] // tile[d]), window[d] // 2
        centre = np.clip(coords[:, d], half, max(half, n - 1 - half)) if 2 * half < n else np.full(len(coords), -1)
        near = np.abs(centre[:, None] - coords[None, :, d]) <= half
        allowed &= near if 2 * half < n else True
    return allowed


# ---- VAE parity tests (Wan2.1, Wan2.2, HunyuanVideo): one noised oracle and the same inputs and error report ------

def noised_torch_vae(cls: type, preset: dict) -> torch.nn.Module:
    """``cls(**preset)`` (tuples as lists, as diffusers' configs hold them) from seed 0, in eval mode, with
    0.1 * N(0, 1) added to every parameter."""
    torch.manual_seed(0)
    model = cls(**{k: list(v) if isinstance(v, tuple) else v for k, v in preset.items()}).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


def uniform_video(seed: int, shape) -> np.ndarray:
    """A float32 video in [-1, 1] (the VAE's pixel range)."""
    return np.random.default_rng(seed).uniform(-1, 1, shape).astype(np.float32)


def normal_latents(seed: int, shape) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def error_report(got, ref) -> tuple[float, str]:
    """(max-abs error, "max-abs ..., relative ..." with the relative error in the Frobenius norm)."""
    got, ref = np.asarray(got, np.float32), np.asarray(ref, np.float32)
    assert got.shape == ref.shape, f"shape {got.shape} != reference {ref.shape}"
    err = float(np.abs(got - ref).max())
    rel = float(np.linalg.norm(got - ref) / max(np.linalg.norm(ref), 1e-12))
    return err, f"max-abs {err:.3e}, relative {rel:.3e}"


def vsa_cube_ids(grid) -> np.ndarray:
    """Cube id of every row-major token, from its (t, h, w) coordinates (4x4x4 cubes, row-major cube grid)."""
    T, H, W = grid
    t, h, w = np.meshgrid(np.arange(T), np.arange(H), np.arange(W), indexing="ij")
    nh, nw = -(-H // 4), -(-W // 4)
    return ((t // 4 * nh + h // 4) * nw + w // 4).reshape(-1)


def vsa_dense_oracle(q, k, v, gate, grid, sel, count):
    """Oracle: dense softmax under the token mask of the selection (query token i sees key token j iff j's cube is
    among the first ``count`` cubes listed for i's cube), plus the gated attention over cube means (means of the
    real tokens, found by coordinates)."""
    cube_np = vsa_cube_ids(grid)  # (L,)
    C, cube = int(cube_np.max()) + 1, jnp.asarray(cube_np)
    chosen = jnp.any(jax.nn.one_hot(sel[..., :count], C, dtype=bool), axis=-2)  # (B, N, C, C)
    mask = chosen[:, :, cube][:, :, :, cube]  # (B, N, L, L)
    scale = q.shape[-1] ** -0.5
    s = jnp.einsum("bqne,bkne->bnqk", q, k) * scale
    fine = jnp.einsum("bnqk,bkne->bqne", jax.nn.softmax(jnp.where(mask, s, -jnp.inf), axis=-1), v)
    member = jax.nn.one_hot(cube, C, dtype=jnp.float32)  # (L, C)
    mean = lambda x: jnp.einsum("blne,lc->bcne", x, member) / member.sum(0)[None, :, None, None]  # noqa: E731
    sc = jnp.einsum("bqne,bkne->bnqk", mean(q), mean(k)) * scale
    coarse = jnp.einsum("bnqk,bkne->bqne", jax.nn.softmax(sc, axis=-1), mean(v))[:, cube]  # per token
    return fine + (coarse if gate is None else gate * coarse)
