"""Parity of the NNX Wan VAE with diffusers' ``AutoencoderKLWan`` (PLAYBOOK step 5), loading and export.

A tiny diffusers model (conv shortcuts, spatial + temporal resampling) gets noise on every parameter (gammas
included), is saved, and is loaded through ``VAELoader``; encode and decode are compared on odd frame
counts, non-square sizes and batch 2, with and without spatial tiling.
"""

from __future__ import annotations

import shutil

import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
from tests.oracles import error_report, normal_latents, noised_torch_vae, uniform_video  # noqa: E402
from safetensors.numpy import load_file, save_file  # noqa: E402

from converters import ConversionError  # noqa: E402
from fastvideo_jax.configs.models.vaes.wanvae import WAN_VAE_PRESETS  # noqa: E402
from fastvideo_jax.models.loader.component_loader import VAELoader, export_component  # noqa: E402

TOL = 1e-4  # fp32, whole model
# Small tiles so tiling triggers on tiny inputs: 16x40 px (2x5 latents), strides 8x24 px (1x3 latents). The
# shapes are chosen so that full tiles reuse the compiled shapes of the untiled tests (compile time dominates).
TILES = dict(tile_sample_min_height=16, tile_sample_min_width=40, tile_sample_stride_height=8,
             tile_sample_stride_width=24)
SIZE = (16, 40)  # non-square, with an odd latent width: 40 -> 20 -> 10 -> 5
WEIGHTS = "diffusion_pytorch_model.safetensors"




@pytest.fixture(scope="module")
def torch_vae():
    return noised_torch_vae(diffusers.AutoencoderKLWan, WAN_VAE_PRESETS["tiny"])


@pytest.fixture(scope="module")
def ckpt_dir(torch_vae, tmp_path_factory):
    path = tmp_path_factory.mktemp("wan_vae")
    torch_vae.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def vae(ckpt_dir):
    return VAELoader().load(ckpt_dir, precision="fp32", **TILES)






@pytest.mark.parametrize("frames", [1, 5, 9, 17])
def test_encode_matches_diffusers(torch_vae, vae, frames):
    x = uniform_video(frames, (2, 3, frames, *SIZE))
    with torch.no_grad():
        dist = torch_vae.encode(torch.from_numpy(x)).latent_dist
    mean, logvar = vae.encode_distribution(x)
    err, msg = error_report(mean, dist.mean.numpy())
    assert err < TOL, f"encode mean, {frames} frames: {msg}"
    err, msg = error_report(logvar, dist.logvar.numpy())
    assert err < TOL, f"encode logvar, {frames} frames: {msg}"


