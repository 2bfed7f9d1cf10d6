"""Wan2.2 TI2V per-token timesteps (diffusers' ``expand_timesteps``): a (B, L) timestep embeds and modulates every
token and the output head on its own. Parity with diffusers on a tiny 48-channel TI2V-like DiT with noise on
every parameter, batch 2 with different per-token timesteps; the same under a sequence-split mesh with padding;
and the (B,) path is what a constant (B, L) gives."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from fastvideo_jax.models.dits.wanvideo import per_token_timesteps
from fastvideo_jax.models.loader.component_loader import TransformerLoader
from fastvideo_jax.parallel.mesh import MeshConfig, make_mesh
from tests.oracles import dit_call, errors, tiny_wan_dit, torch_out

TI2V = dict(in_channels=48, out_channels=48)  # the 5B's latent width; the rest is the tiny Wan


@pytest.fixture(scope="module")
def ti2v(tmp_path_factory):
    d = tmp_path_factory.mktemp("wan_ti2v")
    ref = tiny_wan_dit(d, seed=5, **TI2V)
    return ref, TransformerLoader().load(d, precision="fp32")


def _inputs(batch=2, frames=3, height=6, width=10, text_len=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 48, frames, height, width, generator=g)
    ctx = torch.randn(batch, text_len, 32, generator=g)
    L = frames * (height // 2) * (width // 2)
    per_frame = L // frames
    # sample 0: image-to-video's mask (first-frame tokens clean at 0, the rest at 700); sample 1: every token its own
    t0 = torch.cat([torch.zeros(per_frame), torch.full((L - per_frame,), 700.0)])
    t1 = torch.rand(L, generator=g) * 1000
    return x, torch.stack([t0, t1]), ctx


def _jx(*tensors):
    return [jnp.asarray(t.numpy()) for t in tensors]


@pytest.mark.parametrize("frames, height, width", [(3, 6, 10), (2, 4, 4), (1, 8, 6)])
def test_per_token_parity_fp32(ti2v, frames, height, width):
    ref_model, model = ti2v
    x, t, ctx = _inputs(frames=frames, height=height, width=width, seed=frames)
    assert t.shape == (2, frames * (height // 2) * (width // 2))
    ref = torch_out(ref_model, x, t, ctx)
    ours = np.asarray(dit_call(model, *_jx(x, t, ctx)))
    err, rel = errors(ours, ref)
    assert rel < 1e-4, f"max-abs {err:.3e}, relative {rel:.3e}"


def test_each_token_sees_its_own_timestep(ti2v):
    """Changing one sample's timestep on the first frame's tokens changes only that sample (the per-token
    modulation is not averaged or broadcast from another token or sample)."""
    _, model = ti2v
    x, t, ctx = _jx(*_inputs())
    base = np.asarray(dit_call(model, x, t, ctx))
    t2 = t.at[0, :15].set(999.0)
    moved = np.asarray(dit_call(model, x, t2, ctx))
    assert np.array_equal(moved[1], base[1])
    assert not np.allclose(moved[0], base[0])


def test_constant_per_token_equals_per_sample(ti2v):
    _, model = ti2v
    x, _, ctx = _jx(*_inputs())
    t = jnp.asarray([900.0, 35.0])
    per_sample = np.asarray(dit_call(model, x, t, ctx))
    per_token = np.asarray(dit_call(model, x, jnp.repeat(t[:, None], 3 * 3 * 5, axis=1), ctx))
    err, rel = errors(per_token, per_sample)
    assert rel < 1e-5, f"max-abs {err:.3e}, relative {rel:.3e}"


@pytest.mark.parametrize("mesh_config", [MeshConfig(sequence=8), MeshConfig(data=2, sequence=4)])
def test_per_token_on_a_sequence_mesh(mesh_config):
    """45 tokens over sp = 8 or 4: the timesteps are padded and split with the tokens; same output as one device."""
    from tests.test_parallel_dit import _model, _run_on

    model = _model(in_channels=48, out_channels=48)  # 8 heads (sp = 8 divides them), every parameter noised
    x, t, ctx = _jx(*_inputs())
    single = _run_on(model, None, (x, t, ctx))
    split = _run_on(model, make_mesh(mesh_config), (x, t, ctx))
    err, rel = errors(split, single)
    assert rel < 1e-5, f"{mesh_config}: max-abs {err:.3e}, relative {rel:.3e}"


@pytest.mark.parametrize("shape", [(2, 44), (2, 46), (1, 45), (2, 45, 1), (3,)])
def test_bad_timestep_shape(ti2v, shape):
    _, model = ti2v
    x, _, ctx = _jx(*_inputs())
    with pytest.raises(ValueError, match=r"timestep of shape .* expected \(\), \(2,\) or per token \(2, 45\)"):
        dit_call(model, x, jnp.zeros(shape), ctx)


@pytest.mark.parametrize("clean_first_frame", [False, True])
def test_per_token_timesteps_as_diffusers_builds_them(clean_first_frame):
    """diffusers' WanPipeline / WanImageToVideoPipeline with expand_timesteps: a latent-sized mask (first frame 0
    for image-to-video), subsampled to the patch grid, times t, flattened and expanded over the batch."""
    shape = (2, 48, 3, 6, 10)
    t = torch.tensor(757.25)
    mask = torch.ones(shape)
    if clean_first_frame:
        mask[:, :, 0] = 0
    ref = (mask[0][0][:, ::2, ::2] * t).flatten().unsqueeze(0).expand(shape[0], -1).numpy()
    ours = np.asarray(per_token_timesteps(jnp.float32(757.25), shape, clean_first_frame=clean_first_frame))
    np.testing.assert_array_equal(ours, ref)
    per_sample = np.asarray(per_token_timesteps(jnp.asarray([10.0, 20.0]), shape))
    np.testing.assert_array_equal(per_sample, np.repeat([[10.0], [20.0]], 45, axis=1))


@pytest.mark.parametrize("preset, image", [("tiny-ti2v", False), ("tiny-i2v", True), ("tiny-i2v-a14b", False)])
def test_tiny_layout_presets_load_and_run(tmp_path, preset, image):
    """The tiny twins of the Wan2.1 I2V / Wan2.2 TI2V / A14B-I2V layouts (for tiny pipelines) write, load and run,
    with the tiny CLIP vision width (24) as the I2V image input."""
    from fastvideo_jax.configs.models.dits.wanvideo import WAN_PRESETS
    from fastvideo_jax.testing.tiny_checkpoints import write_random_dit

    arch = WAN_PRESETS[preset]
    model = TransformerLoader().load(write_random_dit(tmp_path / preset, preset), precision="fp32")
    x = jnp.ones((1, arch["in_channels"], 2, 4, 4))
    kwargs = {"encoder_hidden_states_image": jnp.ones((1, 3, 24))} if image else {}
    out = dit_call(model, x, jnp.asarray([500.0]), jnp.ones((1, 5, 32)), **kwargs)
    assert out.shape == (1, arch["out_channels"], 2, 4, 4) and bool(jnp.isfinite(out).all())


def test_per_token_bf16_as_accurate_as_diffusers_bf16(tmp_path):
    """bf16 (8-bit mantissa) per-token run: no further from the fp32 reference than diffusers' own bf16 run (x1.5
    margin for rounding order, as the (B,) path's test) and within 2% of scale. The per-token embedding is cast
    to the text dtype and modulated in fp32, as the original."""
    from diffusers import WanTransformer3DModel

    ref_model = tiny_wan_dit(tmp_path, seed=9, **TI2V)
    model = TransformerLoader().load(tmp_path, precision="bf16")
    x, t, ctx = _inputs(seed=4)
    ref = torch_out(ref_model, x, t, ctx)
    torch_bf16 = WanTransformer3DModel.from_pretrained(tmp_path, torch_dtype=torch.bfloat16).eval()
    ref_bf16 = torch_out(torch_bf16, x.bfloat16(), t, ctx.bfloat16())
    ours = dit_call(model, jnp.asarray(x.numpy(), jnp.bfloat16), jnp.asarray(t.numpy()),
                    jnp.asarray(ctx.numpy(), jnp.bfloat16))
    assert ours.dtype == jnp.bfloat16
    err, rel = errors(np.asarray(ours.astype(jnp.float32)), ref)
    _, rel_torch = errors(ref_bf16, ref)
    assert rel < 2e-2 and rel <= 1.5 * rel_torch, f"ours bf16 rel {rel:.3e}; diffusers bf16 rel {rel_torch:.3e}"


def test_second_per_token_call_does_not_compile(ti2v, count_compiles):
    """New per-token timestep values with the same shapes reuse the executable (the step of a TI2V loop)."""
    _, model = ti2v
    x, t, ctx = _jx(*_inputs())
    t2 = jnp.asarray(np.asarray(t)[::-1].copy())  # built before counting: an eager op compiles too
    first = np.asarray(dit_call(model, x, t, ctx))
    with count_compiles() as compiles:
        second = np.asarray(dit_call(model, x, t2, ctx))
    assert compiles[0] == 0, f"a second per-token call with the same shapes compiled {compiles[0]} times"
    assert not np.array_equal(first, second)
