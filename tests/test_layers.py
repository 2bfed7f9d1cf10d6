"""Shared layers against PyTorch and float64: activations, timestep embedding, RoPE tables."""

from __future__ import annotations

import math

import jax
import numpy as np
import torch

from fastvideo_jax.models.layers.activations import gelu_exact, gelu_tanh
from fastvideo_jax.models.layers.embeddings import rope_3d_tables, timestep_embedding


def _x(n=200_000, seed=0):
    return (np.random.default_rng(seed).standard_normal(n) * 3).astype(np.float32)


def test_gelu_tanh_as_accurate_as_torch():
    x = _x()
    x64 = x.astype(np.float64)
    exact = 0.5 * x64 * (1 + np.tanh(math.sqrt(2 / math.pi) * (x64 + 0.044715 * x64**3)))
    ours = np.asarray(jax.jit(gelu_tanh)(x), np.float64)
    ref = torch.nn.functional.gelu(torch.from_numpy(x), approximate="tanh").double().numpy()
    err, torch_err = np.abs(ours - exact).max(), np.abs(ref - exact).max()
    assert err < 1e-6 and err <= 2 * torch_err, f"gelu_tanh max-abs {err:.3e} (PyTorch {torch_err:.3e})"
    assert np.abs(ours - ref).max() < 1e-6


def test_gelu_exact_matches_torch():
    x = _x(seed=1)
    ours = np.asarray(jax.jit(gelu_exact)(x))
    ref = torch.nn.functional.gelu(torch.from_numpy(x)).numpy()
    assert np.abs(ours - ref).max() < 1e-5  # simple-module bound (measured 1.2e-6: one ulp at |x| ~ 10)


def test_timestep_embedding_matches_diffusers():
    """sin/cos of t*f for t up to 999: one fp32 ulp of a frequency f (exp rounds differently in XLA and
    PyTorch) moves t*f by up to 6e-5, so we require ours to be as close to the float64 result as diffusers
    is (x2), and within 1e-4 of diffusers."""
    from diffusers.models.embeddings import get_timestep_embedding

    t = np.array([0.0, 1.0, 250.0, 999.0], np.float32)
    ours = np.asarray(timestep_embedding(t, 256), np.float64)
    ref = get_timestep_embedding(torch.from_numpy(t), 256, flip_sin_to_cos=True, downscale_freq_shift=0)
    ref = ref.double().numpy()
    args = t.astype(np.float64)[:, None] * np.exp(-math.log(10000) * np.arange(128) / 128)[None, :]
    exact = np.concatenate([np.cos(args), np.sin(args)], axis=-1)
    err, ref_err = np.abs(ours - exact).max(), np.abs(ref - exact).max()
    assert err <= 2 * ref_err + 1e-6, f"ours {err:.3e} from float64, diffusers {ref_err:.3e}"
    assert np.abs(ours - ref).max() < 1e-4


def test_rope_tables_match_diffusers():
    from diffusers.models.transformers.transformer_wan import WanRotaryPosEmbed

    head_dim, grid = 24, (3, 4, 5)
    rope = WanRotaryPosEmbed(head_dim, (1, 2, 2), 32)
    cos_ref, sin_ref = rope(torch.zeros(1, 1, grid[0], grid[1] * 2, grid[2] * 2))
    cos, sin = rope_3d_tables(head_dim, grid, 32)
    # diffusers repeats each pair's value twice along the head dim; we keep one per pair.
    np.testing.assert_array_equal(np.asarray(cos), cos_ref[0, :, 0, 0::2].numpy())
    np.testing.assert_array_equal(np.asarray(sin), sin_ref[0, :, 0, 1::2].numpy())