@pytest.mark.parametrize("latent_frames", [1, 2, 3, 5])
def test_decode_matches_diffusers(torch_vae, vae, latent_frames):
    z = normal_latents(latent_frames, (2, 16, latent_frames, SIZE[0] // 8, SIZE[1] // 8))
    with torch.no_grad():
        ref = torch_vae.decode(torch.from_numpy(z)).sample.numpy()
    err, msg = error_report(vae.decode(z), ref)
    assert err < TOL, f"decode, {latent_frames} latent frames -> {ref.shape[2]} frames: {msg}"


def test_tiled_decode_matches_diffusers(torch_vae, vae):
    # A 3x3 grid of tiles, blended both ways. One latent frame: tiles reuse the time path tested above, and
    # full tiles then reuse the compiled (2, 16, 1, 2, 5) decode.
    z = normal_latents(7, (2, 16, 1, 3, 8))
    torch_vae.enable_tiling(**TILES)
    try:
        with torch.no_grad():
            ref = torch_vae.decode(torch.from_numpy(z)).sample.numpy()
    finally:
        torch_vae.use_tiling = False
    tiled = np.asarray(vae.decode(z, tiled=True))
    err, msg = error_report(tiled, ref)
    assert err < TOL, f"tiled decode vs diffusers tiled decode: {msg}"

    # Against the untiled decode. Tiles see zero padding at their borders and the mid-block attention is global
    # within each tile, so tiling changes the function; on random weights no small whole-frame tolerance is
    # justified. Exact where the two must agree: latents that fit one tile are not tiled, and the top-left
    # tile's kept (unblended) region is that tile's own untiled decode.
    small = z[..., :2, :5]
    err, msg = error_report(vae.decode(small, tiled=True), vae.decode(small, tiled=False))
    assert err == 0.0, f"latents within one tile, tiled=True vs untiled: {msg}"
    err, msg = error_report(tiled[..., :8, :24], np.asarray(vae.decode(small, tiled=False))[..., :8, :24])
    assert err == 0.0, f"tiled decode, unblended corner vs untiled decode of that tile: {msg}"
    # Whole frame (measured: relative 0.34 vs 0.52): closer to the untiled decode of the same latents than the
    # untiled decode of unrelated latents is.
    untiled = np.asarray(vae.decode(z, tiled=False))
    other = np.asarray(vae.decode(normal_latents(8, z.shape), tiled=False))
    rel = np.linalg.norm(tiled - untiled) / np.linalg.norm(untiled)
    rel_other = np.linalg.norm(other - untiled) / np.linalg.norm(untiled)
    assert rel < rel_other, f"tiled vs untiled: relative {rel:.3f}; unrelated latents: {rel_other:.3f}"


def test_tiled_encode_matches_diffusers(torch_vae, vae):
    x = uniform_video(9, (2, 3, 1, 8, 48))  # one tile row (8 px fit the row stride), two blended columns
    torch_vae.enable_tiling(**TILES)
    try:
        with torch.no_grad():
            ref = torch_vae.encode(torch.from_numpy(x)).latent_dist.mean.numpy()
    finally:
        torch_vae.use_tiling = False
    err, msg = error_report(vae.encode(x, tiled=True), ref)
    assert err < TOL, f"tiled encode vs diffusers tiled encode: {msg}"


def test_bf16_decode_as_accurate_as_diffusers_bf16(torch_vae, ckpt_dir):
    # bf16 has 8 mantissa bits; the justified bound is diffusers' own bf16 error against fp32.
    z = normal_latents(3, (1, 16, 2, 2, 3))
    with torch.no_grad():
        ref = torch_vae.decode(torch.from_numpy(z)).sample.numpy()
        tb16 = diffusers.AutoencoderKLWan.from_pretrained(ckpt_dir, torch_dtype=torch.bfloat16).eval()
        ref16 = tb16.decode(torch.from_numpy(z).bfloat16()).sample.float().numpy()
    ours = VAELoader().load(ckpt_dir, precision="bf16", load_encoder=False)
    got = np.asarray(ours.decode(z).astype(jnp.float32))
    ours_err, torch_err = np.abs(got - ref).mean(), np.abs(ref16 - ref).mean()
    assert ours_err <= 1.5 * torch_err, f"bf16 mean-abs error {ours_err:.3e}, diffusers bf16 {torch_err:.3e}"


def test_without_feature_cache_same_result(ckpt_dir, vae):
    z = normal_latents(11, (2, 16, 3, SIZE[0] // 8, SIZE[1] // 8))
    one_chunk = VAELoader().load(ckpt_dir, precision="fp32", use_feature_cache=False, load_encoder=False)
    err, msg = error_report(one_chunk.decode(z), vae.decode(z))
    assert err < 1e-5, f"decode with all frames after the first in one chunk vs per-frame scan: {msg}"


def test_export_round_trip(ckpt_dir, vae):
    exported = export_component(vae)
    original = load_file(str(ckpt_dir / WEIGHTS))
    assert sorted(exported) == sorted(original)
    for name, tensor in original.items():
        assert exported[name].shape == tensor.shape and np.array_equal(exported[name], tensor), name


def test_latent_normalisation_round_trip(vae):
    z = normal_latents(5, (1, 16, 2, 2, 3))
    mean = np.asarray(vae.config.latents_mean, np.float32)[None, :, None, None, None]
    std = np.asarray(vae.config.latents_std, np.float32)[None, :, None, None, None]
    np.testing.assert_allclose(vae.normalize_latents(z), (z - mean) / std, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(vae.denormalize_latents(vae.normalize_latents(z)), z, rtol=1e-5, atol=1e-5)


def test_wrong_frame_count_is_a_clear_error(vae):
    with pytest.raises(ValueError, match="got 4 frames"):
        vae.encode(np.zeros((1, 3, 4, 16, 16), np.float32))


def test_wrong_latent_channels_is_a_clear_error(vae):
    with pytest.raises(ValueError, match="expected 16 latent channels, got 8"):
        vae.decode(np.zeros((1, 8, 2, 2, 2), np.float32))


def test_renamed_checkpoint_key_is_named(ckpt_dir, tmp_path):
    tensors = load_file(str(ckpt_dir / WEIGHTS))
    key = "decoder.up_blocks.0.upsamplers.0.time_conv.weight"
    tensors["decoder.up_blocks.0.upsamplers.0.time_conv_renamed.weight"] = tensors.pop(key)
    save_file(tensors, str(tmp_path / WEIGHTS), metadata={"format": "pt"})
    shutil.copy(ckpt_dir / "config.json", tmp_path / "config.json")
    with pytest.raises(ConversionError) as info:
        VAELoader().load(tmp_path, precision="fp32")
    message = str(info.value)
    assert "time_conv_renamed.weight" in message  # the unexpected tensor
    assert "decoder.up_blocks.0.upsamplers.0.time_conv.kernel" in message  # the parameter left unfilled


def test_second_eager_decode_and_encode_do_not_compile(vae, count_compiles):
    z1, z2 = (jnp.asarray(normal_latents(s, (1, 16, 2, SIZE[0] // 8, SIZE[1] // 8))) for s in (11, 12))
    x1, x2 = (jnp.asarray(uniform_video(s, (1, 3, 5, *SIZE))) for s in (13, 14))
    first = (np.asarray(vae.decode(z1)), np.asarray(vae.encode(x1)))
    with count_compiles() as compiles:
        second = (np.asarray(vae.decode(z2)), np.asarray(vae.encode(x2)))
    assert compiles[0] == 0, f"second eager decode + encode with the same shapes compiled {compiles[0]} times"
    assert not np.array_equal(first[0], second[0]) and not np.array_equal(first[1], second[1])


@pytest.mark.parametrize("knob,expect", [(None, "HIGHEST"), ("default", "DEFAULT")])
def test_matmul_precision_knob_reaches_every_conv(ckpt_dir, matmul_precisions, knob, expect):
    vae = VAELoader().load(ckpt_dir, precision="fp32", matmul_precision=knob)
    z = jnp.asarray(normal_latents(1, (1, 16, 2, SIZE[0] // 8, SIZE[1] // 8)))
    found = matmul_precisions(vae.decode, z)
    names = set(found)
    assert len(found) >= 10 and names == {expect}, f"{len(found)} convs/matmuls at {names}, expected {expect}"
